"""Frames from a video file, a camera or a network stream, decoded in a background thread.

    reader = FrameReader("clip.mp4", stride=2, max_frames=100)   # or "0" (first camera), "rtsp://host/cam"
    for frame in reader:                                         # VideoFrame(index, time, image [H, W, 3] uint8 RGB)
        ...
    reader.error        # None, or what stopped the decoding early (a damaged or truncated file), named

Decoding is PyAV (FFmpeg's libraries in a wheel, codecs inside: H.264, HEVC, VP8/9, AV1, MPEG-4, MJPEG ...),
the optional ``video`` extra. A thread decodes while the model runs: FFmpeg works without the GIL, so on
two cores decoding costs the model little. A file is read whole, in order: the thread waits when the
model is behind. A live source (camera, stream) is not: when the model falls behind, the oldest
waiting frame is dropped (counted in ``reader.dropped``), so what is shown and written stays current
instead of lagging further every second.

``stride`` K keeps frames 0, K, 2K, ... (the others are decoded, as H.264 needs, but not converted);
``max_frames`` stops after that many kept frames. A file that ends in damage keeps the frames decoded
before it and says where it stopped in ``reader.error``; one that ends silently short of its declared
length (a cut-off download) is reported the same way.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import re
import sys
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from .report import DataError

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".wmv", ".flv", ".3gp")
STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "rtmps://", "http://", "https://", "udp://", "tcp://", "srt://")
_DEFAULT_FPS = 30.0  # a stream that states no frame rate


class VideoError(DataError):
    """A video that cannot be opened or read, or a camera that cannot be opened; the message names it."""


def import_av():
    """PyAV, or an error that says how to install it."""
    try:
        import av
    except ImportError:
        raise VideoError(
            "video needs PyAV (FFmpeg in a wheel): pip install 'fasterrcnn[video]' (or pip install av)"
        ) from None
    return av


def is_video_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def _is_camera_index(text: str) -> bool:
    """ "0", "1", ...: a camera, unless a file has that name."""
    return bool(re.fullmatch(r"\d+", text)) and not os.path.exists(text)


def is_live_source(source: str | os.PathLike) -> bool:
    """A camera index ("0", "1", ...; when no file has that name), a /dev/video* device or a stream URL."""
    text = os.fspath(source)
    if _is_camera_index(text):
        return True
    return text.startswith("/dev/video") or text.lower().startswith(STREAM_SCHEMES)


def source_name(source: str | os.PathLike) -> str:
    """A short name for outputs: the file's stem, ``camera0``, or the stream URL's host and path made file-safe."""
    text = os.fspath(source)
    if _is_camera_index(text):
        return f"camera{text}"
    if text.startswith("/dev/video"):
        return "camera" + text[len("/dev/video") :]
    if text.lower().startswith(STREAM_SCHEMES):
        rest = text.split("://", 1)[1].split("?", 1)[0].split("@")[-1]  # no credentials in a file name
        return re.sub(r"[^A-Za-z0-9._-]+", "_", rest).strip("_.") or "stream"
    return Path(text).stem


def _camera(index: str) -> tuple[str, str | None]:
    """(what FFmpeg opens, its input format) for camera ``index`` on this platform."""
    if sys.platform.startswith("linux"):
        return f"/dev/video{index}", "v4l2"
    if sys.platform == "darwin":
        return index, "avfoundation"
    raise VideoError(
        f"camera {index}: cameras are opened by index on Linux and macOS only; on Windows pass the "
        "camera as a DirectShow name (video=NAME) or a stream URL"
    )


@dataclass
class VideoFrame:
    """One decoded frame: its index in the source (0-based, counting every frame), its time in seconds
    from the start, and the picture, [H, W, 3] uint8 RGB."""

    index: int
    time: float
    image: np.ndarray


_END = object()


class FrameReader:
    """The frames of ``source`` (a video file, a camera index, a /dev/video device or a stream URL), decoded
    by a background thread; iterate once. Opening happens here, so a missing file, a file that is no
    video and a camera that cannot be opened are a ``VideoError`` naming the source before any work.

    Attributes after opening: ``width``, ``height`` (of the frames as yielded: upright, see ``rotation``),
    ``fps`` (the source's frame rate, 30 if it states none), ``live``, ``total`` (frames that will be kept,
    when the file states its length; else None), ``rotation`` (quarter turns counter-clockwise applied to
    each frame, from the display rotation the file states: a phone's portrait video stands upright).
    After iterating: ``decoded`` (frames decoded), ``kept``, ``dropped`` (live sources only), ``error``."""

    def __init__(
        self,
        source: str | os.PathLike,
        *,
        stride: int = 1,
        max_frames: int | None = None,
        queue_size: int = 8,
        live: bool | None = None,
    ):
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be a whole number >= 1 (keep every stride-th frame), got {stride!r}")
        if max_frames is not None and (
            isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1
        ):
            raise ValueError(f"max_frames must be a whole number >= 1 or None, got {max_frames!r}")
        av = import_av()
        self.source = os.fspath(source)
        self.name = source_name(source)
        self.live = is_live_source(source) if live is None else live
        self.stride, self.max_frames = stride, max_frames
        self.decoded = self.kept = self.dropped = 0
        self.error: str | None = None
        self._container = self._open(av)
        stream = self._container.streams.video[0]
        stream.thread_type = "AUTO"  # frame and slice threads: FFmpeg's own, outside the GIL
        self._stream = stream
        self._frames = self._container.decode(stream)
        self._first = self._first_frame()
        # a phone's portrait clip is stored landscape with a display rotation: turned upright, as the EXIF
        # orientation of a photo is (the rotation FFmpeg states, counter-clockwise, in quarter turns)
        self.rotation = int(round((getattr(self._first, "rotation", 0) or 0) / 90)) % 4
        width, height = int(self._first.width), int(self._first.height)
        self.width, self.height = (height, width) if self.rotation % 2 else (width, height)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        self.fps = float(rate) if rate else _DEFAULT_FPS
        self.frame_rate = Fraction(rate).limit_denominator(100000) if rate else Fraction(int(_DEFAULT_FPS))
        declared = int(stream.frames or 0)
        self.declared_frames = declared or None
        total = None if self.live or not declared else -(-declared // stride)
        self.total = min(total, max_frames) if total is not None and max_frames else total
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_time = -1.0

    def _open(self, av):
        target, fmt = self.source, None
        options: dict[str, str] = {}
        if _is_camera_index(self.source):
            target, fmt = _camera(self.source)
        elif self.source.startswith("/dev/video"):
            fmt = "v4l2"
        elif self.source.lower().startswith(("rtsp://", "rtsps://")):
            options = {"rtsp_transport": "tcp"}  # no lost UDP packets smearing the picture
        elif not self.live and not os.path.isfile(self.source):
            raise VideoError(f"{self.source}: no such video file")
        what = "camera" if fmt in ("v4l2", "avfoundation") else "stream" if self.live else "video"
        label = f"camera {self.source} ({target})" if what == "camera" and target != self.source else self.source
        try:
            container = av.open(target, format=fmt, options=options, timeout=10.0 if self.live else None)
        except av.error.FFmpegError as e:
            hint = (
                "; is a camera connected, and free (no other program using it)?"
                if what == "camera"
                else "; is the address right and the stream up?"
                if what == "stream"
                else ""
            )
            raise VideoError(f"{label}: cannot open this {what} ({_reason(e)}){hint}") from None
        if not container.streams.video:
            container.close()
            raise VideoError(f"{self.source}: no video stream in this file")
        return container

    def _first_frame(self):
        """The first frame, decoded now: its size and rotation are the video's, and a file FFmpeg opens but
        cannot decode (or holding no frame) is refused here, before any output is made."""
        try:
            first = next(self._frames, None)
        except Exception as e:
            self._container.close()
            raise VideoError(f"{self.source}: no frame could be decoded ({_reason(e)})") from None
        if first is None:
            self._container.close()
            raise VideoError(f"{self.source}: the video holds no frame that can be decoded (empty, or cut off early)")
        return first

    def _picture(self, frame) -> np.ndarray:
        image = frame.to_ndarray(format="rgb24")
        return np.ascontiguousarray(np.rot90(image, self.rotation)) if self.rotation else image

    # ---- the decoding thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            for frame in itertools.chain([self._first], self._frames):
                if self._stop.is_set():
                    return
                index = self.decoded
                self.decoded += 1
                if index % self.stride:
                    continue
                time = float(frame.time) if frame.time is not None else index / self.fps
                self._last_time = time
                item = VideoFrame(index, time, self._picture(frame))
                self._put(item)
                self.kept += 1
                if self.max_frames is not None and self.kept >= self.max_frames:
                    return
            self._check_length()
        except Exception as e:  # FFmpeg's errors, or a frame it could not convert: keep what came before
            self.error = (
                f"{self.source}: the video is damaged or cut off after frame {self.decoded - 1}"
                f" ({self.decoded} frames decoded; {_reason(e)})"
            )
        finally:
            self._put(_END, force=True)

    def _put(self, item, force: bool = False) -> None:
        if self.live and not force:
            while True:  # never wait on a camera: drop the oldest frame waiting instead
                try:
                    self._queue.put_nowait(item)
                    return
                except queue.Full:
                    try:
                        self._queue.get_nowait()
                        self.dropped += 1
                    except queue.Empty:
                        pass
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                if force:  # the reader has gone (stopped): make room for the end marker
                    with contextlib.suppress(queue.Empty):
                        self._queue.get_nowait()

    def _check_length(self) -> None:
        """A file that ended without an error but short of the length it states (frames, or duration for a
        file with one stream) was cut off: say so."""
        if self.live:
            return
        if self.declared_frames and self.decoded < self.declared_frames:
            self.error = (
                f"{self.source}: the video ends early (damaged or cut off): {self.decoded} of the "
                f"{self.declared_frames} frames it states could be decoded"
            )
            return
        duration = self._container.duration  # microseconds, from the header
        if duration and len(self._container.streams) == 1 and self.decoded:
            stated = duration / 1e6
            start = self._stream.start_time * self._stream.time_base if self._stream.start_time else 0.0
            last = self._end_time - float(start)
            if last + 1.0 / self.fps < stated - max(2.0 / self.fps, 0.05):
                self.error = (
                    f"{self.source}: the video ends early (damaged or cut off): at {last:.2f} s of the {stated:.2f} s "
                    f"it states ({self.decoded} frames decoded)"
                )

    @property
    def _end_time(self) -> float:
        return self._last_time if self.stride == 1 else self._last_time + (self.decoded - 1) % self.stride / self.fps

    # ---- iteration --------------------------------------------------------------------------------------

    def __iter__(self):
        if self._thread is not None:
            raise RuntimeError("a FrameReader is iterated once")
        self._thread = threading.Thread(target=self._run, name="fasterrcnn-decode", daemon=True)
        self._thread.start()
        try:
            while True:
                item = self._queue.get()
                if item is _END:
                    return
                yield item
        finally:
            self.close()

    def close(self) -> None:
        """Stop decoding and release the file or device (also when iteration ends or is abandoned)."""
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            while self._thread.is_alive():  # unblock a waiting put, then let the thread see the stop
                with contextlib.suppress(queue.Empty):
                    self._queue.get_nowait()
                self._thread.join(timeout=0.05)
        self._container.close()

    def __enter__(self) -> FrameReader:
        return self

    def __exit__(self, *_) -> None:
        self.close()


def _reason(error: BaseException) -> str:
    """FFmpeg's words for an error, without PyAV's errno prefix."""
    text = getattr(error, "strerror", None) or str(error)
    return str(text).strip()
