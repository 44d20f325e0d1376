"""NMS and RoIAlign in plain PyTorch, and the switch that picks the detector's ops.

The detector calls three ops that torchvision ships as compiled kernels: ``nms``, ``batched_nms``
and ``roi_align``. This file writes them again with tensor operations only, so that you can read
what they do, and so that the model still runs where torchvision's kernels are missing. They give
the same results as torchvision's kernels: the same indices in the same order for NMS; the same
values up to float32 rounding (about 1e-6) for RoIAlign.

It is the course's counterpart of ``torchvision.ops``, kept beside ``frcnn_common.py`` (which
imports everything public from here) as torchvision keeps its ops apart from its models. The
model calls the ops through :func:`run_op`, which sends each call to the backend chosen with
:func:`set_ops_backend` or :func:`ops_backend` ("torchvision" by default, or "pure"), or with the
environment variable ``FRCNN_OPS_BACKEND``.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
# ── NMS ──


def _compute_dtype(t: Tensor) -> torch.dtype:
    """The ops compute in float32, or in float64 when given float64."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _float32_threshold(threshold: float) -> float:
    """The float32 value t with ``v > t  <=>  v > threshold`` for every float32 v.

    torchvision compares the float32 IoU with the threshold as a double; PyTorch compares a float32
    tensor with a Python number in float32, after rounding the number to float32. When rounding goes
    up (0.3 becomes 0.30000001), an IoU equal to that rounded value would be kept by PyTorch but
    suppressed by torchvision, so step one float32 down in that case.
    """
    t = torch.tensor(threshold, dtype=torch.float32)
    if t.item() > threshold:
        t = torch.nextafter(t, torch.tensor(-math.inf))
    return t.item()


def _overlap_matrix(a: Tensor, b: Tensor, threshold: float) -> Tensor:
    """``[N, M]`` of 1.0 where ``IoU(a_i, b_j) > threshold`` and 0.0 elsewhere, for boxes given as
    ``[5, N]`` and ``[5, M]`` rows (x1, y1, x2, y2, area), each row contiguous.

    The IoU is computed as torchvision's NMS kernel does, operation by operation, so borderline
    pairs are decided alike: ``inter / (area_a + area_b - inter)``, ``inter = w * h``,
    ``w = max(0, min(x2) - max(x1))``. Two zero-area boxes give 0/0 = NaN: never above.
    The result is a float 0/1 matrix because float kernels are several times faster than
    boolean ones on the CPU; ``sign(iou - t)`` is exact (a float difference is 0 only when equal).
    """
    w = torch.minimum(a[2, :, None], b[2]).sub_(torch.maximum(a[0, :, None], b[0])).clamp_(min=0)
    h = torch.minimum(a[3, :, None], b[3]).sub_(torch.maximum(a[1, :, None], b[1])).clamp_(min=0)
    inter = w.mul_(h)
    iou = inter.div_((a[4, :, None] + b[4]).sub_(inter))
    return iou.nan_to_num_(nan=-math.inf).sub_(threshold).sign_().clamp_(min=0)


def _same_group(g_a: Tensor, g_b: Tensor, dtype: torch.dtype) -> Tensor:
    """``[N, M]`` of 1.0 where the groups (small non-negative integers) are equal, 0.0 elsewhere."""
    d = g_a.to(dtype)[:, None] - g_b.to(dtype)[None, :]
    return d.abs_().neg_().add_(1).clamp_(min=0)


@contextlib.contextmanager
def cpu_threads(count: Optional[int]) -> Iterator[None]:
    """Run the block below with ``count`` torch CPU threads, then restore the previous count, also
    after an error. ``None`` (or the current count) changes nothing. ``torch.set_num_threads`` is
    process-wide, so ops of other Python threads use ``count`` meanwhile too."""
    previous = torch.get_num_threads()
    if count is None or count == previous:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _one_cpu_thread(device: torch.device):
    """Context: the block below on one CPU thread (nothing changes on other devices).

    The ops of this file run serially on the CPU, like torchvision's CPU kernels. NMS makes many
    small tensor ops, where threads save little; and when the cores are shared with other processes
    every parallel op waits for its slowest thread: on 2 busy cores, 2 threads made NMS 5-9x and
    RoIAlign 2-5x slower than 1 thread.
    """
    return cpu_threads(1 if device.type == "cpu" else None)


def _nms_block_size(device: torch.device) -> int:
    # Small blocks on the CPU (less work against boxes that are already suppressed); big ones on an
    # accelerator, where each block costs a few device->host syncs and the arithmetic is cheap.
    return 256 if device.type == "cpu" else 4096


def _greedy_nms_sorted(boxes: Tensor, threshold: float, groups: Optional[Tensor] = None) -> Tensor:
    """Keep mask ``[N]`` of greedy NMS over boxes already sorted by decreasing score.

    ``groups`` (``[N]`` int64 0, 1, 2..., non-decreasing) restricts suppression to boxes of the
    same group.
    The boxes are processed in blocks of B. For each block:

    1. boxes that overlap a box kept in an earlier block are suppressed (one IoU matrix against the
       kept boxes only, not all earlier boxes);
    2. inside the block, greedy NMS is the unique solution of the fixed-point equation
       ``keep_j = alive_j and not any_i<j (keep_i and IoU_ij > t)``. Iterating
       ``keep <- alive & (keep @ S == 0)`` from ``keep = alive`` (Cluster-NMS), with ``S`` the
       strict upper triangle of ``IoU > t``, makes ``keep_j`` exact after at most j steps; once an
       iterate repeats it is the fixed point, hence the greedy answer. Checking for the repeat is
       a device sync, so on an accelerator it is done only every 4 steps.
    """
    n = boxes.shape[0]
    device, dtype = boxes.device, boxes.dtype
    t = _float32_threshold(threshold) if dtype == torch.float32 else float(threshold)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    rows = torch.cat((boxes.t(), area[None])).contiguous()  # [5, N]: x1, y1, x2, y2, area
    keep = torch.zeros(n, dtype=dtype, device=device)
    kept = torch.zeros(0, dtype=torch.long, device=device)  # positions of the kept boxes so far
    block = min(_nms_block_size(device), n)
    upper = torch.ones(block, block, dtype=dtype, device=device).triu_(diagonal=1)
    check_every = 1 if device.type == "cpu" else 4
    for start in range(0, n, block):
        stop = min(start + block, n)
        r = rows[:, start:stop].contiguous()
        g = groups[start:stop] if groups is not None else None
        alive = torch.ones(stop - start, dtype=dtype, device=device)
        candidates = kept
        if g is not None and kept.shape[0] > 0:  # kept boxes of lower groups cannot touch this block
            candidates = kept[int(torch.searchsorted(groups[kept], g[:1]).item()) :]
        if candidates.shape[0] > 0:
            hit = _overlap_matrix(r, rows[:, candidates], t)
            if g is not None:
                hit.mul_(_same_group(g, groups[candidates], dtype))
            alive = 1.0 - hit.amax(dim=1)
        s = _overlap_matrix(r, r, t).mul_(upper[: stop - start, : stop - start])
        if g is not None:
            s.mul_(_same_group(g, g, dtype))  # s[i, j] = 1: i (higher score) suppresses j
        x = alive
        while True:
            previous = x
            for _ in range(check_every):
                x = alive * ((x @ s) == 0)
            if torch.equal(x, previous):
                break
        keep[start:stop] = x
        kept = torch.cat((kept, x.nonzero().squeeze(1) + start))
    return keep > 0


def _check_nms_inputs(boxes: Tensor, scores: Tensor, idxs: Optional[Tensor] = None,
                      with_idxs: bool = False) -> None:
    """Refuse anything but boxes ``[N, 4]``, scores ``[N]`` (and idxs ``[N]``), naming the shapes."""
    names = ["boxes", "scores"] + (["idxs"] if with_idxs else [])
    for name, value in zip(names, (boxes, scores, idxs)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} is {type(value).__name__}: expected a tensor (boxes [N, 4], "
                            "scores [N]" + (", idxs [N]" if with_idxs else "") + ")")
    n = boxes.shape[0] if boxes.dim() == 2 else -1
    shapes_ok = boxes.dim() == 2 and boxes.shape[1] == 4 and tuple(scores.shape) == (n,)
    if with_idxs:
        shapes_ok = shapes_ok and tuple(idxs.shape) == (n,)
    if not shapes_ok:
        got = f"boxes {list(boxes.shape)}, scores {list(scores.shape)}"
        got += f", idxs {list(idxs.shape)}" if with_idxs else ""
        expected = "boxes [N, 4], scores [N]" + (", idxs [N]" if with_idxs else "")
        raise ValueError(f"got {got}: expected {expected} (one score per box, boxes as "
                         "x1, y1, x2, y2)")


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Non-maximum suppression, exactly as ``torchvision.ops.nms``, in tensor operations.

    Greedy NMS visits the boxes from the highest score down and keeps a box unless it overlaps an
    already kept box with IoU > ``iou_threshold``. Boxes of equal score are visited in index order
    (a stable sort), as torchvision's CPU kernel does. Instead of a Python loop over the boxes
    (one device sync per kept box), the greedy pass is solved for blocks of boxes at once from
    their IoU matrix, see ``_greedy_nms_sorted``.

    Args:
        boxes: ``[N, 4]`` boxes (x1, y1, x2, y2).
        scores: ``[N]`` scores.
        iou_threshold: suppress when IoU > this value (strictly).

    Returns:
        int64 ``[K]``: indices of the kept boxes, by decreasing score. Computed in float32 (float64
        for float64 boxes), also under autocast.
    """
    _check_nms_inputs(boxes, scores)
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    dtype = _compute_dtype(boxes)
    with torch.autocast(boxes.device.type, enabled=False), _one_cpu_thread(boxes.device):
        order = torch.sort(scores.to(dtype), descending=True, stable=True)[1]
        keep = _greedy_nms_sorted(boxes.to(dtype)[order], iou_threshold)
    return order[keep]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS inside each category, exactly as ``torchvision.ops.batched_nms``.

    A box only suppresses boxes with the same ``idxs`` value (its class, or its image).

    Args:
        boxes: ``[N, 4]`` boxes (x1, y1, x2, y2).
        scores: ``[N]`` scores.
        idxs: ``[N]`` integer category of each box.
        iou_threshold: suppress when IoU > this value (strictly).

    Returns:
        int64 ``[K]``: indices of the kept boxes, by decreasing score; equal scores in index order.
        (torchvision keeps the same boxes; with more than 1000 boxes on the CPU, or 25000 on a
        GPU, it orders equal scores by an unstable sort, so their order may differ from this one.)
        Empty ``boxes`` give an empty result whatever the other arguments, as torchvision's.
    """
    if isinstance(boxes, Tensor) and boxes.numel() == 0:  # torchvision checks nothing else then
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    _check_nms_inputs(boxes, scores, idxs, with_idxs=True)
    dtype = _compute_dtype(boxes)
    with torch.autocast(boxes.device.type, enabled=False), _one_cpu_thread(boxes.device):
        by_score = torch.sort(scores.to(dtype), descending=True, stable=True)[1]
        by_group = torch.sort(idxs[by_score], stable=True)[1]
        order = by_score[by_group]  # grouped by category, by decreasing score inside each
        category = idxs[order]
        new = torch.ones_like(category, dtype=torch.long)  # renumber the categories 0, 1, 2...
        new[1:] = category[1:] != category[:-1]
        groups = torch.cumsum(new, 0) - 1
        keep = torch.zeros_like(by_score, dtype=torch.bool)
        keep[order] = _greedy_nms_sorted(boxes.to(dtype)[order], iou_threshold, groups)
    return by_score[keep[by_score]]


# ── RoIAlign ──


def rois_from_boxes(boxes: Union[Tensor, Sequence[Tensor]]) -> Tensor:
    """``[K, 5]`` rows (batch index, x1, y1, x2, y2) from either box format of ``roi_align``."""
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(f"boxes as a Tensor must be [K, 5], got {list(boxes.shape)}")
        return boxes
    for b in boxes:
        if b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"boxes as a list must hold [L, 4] tensors, got {list(b.shape)}")
    if len(boxes) == 0:
        return torch.zeros(0, 5)
    batch = torch.cat([torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)])
    return torch.cat((batch, torch.cat(list(boxes))), dim=1)


def _bilinear_axis(coord: Tensor, size: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Neighbours and weights of sample coordinates along one axis, by torchvision's rules.

    A sample outside ``[-1, size]`` is invalid (it contributes 0). Otherwise the coordinate is
    clamped to ``>= 0``, and from ``size - 1`` on it sits on the last row (both neighbours equal).
    Returns ``(low, high, w_low, w_high, valid)`` with ``w_low = 1 - (c - low)``, ``w_high = c - low``.
    """
    valid = (coord >= -1) & (coord <= size)
    c = torch.where(valid, coord, torch.zeros_like(coord)).clamp(min=0)
    low = c.floor()
    last = low >= size - 1
    low = torch.where(last, torch.full_like(low, size - 1), low)
    c = torch.where(last, low, c)
    frac = c - low
    low_i = low.long()
    high_i = torch.where(last, low_i, low_i + 1)
    return low_i, high_i, 1.0 - frac, frac, valid


_ROI_ALIGN_CHUNK = 1 << 20  # sampling points per chunk: bounds the temporary tensors (~150 MB)


def _roi_align_chunk(
    table: Tensor, rois: Tensor, shape: Tuple[int, int, int], out_hw: Tuple[int, int],
    scale: float, sampling_ratio: int, aligned: bool,
) -> Tensor:
    """RoIAlign of ``rois`` as ``[K * ph * pw, C]`` from ``table`` = the map as ``[N*H*W, C]``."""
    _, height, width = shape
    ph, pw = out_hw
    k = rois.shape[0]
    device, dtype = rois.device, rois.dtype
    offset = 0.5 if aligned else 0.0
    x1 = rois[:, 1] * scale - offset
    y1 = rois[:, 2] * scale - offset
    roi_w = (rois[:, 3] * scale - offset) - x1
    roi_h = (rois[:, 4] * scale - offset) - y1
    if not aligned:  # legacy mode: malformed rois become 1 x 1
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_w, bin_h = roi_w / pw, roi_h / ph
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full((k,), sampling_ratio, dtype=torch.long, device=device)
        total = k * ph * pw * sampling_ratio**2
    else:  # adaptive grid: ceil(roi size / output size) points per bin and axis
        grid_h = torch.nan_to_num(torch.ceil(bin_h), nan=0.0).clamp(min=0).long()
        grid_w = torch.nan_to_num(torch.ceil(bin_w), nan=0.0).clamp(min=0).long()
        total = int((grid_h * grid_w).sum().item()) * ph * pw
    per_bin = grid_h * grid_w  # samples averaged in each bin of a roi
    per_roi = per_bin * (ph * pw)

    # One entry per sampling point, ordered (roi, bin row, bin col, grid row, grid col).
    roi = torch.repeat_interleave(torch.arange(k, device=device), per_roi, output_size=total)
    first = torch.cumsum(per_roi, 0) - per_roi
    t = torch.arange(total, device=device) - first[roi]
    n, gw = per_bin[roi], grid_w[roi]
    bin_index = torch.div(t, n, rounding_mode="floor")
    sample = t - bin_index * n
    i = torch.div(bin_index, pw, rounding_mode="floor")
    j = bin_index - i * pw
    iy = torch.div(sample, gw, rounding_mode="floor")
    ix = sample - iy * gw
    # y = y1 + i * bin_h + (iy + 0.5) * bin_h / grid_h, in the kernel's order of operations.
    bh, bw = bin_h[roi], bin_w[roi]
    y = (y1[roi] + i.to(dtype) * bh) + ((iy.to(dtype) + 0.5) * bh) / grid_h[roi].to(dtype)
    x = (x1[roi] + j.to(dtype) * bw) + ((ix.to(dtype) + 0.5) * bw) / gw.to(dtype)

    y_lo, y_hi, wy_lo, wy_hi, y_ok = _bilinear_axis(y, height)
    x_lo, x_hi, wx_lo, wx_hi, x_ok = _bilinear_axis(x, width)
    base = rois[:, 0].long()[roi] * (height * width)
    index = torch.stack(
        (y_lo * width + x_lo, y_lo * width + x_hi, y_hi * width + x_lo, y_hi * width + x_hi), dim=1
    ).add_(base[:, None])
    weight = torch.stack((wy_lo * wx_lo, wy_lo * wx_hi, wy_hi * wx_lo, wy_hi * wx_hi), dim=1)
    weight = weight * ((y_ok & x_ok).to(dtype) / per_bin[roi].clamp(min=1).to(dtype))[:, None]

    # Each bin is a weighted sum of table rows: exactly what embedding_bag computes, fused.
    if sampling_ratio > 0:
        bag = 4 * sampling_ratio**2
        return F.embedding_bag(
            index.view(-1, bag), table, per_sample_weights=weight.view(-1, bag), mode="sum"
        )
    bag_sizes = torch.repeat_interleave(4 * per_bin, ph * pw)
    offsets = torch.cumsum(bag_sizes, 0) - bag_sizes
    return F.embedding_bag(
        index.view(-1), table, offsets, per_sample_weights=weight.view(-1), mode="sum"
    )


def _split_rois_by_samples(
    rois: Tensor, scale: float, out_hw: Tuple[int, int], aligned: bool
) -> List[Tensor]:
    """Split rois so each chunk has at most ~``_ROI_ALIGN_CHUNK`` adaptive sampling points."""
    offset = 0.5 if aligned else 0.0
    w = (rois[:, 3] * scale - offset) - (rois[:, 1] * scale - offset)
    h = (rois[:, 4] * scale - offset) - (rois[:, 2] * scale - offset)
    if not aligned:
        w, h = w.clamp(min=1.0), h.clamp(min=1.0)
    gh = torch.nan_to_num(torch.ceil(h / out_hw[0]), nan=0.0).clamp(min=0)
    gw = torch.nan_to_num(torch.ceil(w / out_hw[1]), nan=0.0).clamp(min=0)
    cum = torch.cumsum((gh * gw).double() * (out_hw[0] * out_hw[1]), 0)
    if cum[-1].item() <= _ROI_ALIGN_CHUNK:
        return [rois]
    chunk_of = torch.div(cum - 1, _ROI_ALIGN_CHUNK, rounding_mode="floor").clamp(min=0).long()
    sizes = torch.bincount(chunk_of).tolist()
    return list(rois.split([s for s in sizes if s > 0]))


def roi_align(
    input: Tensor,
    boxes: Union[Tensor, List[Tensor]],
    output_size: Union[int, Tuple[int, int]],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign (Mask R-CNN), exactly as ``torchvision.ops.roi_align``, in tensor operations.

    Each box is scaled to the feature map (``x * spatial_scale``, minus 0.5 if ``aligned``) and cut
    into ``ph x pw`` equal bins. Each bin averages the map, bilinearly interpolated, at a regular
    ``gh x gw`` grid of points::

        out[k, c, i, j] = 1/(gh gw) * sum_{a<gh, b<gw} f_c(y1 + (i + (a + 1/2)/gh) h/ph,
                                                           x1 + (j + (b + 1/2)/gw) w/pw)

    with (x1, y1) the box's top-left corner and h x w its size on the map, and f_c the bilinear
    interpolation of channel c of the box's image. A point outside ``[-1, H] x [-1, W]`` counts as 0; otherwise it is clamped into the map.
    Differentiable with respect to ``input`` (not ``boxes``, like torchvision).

    Args:
        input: ``[N, C, H, W]`` feature maps.
        boxes: ``Tensor[K, 5]`` rows (batch index, x1, y1, x2, y2), or a list of N ``Tensor[L, 4]``,
            one per image, in image pixels.
        output_size: ``ph`` (square) or ``(ph, pw)``.
        spatial_scale: feature-map pixels per image pixel, e.g. 1/4 for a stride-4 map.
        sampling_ratio: ``gh = gw`` if > 0; else adaptive per box, ``ceil(h / ph)`` and
            ``ceil(w / pw)`` (a box with an empty grid gives zeros).
        aligned: shift by -0.5 pixel (pixel centres at integers). If False (the legacy mode, used by
            Faster R-CNN), boxes are made at least 1 x 1.

    Returns:
        ``[K, C, ph, pw]``, contiguous, in ``input``'s dtype. Computed in float32 (float64 for a
        float64 input), also under autocast, like torchvision's autocast rule (float32 inside,
        result cast back to the input's dtype).
    """
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    rois = rois_from_boxes(boxes)
    dtype = _compute_dtype(input)
    n, c, height, width = input.shape
    with torch.autocast(input.device.type, enabled=False), _one_cpu_thread(input.device):
        rois = rois.to(device=input.device, dtype=dtype)
        # The map as a table of N*H*W rows of C channels: the bilinear samples gather rows.
        table = input.to(dtype).permute(0, 2, 3, 1).reshape(n * height * width, c)
        if sampling_ratio > 0 or rois.shape[0] == 0:
            points_per_roi = ph * pw * max(sampling_ratio, 1) ** 2
            rois_per_chunk = max(1, _ROI_ALIGN_CHUNK // points_per_roi)
            chunks = list(rois.split(rois_per_chunk)) or [rois]
        else:  # adaptive: split where the running number of sampling points crosses the budget
            chunks = _split_rois_by_samples(rois, spatial_scale, (ph, pw), aligned)
        parts = [
            _roi_align_chunk(
                table, r, (n, height, width), (ph, pw), spatial_scale, sampling_ratio, aligned
            )
            for r in chunks
        ]
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        out = out.view(rois.shape[0], ph, pw, c).permute(0, 3, 1, 2).contiguous()
    return out.to(input.dtype)


# ── The backend switch ──

OPS_BACKENDS = ("torchvision", "pure")
"""The implementations of nms / batched_nms / roi_align the model can use: torchvision's compiled
kernels, or the tensor-operation versions of this file."""

_ops_backend = os.environ.get("FRCNN_OPS_BACKEND", "torchvision")
if _ops_backend not in OPS_BACKENDS:
    raise ValueError(f"FRCNN_OPS_BACKEND must be one of {OPS_BACKENDS}, got {_ops_backend!r}")


def set_ops_backend(name: str) -> str:
    """Make the model use ``name`` ("torchvision" or "pure") for NMS and RoIAlign.

    The default is "torchvision", or the environment variable ``FRCNN_OPS_BACKEND``.
    Returns the previous backend, so ``old = set_ops_backend("pure") ... set_ops_backend(old)``.
    """
    global _ops_backend
    if name not in OPS_BACKENDS:
        raise ValueError(f"unknown ops backend {name!r}; choose one of {OPS_BACKENDS}")
    previous, _ops_backend = _ops_backend, name
    return previous


@contextlib.contextmanager
def ops_backend(name: str) -> Iterator[str]:
    """Context manager: use backend ``name`` inside the ``with`` block, then restore the old one."""
    previous = set_ops_backend(name)
    try:
        yield name
    finally:
        set_ops_backend(previous)


def _to_dtype(value, dtype: torch.dtype):
    """Floating tensors (also inside a list) in ``dtype``; anything else as it is."""
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, (list, tuple)):
        return [_to_dtype(v, dtype) for v in value]
    return value


def run_op(name: str, *args):
    """Op ``name`` ("nms", "batched_nms" or "roi_align") of the backend in use: this file's
    function, or torchvision's kernel. Both compute in float32 (float64 stays float64) with
    autocast off, and a floating result comes back in the first input's dtype, so either backend
    gives the same numbers under autocast or on half-precision inputs."""
    first = args[0]
    args = [_to_dtype(a, _compute_dtype(first)) for a in args]
    if _ops_backend == "pure":
        op = globals()[name]
    else:
        import torchvision.ops

        op = getattr(torchvision.ops, name)
    with torch.autocast(first.device.type, enabled=False):
        out = op(*args)
    return out.to(first.dtype) if out.is_floating_point() else out
