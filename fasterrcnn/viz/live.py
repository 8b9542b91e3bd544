"""A window that shows frames as they come (``fasterrcnn predict --show``), through matplotlib.

    window, why_not = LiveWindow.open("camera0")
    if window is None: print(why_not)          # no display, or no interactive backend
    window.show(image)                          # a PIL image or [H, W, 3] uint8; False once the user closed it

matplotlib is already a dependency and opens a window with whatever GUI toolkit the machine has (Tk, Qt,
GTK); nothing else to install. On a machine without a display (a server, CI) ``open`` says why and
returns no window: the caller then only writes the frames.
"""

from __future__ import annotations

import os
import sys

import numpy as np

_INTERACTIVE = ("TkAgg", "QtAgg", "GTK4Agg", "GTK3Agg", "MacOSX", "WXAgg")


class LiveWindow:
    def __init__(self, plt, title: str):
        self._plt = plt
        self.fig, self.ax = plt.subplots(num=title)
        self.ax.set_axis_off()
        self.fig.subplots_adjust(0, 0, 1, 1)
        self._image = None
        plt.show(block=False)

    @classmethod
    def open(cls, title: str) -> tuple[LiveWindow | None, str | None]:
        """(a window, None), or (None, the reason there is none)."""
        if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            return None, "no display here (DISPLAY is not set)"
        import matplotlib.pyplot as plt

        errors = []
        for backend in _INTERACTIVE:
            try:
                plt.switch_backend(backend)
                return cls(plt, title), None
            except Exception as e:  # no such toolkit here, or it cannot reach the display
                errors.append(f"{backend}: {type(e).__name__}")
        return None, "matplotlib found no GUI toolkit that opens a window here (" + ", ".join(errors) + ")"

    def show(self, image) -> bool:
        """Show ``image``; False when the user has closed the window (the caller may stop then)."""
        if not self._plt.fignum_exists(self.fig.number):
            return False
        array = np.asarray(image)
        if self._image is None or self._image.get_array().shape != array.shape:
            self.ax.clear()
            self.ax.set_axis_off()
            self._image = self.ax.imshow(array)
        else:
            self._image.set_data(array)
        self.fig.canvas.draw_idle()
        self.fig.canvas.flush_events()
        return True

    def close(self) -> None:
        self._plt.close(self.fig)
