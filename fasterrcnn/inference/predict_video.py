"""``fasterrcnn predict`` on a video file, a camera or a stream: per-frame results and an annotated video.

Writes, under the output folder, for a source named NAME (a file's stem, ``camera0``, a stream's host):
    NAME.json    {"video", "width", "height", "fps", "stride", "categories": [{id, name}],
                  "frames": [{"frame", "time", "boxes" [[x1, y1, x2, y2]], "labels", "names", "scores"}, ...],
                  "frames_processed", "frames_decoded", "frames_dropped", "error", "end", "partial"}
                 one record per processed frame (frame: its index in the source, counting every frame;
                 time: seconds from the start), streamed to a temporary file and renamed into place at the end,
                 so memory stays flat over hours of video
    NAME.mp4     the frames with their detections drawn (the drawing predict makes for images), same size,
                 H.264; the source's frame rate, divided by ``stride`` (every processed frame once: the
                 video lasts as long as the source). Not written with ``draw=False``.

Three threads share the work: one decodes (video_source.FrameReader), this one runs the model on batches
of frames and draws, one encodes (video_writer.VideoWriter). ``end`` says how it ended: "finished",
"max_frames", "error" (the frames before the damage are kept, ``error`` says where), "interrupted"
(Ctrl-C; the usual end of a camera or stream, whose files are then complete) or "window closed" (--show).
A file interrupted part-way says ``"partial": true``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.video_source import FrameReader, VideoFrame
from ..data.video_writer import VideoWriter
from ..engine.progress import Progress
from ..viz.detections import draw_detections
from .detector import Detections, Detector, detect_frames
from .predict_files import JsonArrayWriter

log = logging.getLogger("fasterrcnn")


@dataclass
class VideoSummary:
    source: str
    json_path: Path
    video_path: Path | None
    frames: int  # frames run through the model
    detections: int
    seconds: float
    decoded: int = 0
    dropped: int = 0
    error: str | None = None
    end: str = "finished"

    @property
    def fps(self) -> float:
        return self.frames / max(self.seconds, 1e-9)


def frame_record(frame: VideoFrame, dets: Detections) -> dict:
    return {
        "frame": frame.index,
        "time": round(frame.time, 4),
        "boxes": [[round(v, 2) for v in box] for box in dets.boxes.tolist()],
        "labels": [int(v) for v in dets.labels.tolist()],
        "names": list(dets.names),
        "scores": [round(v, 5) for v in dets.scores.tolist()],
    }


def video_outputs(out_dir: Path, name: str) -> tuple[Path, Path]:
    """(NAME.json, NAME.mp4) under ``out_dir``."""
    return out_dir / f"{name}.json", out_dir / f"{name}.mp4"


def predict_video(
    detector: Detector,
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    name: str | None = None,
    batch_size: int = 1,
    stride: int = 1,
    max_frames: int | None = None,
    draw: bool = True,
    show: bool = False,
    show_progress: bool = True,
) -> VideoSummary:
    """Run ``detector`` over the frames of ``source`` (a file, a camera index, a stream URL) and write
    NAME.json and NAME.mp4 under ``out_dir`` (the module docstring). A source that cannot be opened is a
    VideoError before anything is written; one that breaks part-way keeps its frames and says so in the
    summary's ``error``."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reader = FrameReader(source, stride=stride, max_frames=max_frames, queue_size=max(8, 2 * batch_size))
    name = name or reader.name
    json_path, video_path = video_outputs(out_dir, name)
    json_path.parent.mkdir(parents=True, exist_ok=True)  # a video in a sub-folder keeps its relative name
    window = None
    if show:
        from ..viz.live import LiveWindow

        window, why_not = LiveWindow.open(f"fasterrcnn: {name}")
        if window is None:
            log.warning("--show: %s; the annotated frames are only written", why_not)
    categories = detector.categories()
    head = {
        "video": os.fspath(source),
        "width": reader.width,
        "height": reader.height,
        "fps": round(reader.fps, 4),
        "stride": stride,
        "categories": categories,
    }
    records = JsonArrayWriter(json_path, prefix=json.dumps(head)[:-1] + ', "frames": [')
    try:
        writer = (
            VideoWriter(video_path, width=reader.width, height=reader.height, fps=reader.frame_rate / stride)
            if draw
            else None
        )
    except BaseException:
        records.abort()
        reader.close()
        raise
    progress = Progress(
        total=reader.total,  # type: ignore[arg-type]  # None: a stream of unknown length (tqdm counts up)
        desc=name,
        unit="frame",
        enabled=show_progress,
        every=max(1, (reader.total or 2000) // 20),
    )
    detections, end, interrupted = 0, "finished", None
    try:
        for frame, dets in detect_frames(detector, reader, batch_size):
            records.write(frame_record(frame, dets))
            detections += len(dets)
            if writer is not None or window is not None:
                drawn = draw_detections(Image.fromarray(frame.image), dets.boxes, dets.labels, dets.names, dets.scores)
                if writer is not None:
                    writer.write(np.asarray(drawn))
                if window is not None and not window.show(drawn):
                    end = "window closed"
                    break
            progress.update(1, fps=f"{records.count / max(time.perf_counter() - start, 1e-9):.1f}")
    except KeyboardInterrupt as e:  # the usual end of a live source; a file's results so far are kept too
        end, interrupted = "interrupted", e
    except BaseException:
        progress.close()
        reader.close()
        records.close(suffix=_tail(records.count, reader, "failed", partial=True))
        if writer is not None:
            with contextlib.suppress(Exception):  # the frames so far, playable; the error raised is the first one
                writer.close()
        raise
    finally:
        if window is not None:
            window.close()
    progress.close()
    reader.close()
    if end == "finished" and reader.error:
        end = "error"
    elif end == "finished" and max_frames is not None and reader.kept >= max_frames:
        end = "max_frames"
    partial = end == "interrupted" and not reader.live
    records.close(suffix=_tail(records.count, reader, end, partial=partial))
    if writer is not None:
        writer.close()
    seconds = time.perf_counter() - start
    if interrupted is not None and partial:
        log.warning(
            'predict stopped at frame %d of %s: the results so far are in %s ("partial": true)',
            reader.decoded,
            source,
            json_path,
        )
        raise interrupted
    if reader.dropped:
        log.warning(
            "%s: %d frames dropped because the model was slower than the source (the newest frame is always taken)",
            source,
            reader.dropped,
        )
    return VideoSummary(
        os.fspath(source),
        json_path,
        video_path if writer is not None else None,
        records.count,
        detections,
        seconds,
        decoded=reader.decoded,
        dropped=reader.dropped,
        error=reader.error,
        end=end,
    )


def _tail(processed: int, reader: FrameReader, end: str, *, partial: bool) -> str:
    tail = {
        "frames_processed": processed,
        "frames_decoded": reader.decoded,
        "frames_dropped": reader.dropped,
        "error": reader.error,
        "end": end,
        "partial": partial,
    }
    return "], " + json.dumps(tail)[1:]
