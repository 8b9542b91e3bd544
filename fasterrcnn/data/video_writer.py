"""An annotated video written as it is made: RGB frames in, an mp4 file out, encoded in a background thread.

    with VideoWriter("out/clip.mp4", width=640, height=480, fps=Fraction(30)) as writer:
        writer.write(image)        # [H, W, 3] uint8 RGB, the size given

H.264 (libx264, in PyAV's wheel) in an mp4, the format every player and browser reads; yuv420p, or yuv444p
when a side is odd (4:2:0 needs even sides, and the video keeps the source's exact size). MPEG-4 part 2
when this FFmpeg has no H.264 encoder. Encoding runs in a thread (FFmpeg encodes outside the GIL), so
the model does not wait for it. The file is written under a temporary name and renamed into place by
``close()``: a crash never leaves a half-written file under the final name; ``close(keep=False)`` (or an
exception inside ``with``) removes it.
"""

from __future__ import annotations

import os
import queue
import threading
from fractions import Fraction
from pathlib import Path

import numpy as np

from .video_source import VideoError, import_av

_END = object()


def video_codec(av) -> str:
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


class VideoWriter:
    def __init__(self, path: str | os.PathLike, *, width: int, height: int, fps: Fraction | float, queue_size: int = 8):
        av = import_av()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.partial.mp4")
        self.width, self.height = int(width), int(height)
        self.frames = 0
        rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(100000)
        self.codec = video_codec(av)
        self._container = av.open(str(self.tmp), mode="w", format="mp4")
        stream = self._container.add_stream(self.codec, rate=rate)
        stream.width, stream.height = self.width, self.height
        odd = self.width % 2 or self.height % 2
        stream.pix_fmt = "yuv444p" if odd and self.codec == "libx264" else "yuv420p"
        if self.codec == "libx264":
            # one encoding thread on a small machine: the model has the cores (x264's own threads cost 30% more
            # CPU for the same frames: 5.1 against 3.9 ms a 640x480 frame); FFmpeg's choice on a larger one
            threads = "1" if (os.cpu_count() or 1) <= 4 else "0"
            stream.options = {"preset": "veryfast", "crf": "23", "threads": threads}
        elif odd:
            self._container.close()
            os.unlink(self.tmp)
            raise VideoError(f"{self.path}: this FFmpeg has no H.264 encoder, and MPEG-4 needs even sides")
        self._stream = stream
        self._av = av
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fasterrcnn-encode", daemon=True)
        self._thread.start()

    def write(self, image: np.ndarray) -> None:
        """Queue one frame ([H, W, 3] uint8 RGB at the writer's size) for encoding."""
        if image.shape != (self.height, self.width, 3) or image.dtype != np.uint8:
            raise ValueError(
                f"{self.path}: frames must be [{self.height}, {self.width}, 3] uint8, got "
                f"{list(image.shape)} {image.dtype}"
            )
        if self.error is not None:
            raise VideoError(f"{self.path}: encoding failed ({self.error})") from self.error
        self._queue.put(image)
        self.frames += 1

    def _run(self) -> None:
        try:
            while True:
                image = self._queue.get()
                if image is _END:
                    break
                frame = self._av.VideoFrame.from_ndarray(image, format="rgb24")
                for packet in self._stream.encode(frame):
                    self._container.mux(packet)
            for packet in self._stream.encode():  # the frames the encoder still holds
                self._container.mux(packet)
        except Exception as e:  # a full disk, an encoder error: reported by write() and close()
            self.error = e
            while self._queue.get() is not _END:  # let write() and close() go on
                pass

    def close(self, keep: bool = True) -> None:
        """Finish encoding and put the file in place (``keep``), or remove it."""
        if self._thread.is_alive():
            self._queue.put(_END)
            self._thread.join()
        self._container.close()
        if keep and self.error is None:
            os.replace(self.tmp, self.path)
        elif os.path.exists(self.tmp):
            os.unlink(self.tmp)
        if keep and self.error is not None:
            raise VideoError(f"{self.path}: encoding failed ({self.error})") from self.error

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.close(keep=exc_type is None)
