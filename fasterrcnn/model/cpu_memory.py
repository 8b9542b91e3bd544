"""Freed feature maps kept for the next image: no page faults in CPU inference.

    keep_freed_memory()    glibc's malloc told to serve large blocks from its heap and to keep what is
                           freed (process-wide); True when it took effect

Why: PyTorch's CPU tensors come from malloc. glibc hands every block above its mmap threshold (128 KiB at
start, adapting up to 32 MiB) to the kernel on free, so the next image's feature maps are fresh pages: the
kernel zeroes each 4 KiB page at its first touch. For R50-FPN at 800x1066 that is ~47,000 page faults per
image in bfloat16 (185 MB) and ~160,000 in float32, 20% of the bf16 inference time on this machine
(docs/design-decisions.md, issue 16). Runtimes built for inference (OpenVINO, ONNX Runtime) keep their own
memory pools; this is the same for our eager path: blocks up to 256 MiB come from the heap, and up to 1 GiB
of freed heap is kept, so after the first few images (glibc's alignment padding can make the first freed
block miss the next request) the maps reuse the pages of earlier ones.

The cost: the process keeps its peak memory after an inference (the peak itself is unchanged). It is
process-wide, so ``FasterRCNN.optimize_for_inference`` applies it only for a model on the CPU and takes
``reuse_memory=False``. Elsewhere than glibc (macOS, Windows, musl) it does nothing and returns False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters (glibc's malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 * 2**20
TRIM_THRESHOLD = 2**30

_applied = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (once per process); False where malloc is not glibc's."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  # glibc only (musl has mallopt as a stub)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
