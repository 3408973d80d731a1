"""Pillow's bilinear resize, bit for bit, computing only the pixels of a crop.

The model card resizes the whole image (shorter side to 256, ``Image.BILINEAR``) and then keeps
only the centre 224x224. Most of that resize is thrown away, so here only the kept output pixels
are computed. The int8 model flips a few percent of its answers when pixels move by one level,
so the result must equal Pillow's exactly; ``resize(..., box=...)`` does not (Pillow passes the
box to its C code as single-precision floats, which moves the filter centres). Instead this
module replays Pillow 13's ``src/libImaging/Resample.c`` for the kept rows and columns:

* coefficients (``precompute_coeffs`` + ``normalize_coeffs_8bpc``): the same float64 operations
  in the same order, then rounded to 22-bit fixed point;
* two separable passes, each accumulating ``pixel * weight`` in int32 from ``1 << 21`` and
  keeping ``acc >> 22`` clipped to 0..255, the first pass rounded to uint8 before the second;
* the same choice of passes: a dimension whose size does not change is not resampled, and
  Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many
  pixels as the width, which for the card's resize means portraits taller than 2:1 (older
  Pillows always go horizontal first, so such images differ by a level here and there between
  Pillow versions; the tests compare with the Pillow that is installed).

Speed comes from numpy doing every tap of a pass at once: the taps are gathered with
``np.take`` (``mode="clip"``, much faster than the default), multiplied and summed by one
``np.einsum``, and every temporary lives in per-thread scratch buffers, because the page faults
of fresh megabyte-sized arrays cost as much as the work. The horizontal pass works on a
transposed copy of the source so that its taps are whole rows, as the vertical taps are.
Coefficient tables are cached (computing one is not cheap next to resampling the crop). Large
images are processed in chunks that keep scratch buffers near 2 MB. docs/performance.md has the
measurements.
"""

from __future__ import annotations

import math
import threading
from functools import lru_cache
from typing import NamedTuple

import numpy as np

__all__ = ["center_crop_resize", "resize_crop"]

_PRECISION_BITS = 22  # Resample.c: 32 - 8 (result) - 2 (headroom)
_BIAS = np.int32(1 << (_PRECISION_BITS - 1))
# Largest weight sum for which 255 * sum + bias still shifts to at most 255, so that Pillow's
# clip to 0..255 has nothing to do (bilinear weights are >= 0, so the low side cannot clip).
_NO_CLIP_WEIGHT_SUM = ((256 << _PRECISION_BITS) - 1 - int(_BIAS)) // 255
_CHUNK_BYTES = 2 << 20  # rough size of each scratch buffer, so huge images do not need huge ones
# Transposing more rows at once reads each output row across thousands of pages of a large
# image; the TLB misses made that copy far slower than in slabs of this many rows.
_TRANSPOSE_ROWS = 256

_scratch_local = threading.local()


def _scratch(slot: str, shape: tuple[int, ...], dtype: type[np.generic]) -> np.ndarray:
    """An uninitialised array from this thread's reusable buffer ``slot`` (grown when too small).

    Reusing memory avoids the page faults of new large arrays; per-thread, so that server
    worker threads never share one.
    """
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    buffers: dict[str, np.ndarray] | None = getattr(_scratch_local, "buffers", None)
    if buffers is None:
        buffers = _scratch_local.buffers = {}
    buffer = buffers.get(slot)
    if buffer is None or buffer.size < nbytes:
        buffer = buffers[slot] = np.empty(max(nbytes, 1 << 16), np.uint8)
    return buffer[:nbytes].view(dtype).reshape(shape)


class _Taps(NamedTuple):
    """Pillow's resampling coefficients for a run of consecutive outputs of one dimension."""

    source: np.ndarray  # [outputs, taps] source index of each tap
    weight: np.ndarray  # [outputs, taps] int32 fixed-point weight (0 past an output's window)
    clips: bool  # some output could exceed 255, so Pillow's clip8 would matter


@lru_cache(maxsize=512)  # a few KB each; 515 sample photos need 357 tables
def _coefficients(in_size: int, out_size: int, start: int, count: int) -> _Taps:
    """``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for outputs ``start .. start + count - 1``
    of an ``in_size`` -> ``out_size`` bilinear resize of the whole dimension (``in0 = 0``,
    ``in1 = in_size``): the same float64 operations, in the same order, as the C.

    Taps past an output's own window get weight 0 and repeat its last index, so that gathers
    stay inside the rows or columns the crop really needs.
    """
    scale = in_size / out_size  # (double)(in1 - in0) / outSize: exact operands, one division
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # bilinear support is 1.0
    ksize = math.ceil(support) * 2 + 1
    center = (np.arange(start, start + count) + 0.5) * scale  # in0 (0.0f) + ... adds nothing
    inv_filterscale = 1.0 / filterscale
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)  # (int) truncates, as astype
    n = np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin
    x = np.arange(ksize)
    distance = np.abs(((xmin[:, None] + x) - center[:, None] + 0.5) * inv_filterscale)
    weight = np.where((x < n[:, None]) & (distance < 1.0), 1.0 - distance, 0.0)
    total = np.cumsum(weight, axis=1)[:, -1]  # left to right, as the C's ww += w (np.sum is not)
    np.divide(weight, total[:, None], out=weight, where=total[:, None] != 0.0)
    fixed = (0.5 + weight * (1 << _PRECISION_BITS)).astype(np.int32)  # weights are all >= 0
    taps = int(n.max())
    fixed = np.ascontiguousarray(fixed[:, :taps])
    index = (xmin[:, None] + np.minimum(np.arange(taps), n[:, None] - 1)).astype(np.int32)
    clips = bool(fixed.sum(axis=1, dtype=np.int64).max() > _NO_CLIP_WEIGHT_SUM)
    index.flags.writeable = fixed.flags.writeable = False  # shared by every caller
    return _Taps(index, fixed, clips)


def _finish(acc: np.ndarray) -> np.ndarray:
    """Pillow's ``clip8`` of the weighted sums, in place: add the rounding bias and shift (the
    clip itself has nothing to do: ``_coefficients`` checked the weights, and they are >= 0)."""
    acc += _BIAS
    acc >>= _PRECISION_BITS
    return acc


def _vertical(src: np.ndarray, taps: _Taps, lo: int, hi: int, out: np.ndarray) -> None:
    """``ImagingResampleVertical_8bpc``: ``out[i] = clip8(sum_k w[i, k] * src[index[i, k], lo:hi])``.

    ``src`` is C-contiguous uint8 ``[rows, row_bytes]`` (``np.take`` would copy anything else),
    ``out`` uint8 ``[outputs, hi - lo]``.
    """
    index, weight, _ = taps
    count, row_bytes = index.shape[1], src.shape[1]
    step = max(1, _CHUNK_BYTES // (count * row_bytes + 4 * (hi - lo)))
    for i in range(0, len(index), step):
        rows = index[i : i + step]
        gathered = _scratch("v_taps", (len(rows), count, row_bytes), np.uint8)
        np.take(src, rows, axis=0, out=gathered, mode="clip")
        acc = _scratch("v_acc", (len(rows), hi - lo), np.int32)
        np.einsum("ikc,ik->ic", gathered[:, :, lo:hi], weight[i : i + step], out=acc)
        np.copyto(out[i : i + step], _finish(acc), casting="unsafe")


def _horizontal(src: np.ndarray, taps: _Taps, offset: int, out: np.ndarray) -> None:
    """``ImagingResampleHorizontal_8bpc`` on RGB rows: ``src`` is uint8 ``[rows, pixels * 3]``
    whose first pixel is source column ``offset`` (any row stride); ``out`` is uint8
    ``[rows, outputs * 3]``.

    The needed source columns are first copied transposed, one row per column and channel, so
    that gathering the taps is ``np.take`` of whole rows, far faster than picking bytes.
    """
    index, weight, _ = taps
    rows, count = src.shape[0], index.shape[1]
    # one tap row per output byte: source byte column 3 * pixel + channel, the pixel's weight
    columns = (index[:, :, None] * 3 + np.arange(3)).transpose(1, 0, 2).reshape(count, -1)
    weight3 = np.repeat(weight, 3, axis=0)
    step = max(1, _CHUNK_BYTES // (rows * 3 * (count + 4)))
    for j in range(0, len(index), step):
        first, last = int(index[j, 0]), int(index[min(j + step, len(index)) - 1, -1]) + 1
        transposed = _scratch("h_source", ((last - first) * 3, rows), np.uint8)
        needed = src[:, (first - offset) * 3 : (last - offset) * 3]
        for r in range(0, rows, _TRANSPOSE_ROWS):
            np.copyto(transposed[:, r : r + _TRANSPOSE_ROWS], needed[r : r + _TRANSPOSE_ROWS].T)
        picks = columns[:, j * 3 : (j + step) * 3] - first * 3
        gathered = _scratch("h_taps", (count, picks.shape[1], rows), np.uint8)
        np.take(transposed, picks, axis=0, out=gathered, mode="clip")
        acc = _scratch("h_acc", (picks.shape[1], rows), np.int32)
        np.einsum("kcr,ck->cr", gathered, weight3[j * 3 : (j + step) * 3], out=acc)
        np.copyto(out[:, j * 3 : j * 3 + picks.shape[1]], _finish(acc).T, casting="unsafe")


def _pillow(pixels: np.ndarray, resized: tuple[int, int], crop: tuple[int, int, int, int]) -> np.ndarray:
    """The reference itself, for weights whose fixed-point sums could reach 256 and need Pillow's
    clip. Bilinear weights never do (each is rounded by at most 1/2), but correctness first."""
    from PIL import Image

    image = Image.fromarray(pixels).resize(resized, Image.Resampling.BILINEAR)
    return np.asarray(image.crop(crop))


def resize_crop(pixels: np.ndarray, resized: tuple[int, int], crop: tuple[int, int, int, int]) -> np.ndarray:
    """``np.asarray(Image.fromarray(pixels).resize(resized, BILINEAR).crop(crop))``, bit for bit,
    computing only the cropped pixels.

    ``pixels`` is uint8 ``[H, W, 3]``; ``resized`` is the full resized ``(width, height)``;
    ``crop`` is ``(left, top, right, bottom)`` in resized coordinates. Parts of the crop outside
    the resized image are black, as with Pillow. Returns a new uint8 ``[bottom - top,
    right - left, 3]`` array. Safe to call from several threads at once.
    """
    pixels = np.ascontiguousarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3] pixels, got {pixels.dtype} {list(pixels.shape)}")
    height, width = pixels.shape[:2]
    out_width, out_height = (int(v) for v in resized)
    left, top, right, bottom = (int(v) for v in crop)
    if min(height, width, out_width, out_height) < 1:
        raise ValueError(f"cannot resize {width}x{height} to {out_width}x{out_height}")
    if right < left or bottom < top:
        raise ValueError(f"crop {crop} has right < left or bottom < top")
    # the part of the crop inside the resized image; the rest is black, as Pillow pads it
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(right, out_width), min(bottom, out_height)
    within = (x0, y0, x1, y1) == (left, top, right, bottom)
    out = (np.empty if within else np.zeros)((bottom - top, right - left, 3), np.uint8)
    if x1 <= x0 or y1 <= y0:
        return out
    inside = out[y0 - top : y1 - top, x0 - left : x1 - left].reshape(y1 - y0, -1)
    flat = pixels.reshape(height, width * 3)
    horizontal = out_width != width  # Pillow: need_horizontal / need_vertical
    vertical = out_height != height
    columns = _coefficients(width, out_width, x0, x1 - x0) if horizontal else None
    rows = _coefficients(height, out_height, y0, y1 - y0) if vertical else None
    if (columns is not None and columns.clips) or (rows is not None and rows.clips):
        return _pillow(pixels, (out_width, out_height), (left, top, right, bottom))
    shrink = height - out_height
    if columns is not None and rows is not None:
        if shrink > 0 and shrink > (width - out_width) * 2:
            # Pillow 13 goes vertical first here: the needed source columns of the kept rows
            first, last = int(columns.source[0, 0]), int(columns.source[-1, -1]) + 1
            temp = _scratch("temp", (y1 - y0, (last - first) * 3), np.uint8)
            _vertical(flat, rows, first * 3, last * 3, temp)
            _horizontal(temp, columns, first, inside)
        else:
            first, last = int(rows.source[0, 0]), int(rows.source[-1, -1]) + 1
            temp = _scratch("temp", (last - first, (x1 - x0) * 3), np.uint8)
            _horizontal(flat[first:last], columns, 0, temp)
            shifted = _Taps(rows.source - first, rows.weight, rows.clips)
            _vertical(temp, shifted, 0, temp.shape[1], inside)
    elif columns is not None:
        _horizontal(flat[y0:y1], columns, 0, inside)
    elif rows is not None:
        _vertical(flat, rows, x0 * 3, x1 * 3, inside)
    else:
        inside[...] = flat[y0:y1, x0 * 3 : x1 * 3]
    return out


def center_crop_resize(pixels: np.ndarray, shorter: int = 256, size: int = 224) -> np.ndarray:
    """The model card's preprocessing on uint8 ``[H, W, 3]`` pixels: resize so the shorter side is
    ``shorter`` (sizes ``round(w * s)``, ``round(h * s)`` with ``s = shorter / min(w, h)``), then
    the centre ``size`` x ``size`` crop at ``((W - size) // 2, (H - size) // 2)``."""
    height, width = pixels.shape[:2]
    scale = shorter / min(width, height)
    out_width, out_height = round(width * scale), round(height * scale)
    left, top = (out_width - size) // 2, (out_height - size) // 2
    return resize_crop(pixels, (out_width, out_height), (left, top, left + size, top + size))
