"""The cases torchvision's own test suite runs, ported to this module's ops and classes.

Each group names the torchvision test it mirrors (``test/test_ops.py``,
``test/test_models_detection_utils.py``, ``test/test_models_detection_anchor_utils.py``,
``test/test_models_detection_negative_samples.py``). The cases are rewritten here: expected values
are computed in the test (by hand, with exact fractions, or with a slow reference written below),
or taken from ``torchvision`` run on the same inputs. ``tests/test_ops.py`` already compares the
ops with torchvision's kernels on many inputs; this file adds what torchvision checks and that
file does not: reference implementations, input validation, dtypes, and the detection utilities.
"""

import math
import warnings
from fractions import Fraction

import pytest
import torch
import torchvision.ops as tv
from torchvision.models import resnet50 as tv_resnet50
from torchvision.models.detection import _utils as tv_det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator as TvAnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor, _validate_trainable_layers
from torchvision.models.detection.image_list import ImageList
from torchvision.ops.misc import FrozenBatchNorm2d as TvFrozenBatchNorm2d

import frcnn_common as fc


def _shape_pattern(*dims: int) -> str:
    """A regex for a shape as an error message may print it: ``[10, 5]``, ``(10, 5)``,
    ``torch.Size([10, 5])``, ``[10]`` or ``(10,)``."""
    return r"[\[(]" + r",\s*".join(str(d) for d in dims) + r",?[\])]"


def _exact_iou(a, b) -> Fraction:
    """IoU of two integer boxes (x1, y1, x2, y2), as an exact fraction."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return Fraction(inter, union)


def _pairwise_iou_float64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU ``[N, M]`` of boxes ``[N, 4]`` with boxes ``[M, 4]``, in float64 (a plain reference)."""
    a, b = a.double()[:, None], b.double()[None]
    w = (torch.min(a[..., 2], b[..., 2]) - torch.max(a[..., 0], b[..., 0])).clamp(min=0)
    h = (torch.min(a[..., 3], b[..., 3]) - torch.max(a[..., 1], b[..., 1])).clamp(min=0)
    inter = w * h
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area_a + area_b - inter)


# ─── box_area (TestBoxArea) ───────────────────────────────────────────────────────────────────

INT_AREA_BOXES = [[0, 0, 100, 100], [0, 0, 0, 0], [10, 20, 127, 90]]  # all fit in int8 and uint8


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64])
def test_box_area_of_integer_boxes_is_widened_like_torchvision(dtype):
    """TestBoxArea.test_int_boxes: a 100 x 100 box has area 10000 even in int8 (which int8
    arithmetic would wrap to 16): small integer types are widened to int32."""
    boxes = torch.tensor(INT_AREA_BOXES, dtype=dtype)
    expected = [(x2 - x1) * (y2 - y1) for x1, y1, x2, y2 in INT_AREA_BOXES]
    got = fc.box_area(boxes)
    theirs = tv.box_area(boxes)
    assert got.tolist() == expected == [10000, 0, 8190]
    assert got.dtype == theirs.dtype == (torch.int64 if dtype == torch.int64 else torch.int32)
    assert torch.equal(got, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_box_area_of_float_boxes_keeps_the_dtype_and_matches_torchvision(dtype, gen):
    """TestBoxArea.test_float_boxes: large COCO-like boxes, area computed in the boxes' dtype."""
    xy = torch.rand(6, 2, generator=gen(0), dtype=torch.float64) * 400
    wh = torch.rand(6, 2, generator=gen(1), dtype=torch.float64) * 800 + 1
    boxes = torch.cat((xy, xy + wh), 1).to(dtype)
    expected = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes.double().tolist()]  # Python floats
    got = fc.box_area(boxes)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-6 if dtype == torch.float32 else 1e-14, atol=0)
    torch.testing.assert_close(got, tv.box_area(boxes))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_box_area_of_half_precision_boxes_is_float32_without_overflow(dtype):
    """TestBoxArea.test_float16_box: half-precision boxes are widened to float32, so a
    300 x 300 box has area 90000 (above float16's largest value, 65504) instead of inf."""
    boxes = torch.tensor([[0.0, 0.0, 300.0, 300.0], [2.825, 1.8625, 3.9, 4.85],
                          [2.825, 4.875, 19.2, 5.1], [10.0, 20.0, 250.5, 400.0]], dtype=dtype)
    # the areas of the boxes as stored (rounded to the half type), computed exactly in float64
    expected = torch.tensor([(b[2] - b[0]) * (b[3] - b[1]) for b in boxes.double().tolist()],
                            dtype=torch.float64)
    got = fc.box_area(boxes)
    theirs = tv.box_area(boxes)
    assert got.dtype == theirs.dtype == torch.float32
    assert torch.isfinite(got).all() and got[0].item() == 90000.0
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(got, theirs)


# ─── box_iou (TestBoxIou) ─────────────────────────────────────────────────────────────────────

INT_BOXES_A = [[0, 0, 100, 100], [0, 0, 50, 50], [60, 60, 120, 120], [0, 0, 25, 25]]
INT_BOXES_B = [[0, 0, 100, 100], [0, 0, 50, 50], [60, 60, 120, 120]]


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64])
def test_box_iou_of_integer_boxes_equals_the_exact_fractions(dtype):
    """TestBoxIou.test_iou (int boxes): IoU as a float, computed without wrapping products of
    coordinates (100 * 100 overflows int8 and uint8)."""
    a, b = torch.tensor(INT_BOXES_A, dtype=dtype), torch.tensor(INT_BOXES_B, dtype=dtype)
    expected = torch.tensor([[float(_exact_iou(p, q)) for q in INT_BOXES_B] for p in INT_BOXES_A],
                            dtype=torch.float64)
    # overlaps whose products of coordinates overflow 8 bits: 40 x 40 and 25 x 25 intersections
    assert _exact_iou(INT_BOXES_A[2], INT_BOXES_B[0]) == Fraction(1600, 10000 + 3600 - 1600)
    assert _exact_iou(INT_BOXES_A[3], INT_BOXES_B[0]) == Fraction(625, 10000)
    got = fc.box_iou(a, b)
    assert got.shape == (4, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)
    if dtype != torch.uint8:
        # torchvision subtracts corners before widening: in uint8 a negative overlap wraps
        # (50 - 60 = 246), so its uint8 IoU is wrong and only the exact values are the reference
        torch.testing.assert_close(got, tv.box_iou(a, b))


# Large boxes of about 900 x 660 pixels: their areas (~600 000) overflow float16 (max 65504).
LARGE_FLOAT_BOXES = [[300.5, 190.25, 1200.75, 860.5], [298.0, 185.5, 1195.0, 855.25],
                     [310.25, 200.0, 1190.5, 850.0]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_box_iou_of_half_precision_boxes_is_float32_without_nan(dtype):
    """TestBoxIou.test_iou (float16 boxes): computed in float32, so no inf area and no NaN IoU."""
    boxes = torch.tensor(LARGE_FLOAT_BOXES, dtype=dtype)
    stored = boxes.double()  # the coordinates as rounded to the half type
    expected = _pairwise_iou_float64(stored, stored)
    got = fc.box_iou(boxes, boxes)
    theirs = tv.box_iou(boxes, boxes)
    assert got.dtype == theirs.dtype == torch.float32
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)
    # torchvision subtracts the corners in the half type before widening, so it is only as
    # close as that rounding allows (its own test allows 0.002 for float16)
    torch.testing.assert_close(got, theirs, rtol=0, atol=2e-3 if dtype == torch.float16 else 2e-2)
    assert (got.diagonal() == 1).all() and (got < 1).sum() == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_box_iou_of_float_boxes_matches_a_float64_reference(dtype):
    """TestBoxIou.test_iou (float32/float64 boxes)."""
    boxes = torch.tensor(LARGE_FLOAT_BOXES, dtype=dtype)
    expected = _pairwise_iou_float64(boxes, boxes)
    got = fc.box_iou(boxes, boxes)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), expected, rtol=0,
                               atol=1e-6 if dtype == torch.float32 else 1e-14)
    torch.testing.assert_close(got, tv.box_iou(boxes, boxes))


def test_box_iou_matrix_equals_the_iou_of_each_pair_alone(gen):
    """TestBoxIou.test_iou_cartesian: entry (i, j) of the [N, M] matrix is box_iou of the pair."""
    g = gen(2)
    xy_a, xy_b = torch.rand(5, 2, generator=g), torch.rand(7, 2, generator=g)
    a = torch.cat((xy_a, xy_a + torch.rand(5, 2, generator=g)), 1)
    b = torch.cat((xy_b, xy_b + torch.rand(7, 2, generator=g)), 1)
    matrix = fc.box_iou(a, b)
    assert matrix.shape == (5, 7)
    one_by_one = torch.tensor([[fc.box_iou(a[i:i + 1], b[j:j + 1]).item() for j in range(7)]
                               for i in range(5)])
    assert torch.equal(matrix, one_by_one)
    assert (matrix > 0).any() and (matrix < 1).all()


# ─── nms (TestNMS) ────────────────────────────────────────────────────────────────────────────


def _reference_nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedy NMS, written as the textbook loop: visit the boxes by decreasing score; keep a box
    unless a kept box overlaps it with IoU above the threshold (IoU in float64)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    iou = _pairwise_iou_float64(boxes[order], boxes[order])
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    kept = []
    for i in range(len(order)):
        if not suppressed[i]:
            kept.append(order[i].item())
            suppressed |= iou[i] > threshold
    return torch.tensor(kept, dtype=torch.int64)


def _boxes_with_a_pair_just_above(n: int, threshold: float, g: torch.Generator):
    """Random boxes where the last one is the first one stretched so that their IoU is just
    above ``threshold`` (and must be suppressed), plus random scores."""
    boxes = torch.rand(n, 4, generator=g) * 100
    boxes[:, 2:] += boxes[:, :2]
    boxes[-1] = boxes[0]
    width = (boxes[0, 2] - boxes[0, 0]).item()
    target = threshold + 1e-5  # IoU = w / (w + d) = target for d = w (1 - target) / target
    boxes[-1, 2] += width * (1 - target) / target
    return boxes, torch.rand(n, generator=g)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.8])
def test_nms_equals_the_reference_greedy_loop(threshold, seed, gen):
    """TestNMS.test_nms_ref: 1000 random boxes, one pair planted just above the threshold."""
    boxes, scores = _boxes_with_a_pair_just_above(1000, threshold, gen(seed))
    planted = _pairwise_iou_float64(boxes[:1], boxes[-1:]).item()
    assert threshold < planted < threshold + 1e-4
    expected = _reference_nms(boxes, scores, threshold)
    got = fc.nms(boxes, scores, threshold)
    assert got.dtype == torch.int64
    assert torch.equal(got, expected)
    assert not {0, 999} <= set(got.tolist())  # the planted pair never survives together
    assert 0 < len(got) < 1000
    assert torch.equal(expected, tv.nms(boxes, scores, threshold))  # the reference is right


NMS_BAD_SHAPES = [  # (boxes shape, scores shape, the shape the message must name)
    ((10,), (10,), (10,)),          # boxes not 2-D
    ((10, 5), (10,), (10, 5)),      # five coordinates per box
    ((10, 4), (10, 2), (10, 2)),    # two scores per box
    ((10, 4), (10, 1), (10, 1)),    # a column of scores
    ((10, 4), (9,), (9,)),          # one score too few
    ((10, 4), (11,), (11,)),        # one score too many
]


@pytest.mark.parametrize("boxes_shape, scores_shape, named", NMS_BAD_SHAPES)
def test_nms_refuses_wrong_shapes_and_names_them(boxes_shape, scores_shape, named):
    """TestNMS.test_nms_input_errors (and the [N, 5] boxes case): a ValueError naming the shape
    it got, where torchvision raises a RuntimeError."""
    boxes, scores = torch.rand(boxes_shape) * 10, torch.rand(scores_shape)
    with pytest.raises(ValueError, match=_shape_pattern(*named)):
        fc.nms(boxes, scores, 0.5)


BATCHED_NMS_BAD_SHAPES = [  # (boxes, scores, idxs shapes, the shape the message must name)
    ((10, 5), (10,), (10,), (10, 5)),
    ((10, 4), (9,), (10,), (9,)),
    ((10, 4), (10, 1), (10,), (10, 1)),
    ((10, 4), (10,), (11,), (11,)),
    ((10, 4), (10,), (9,), (9,)),
    ((10, 4), (10,), (10, 1), (10, 1)),
]


@pytest.mark.parametrize("boxes_shape, scores_shape, idxs_shape, named", BATCHED_NMS_BAD_SHAPES)
def test_batched_nms_refuses_wrong_shapes_and_names_them(boxes_shape, scores_shape, idxs_shape, named):
    """TestNMS.test_nms_input_errors, for batched_nms: idxs must be [N] too."""
    boxes, scores = torch.rand(boxes_shape) * 10, torch.rand(scores_shape)
    idxs = torch.randint(0, 3, idxs_shape)
    with pytest.raises(ValueError, match=_shape_pattern(*named)):
        fc.batched_nms(boxes, scores, idxs, 0.5)


def test_nms_of_large_float16_boxes_keeps_what_float32_keeps():
    """TestNMS.test_nms_float16: boxes whose areas overflow float16 are still suppressed (the IoU
    is computed in float32), so float16 and float32 inputs keep the same boxes."""
    boxes32 = torch.tensor(LARGE_FLOAT_BOXES)
    scores32 = torch.tensor([0.64, 0.76, 0.40])
    boxes16, scores16 = boxes32.half(), scores32.half()
    assert (_pairwise_iou_float64(boxes16, boxes16) > 0.9).all()  # far above the threshold 0.2
    keep16 = fc.nms(boxes16, scores16, 0.2)
    assert keep16.tolist() == [1]  # only the best-scoring box survives
    assert torch.equal(keep16, fc.nms(boxes32, scores32, 0.2))
    assert torch.equal(keep16, tv.nms(boxes32, scores32, 0.2))
    keep16 = fc.batched_nms(boxes16, scores16, torch.zeros(3, dtype=torch.int64), 0.2)
    assert keep16.tolist() == [1]


# ─── batched_nms (TestNMS.test_batched_nms_implementations) ──────────────────────────────────


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_nms_equals_nms_run_on_each_category(seed, gen):
    """Boxes overlapping heavily (IoU ~0.8 to 1) at threshold 0.9 in four categories: the result
    is the union of greedy NMS run per category, ordered by decreasing score."""
    g = gen(seed)
    n = 1000
    boxes = torch.cat((torch.rand(n, 2, generator=g), torch.rand(n, 2, generator=g) + 10), 1)
    assert boxes[:, 0].max() < boxes[:, 2].min() and boxes[:, 1].max() < boxes[:, 3].min()
    scores = torch.rand(n, generator=g)
    idxs = torch.randint(0, 4, (n,), generator=g)
    kept = []
    for category in range(4):
        members = torch.where(idxs == category)[0]
        kept.append(members[_reference_nms(boxes[members], scores[members], 0.9)])
    kept = torch.cat(kept)
    expected = kept[torch.sort(scores[kept], descending=True, stable=True).indices]
    got = fc.batched_nms(boxes, scores, idxs, 0.9)
    assert torch.equal(got, expected)
    assert len(fc.nms(boxes, scores, 0.9)) < len(got) < n  # categories protect each other
    assert torch.equal(got, tv.batched_nms(boxes, scores, idxs, 0.9))


# ─── roi_align (TestRoIAlign) ─────────────────────────────────────────────────────────────────


def _bilinear_reference(plane: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """The value of ``plane`` ``[C, H, W]`` at (y, x), by the RoIAlign kernel's rule: zero outside
    ``[-1, H] x [-1, W]``; coordinates below 0 read the first row/column; from the last row/column
    on, the last one."""
    height, width = plane.shape[-2:]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return torch.zeros(plane.shape[0], dtype=torch.float64)
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    if y0 >= height - 1:
        y0 = y1 = height - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= width - 1:
        x0 = x1 = width - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * plane[:, y0, x0] + (1 - ly) * lx * plane[:, y0, x1]
            + ly * (1 - lx) * plane[:, y1, x0] + ly * lx * plane[:, y1, x1])


def _roi_align_reference(x, rois, output_size, spatial_scale, sampling_ratio, aligned):
    """RoIAlign by loops over boxes, bins and sampling points, in float64."""
    x = x.double()
    ph, pw = output_size
    offset = 0.5 if aligned else 0.0
    out = torch.zeros(len(rois), x.shape[1], ph, pw, dtype=torch.float64)
    for k, (batch, x1, y1, x2, y2) in enumerate(rois.double().tolist()):
        start_x, start_y = x1 * spatial_scale - offset, y1 * spatial_scale - offset
        roi_w = x2 * spatial_scale - offset - start_x
        roi_h = y2 * spatial_scale - offset - start_y
        if not aligned:  # the legacy mode makes every box at least 1 x 1
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_w, bin_h = roi_w / pw, roi_h / ph
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(bin_h)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(bin_w)
        count = max(grid_h * grid_w, 1)
        for i in range(ph):
            for j in range(pw):
                total = torch.zeros(x.shape[1], dtype=torch.float64)
                for a in range(grid_h):  # empty for an empty adaptive grid: the bin is 0
                    sy = start_y + i * bin_h + (a + 0.5) * bin_h / grid_h
                    for b in range(grid_w):
                        sx = start_x + j * bin_w + (b + 0.5) * bin_w / grid_w
                        total += _bilinear_reference(x[int(batch)], sy, sx)
                out[k, :, i, j] = total / count
    return out


# boxes in image pixels, for a map at scale 1/2 of size 10 x 12 (an image of 20 x 24); image 2
# has no boxes. Coordinates are multiples of 1/4, exact also in float16.
ROIS_PER_IMAGE = [
    [[0.0, 0.0, 18.0, 18.0],        # most of the map
     [1.5, 9.25, 8.0, 19.0],        # fractional corners
     [20.0, 16.0, 21.0, 16.5],      # tiny: 0.5 x 0.25 on the map
     [12.0, 8.0, 10.0, 6.0]],       # inverted
    [[10.25, 4.75, 23.75, 19.75],   # along the right and bottom edges
     [-3.0, -2.0, 6.0, 30.0]],      # partly outside (above, left and below)
    [],
]


@pytest.mark.parametrize("box_format", ["tensor", "list"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_equals_the_reference_loops(aligned, sampling_ratio, dtype, box_format, gen):
    """TestRoIAlign.test_forward: against a slow reference written with the bilinear rule, for
    aligned True/False, adaptive and fixed sampling grids, boxes as [K, 5] or as a list of
    [L, 4] (one image with none), float16/32/64 maps."""
    x = torch.rand(3, 5, 10, 12, generator=gen(3), dtype=torch.float64).to(dtype)
    per_image = [torch.tensor(b, dtype=dtype).reshape(-1, 4) for b in ROIS_PER_IMAGE]
    rois = torch.cat([torch.cat((torch.full((len(b), 1), float(i), dtype=dtype), b), 1)
                      for i, b in enumerate(per_image)])
    boxes = rois if box_format == "tensor" else per_image
    got = fc.roi_align(x, boxes, (3, 4), 0.5, sampling_ratio, aligned)
    expected = _roi_align_reference(x, rois, (3, 4), 0.5, sampling_ratio, aligned)
    assert got.shape == (6, 5, 3, 4) and got.dtype == dtype
    tol = {torch.float16: 4e-3, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)
    assert (expected.abs().sum((1, 2, 3)) > 0).sum() >= 4  # the boxes really sample the map


@pytest.mark.parametrize("boxes, named", [
    (torch.tensor([[0.0, 0, 3, 3], [1.0, 1, 4, 4], [2.0, 2, 5, 5]]), (3, 4)),   # [K, 4] tensor
    (torch.tensor([0.0, 0, 0, 3, 3]), (5,)),                                     # 1-D tensor
    ([torch.tensor([[0.0, 0, 3], [1.0, 1, 4]])], (2, 3)),                        # list of [L, 3]
    ([torch.zeros(1, 4), torch.tensor([[0.0, 0, 0, 3, 3], [0.0, 1, 1, 4, 4]])], (2, 5)),
])
def test_roi_align_refuses_boxes_of_the_wrong_shape(boxes, named):
    """TestRoIAlign.test_boxes_shape: boxes are a [K, 5] tensor or a list of [L, 4] tensors;
    anything else is a ValueError naming the shape it got (torchvision: an AssertionError)."""
    x = torch.linspace(1, 2 * 64, 2 * 64).reshape(2, 1, 8, 8)
    with pytest.raises(ValueError, match=_shape_pattern(*named)):
        fc.roi_align(x, boxes, (2, 2))


@pytest.mark.parametrize("aligned, shape, rois, output, scale, sampling_ratio", [
    (aligned, (1, 8, 5, 5), [[0, 0, 0, 4, 4], [0, 0, 2, 3, 4], [0, 2, 2, 4, 4]], 2, 1.0, 1)
    for aligned in (False, True)] + [  # torchvision's: one sampling point per bin
    (True, (1, 2, 6, 7), [[0, 1, 2, 17, 20], [0, -3, -2, 9, 30], [0, 20, 20, 31, 26]], 3, 0.25, -1),
], ids=["one_sample_per_bin", "aligned_one_sample_per_bin", "adaptive_boxes_partly_outside"])
def test_roi_align_gradcheck(aligned, shape, rois, output, scale, sampling_ratio, gen):
    """TestRoIAlign.test_backward: torch.autograd.gradcheck in float64 on a tiny input, one
    sampling point per bin; and with the adaptive sampling grid and boxes partly off the map."""
    x = torch.rand(*shape, generator=gen(4), dtype=torch.float64).requires_grad_()
    rois = torch.tensor(rois, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda t: fc.roi_align(t, rois, output, scale, sampling_ratio, aligned), (x,))


# ─── AnchorGenerator (test_models_detection_anchor_utils.py) ─────────────────────────────────


def test_anchor_generator_small_image_anchors_computed_by_hand():
    """Tester.test_anchor_generator: one 10 px anchor of ratio 1 on a 3 x 3 map of a 15 x 15
    image: stride 15 // 3 = 5, anchors (5x - 5, 5y - 5, 5x + 5, 5y + 5), row by row."""
    generator = fc.AnchorGenerator(((10,),), ((1.0,),))
    assert generator.num_anchors_per_location() == [1]
    anchors = generator((15, 15), [(3, 3)])
    expected = torch.tensor([[5.0 * x - 5, 5.0 * y - 5, 5.0 * x + 5, 5.0 * y + 5]
                             for y in range(3) for x in range(3)])
    assert anchors.shape == (9, 4)
    assert torch.equal(anchors, expected)
    # torchvision gives every image of the batch the same anchors
    theirs = TvAnchorGenerator(((10,),), ((1.0,),))(
        ImageList(torch.zeros(2, 3, 15, 15), [(15, 15)] * 2), [torch.zeros(2, 8, 3, 3)])
    assert len(theirs) == 2 and all(torch.equal(t, anchors) for t in theirs)


def test_anchor_generator_sizes_ratios_and_per_axis_strides_computed_by_hand():
    """Two sizes and three ratios (h / w) at each location of a 2 x 4 map of a 64 x 96 image
    (strides 32 down, 24 across): w = s / sqrt(r), h = s sqrt(r), half-sizes rounded, ratios
    outer and sizes inner."""
    sizes, ratios = (16, 40), (0.5, 1.0, 2.0)
    generator = fc.AnchorGenerator((sizes,), (ratios,))
    assert generator.num_anchors_per_location() == [6]
    base = []
    for r in ratios:
        for s in sizes:
            half_w, half_h = round(s / math.sqrt(r) / 2), round(s * math.sqrt(r) / 2)
            base.append((half_w, half_h))
    expected = torch.tensor([[24.0 * x - hw, 32.0 * y - hh, 24.0 * x + hw, 32.0 * y + hh]
                             for y in range(2) for x in range(4) for hw, hh in base])
    anchors = generator((64, 96), [(2, 4)])
    assert anchors.shape == (2 * 4 * 6, 4)
    assert torch.equal(anchors, expected)
    theirs = TvAnchorGenerator((sizes,), (ratios,))(
        ImageList(torch.zeros(1, 3, 64, 96), [(64, 96)]), [torch.zeros(1, 8, 2, 4)])[0]
    assert torch.equal(anchors, theirs)


def test_anchor_generator_refuses_mismatched_levels():
    """Tester.test_incorrect_anchors: as many ratio tuples as size tuples, and as many feature
    maps as levels (torchvision: an error when called)."""
    with pytest.raises(ValueError):
        fc.AnchorGenerator(((2, 4, 8), (32, 8)), ((0.5, 1.0),))
    generator = fc.AnchorGenerator(((32,), (64,)), ((0.5, 1.0),) * 2)
    with pytest.raises(ValueError, match="levels"):
        generator((800, 800), [(50, 50)])


# ─── sample_balanced (TestModelsDetectionUtils.test_balanced_positive_negative_sampler) ──────


def test_sample_balanced_takes_one_positive_and_three_negatives():
    """Six negatives, three positives, two ignored; 4 samples with a quarter positive: exactly
    one positive among the positives and three negatives among the negatives, every time."""
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, -1, -1])
    chosen_pos, chosen_neg = torch.zeros(11, dtype=torch.bool), torch.zeros(11, dtype=torch.bool)
    for seed in range(100):
        torch.manual_seed(seed)
        pos, neg = fc.sample_balanced(labels, 4, 0.25)
        assert pos.dtype == neg.dtype == torch.bool and pos.shape == neg.shape == (11,)
        assert pos.sum() == 1 and pos[6:9].sum() == 1
        assert neg.sum() == 3 and neg[:6].sum() == 3
        assert not (pos | neg)[9:].any()  # ignored candidates are never sampled
        chosen_pos |= pos
        chosen_neg |= neg
    # random picks: over 100 draws every candidate of each kind was picked at some point
    assert chosen_pos[6:9].all() and chosen_neg[:6].all()


@pytest.mark.parametrize("batch_size, positive_fraction", [(8, 0.5), (100, 0.5), (4, 0.25), (3, 1.0)])
def test_sample_balanced_counts_equal_torchvision_sampler(batch_size, positive_fraction):
    """Negatives fill the places the few positives leave; class labels >= 1 are positives."""
    labels = torch.tensor([0] * 10 + [3, 1] + [-1] * 5)
    torch.manual_seed(0)
    pos, neg = fc.sample_balanced(labels, batch_size, positive_fraction)
    tv_pos, tv_neg = tv_det_utils.BalancedPositiveNegativeSampler(batch_size, positive_fraction)([labels])
    assert pos.sum() == tv_pos[0].sum() and neg.sum() == tv_neg[0].sum()
    num_pos = min(2, int(batch_size * positive_fraction))
    assert pos.sum() == num_pos and neg.sum() == min(10, batch_size - num_pos)
    assert (labels[pos] >= 1).all() and (labels[neg] == 0).all()


# ─── match_boxes (torchvision's Matcher, used by the RPN and the ROI heads) ────────────────────


@pytest.mark.parametrize("high, low, allow_low_quality", [(0.7, 0.3, True), (0.5, 0.5, False)])
def test_match_boxes_equals_torchvision_matcher(high, low, allow_low_quality, gen):
    g = gen(5)
    xy = torch.rand(300, 2, generator=g) * 200
    anchors = torch.cat((xy, xy + torch.rand(300, 2, generator=g) * 60 + 4), 1)
    gt = torch.tensor([[10.0, 10, 60, 70], [100, 40, 180, 90], [30, 150, 45, 160], [5, 5, 250, 250]])
    anchors[:4] = gt + torch.tensor([2.0, -3, 4, 1])  # one close anchor per box
    anchors[150:] = anchors[:150]  # duplicates: ties for the best anchor of a box
    iou = fc.box_iou(gt, anchors)
    got = fc.match_boxes(iou.clone(), high, low, allow_low_quality)
    expected = tv_det_utils.Matcher(high, low, allow_low_quality)(iou.clone())
    assert torch.equal(got, expected)
    assert set(got.unique().tolist()) >= {-1, 0, 1, 2, 3}
    if allow_low_quality:
        assert (got == -2).any()  # between the thresholds: ignored


# ─── encode_boxes / decode_boxes (the box coder) ──────────────────────────────────────────────


def _random_boxes(n, g, extent=50.0):
    xy = torch.rand(n, 2, generator=g) * extent
    wh = (torch.rand(n, 2, generator=g) * extent).clamp(min=1.0)  # tiny boxes are unstable
    return torch.cat((xy, xy + wh), 1)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_then_decode_gives_the_boxes_back(weights, gen):
    """TestModelsDetectionUtils.test_box_linear_coder, for the (dx, dy, dw, dh) coder of the RPN
    (weights 1) and of the ROI head (10, 10, 5, 5); the deltas equal torchvision's BoxCoder's."""
    g = gen(6)
    boxes, proposals = _random_boxes(10, g), _random_boxes(10, g, extent=100.0)
    deltas = fc.encode_boxes(proposals, boxes, weights)
    assert deltas.shape == (10, 4)
    torch.testing.assert_close(fc.decode_boxes(proposals, deltas, weights), boxes, rtol=0, atol=1e-4)
    coder = tv_det_utils.BoxCoder(weights)
    torch.testing.assert_close(deltas, coder.encode_single(boxes, proposals), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fc.decode_boxes(proposals, deltas, weights),
                               coder.decode_single(deltas, proposals), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder_deltas_computed_by_hand(weights):
    """Centre offsets over the reference size, log size ratios, each times its weight."""
    wx, wy, ww, wh = weights
    reference = torch.tensor([[0.0, 0, 10, 20], [10.0, 10, 30, 50]])
    gt = torch.tensor([[5.0, 5, 15, 25], [0.0, 20, 80, 40]])
    # pair 1: centres (5, 10) -> (10, 15), sizes 10 x 20 -> 10 x 20
    # pair 2: centres (20, 30) -> (40, 30), sizes 20 x 40 -> 80 x 20
    expected = torch.tensor([[wx * 5 / 10, wy * 5 / 20, 0.0, 0.0],
                             [wx * 20 / 20, 0.0, ww * math.log(4.0), wh * math.log(0.5)]])
    torch.testing.assert_close(fc.encode_boxes(reference, gt, weights), expected)
    torch.testing.assert_close(fc.decode_boxes(reference, expected, weights), gt)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_decode_clamps_size_deltas_at_log_1000_over_16_per_class(weights):
    """dw and dh are clamped at log(1000 / 16) after dividing by their weight, so a huge delta
    grows a box 62.5 times at most; deltas [N, 4K] decode K boxes per reference box."""
    reference = torch.tensor([[0.0, 0, 10, 10], [20.0, 30, 60, 50]])
    _, _, ww, wh = weights
    deltas = torch.tensor([[0.0, 0, ww * 20, wh * 20, 0, 0, 0, 0],
                           [0.0, 0, -ww * 1, wh * 3, 0.5, -0.5, ww * 1, 0]])
    got = fc.decode_boxes(reference, deltas, weights)
    assert got.shape == (2, 8)
    width, height = got[0, 2] - got[0, 0], got[0, 3] - got[0, 1]
    torch.testing.assert_close(width, torch.tensor(10 * 1000 / 16))
    torch.testing.assert_close(height, torch.tensor(10 * 1000 / 16))
    torch.testing.assert_close(got[0, 4:], reference[0])  # zero deltas: the box itself
    for k in range(2):  # each class's deltas decode as if alone
        torch.testing.assert_close(got[:, 4 * k:4 * k + 4],
                                   fc.decode_boxes(reference, deltas[:, 4 * k:4 * k + 4], weights))
    theirs = tv_det_utils.BoxCoder(weights, bbox_xform_clip=math.log(1000.0 / 16)).decode_single(
        deltas, reference)
    torch.testing.assert_close(got, theirs)


# ─── targets without boxes (test_models_detection_negative_samples.py) ───────────────────────


def test_rpn_with_no_ground_truth_boxes_samples_only_negatives(empty_target):
    """TestModelsDetectionNegativeSamples.test_targets_to_anchors: with no boxes every anchor is
    background. With the objectness logits all equal to b, the classification loss is the
    cross-entropy of b against label 0, log(1 + e^b), and the box loss is exactly 0."""
    torch.manual_seed(0)
    sizes = ((32,), (64,), (128,), (256,), (512,))
    generator = fc.AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
    head = fc.RPNHead(4, generator.num_anchors_per_location()[0])
    rpn = fc.RegionProposalNetwork(head, generator).train()
    with torch.no_grad():
        head.cls_logits.weight.zero_()
        head.cls_logits.bias.fill_(0.3)
    features = [torch.rand(1, 4, s, s) for s in (25, 13, 7, 4, 2)]
    proposals, losses = rpn(features, [(100, 100)], (100, 100), [empty_target])
    assert set(losses) == {"rpn_cls", "rpn_box"}
    assert losses["rpn_box"].item() == 0.0
    torch.testing.assert_close(losses["rpn_cls"], torch.tensor(math.log1p(math.exp(0.3))))
    assert len(proposals) == 1 and proposals[0].shape[1] == 4


def test_roi_heads_with_no_ground_truth_boxes_label_every_proposal_background(gen, empty_target):
    """TestModelsDetectionNegativeSamples.test_assign_targets_to_proposals: with no boxes every
    proposal is sampled as background (label 0); the box loss is exactly 0 and the class loss is
    the cross-entropy of the logits against class 0."""
    torch.manual_seed(0)
    roi_heads = fc.ROIHeads(fc.ROIAlign(7, 2), fc.TwoMLPHead(4 * 7 * 7, 32),
                            fc.FastRCNNPredictor(32, 2)).train()
    proposals = [_random_boxes(20, gen(7), extent=45.0)]
    sampled, labels, _ = roi_heads.sample(proposals, [empty_target])
    assert sampled[0].shape == (20, 4)  # fewer than 512 proposals: all are sampled
    assert labels[0].dtype == torch.int64 and labels[0].shape == (20,)
    assert (labels[0] == 0).all()
    bias = torch.tensor([0.2, -0.4])
    with torch.no_grad():
        roi_heads.predictor.cls_score.weight.zero_()
        roi_heads.predictor.cls_score.bias.copy_(bias)
    features = [torch.rand(1, 4, s, s) for s in (25, 13, 7, 4)]
    _, losses = roi_heads(features, proposals, [(100, 100)], [empty_target])
    assert losses["roi_box"].item() == 0.0
    torch.testing.assert_close(losses["roi_cls"], -torch.log_softmax(bias, 0)[0])


def test_detector_trains_on_an_image_without_boxes(empty_target):
    """TestModelsDetectionNegativeSamples.test_forward_negative_sample_frcnn: a training forward
    of one 100 x 100 image with no boxes gives finite losses, both box losses exactly 0, and
    finite gradients."""
    torch.manual_seed(0)
    model = fc.tiny_detector(2).train()
    losses = model([torch.rand(3, 100, 100)], [empty_target])
    assert losses["rpn_box"].item() == 0.0 and losses["roi_box"].item() == 0.0
    assert losses["rpn_cls"] > 0 and losses["roi_cls"] > 0
    assert all(torch.isfinite(v) for v in losses.values())
    parts = ("rpn_cls", "rpn_box", "roi_cls", "roi_box")
    torch.testing.assert_close(losses["total"], sum(losses[k] for k in parts))
    losses["total"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)


# ─── ResNet50 trainable layers (TestModelsDetectionUtils: frozen layers, _validate_trainable_layers)


@pytest.mark.parametrize("trainable_layers", [0, 3])
def test_resnet50_trainable_layers_without_weights_warns_and_trains_every_layer(trainable_layers):
    """test_validate_resnet_inputs_detection: without pretrained weights, asking for frozen
    stages has no effect: torchvision warns and trains all 5; so does ResNet50."""
    with pytest.warns(UserWarning):
        assert _validate_trainable_layers(False, trainable_layers, 5, 3) == 5
    with pytest.warns(UserWarning, match="no effect without pretrained weights"):
        backbone = fc.ResNet50(weights=None, trainable_layers=trainable_layers)
    assert all(p.requires_grad for p in backbone.parameters())


def test_resnet50_without_weights_and_default_layers_trains_everything_silently():
    """torchvision: no warning when trainable layers are left at their default."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _validate_trainable_layers(False, None, 5, 3) == 5
        backbone = fc.ResNet50(weights=None)
    assert all(p.requires_grad for p in backbone.parameters())


@pytest.fixture(scope="module")
def torchvision_resnet50():
    """torchvision's ResNet-50 with frozen BatchNorm, built once: each test re-freezes it."""
    return tv_resnet50(weights=None, norm_layer=TvFrozenBatchNorm2d)


@pytest.mark.parametrize("trainable_layers", [0, 1, 2, 3, 4, 5])
def test_resnet50_frozen_parameters_equal_torchvision(resnet50_state, torchvision_resnet50,
                                                      trainable_layers):
    """test_resnet_fpn_backbone_frozen_layers: with (here random) pretrained weights and frozen
    BatchNorm, the parameters that train are those torchvision's ResNet-50 FPN backbone trains,
    and the frozen ones come first."""
    ours = fc.ResNet50(resnet50_state, trainable_layers=trainable_layers, frozen_bn=True)
    for p in torchvision_resnet50.parameters():
        p.requires_grad_(True)
    theirs = _resnet_fpn_extractor(torchvision_resnet50, trainable_layers).body  # freezes in place
    our_flags = [(n, p.requires_grad) for n, p in ours.named_parameters()]
    their_flags = [(n, p.requires_grad) for n, p in theirs.named_parameters()]
    assert our_flags == their_flags
    frozen = sum(not trains for _, trains in our_flags)
    assert all(trains for _, trains in our_flags[frozen:])  # a frozen prefix, then all train
    assert (frozen == 0) == (trainable_layers == 5)
