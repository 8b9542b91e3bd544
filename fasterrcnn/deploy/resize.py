"""The eager transform's resize, reproduced to the pixel inside an exported graph.

The eager model (as torchvision's) resizes a side to ``floor(side * scale)`` with ``scale = min(min_size /
short, max_size / long)`` in double precision, and ``F.interpolate`` resamples to that size. Double rounding
makes this one pixel less than the exact value for some sizes: a side of 97 at min_size 800 becomes 799
(``97 * (800 / 97) = 799.9999999999999``), a 196x245 image at 256/320 becomes 255x320. A one-pixel
difference moves every sampling point of the resize, and on the demo model such images kept only 7% of the
eager model's detections at the agreement criterion. The graph must reproduce the double arithmetic, and
not every runtime computes in double (OpenVINO's CPU plugin runs float64 as float32), so it is done in
integers:

- ``floor(side * fl(n / d))`` differs from the exact ``side * n // d`` only when ``side * n / d`` is a whole
  number k and ``fl(n / d)`` lies below ``n / d`` by ``eps``; then the product ``k - side * eps`` rounds below
  k (to the double below, ``u`` lower) exactly when ``2 * side * eps > u`` (a tie goes to k, whose mantissa
  is even). With ``eps = P_d / (d * 2^(52 - L_d))``, ``L_d = floor(log2(n / d))``, and ``u = 2^(floor(log2 k)
  - 52)`` (half that when k is a power of two), the condition is the integer comparison
  ``4 * side * P_d > d * 2^(floor(log2 k) - L_d + 1 - [k is a power of two])``.
- ``P_d`` and ``L_d`` are tables over d, computed once with exact fractions (``rounding_tables``).
- Which scale is smaller is decided exactly (``n1 * long <= n2 * short``): two rationals that compare one
  way round to doubles that do not compare the other way, and equal rationals round to the same double.
Checked against the eager transform's arithmetic on every size in tests/deploy/test_graph.py and test_runtime_ops.py.

The corrected size is a tensor (it depends on a table lookup), so the resampling cannot be a resize to a
shape. The image is resampled into the canvas padded for the exact size, with the eager kernel's own
formulas (``F.interpolate(mode="bilinear", align_corners=False)``: source ``scale * (i + 0.5) - 0.5`` in
float32, clamped at 0, weights ``(1 - l, l)``, columns then rows), and rows and columns past the eager size
are zero, as the eager model's padding. The one case left different: when the exact size is one more than
a multiple of 32 and the eager size is one less, the eager batch is 32 pixels smaller (not met at the
builders' min sizes, which are multiples of 32).
"""

import math
from fractions import Fraction

import torch
from torch import Tensor, nn

# sides up to this many pixels get the correction (a larger side: the exact size)
TABLE_LIMIT = 16384


def rounding_tables(n: int, limit: int = TABLE_LIMIT) -> tuple[Tensor, Tensor]:
    """``(P, L)``, int64 ``[limit + 1]``: for each ``d``, ``P[d] = (n/d - fl(n/d)) * d * 2^(52 - L[d])`` when
    the double ``fl(n/d)`` lies below ``n/d`` (else 0), and ``L[d] = floor(log2(n / d))``."""
    p = torch.zeros(limit + 1, dtype=torch.int64)
    low = torch.zeros(limit + 1, dtype=torch.int64)
    for d in range(1, limit + 1):
        q = Fraction(n, d)
        level = math.floor(math.log2(n / d))
        while Fraction(2) ** level > q:
            level -= 1
        while Fraction(2) ** (level + 1) <= q:
            level += 1
        low[d] = level
        eps = q - Fraction(n / d)  # Python's float division is the correctly rounded double
        if eps > 0:
            p[d] = int(eps * d * Fraction(2) ** (52 - level))
    return p, low


def floor_divide(a: Tensor, b: Tensor) -> Tensor:
    """``a // b`` for non-negative int64 tensors, exact under every runtime: exporters turn an integer floor
    division into float32 Cast -> Div -> Floor, and OpenVINO's division is not correctly rounded (427 * 800 /
    427 gave 799.99994 -> 799), nor is any float32 quotient past 2^24. The float quotient is off by at most
    one here; the integer remainder corrects it."""
    k = torch.div(a, b, rounding_mode="floor")
    r = a - k * b
    k = torch.where(r < 0, k - 1, k)
    return torch.where(a - k * b >= b, k + 1, k)


class EagerResize(nn.Module):
    """``forward(x [N, C, H, W]) -> (canvas [N, C, Hp, Wp], h, w)``: x resampled to the eager transform's size
    ``(h, w)`` (0-d int64 tensors) at the top left of a zero canvas padded to a multiple of ``size_divisible``."""

    p_min: Tensor
    l_min: Tensor
    p_max: Tensor
    l_max: Tensor
    powers: Tensor

    def __init__(self, min_size: int, max_size: int, size_divisible: int):
        super().__init__()
        self.min_size = int(min_size)
        self.max_size = int(max_size)
        self.size_divisible = int(size_divisible)
        self.table_limit = TABLE_LIMIT
        p_min, l_min = rounding_tables(self.min_size)
        p_max, l_max = rounding_tables(self.max_size)
        self.register_buffer("p_min", p_min, persistent=False)
        self.register_buffer("l_min", l_min, persistent=False)
        self.register_buffer("p_max", p_max, persistent=False)
        self.register_buffer("l_max", l_max, persistent=False)
        self.register_buffer("powers", 2 ** torch.arange(62, dtype=torch.int64), persistent=False)

    def side(self, side: Tensor, n: Tensor, d: Tensor, p: Tensor, low: Tensor) -> Tensor:
        """``floor(side * fl(n / d))`` for 0-d int64 tensors, at least 1 (see the module docstring)."""
        k = floor_divide(side * n, d)
        whole = side * n - k * d == 0
        log_k = (k >= self.powers[1:]).sum()  # floor(log2 k), k >= 1
        power_of_two = self.powers[log_k] == k
        shift = log_k - low + 1 - power_of_two.to(torch.int64)
        below = whole & (p > 0) & (4 * side * p > d * self.powers[shift.clamp(min=0, max=61)])
        return torch.clamp(k - below.to(torch.int64), min=1)

    def sizes(self, height: int, width: int) -> tuple[Tensor, Tensor]:
        """The eager transform's (h, w) for an image of ``height`` x ``width``, as 0-d int64 tensors."""
        one = torch.ones((), dtype=torch.int64, device=self.powers.device)
        h, w = one * height, one * width
        short, long = torch.minimum(h, w), torch.maximum(h, w)
        use_min = self.min_size * long <= self.max_size * short
        n = torch.where(use_min, one * self.min_size, one * self.max_size)
        d = torch.where(use_min, short, long)
        index = d.clamp(max=self.table_limit)
        p = torch.where(use_min, self.p_min[index], self.p_max[index])
        p = torch.where(d <= self.table_limit, p, 0)
        low = torch.where(use_min, self.l_min[index], self.l_max[index])
        return self.side(h, n, d, p, low), self.side(w, n, d, p, low)

    def taps(self, size_in: int, size_out: Tensor, length: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The bilinear taps of output positions ``0..length-1`` when ``size_in`` pixels are resampled to
        ``size_out``: (low index, high index, low weight, high weight), each ``[length]``; positions at or past
        ``size_out`` get weight 0."""
        device = self.powers.device
        limit = torch.ones((), dtype=torch.int64, device=device) * (size_in - 1)
        scale = (torch.ones((), dtype=torch.float32, device=device) * size_in) / size_out.to(torch.float32)
        index = torch.arange(length, device=device)
        source = (scale * (index.to(torch.float32) + 0.5) - 0.5).clamp(min=0.0)
        low = torch.minimum(torch.floor(source).to(torch.int64), limit)
        weight = (source - low.to(torch.float32)).clamp(min=0.0, max=1.0)
        high = torch.where(low < limit, low + 1, low)
        inside = (index < size_out).to(torch.float32)
        return low, high, (1.0 - weight) * inside, weight * inside

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        height, width = x.shape[2], x.shape[3]
        h, w = self.sizes(height, width)
        # the canvas: the exact size (never smaller than the eager one) padded
        d = self.size_divisible
        short, long = min(height, width), max(height, width)
        exact_h = max(min(height * self.min_size // short, height * self.max_size // long), 1)
        exact_w = max(min(width * self.min_size // short, width * self.max_size // long), 1)
        padded_h, padded_w = (exact_h + d - 1) // d * d, (exact_w + d - 1) // d * d
        # columns, then rows: the eager kernel's order of operations
        c0, c1, cw0, cw1 = self.taps(width, w, padded_w)
        x = x.index_select(3, c0) * cw0 + x.index_select(3, c1) * cw1
        r0, r1, rw0, rw1 = self.taps(height, h, padded_h)
        x = x.index_select(2, r0) * rw0[:, None] + x.index_select(2, r1) * rw1[:, None]
        return x, h, w
