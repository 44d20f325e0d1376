"""Faster R-CNN from scratch: the detector, the one module every notebook imports.

The file reads top to bottom in the order data flows through a detector:

1. constants          image size, classes, device, ImageNet statistics, COCO names
2. box utilities/ops  IoU, the box coder; NMS and RoIAlign (from frcnn_ops.py)
3. data               samples, the COCO stream (its files read by frcnn_sources.py), synthetic
                      shapes, your own COCO-format and VOC folders, collate
4. backbone           ResNet-50 with frozen BatchNorm, the feature pyramid, the tiny backbone
5. RPN                anchors, the RPN head, proposals and their losses
6. ROI head           multi-level RoIAlign, the two-layer head, the predictor
7. detector           input checks, ``FasterRCNN``, its factories (``fasterrcnn_resnet50_fpn``,
                      ``tiny_detector``), loading torchvision's weights, ``transfer_weights``

Training and evaluation live in ``frcnn_engine.py``, what the notebooks share in
``frcnn_course.py``; a name asked of this module that moved there names its new home.

Conventions used throughout
---------------------------
* Images are float tensors ``[3, H, W]`` normalised with ``IMAGENET_MEAN``/``IMAGENET_STD``.
* Boxes are absolute pixels ``[x1, y1, x2, y2]`` (x right, y down), float32.
* Labels are ``1..num_classes-1``; ``0`` is the background. ``num_classes`` counts it.

The mathematics follows torchvision's ``fasterrcnn_resnet50_fpn`` line by line, so its published
COCO weights load into ``FasterRCNN.from_torchvision`` and give the same detections.
"""

from __future__ import annotations

import glob
import math
import os
import sys
import warnings
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, IterableDataset, get_worker_info

Tensor = torch.Tensor


# ─── 1. Constants ──────────────────────────────────────────────────────────────────────────────

IMG_SIZE = 400
"""Training resolution in pixels: the shorter image side (or the square side in ``"square"``
resize mode). Half of torchvision's 800, so that a training step costs about a quarter of the
pixels; its GPU memory has not been measured here (torchvision publishes 5.2 GB per GPU for 2
images at 800 px, in its models table)."""


NUM_CLASSES = 81
"""Classes the COCO detector predicts, background included: index 0 is the background and
1..80 are the COCO categories of ``COCO_NAMES``."""


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
"""The device the notebooks use: CUDA when available, else the CPU."""


IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
"""Per-channel mean of ImageNet RGB images in [0, 1], shape [3, 1, 1]."""


IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
"""Per-channel standard deviation of ImageNet RGB images in [0, 1], shape [3, 1, 1]."""


COCO_NAMES = [
    "__background__",
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
]  # fmt: skip
"""The 81 class names: index 0 is ``"__background__"``, 1..80 the COCO categories in order."""


COCO_CATEGORY_IDS = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
    56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90,
]  # fmt: skip
"""The official (sparse) COCO category id of each contiguous label 1..80:
``COCO_CATEGORY_IDS[label - 1]``. The official annotation files and torchvision's 91-way COCO
head index classes by these ids; the course uses the contiguous labels."""


BBOX_XFORM_CLIP = math.log(1000.0 / 16)
"""Upper bound on the predicted log-scale deltas dw, dh before ``exp``: a box may grow at most
1000/16 = 62.5 times its reference, which keeps ``exp`` finite early in training."""


def rank_and_world_size() -> Tuple[int, int]:
    """This process (of a data-parallel run)'s rank and the number of processes: (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def say(message: str) -> None:
    """Tell the user something outside any progress bar: a line on stderr, flushed at once."""
    print(message, file=sys.stderr, flush=True)


# ─── 2. Box utilities and ops ──────────────────────────────────────────────────────────────────


def _upcast(t: Tensor) -> Tensor:
    """Widen types that would overflow or round badly in products of coordinates, as torchvision:
    float16/bfloat16 -> float32, int8/int16/uint8 -> int32; float32/64 and int32/64 stay."""
    if t.is_floating_point():
        return t if t.dtype in (torch.float32, torch.float64) else t.float()
    return t if t.dtype in (torch.int32, torch.int64) else t.int()


def box_area(boxes: Tensor) -> Tensor:
    """Area of boxes ``[N, 4]`` (x1, y1, x2, y2) in square pixels, shape ``[N]``.

    Small types are widened first (see ``_upcast``): a 100 x 100 box in int8 has area 10000,
    not the 16 that int8 arithmetic would wrap to."""
    boxes = _upcast(boxes)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """Pairwise intersection over union, ``[N, 4] x [M, 4] -> [N, M]``.

    IoU(a, b) = |a ∩ b| / (|a| + |b| - |a ∩ b|), computed exactly as ``torchvision.ops.box_iou``
    (no epsilon, so two zero-area boxes give NaN there too; the detector never compares such boxes).
    Small types are widened first, as there: float16 boxes give a float32 IoU, integer boxes a
    float one.
    """
    boxes_a, boxes_b = _upcast(boxes_a), _upcast(boxes_b)
    area_a, area_b = box_area(boxes_a), box_area(boxes_b)
    top_left = torch.max(boxes_a[:, None, :2], boxes_b[None, :, :2])
    bottom_right = torch.min(boxes_a[:, None, 2:], boxes_b[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def encode_boxes(
    reference: Tensor, gt_boxes: Tensor, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)
) -> Tensor:
    """Regression targets that move each reference box onto its ground-truth box.

    With reference centre/size (x_a, y_a, w_a, h_a), box (x, y, w, h) and weights (wx, wy, ww, wh)::

        dx = wx (x - x_a) / w_a     dy = wy (y - y_a) / h_a
        dw = ww log(w / w_a)        dh = wh log(h / h_a)

    Args:
        reference: ``[N, 4]`` anchors or proposals.
        gt_boxes: ``[N, 4]`` the matched ground-truth boxes.
        weights: the RPN uses (1, 1, 1, 1), the ROI head (10, 10, 5, 5), which scales the
            targets of the second stage up to a unit-ish range.

    Returns:
        ``[N, 4]`` deltas (dx, dy, dw, dh); :func:`decode_boxes` inverts them.
    """
    wx, wy, ww, wh = weights
    ref_w = reference[:, 2] - reference[:, 0]
    ref_h = reference[:, 3] - reference[:, 1]
    ref_x = reference[:, 0] + 0.5 * ref_w
    ref_y = reference[:, 1] + 0.5 * ref_h
    gt_w = gt_boxes[:, 2] - gt_boxes[:, 0]
    gt_h = gt_boxes[:, 3] - gt_boxes[:, 1]
    gt_x = gt_boxes[:, 0] + 0.5 * gt_w
    gt_y = gt_boxes[:, 1] + 0.5 * gt_h
    return torch.stack(
        (
            wx * (gt_x - ref_x) / ref_w,
            wy * (gt_y - ref_y) / ref_h,
            ww * torch.log(gt_w / ref_w),
            wh * torch.log(gt_h / ref_h),
        ),
        dim=1,
    )


def decode_boxes(
    reference: Tensor, deltas: Tensor, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)
) -> Tensor:
    """Apply deltas to reference boxes: the inverse of :func:`encode_boxes`.

    Args:
        reference: ``[N, 4]`` anchors or proposals.
        deltas: ``[N, 4 * K]``, K sets of (dx, dy, dw, dh) per box (K = 1 in the RPN, one per class
            in the ROI head).
        weights: the same weights the deltas were encoded with.

    Returns:
        ``[N, 4 * K]`` boxes. dw and dh are clamped at ``BBOX_XFORM_CLIP`` before ``exp``.
    """
    reference = reference.to(deltas.dtype)
    wx, wy, ww, wh = weights
    ref_w = reference[:, 2:3] - reference[:, 0:1]
    ref_h = reference[:, 3:4] - reference[:, 1:2]
    ref_x = reference[:, 0:1] + 0.5 * ref_w
    ref_y = reference[:, 1:2] + 0.5 * ref_h
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw = (deltas[:, 2::4] / ww).clamp(max=BBOX_XFORM_CLIP)
    dh = (deltas[:, 3::4] / wh).clamp(max=BBOX_XFORM_CLIP)
    x = dx * ref_w + ref_x
    y = dy * ref_h + ref_y
    half_w = 0.5 * torch.exp(dw) * ref_w
    half_h = 0.5 * torch.exp(dh) * ref_h
    return torch.stack((x - half_w, y - half_h, x + half_w, y + half_h), dim=2).flatten(1)


def clip_boxes(boxes: Tensor, image_size: Tuple[int, int]) -> Tensor:
    """Clip boxes ``[..., 4]`` to an image of ``(height, width)`` pixels."""
    height, width = image_size
    x = boxes[..., 0::2].clamp(min=0, max=width)
    y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((x, y), dim=-1).reshape(boxes.shape)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices of the boxes ``[N, 4]`` whose width and height are both at least ``min_size``."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return torch.where((w >= min_size) & (h >= min_size))[0]


# NMS and RoIAlign, written in tensor operations in ``frcnn_ops.py`` (the course's counterpart of
# ``torchvision.ops``). The model calls them through ``run_op``, which uses torchvision's compiled
# kernels by default and these ones with ``set_ops_backend("pure")`` or ``FRCNN_OPS_BACKEND=pure``.
from frcnn_ops import (  # noqa: E402, F401  (here, in the section they belong to; re-exported)
    OPS_BACKENDS, batched_nms, cpu_threads, nms, ops_backend, roi_align, rois_from_boxes, run_op,
    set_ops_backend,
)


# ─── 3. Data ───────────────────────────────────────────────────────────────────────────────────
# Every source below yields the same sample: ``(image, target)`` with ``image`` a normalised
# float tensor [3, H, W] and ``target`` a dict of tensors:
#
#   boxes     float32 [G, 4]  x1, y1, x2, y2 in pixels of the returned image
#   labels    int64 [G]       1..num_classes-1 (0 is the background)
#   area      float32 [G]     object area in square pixels of the returned image (the annotation's
#                             area when the source has one, which COCO's small/medium/large use)
#   iscrowd   int64 [G]       1 for COCO "crowd" regions (kept for evaluation only), else 0
#   image_id  int64 []        the source's image id (the index for synthetic images)
#   orig_size int64 [2]       (height, width) of the image as stored in the source
#   size      int64 [2]       (height, width) of the returned image, before any batch padding
#   scale     float32 [4]     (sx, sy, sx, sy): returned pixels per original pixel, box-ready
#   flipped   bool []         whether the image was mirrored left-right (training augmentation)
#
# ``boxes_to_original(boxes, target)`` undoes the flip and the resize, which is how predictions
# are mapped back to the original pixels for evaluation. All values are tensors, so a training
# loop may move a whole target to the GPU with ``{k: v.to(device) for k, v in target.items()}``.

# Reading COCO's files, from the hub or from disk, lives in ``frcnn_sources.py``: it opens every
# kind of source into rows and a function that turns a row into a record (image, boxes, labels).
from frcnn_sources import (HUB_COCO, _open_image, check_hub, export_line,  # noqa: E402, F401
                           find_export, open_source, read_coco_file, read_voc_folder,
                           unreachable_reason, upright)


SHAPE_NAMES = ["__background__", "circle", "square", "triangle"]
"""Class names of ``SyntheticShapesDataset``: index 0 is the background, as in ``COCO_NAMES``."""

SHAPE_KINDS = ("circle", "square", "triangle", "ring", "cross", "star", "bar")
"""Every shape ``SyntheticShapesDataset`` can draw (its ``shapes`` argument); it draws the first
three, the classes of :data:`SHAPE_NAMES`, unless told otherwise."""


def load_rgb(image) -> Tensor:
    """Any PIL image as a uint8 RGB tensor [3, H, W].

    Grayscale (``L``), palette (``P``), ``RGBA``, ``LA`` and ``CMYK`` images are converted to RGB;
    a palette image goes through RGBA so that its transparency is read correctly.
    """
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def resized_size(height: int, width: int, resize: Optional[str] = "shorter",
                 min_size: int = IMG_SIZE, max_size: Optional[int] = None) -> Tuple[int, int]:
    """The (height, width) in pixels that an image of ``height x width`` is resized to.

    * ``"shorter"``: keep the aspect ratio, shorter side ``min_size``, longer side at most
      ``max_size`` (default ``min_size * 1333 / 800``, torchvision's ratio). The scale and the
      rounding down are torchvision's ``GeneralizedRCNNTransform``, so ``min_size=800,
      max_size=1333`` reproduces the input its published COCO weights were evaluated on. Objects
      keep their shape; at the default size a 640 x 480 image becomes 533 x 400, not 400 x 400.
    * ``"square"``: ``min_size x min_size``, stretching the image (the seed's behaviour).
    * ``None``: keep the original size.
    """
    if resize is None:
        return height, width
    if resize == "square":
        return min_size, min_size
    if resize != "shorter":
        raise ValueError(f"resize={resize!r} is not a resize mode: use 'shorter', 'square' or None")
    max_size = max_size or int(min_size * 1333 / 800)
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return math.floor(height * scale), math.floor(width * scale)


def flip_boxes(boxes: Tensor, width: float) -> Tensor:
    """Boxes ``[N, 4]`` mirrored left-right in an image ``width`` pixels wide."""
    return torch.stack((width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]), 1)


def boxes_to_original(boxes: Tensor, target: Dict[str, Tensor]) -> Tensor:
    """Map boxes [N, 4] from a returned image's pixels back to the source image's pixels.

    Undoes the flip (``target["flipped"]``, mirrored about the width ``target["size"][1]``), then
    the resize (divides by ``target["scale"]``), then clips to ``target["orig_size"]``. A target
    without these keys (your own data) leaves the boxes as they are.
    """
    boxes = boxes.float()
    if "flipped" in target and bool(target["flipped"]):
        boxes = flip_boxes(boxes, float(target["size"][1]))
    if "scale" in target:
        boxes = boxes / target["scale"].to(boxes.device)
    if "orig_size" in target:
        boxes = clip_boxes(boxes, tuple(int(s) for s in target["orig_size"]))
    return boxes


class SampleOptions:
    """How a dataset turns its images into samples: the resize (see :func:`resized_size`) and the
    training-time options of :func:`make_sample`, with the defaults :class:`COCOStreamDataset`
    documents. Shared by both datasets, checked once here."""

    def __init__(self, resize: Optional[str], min_size: int, max_size: Optional[int], train: bool,
                 flip_prob: Optional[float], skip_empty: Optional[bool] = None):
        resized_size(2, 1, resize, min_size, max_size)  # validates the resize arguments
        self.resize, self.min_size, self.max_size, self.train = resize, min_size, max_size, train
        self.flip_prob = (0.5 if train else 0.0) if flip_prob is None else flip_prob
        self.skip_empty = train if skip_empty is None else skip_empty

    def sample(self, image, boxes, labels, image_id, area=None, iscrowd=None):
        """:func:`make_sample` with these options."""
        return make_sample(image, boxes, labels, image_id, area, iscrowd, resize=self.resize,
                           min_size=self.min_size, max_size=self.max_size,
                           flip_prob=self.flip_prob, train=self.train, skip_empty=self.skip_empty)


def make_sample(image, boxes: Tensor, labels: Tensor, image_id: int,
                area: Optional[Tensor] = None, iscrowd: Optional[Tensor] = None, *,
                resize: Optional[str] = "shorter", min_size: int = IMG_SIZE,
                max_size: Optional[int] = None, flip_prob: float = 0.0,
                train: bool = False, skip_empty: bool = False):
    """Turn one annotated image into a sample ``(image [3, H, W], target)``, or ``None``.

    Args:
        image: a PIL image (decoded only if the sample is kept) or a uint8 tensor [3, H0, W0].
        boxes: float [G, 4] x1, y1, x2, y2 in the image's own pixels.
        labels: int64 [G], 1..num_classes-1.
        image_id: the id recorded in the target.
        area: float [G] the annotation's area in square pixels (default: the box area).
        iscrowd: int [G] COCO crowd flags (default: zeros).
        resize, min_size, max_size: see :func:`resized_size`.
        flip_prob: probability of a left-right flip (torch's global RNG, so seeded per worker).
        train: drop crowd regions (they only mark areas that evaluation ignores).
        skip_empty: return ``None`` when no box is left.

    Boxes are clipped to the image and degenerate ones (zero width or height after resizing)
    are dropped. The image is normalised, then resized with bilinear interpolation
    (``align_corners=False``, no antialiasing), in that order, as torchvision does.
    """
    height0, width0 = image.shape[-2:] if isinstance(image, Tensor) else image.size[::-1]
    height, width = resized_size(height0, width0, resize, min_size, max_size)
    sx, sy = width / width0, height / height0
    scale = torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if area is None:
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area = torch.as_tensor(area, dtype=torch.float32).reshape(-1)
    iscrowd = torch.zeros_like(labels) if iscrowd is None else torch.as_tensor(iscrowd).long()
    boxes = clip_boxes(boxes, (height0, width0)) * scale
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if train:
        keep &= iscrowd == 0
    boxes, labels, area, iscrowd = boxes[keep], labels[keep], area[keep] * sx * sy, iscrowd[keep]
    if skip_empty and not bool((iscrowd == 0).any()):
        return None

    pixels = image if isinstance(image, Tensor) else load_rgb(image)
    pixels = (pixels.float() / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    if (height, width) != (height0, width0):
        pixels = F.interpolate(pixels[None], size=(height, width), mode="bilinear",
                               align_corners=False)[0]
    flipped = flip_prob > 0 and float(torch.rand(())) < flip_prob
    if flipped:
        pixels = pixels.flip(-1)
        boxes = flip_boxes(boxes, width)
    return pixels, {
        "boxes": boxes, "labels": labels, "area": area, "iscrowd": iscrowd,
        "image_id": torch.tensor(int(image_id)),
        "orig_size": torch.tensor([height0, width0]), "size": torch.tensor([height, width]),
        "scale": scale, "flipped": torch.tensor(flipped),
    }


# The COCO stream ───────────────────────────────────────────────────────────────────────────────


def _reader_index() -> Tuple[int, int]:
    """(index, count) of this reader among all DataLoader workers of all DDP processes."""
    worker = get_worker_info()
    index, count = (worker.id, worker.num_workers) if worker is not None else (0, 1)
    rank, world = rank_and_world_size()
    return rank * count + index, world * count


class COCOStreamDataset(IterableDataset):
    """COCO 2017 detection samples, streamed from the hub or read from a local copy.

    Each sample is ``(image, target)``: ``image`` a normalised float tensor [3, H, W] and
    ``target`` the dict described at the top of this section (``boxes``, ``labels`` 1..80,
    ``image_id``, ``orig_size``, ``scale``, ...).

    Args:
        split: ``"train"`` or ``"val"`` (the hub's names; local sources may hold others).
        max_samples: stop after this many samples in all (shared among DataLoader workers);
            ``None`` reads the whole split.
        source: where the data comes from; every source gives the same samples:

            * ``HUB_COCO`` (``"detection-datasets/coco"``) or another hub dataset with its
              schema, streamed; its category names are matched to ``COCO_NAMES``.
            * a directory with a local copy of the hub's parquet files (``data/{split}-*.parquet``
              or ``.../{split}/*.parquet``), streamed from disk.
            * a directory in the official COCO layout: ``annotations/instances_{split}2017.json``
              and ``{split}2017/`` images; boxes ``[x, y, w, h]``, category ids 1..90 mapped onto
              labels 1..80 by name.
            * a ``datasets.Dataset``/``IterableDataset`` (or a dict of them by split) with the
              hub's features.
        resize, min_size, max_size: the resize of :func:`resized_size`, by default ``"shorter"``
            with the shorter side ``IMG_SIZE``; images of mixed sizes are padded into one batch
            by the detector (:meth:`FasterRCNN.batch_images`).
        train: training mode: random horizontal flips, crowd regions dropped, images without
            objects skipped. Default: ``split == "train"``.
        flip_prob: probability of a horizontal flip; default 0.5 in training mode, else 0.
        skip_empty: skip images without objects; default ``train``. Evaluation keeps them, since
            false detections on them count.
        shuffle_buffer: 0 keeps the order. Otherwise a stream is shuffled with a buffer of this
            many samples (and its shard order), a map-style source with a full permutation.
            Call :meth:`set_epoch` to draw a new order each epoch.
        seed: seed of the shuffle.
        hub_timeout: seconds to wait for the hub before failing with the offline alternatives.

    In a ``DataLoader`` with several workers (and under DDP) every reader takes its own share of
    the source (whole shards where they divide evenly), so each sample comes out exactly once.
    """

    class_names = COCO_NAMES

    def __init__(self, split: str = "train", max_samples: Optional[int] = None,
                 source=HUB_COCO, *, resize: Optional[str] = "shorter",
                 min_size: int = IMG_SIZE, max_size: Optional[int] = None,
                 train: Optional[bool] = None, flip_prob: Optional[float] = None,
                 skip_empty: Optional[bool] = None, shuffle_buffer: int = 0, seed: int = 0,
                 hub_timeout: float = 5.0):
        super().__init__()
        if max_samples is not None and max_samples < 0:
            raise ValueError(f"max_samples must be None or >= 0, got {max_samples}")
        self.split, self.max_samples = split, max_samples
        self.options = SampleOptions(resize, min_size, max_size,
                                     split == "train" if train is None else train, flip_prob,
                                     skip_empty)
        self.shuffle_buffer, self.seed, self.epoch = shuffle_buffer, seed, 0
        self.num_classes = len(COCO_NAMES)
        self.rows, self.to_record = open_source(source, split, COCO_NAMES, hub_timeout)

    def set_epoch(self, epoch: int) -> None:
        """Use the shuffle order of ``epoch`` (call before each epoch when shuffling)."""
        self.epoch = epoch

    def __iter__(self):
        index, count = _reader_index()
        quota = None  # this reader's share of max_samples
        if self.max_samples is not None:
            quota = self.max_samples // count + (index < self.max_samples % count)
            if quota == 0:
                return
        yielded = 0
        for row in self._reader_rows(index, count):
            record = self.to_record(row)
            sample = self.options.sample(record["image"], record["boxes"], record["labels"],
                                         record["image_id"], record["area"], record["iscrowd"])
            if sample is None:
                continue
            yield sample
            yielded += 1
            if quota is not None and yielded >= quota:
                return

    def _reader_rows(self, index: int, count: int) -> Iterator:
        """This reader's share of the rows, shuffled when asked: every ``count``-th row of a
        permutation of an indexable source; whole shards (``split_dataset_by_node``) of a stream."""
        rows = self.rows
        if hasattr(rows, "__len__"):  # a list of records or a datasets.Dataset: indexable
            order = range(len(rows))
            if self.shuffle_buffer:
                generator = torch.Generator().manual_seed(self.seed + self.epoch)
                order = torch.randperm(len(rows), generator=generator).tolist()
            return (rows[i] for i in order[index::count])
        from datasets.distributed import split_dataset_by_node

        if self.shuffle_buffer:
            rows = rows.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        rows.set_epoch(self.epoch)
        if count > 1:
            rows = split_dataset_by_node(rows, rank=index, world_size=count)
        # .iter() rather than iter(): datasets would otherwise shard by worker a second time
        return ({k: v[0] for k, v in batch.items()} for batch in rows.iter(batch_size=1))


# Synthetic shapes ──────────────────────────────────────────────────────────────────────────────


class SyntheticShapesDataset(Dataset):
    """Coloured circles, squares and triangles on textured backgrounds, made on the fly.

    The offline default of the course: every notebook, ``make run``, the tests and the
    benchmarks train on it with no network. Image ``index`` depends only on ``(seed, index)``,
    so any worker renders the same pixels, and a 128 px image takes a few milliseconds.

    Each image has a smooth random texture (a base colour, two sine waves, grain) and
    ``objects[0]..objects[1]`` non-overlapping shapes of random colour (kept away from the
    background colour) whose side is ``object_size[0]..object_size[1]`` of the shorter image
    side, log-uniformly: small to large objects. The box of a shape is the tight box of its
    pixels. Labels index :data:`SHAPE_NAMES` (1 circle, 2 square, 3 triangle), or with ``shapes``
    given, ``class_names = ["__background__", *shapes]``.

    Args:
        num_images: length of the dataset.
        image_size: side in pixels, or ``(height, width)``.
        seed: seed of the whole dataset.
        objects: (fewest, most) shapes per image.
        object_size: (smallest, largest) shape side as a fraction of the shorter image side.
        texture: strength of the background waves (0 gives a flat background, an easier task).
        shapes: the kinds drawn, any of :data:`SHAPE_KINDS` (default circle, square, triangle;
            the default's images are the same as before the option existed). Shape ``k`` of the
            tuple has label ``k + 1``. A ring is a circle with a hole, a cross a plus sign with
            arms a third of its side wide, a star five-pointed, a bar as wide as a square and a
            third as high.
        train, flip_prob: as in :class:`COCOStreamDataset` (flip probability 0.5 when training;
            every shape is mirror-symmetric about its vertical axis).
        resize, min_size, max_size: as in :class:`COCOStreamDataset`; default ``None`` keeps the
            rendered size (render at the size you want rather than resampling).

    Returns per index the sample ``(image [3, H, W], target)`` of the COCO stream's format.
    """

    def __init__(self, num_images: int = 512, image_size=128, seed: int = 0, *,
                 objects: Tuple[int, int] = (1, 4), object_size: Tuple[float, float] = (0.12, 0.5),
                 texture: float = 1.0, shapes: Sequence[str] = SHAPE_KINDS[:3],
                 train: bool = False, flip_prob: Optional[float] = None,
                 resize: Optional[str] = None, min_size: int = IMG_SIZE,
                 max_size: Optional[int] = None):
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        if min(height, width) < 16 or not 1 <= objects[0] <= objects[1]:
            raise ValueError(f"need image_size >= 16 px and 1 <= objects[0] <= objects[1], got "
                             f"image_size={image_size}, objects={objects}")
        if not 0 < object_size[0] <= object_size[1] <= 1:
            raise ValueError(f"object_size must satisfy 0 < low <= high <= 1, got {object_size}")
        if not shapes or any(kind not in SHAPE_KINDS for kind in shapes) \
                or len(set(shapes)) < len(shapes):
            raise ValueError(f"shapes must be distinct names from {SHAPE_KINDS}, got {shapes}")
        self.num_images, self.image_size, self.seed = num_images, (height, width), seed
        self.objects, self.object_size, self.texture = objects, object_size, texture
        self.options = SampleOptions(resize, min_size, max_size, train, flip_prob, skip_empty=False)
        self.shapes = tuple(shapes)
        self.class_names = ["__background__", *self.shapes]
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int):
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        index %= self.num_images
        image, boxes, labels = self.render(index)
        return self.options.sample(image, boxes, labels, index)

    def render(self, index: int) -> Tuple[Tensor, Tensor, Tensor]:
        """Image ``index`` before any transform: uint8 [3, H, W], boxes [G, 4], labels [G]."""
        rng = np.random.default_rng([self.seed, index])
        height, width = self.image_size
        y, x = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5  # pixel centres
        background = rng.uniform(0.2, 0.8, 3)
        image = np.broadcast_to(background, (height, width, 3)).copy()
        for _ in range(2):  # two soft waves of random direction, period (px) and colour
            angle, period, phase = rng.uniform(0, np.pi), rng.uniform(6, 40), rng.uniform(0, 6.3)
            wave = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + phase)
            image += wave[..., None] * rng.uniform(0.03, 0.1, 3) * self.texture

        side = min(height, width)
        low, high = np.log(np.array(self.object_size) * side)
        boxes, labels = [], []
        for _ in range(rng.integers(self.objects[0], self.objects[1] + 1)):
            for _attempt in range(20):  # find a free spot, 2 px away from the other shapes
                s = max(4, int(round(np.exp(rng.uniform(low, high)))))
                x0, y0 = rng.integers(0, width - s + 1), rng.integers(0, height - s + 1)
                if all(x0 >= b[2] + 2 or x0 + s + 2 <= b[0] or y0 >= b[3] + 2 or y0 + s + 2 <= b[1]
                       for b in boxes):
                    break
            else:
                continue
            label = int(rng.integers(1, len(self.shapes) + 1))
            colour = rng.uniform(0, 1, 3)
            while np.abs(colour - background).max() < 0.35:
                colour = rng.uniform(0, 1, 3)
            wy, wx = y[y0:y0 + s, x0:x0 + s], x[y0:y0 + s, x0:x0 + s]
            mask = _shape_mask(self.shapes[label - 1], wx - (x0 + s / 2), wy - y0, s)
            image[y0:y0 + s, x0:x0 + s][mask] = colour
            rows, cols = np.nonzero(mask)
            boxes.append([x0 + cols.min(), y0 + rows.min(),  # tight box, pixel edges
                          x0 + cols.max() + 1, y0 + rows.max() + 1])
            labels.append(label)
        image += rng.normal(0, 0.025, image.shape)  # grain over everything
        pixels = np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)
        return (torch.from_numpy(pixels).permute(2, 0, 1).contiguous(),
                torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                torch.tensor(labels, dtype=torch.int64))


def _shape_mask(kind: str, dx: np.ndarray, dy: np.ndarray, s: int) -> np.ndarray:
    """The pixels of shape ``kind`` (one of :data:`SHAPE_KINDS`) in its ``s`` x ``s`` square:
    ``dx``, ``dy`` [s, s] are the pixel centres' offsets from the square's top centre."""
    r, ry = s / 2, dy - s / 2  # radius; offset from the centre downwards
    if kind == "circle":
        return dx ** 2 + ry ** 2 <= r ** 2
    if kind == "square":
        return np.ones((s, s), dtype=bool)
    if kind == "triangle":  # apex at the top centre, base along the bottom, height = base = s
        return np.abs(dx) <= dy / 2
    if kind == "ring":  # a circle with a hole of 0.55 of its radius
        return ((0.55 * r) ** 2 <= dx ** 2 + ry ** 2) & (dx ** 2 + ry ** 2 <= r ** 2)
    if kind == "cross":  # a plus sign, arms a third of the side wide
        return (np.abs(dx) <= s / 6) | (np.abs(ry) <= s / 6)
    if kind == "bar":  # a third as high as wide, centred
        return np.abs(ry) <= s / 6
    if kind == "star":  # five points, one straight up; the edges are straight lines from each
        # point (radius r, angle 0) to the inner corner (radius 0.382 r, 36 degrees): a pentagram
        phi = np.abs((np.arctan2(dx, -ry) + np.pi / 5) % (2 * np.pi / 5) - np.pi / 5)
        inner, half = 0.382 * r, np.pi / 5
        edge = r * inner * np.sin(half) / (inner * np.sin(half - phi) + r * np.sin(phi))
        return dx ** 2 + ry ** 2 <= edge ** 2
    raise ValueError(f"unknown shape {kind!r}: choose from {SHAPE_KINDS}")


# Your own data ─────────────────────────────────────────────────────────────────────────────────


class _RecordDataset(Dataset):
    """A map-style dataset over records (see ``frcnn_sources``): image path, ``image_id``, boxes
    x1, y1, x2, y2 in the image's pixels, labels, area, iscrowd. ``skip_empty`` leaves out the
    images without a non-crowd box once, here, since a map-style dataset cannot skip an index."""

    def __init__(self, class_names: List[str], records: List[dict], *,
                 resize: Optional[str], min_size: int, max_size: Optional[int],
                 train: bool, flip_prob: Optional[float], skip_empty: Optional[bool]):
        self.options = SampleOptions(resize, min_size, max_size, train, flip_prob, skip_empty)
        if self.options.skip_empty:
            records = [r for r in records if bool((np.asarray(r["iscrowd"]) == 0).any())]
        self.options.skip_empty = False
        self.class_names, self.records = class_names, records
        self.num_classes = len(class_names)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = _open_image(self.records[index])
        return self.options.sample(record["image"], record["boxes"],
                                   record["labels"], record["image_id"], record["area"],
                                   record["iscrowd"])


class CocoFormatDataset(_RecordDataset):
    """Samples of any COCO-format annotation file (what labelling tools export), map-style.

    ``class_names`` is ``["__background__", *the file's category names in id order]`` and
    ``num_classes`` its length (background included): pass it to the detector. Category ids need
    not be contiguous; labels are positions in ``class_names``; a category that only groups the
    others (Roboflow's category 0) is not a class. Boxes ``[x, y, w, h]`` become ``x1, y1, x2,
    y2``; boxes of zero width or height are dropped (counted in ``dropped_boxes``, with a
    warning), never trained on; boxes a pixel or two past the edge are clipped (one warning).
    Images are read upright (EXIF orientation applied, see ``frcnn_sources.upright``) and checked
    against the file's width and height. ``iscrowd`` is kept: crowd regions are dropped in
    training mode and ignored by :func:`frcnn_engine.evaluate`. Images without annotations are
    kept unless ``skip_empty``. Samples are those of :class:`COCOStreamDataset`, with its options ``resize``,
    ``min_size``, ``max_size``, ``train`` (default False), ``flip_prob``, ``skip_empty``.

    Args:
        image_dir: the folder that the file's ``file_name`` entries are relative to, or a list of
            folders tried in order (:func:`folder_dataset` passes the ones an export may use).
        annotation_file: the COCO-format ``.json``, read with pycocotools' ``COCO``.
    """

    def __init__(self, image_dir, annotation_file: str, *, resize: Optional[str] = "shorter",
                 min_size: int = IMG_SIZE, max_size: Optional[int] = None, train: bool = False,
                 flip_prob: Optional[float] = None, skip_empty: Optional[bool] = None):
        class_names, records, self.dropped_boxes = read_coco_file(image_dir, annotation_file)
        if self.dropped_boxes:
            warnings.warn(f"{annotation_file}: {self.dropped_boxes} boxes of zero width or height "
                          "dropped", stacklevel=2)
        super().__init__(class_names, records, resize=resize, min_size=min_size,
                         max_size=max_size, train=train, flip_prob=flip_prob,
                         skip_empty=skip_empty)


class VOCFormatDataset(_RecordDataset):
    """Samples of a Pascal VOC folder (what labelling tools write), map-style.

    The folder holds the ``.xml`` files in ``Annotations/`` (or at its top, beside the images, as
    LabelImg saves them), the images in ``JPEGImages/``, ``images/``, beside the .xml or in the
    ``<folder>`` it names, and, when present, ``ImageSets/Main/{split}.txt`` (one image id a
    line; ``split`` ``None`` takes the only one); without split files every .xml is read.
    ``class_names`` default: ``["__background__", *the object names found, sorted]``;
    ``num_classes`` counts the background. VOC's ``difficult`` objects become crowd-like
    (``iscrowd = 1``): dropped in training mode, ignored by :func:`frcnn_engine.evaluate`.
    Corners are pixel edges, ``x1 = xmin, x2 = xmax``, as LabelImg, CVAT, Label Studio and
    makesense.ai write them (their exporters write ``xmax = x + width``; see ``frcnn_sources``).
    Images are read upright as in :class:`CocoFormatDataset`, whose samples and options
    (``resize``, ``min_size``, ``max_size``, ``train``, ``flip_prob``, ``skip_empty``) these are.
    """

    def __init__(self, root: str, split: Optional[str] = None,
                 class_names: Optional[Sequence[str]] = None, *,
                 resize: Optional[str] = "shorter", min_size: int = IMG_SIZE,
                 max_size: Optional[int] = None, train: bool = False,
                 flip_prob: Optional[float] = None, skip_empty: Optional[bool] = None):
        class_names, records = read_voc_folder(root, split, class_names)
        super().__init__(class_names, records, resize=resize, min_size=min_size,
                         max_size=max_size, train=train, flip_prob=flip_prob,
                         skip_empty=skip_empty)


def folder_dataset(folder: str, split: Optional[str] = None, *, verbose: bool = True,
                   **options) -> Dataset:
    """The dataset of a labelling tool's export ``folder``, unzipped as it came.

    ``frcnn_sources.find_export`` recognises the layouts of CVAT (COCO 1.0, Pascal VOC 1.1),
    Label Studio (COCO, Pascal VOC XML), Roboflow (COCO), LabelImg, makesense.ai and the official
    COCO layout: a :class:`VOCFormatDataset` or a :class:`CocoFormatDataset`. ``split`` names one
    split (annotation file or split file) where the folder holds several; the error lists them.
    ``verbose`` prints one line saying which layout and files were taken (also kept as the
    dataset's ``layout``). ``options`` are the datasets' sample options (``train``, ``resize``, ...).
    """
    export = find_export(folder, split)
    if export["format"] == "voc":
        data = VOCFormatDataset(export["root"], export["split"], **options)
    else:
        data = CocoFormatDataset(export["image_dirs"], export["file"], **options)
    data.layout = export_line(folder, export, data.records)
    if verbose:
        print(data.layout, flush=True)
    return data


# Batching ──────────────────────────────────────────────────────────────────────────────────────


def frcnn_collate_fn(batch) -> Tuple[List[Tensor], List[Dict[str, Tensor]]]:
    """``DataLoader`` collate: ``(images, targets)``, two lists with one entry per sample.

    Images stay separate ``[3, H_i, W_i]`` tensors, as torchvision's detection references keep
    them: the detector pads them into one batch itself (:meth:`FasterRCNN.batch_images`) and so
    knows every image's own size, which it needs to clip proposals and check boxes per image.
    No caller can forget the sizes, because no padded tensor without them ever exists. Targets
    cannot be stacked either (each image has its own number of boxes).
    """
    images, targets = zip(*batch)
    return list(images), list(targets)


# ─── 4. Backbone: ResNet-50 and the feature pyramid ────────────────────────────────────────────


def load_weights(source, weights_enum, what: str, argument: str = "weights",
                 random_ok: bool = True) -> Dict[str, Tensor]:
    """A state dict from ``source``: a dict, the path of a saved state dict, or the name of one of
    torchvision's published weights in ``weights_enum`` (e.g. ``"IMAGENET1K_V1"``, ``"DEFAULT"``).

    Named weights are downloaded once into torch's hub cache. Without a network and without the
    cached file this fails within seconds, saying how to go on offline. ``argument`` is the name
    the caller's user passed ``source`` as, so that the advice in an error can be followed as
    written; ``random_ok`` says whether ``argument=None`` (random initialisation) is a way out.
    """
    offline_way = f"pass {argument}=None (random initialisation) or " if random_ok else "pass "
    if source is None and not random_ok:
        choices = ", ".join(weights_enum.__members__)
        raise ValueError(f"{argument}=None: {what} needs weights: one of {choices}, a state dict "
                         "or the path of one")
    if isinstance(source, dict):
        return source
    if isinstance(source, (str, os.PathLike)) and os.path.isfile(source):
        state = torch.load(source, map_location="cpu", weights_only=True)
        return state.get("model", state) if isinstance(state, dict) else state
    if isinstance(source, weights_enum):
        weights = source
    else:
        try:
            weights = weights_enum[str(source)]
        except KeyError:
            choices = ", ".join(weights_enum.__members__)
            raise ValueError(
                f"unknown {what} weights {argument}={source!r}: use one of {choices}, or the path "
                f"of a state-dict file" + (", or None for random initialisation" if random_ok else "")
            ) from None
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    reason = None if os.path.isfile(cached) else unreachable_reason(weights.url)
    if reason:
        raise ConnectionError(
            f"cannot download the {what} weights {weights.name}: {reason}. Offline, {offline_way}"
            f"{argument}=<the path of a state dict saved on a machine with a network>, or copy "
            f"{os.path.basename(weights.url)} into {os.path.dirname(cached)}."
        )
    return weights.get_state_dict(progress=True)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters, all stored as buffers.

    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``, the same in training and
    evaluation: detection batches are too small (2 images) to estimate batch statistics, so the
    ImageNet ones are kept. Being buffers, nothing here reaches the optimiser or gets updated.
    ``eps`` is 1e-5 for the ImageNet classifier weights and 0.0 for torchvision's COCO detector.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # a BatchNorm2d counter we don't need
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"


class Bottleneck(nn.Module):
    """The ResNet-50 residual block: 1x1 (narrow) -> 3x3 (stride) -> 1x1 (widen 4x), plus a shortcut.

    ``[B, in_ch, H, W] -> [B, 4 * width, H / stride, W / stride]``. The stride sits on the 3x3
    convolution (ResNet "v1.5", as torchvision). ``downsample`` projects the shortcut when the
    shape changes. ``norm_layer(channels)`` builds its normalisation layers.
    """

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1, downsample=None,
                 norm_layer=FrozenBatchNorm2d):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm_layer(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = norm_layer(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += shortcut  # in place: at 800 px one block's output is 56 MB, not worth a new one
        return self.relu(out)


class ResNet50(nn.Module):
    """ResNet-50 as a detection backbone: returns the outputs C2..C5 of its four stages.

    ``[B, 3, H, W] -> [C2, C3, C4, C5]`` with 256/512/1024/2048 channels at strides 4/8/16/32.
    Parameter names are torchvision's, so its ImageNet weights load as they are.

    Args:
        weights: ``None`` (random), a torchvision name such as ``"IMAGENET1K_V1"``, a state dict,
            or the path of one.
        trainable_layers: how many stages, counted from the top, are trained (0..5): 3 trains
            layer2..layer4, 1 only layer4, 5 everything; the rest are frozen. Default: 3 with
            pretrained weights, 5 without (torchvision's rule); another value given without
            weights warns and trains all 5, as torchvision does (freezing random layers only stops
            them learning).
        frozen_bn: ``FrozenBatchNorm2d`` (True) or ordinary, trained ``nn.BatchNorm2d`` (False).
            Default: frozen with pretrained weights, whose statistics are worth keeping; ordinary
            without, since the identity statistics of a random network let activations grow
            through the 16 residual blocks until training diverges (torchvision's rule too).
        norm_eps: BatchNorm epsilon (1e-5 for ImageNet weights, 0.0 for torchvision's COCO detector).
        gradient_checkpointing: recompute layer3 and layer4 in the backward pass instead of storing
            their activations (less memory, about one extra forward of those stages).
    """

    stage_blocks = (3, 4, 6, 3)
    torchvision_weights = "ResNet50_Weights"
    out_channels = [256, 512, 1024, 2048]

    def __init__(self, weights=None, *, trainable_layers: Optional[int] = None,
                 frozen_bn: Optional[bool] = None, norm_eps: float = 1e-5,
                 gradient_checkpointing: bool = False):
        super().__init__()
        pretrained = weights is not None
        if not pretrained and trainable_layers not in (None, 5):
            warnings.warn(f"trainable_layers={trainable_layers} has no effect without pretrained "
                          "weights: freezing randomly initialised layers would only stop them "
                          "learning, so all 5 are trained (torchvision's rule). Pass weights to "
                          "freeze stages.", UserWarning, stacklevel=2)
            trainable_layers = 5
        trainable_layers = (3 if pretrained else 5) if trainable_layers is None else trainable_layers
        frozen_bn = pretrained if frozen_bn is None else frozen_bn
        norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d

        def norm_layer(channels: int) -> nn.Module:
            return norm(channels, eps=norm_eps)

        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"trainable_layers must be in 0..5, got {trainable_layers}")
        self.gradient_checkpointing = gradient_checkpointing
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = 64
        for i, (blocks, width) in enumerate(zip(self.stage_blocks, (64, 128, 256, 512))):
            stride = 1 if i == 0 else 2
            downsample = nn.Sequential(
                nn.Conv2d(in_ch, width * 4, 1, stride=stride, bias=False),
                norm_layer(width * 4),
            )
            stage = [Bottleneck(in_ch, width, stride, downsample, norm_layer)]
            stage += [Bottleneck(width * 4, width, norm_layer=norm_layer) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            in_ch = width * 4
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if pretrained:
            import torchvision.models

            state = load_weights(weights, getattr(torchvision.models, self.torchvision_weights),
                                 type(self).__name__)
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the classifier
            self.load_state_dict(state)
        trained = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
        trained += ["bn1"] if trainable_layers == 5 else []  # the stem's norm trains with it
        for name, param in self.named_parameters():
            param.requires_grad_(any(name.startswith(layer) for layer in trained))

    def forward(self, x: Tensor) -> List[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = []
        for name in ("layer1", "layer2", "layer3", "layer4"):
            stage = getattr(self, name)
            if self.gradient_checkpointing and self.training and name in ("layer3", "layer4"):
                x = torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
            features.append(x)
        return features


class ResNet101(ResNet50):
    """ResNet-101: ResNet-50 with 23 instead of 6 blocks in its third stage (layer3)."""

    stage_blocks = (3, 4, 23, 3)
    torchvision_weights = "ResNet101_Weights"


class FPN(nn.Module):
    """Feature pyramid network: merges C2..C5 into P2..P6, all with ``out_channels`` channels.

    Top-down: ``M5 = lateral(C5)``, ``M_i = lateral(C_i) + upsample_nearest(M_{i+1})``;
    then ``P_i = conv3x3(M_i)`` and ``P6 = max_pool(P5, kernel 1, stride 2)``. Every level thus
    sees both fine detail (from its own stage) and strong semantics (from the stages above).
    ``[C2..C5] -> [P2, P3, P4, P5, P6]`` at strides 4, 8, 16, 32, 64.
    """

    def __init__(self, in_channels: Sequence[int] = (256, 512, 1024, 2048), out_channels: int = 256):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)
        self.out_channels = out_channels

    def forward(self, features: List[Tensor]) -> List[Tensor]:
        merged = self.lateral[-1](features[-1])
        pyramid = [self.output[-1](merged)]
        for i in range(len(features) - 2, -1, -1):
            lateral = self.lateral[i](features[i])
            merged = lateral + F.interpolate(merged, size=lateral.shape[-2:], mode="nearest")
            pyramid.insert(0, self.output[i](merged))
        pyramid.append(F.max_pool2d(pyramid[-1], kernel_size=1, stride=2))
        return pyramid


# The tiny backbone ─────────────────────────────────────────────────────────────────────────────
# What fast mode trains: the same pyramid (C2.. maps, an FPN on top) at a size a laptop CPU trains
# from scratch in minutes. ``tiny_detector`` (section 7) builds the detector around it.


class TinyBackbone(nn.Module):
    """Stride-2 stages of two 3x3 conv-BN-ReLU layers each, ``widths`` channels: enough to find
    and tell apart coloured shapes, small enough to train from scratch on a laptop CPU.

    Returns the maps of the last ``num_outputs`` stages, finest first: with the defaults C2, C3,
    C4 at strides 4, 8, 16 (the small counterpart of ResNet-50's C2..C5, for an :class:`FPN` on
    top); with ``num_outputs=1`` the last map alone, a tensor (a single-map backbone).
    ``out_channels`` is the list of the returned maps' channels (an int for one map).

    ``gradient_checkpointing``: recompute each stage in backward instead of storing its
    activations (the switch ``FasterRCNN.set_gradient_checkpointing`` turns). The recomputation
    updates BatchNorm's running statistics a second time with the same batch; harmless.
    """

    def __init__(self, widths: Sequence[int] = (32, 64, 64, 64), num_outputs: int = 3):
        super().__init__()
        if not 1 <= num_outputs <= len(widths):
            raise ValueError(f"num_outputs={num_outputs} must be 1..{len(widths)} (one per stage)")

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            )

        self.stages = nn.ModuleList(stage(cin, cout) for cin, cout in zip((3, *widths), widths))
        self.num_outputs = num_outputs
        returned = list(widths[-num_outputs:])
        self.out_channels = returned if num_outputs > 1 else returned[0]
        self.gradient_checkpointing = False

    def forward(self, x: Tensor) -> Union[Tensor, List[Tensor]]:
        outputs = []
        for stage in self.stages:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
            outputs.append(x)
        return outputs[-self.num_outputs:] if self.num_outputs > 1 else x


# ─── 5. Region proposal network ────────────────────────────────────────────────────────────────


class AnchorGenerator(nn.Module):
    """Reference boxes ("anchors") tiled over every location of every feature level.

    Level ``l`` has ``len(sizes[l]) * len(aspect_ratios[l])`` anchors per location. An anchor of
    size s and ratio r = h / w has ``w = s / sqrt(r)``, ``h = s * sqrt(r)`` and is centred on the
    location's top-left pixel ``(x * stride, y * stride)``; base anchors are rounded to whole
    pixels. Order: level, then row y, column x, then the anchors of that location (ratios outer,
    sizes inner), which is the order in which the RPN head's outputs are flattened.
    """

    def __init__(self, sizes: Sequence[Sequence[float]] = ((32,), (64,), (128,), (256,), (512,)),
                 aspect_ratios: Sequence[Sequence[float]] = ((0.5, 1.0, 2.0),) * 5):
        super().__init__()
        if len(sizes) != len(aspect_ratios):
            raise ValueError(f"{len(sizes)} levels of anchor sizes but {len(aspect_ratios)} of ratios")
        self.sizes, self.aspect_ratios = sizes, aspect_ratios
        self.cell_anchors = [self.base_anchors(s, r) for s, r in zip(sizes, aspect_ratios)]

    @staticmethod
    def base_anchors(sizes: Sequence[float], ratios: Sequence[float]) -> Tensor:
        """``[A, 4]`` anchors centred on (0, 0): ``round([-w, -h, w, h] / 2)``."""
        sizes = torch.as_tensor(sizes, dtype=torch.float32)
        h_ratios = torch.sqrt(torch.as_tensor(ratios, dtype=torch.float32))
        ws = (sizes[None, :] / h_ratios[:, None]).reshape(-1)
        hs = (sizes[None, :] * h_ratios[:, None]).reshape(-1)
        return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()

    def num_anchors_per_location(self) -> List[int]:
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def forward(self, image_size: Tuple[int, int], feature_shapes: List[Tuple[int, int]],
                device=None) -> Tensor:
        """Anchors ``[sum_l H_l * W_l * A_l, 4]`` for a padded image of ``image_size`` (H, W).
        Level l's stride is ``image_size // feature_size``, per axis, as torchvision."""
        if len(feature_shapes) != len(self.cell_anchors):
            raise ValueError(
                f"the backbone gives {len(feature_shapes)} feature levels but the anchor generator "
                f"has sizes for {len(self.cell_anchors)}: pass one tuple of anchor sizes per level"
            )
        anchors = []
        for (h, w), cell in zip(feature_shapes, self.cell_anchors):
            stride_y, stride_x = image_size[0] // h, image_size[1] // w
            ys = torch.arange(h, dtype=torch.float32, device=device) * stride_y
            xs = torch.arange(w, dtype=torch.float32, device=device) * stride_x
            ys, xs = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack([xs, ys, xs, ys], dim=-1).reshape(-1, 1, 4)
            anchors.append((shifts + cell.to(device)[None]).reshape(-1, 4))
        return torch.cat(anchors)


class RPNHead(nn.Module):
    """A 3x3 conv + ReLU shared by all levels, then two 1x1 convs per location:
    ``A`` objectness logits and ``4A`` box deltas. ``[B, C, H, W] -> ([B, A, H, W], [B, 4A, H, W])``
    per level."""

    def __init__(self, in_channels: int = 256, num_anchors: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        logits, deltas = [], []
        for x in features:
            x = F.relu(self.conv(x), inplace=True)
            logits.append(self.cls_logits(x))
            deltas.append(self.bbox_pred(x))
        return logits, deltas


BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS = -1, -2


def match_boxes(iou: Tensor, high: float, low: float, allow_low_quality: bool) -> Tensor:
    """Assign each candidate box (anchor or proposal) to a ground-truth box.

    Args:
        iou: ``[G, N]`` IoU of G ground-truth boxes with N candidates.
        high, low: a candidate whose best IoU is >= high matches that box; < low it is background
            (``BELOW_LOW_THRESHOLD``); in between it is ignored (``BETWEEN_THRESHOLDS``).
        allow_low_quality: also match, for every ground-truth box, the candidates with the highest
            IoU with it (ties included), even below ``high``, so that no object goes unmatched.

    Returns:
        ``[N]`` int64: the matched ground-truth index, or -1 / -2.
    """
    best_iou, matches = iou.max(dim=0)
    original = matches.clone() if allow_low_quality else None
    matches[best_iou < low] = BELOW_LOW_THRESHOLD
    matches[(best_iou >= low) & (best_iou < high)] = BETWEEN_THRESHOLDS
    if allow_low_quality:
        best_per_gt = iou.max(dim=1).values
        candidates = torch.where(iou == best_per_gt[:, None])[1]
        matches[candidates] = original[candidates]
    return matches


def sample_balanced(labels: Tensor, batch_size: int, positive_fraction: float
                    ) -> Tuple[Tensor, Tensor]:
    """Pick at most ``batch_size`` candidates, at most ``positive_fraction`` of them positive.

    ``labels`` ``[N]``: >= 1 positive, 0 negative, -1 ignored. Negatives fill the places positives
    leave free. Returns boolean masks ``(positive [N], negative [N])``. Random, via ``randperm``.
    """
    positive = torch.where(labels >= 1)[0]
    negative = torch.where(labels == 0)[0]
    num_pos = min(positive.numel(), int(batch_size * positive_fraction))
    num_neg = min(negative.numel(), batch_size - num_pos)
    positive = positive[torch.randperm(positive.numel(), device=labels.device)[:num_pos]]
    negative = negative[torch.randperm(negative.numel(), device=labels.device)[:num_neg]]
    pos_mask = torch.zeros_like(labels, dtype=torch.bool)
    neg_mask = torch.zeros_like(labels, dtype=torch.bool)
    pos_mask[positive] = True
    neg_mask[negative] = True
    return pos_mask, neg_mask


def _required(targets, stage: str):
    """``targets``, or a clear error: in training mode a stage computes losses and needs them."""
    if targets is None:
        raise ValueError(f"the {stage} is in training mode and computes losses, so it needs "
                         "targets: pass them, or call .eval() for inference")
    return targets


class RegionProposalNetwork(nn.Module):
    """Scores every anchor as object/background, regresses it, and keeps the best as proposals.

    Inference, per image: decode the deltas onto the anchors; per level keep the
    ``pre_nms_top_n`` highest-scoring boxes (one top-k per level, so that the many fine-level
    anchors cannot crowd out the coarse levels); clip to the image; drop boxes under ``min_size``;
    NMS at ``nms_thresh`` within each level; keep the ``post_nms_top_n`` best overall.

    Training adds the losses: anchors with IoU >= 0.7 with a ground-truth box (or the best
    anchor for it) are positive, < 0.3 negative; 256 anchors per image are sampled, half positive
    at most; ``rpn_cls`` is the binary cross-entropy over them, ``rpn_box`` the smooth-L1
    (beta 1/9) of the positives' deltas, summed and divided by the number of sampled anchors.
    """

    def __init__(self, head: RPNHead, anchor_generator: AnchorGenerator, *,
                 pre_nms_top_n: Tuple[int, int] = (2000, 1000),
                 post_nms_top_n: Tuple[int, int] = (2000, 1000),
                 nms_thresh: float = 0.7, fg_iou_thresh: float = 0.7, bg_iou_thresh: float = 0.3,
                 batch_size_per_image: int = 256, positive_fraction: float = 0.5,
                 min_size: float = 1e-3, score_thresh: float = 0.0):
        super().__init__()
        self.head, self.anchor_generator = head, anchor_generator
        self.pre_nms_top_n, self.post_nms_top_n = pre_nms_top_n, post_nms_top_n  # (train, test)
        self.nms_thresh, self.min_size, self.score_thresh = nms_thresh, min_size, score_thresh
        self.fg_iou_thresh, self.bg_iou_thresh = fg_iou_thresh, bg_iou_thresh
        self.batch_size_per_image, self.positive_fraction = batch_size_per_image, positive_fraction

    def forward(self, features: List[Tensor], image_sizes: List[Tuple[int, int]],
                padded_size: Tuple[int, int], targets: Optional[List[Dict[str, Tensor]]] = None
                ) -> Tuple[List[Tensor], Dict[str, Tensor]]:
        """Proposals (a list of ``[P_i, 4]``, one per image) and, with targets, the RPN losses."""
        logits, deltas = self.head(features)
        anchors = self.anchor_generator(padded_size, [f.shape[-2:] for f in features],
                                           features[0].device)
        num_images = features[0].shape[0]
        # [B, A, H, W] -> [B, H*W*A] and [B, 4A, H, W] -> [B, H*W*A, 4]: the anchors' order.
        # Float32 even under autocast: decoding boxes of hundreds of pixels needs the precision.
        per_level = [lg[0].numel() for lg in logits]
        logits = torch.cat([lg.permute(0, 2, 3, 1).reshape(num_images, -1) for lg in logits], 1).float()
        deltas = torch.cat([
            d.view(num_images, -1, 4, *d.shape[-2:]).permute(0, 3, 4, 1, 2).reshape(num_images, -1, 4)
            for d in deltas
        ], 1).float()
        boxes = decode_boxes(anchors.repeat(num_images, 1), deltas.detach().reshape(-1, 4))
        proposals = self.filter_proposals(boxes.view(num_images, -1, 4), logits.detach(),
                                          image_sizes, per_level)
        losses = self.loss(anchors, logits, deltas, _required(targets, "RPN")) if self.training else {}
        return proposals, losses

    def filter_proposals(self, boxes: Tensor, logits: Tensor, image_sizes, per_level: List[int]
                         ) -> List[Tensor]:
        """Per-level top-k, clip, drop tiny boxes, per-level NMS, keep the best overall."""
        pre_n = self.pre_nms_top_n[0 if self.training else 1]
        post_n = self.post_nms_top_n[0 if self.training else 1]
        top_idx, levels, offset = [], [], 0
        for lvl, level_logits in enumerate(logits.split(per_level, dim=1)):
            k = min(pre_n, level_logits.shape[1])
            top_idx.append(level_logits.topk(k, dim=1).indices + offset)
            levels.append(torch.full((k,), lvl, dtype=torch.int64, device=logits.device))
            offset += level_logits.shape[1]
        top_idx, levels = torch.cat(top_idx, dim=1), torch.cat(levels)
        rows = torch.arange(boxes.shape[0], device=boxes.device)[:, None]
        boxes, scores = boxes[rows, top_idx], torch.sigmoid(logits[rows, top_idx])
        proposals = []
        for img_boxes, img_scores, size in zip(boxes, scores, image_sizes):
            img_boxes = clip_boxes(img_boxes, size)
            keep = remove_small_boxes(img_boxes, self.min_size)
            keep = keep[img_scores[keep] >= self.score_thresh]
            keep = keep[run_op("batched_nms", img_boxes[keep], img_scores[keep], levels[keep],
                               self.nms_thresh)]
            proposals.append(img_boxes[keep[:post_n]])
        return proposals

    def loss(self, anchors: Tensor, logits: Tensor, deltas: Tensor,
             targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        labels, box_targets = [], []
        for target in targets:
            gt = target["boxes"]
            if gt.numel() == 0:
                labels.append(torch.zeros(anchors.shape[0], device=anchors.device))
                box_targets.append(torch.zeros_like(anchors))
                continue
            matches = match_boxes(box_iou(gt, anchors), self.fg_iou_thresh, self.bg_iou_thresh, True)
            label = (matches >= 0).float()
            label[matches == BETWEEN_THRESHOLDS] = -1.0
            labels.append(label)
            box_targets.append(encode_boxes(anchors, gt[matches.clamp(min=0)]))
        pos, neg = zip(*(sample_balanced(lb, self.batch_size_per_image, self.positive_fraction)
                         for lb in labels))
        pos, neg = torch.cat(pos), torch.cat(neg)
        sampled = pos | neg
        labels, box_targets = torch.cat(labels), torch.cat(box_targets)
        box_loss = F.smooth_l1_loss(deltas.reshape(-1, 4)[pos], box_targets[pos], beta=1 / 9,
                                    reduction="sum") / sampled.sum()
        cls_loss = F.binary_cross_entropy_with_logits(logits.reshape(-1)[sampled], labels[sampled])
        return {"rpn_cls": cls_loss, "rpn_box": box_loss}


# ─── 6. ROI head ───────────────────────────────────────────────────────────────────────────────


class ROIAlign(nn.Module):
    """Multi-level RoIAlign: pools each box into a fixed ``[C, 7, 7]`` grid from the pyramid level
    whose scale suits its size.

    A box of area ``wh`` goes to level ``k = floor(4 + log2(sqrt(wh) / 224) + 1e-6)``, clamped to
    the levels given (P2..P5): a 224 x 224 box, ImageNet's object scale, is pooled from P4, one
    twice as large from P5. Each level's scale (1/4, 1/8, ...) is the power of two nearest to its
    size over the image size. ``(features, boxes per image, image sizes) -> [K, C, 7, 7]``.
    """

    def __init__(self, output_size: Union[int, Tuple[int, int]] = 7, sampling_ratio: int = 2,
                 canonical_size: float = 224.0, canonical_level: int = 4):
        super().__init__()
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        self.sampling_ratio = sampling_ratio
        self.canonical_size, self.canonical_level = canonical_size, canonical_level

    def level_of(self, boxes: Tensor, k_min: int, k_max: int) -> Tensor:
        """``[K]`` index of the level (0 = the finest given) each box ``[K, 4]`` is pooled from."""
        size = torch.sqrt(box_area(boxes))
        level = torch.floor(self.canonical_level + torch.log2(size / self.canonical_size)
                            + torch.tensor(1e-6, dtype=size.dtype))
        return (level.clamp(min=k_min, max=k_max) - k_min).to(torch.int64)

    def forward(self, features: List[Tensor], boxes: List[Tensor],
                image_sizes: List[Tuple[int, int]]) -> Tensor:
        max_height = max(h for h, _ in image_sizes)
        scales = [2.0 ** round(math.log2(f.shape[-2] / max_height)) for f in features]
        rois = rois_from_boxes(boxes)
        if len(features) == 1:
            return run_op("roi_align", features[0], rois, self.output_size, scales[0],
                          self.sampling_ratio)
        k_min, k_max = -round(math.log2(scales[0])), -round(math.log2(scales[-1]))
        levels = self.level_of(rois[:, 1:], k_min, k_max)
        pooled = features[0].new_zeros((rois.shape[0], features[0].shape[1], *self.output_size))
        for lvl, (feature, scale) in enumerate(zip(features, scales)):
            idx = torch.where(levels == lvl)[0]
            pooled[idx] = run_op("roi_align", feature, rois[idx], self.output_size, scale,
                                 self.sampling_ratio).to(pooled.dtype)
        return pooled


class TwoMLPHead(nn.Module):
    """Flatten each pooled box and pass it through two fully connected layers with ReLU.

    ``[K, C, 7, 7] -> [K, hidden_dim]``. (``fc6``/``fc7`` are the names these layers had in the
    VGG-16 of the original Fast R-CNN, kept by torchvision.)
    """

    def __init__(self, in_channels: int = 256 * 7 * 7, hidden_dim: int = 1024, dropout: float = 0.0):
        super().__init__()
        self.fc6 = nn.Linear(in_channels, hidden_dim)
        self.fc7 = nn.Linear(hidden_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.dropout(F.relu(self.fc6(x.flatten(1))))
        return self.dropout(F.relu(self.fc7(x)))


class FastRCNNPredictor(nn.Module):
    """Class logits ``[K, num_classes]`` and one set of box deltas per class ``[K, 4 * num_classes]``.

    Initialised as torchvision's: PyTorch's default ``nn.Linear`` initialisation (uniform in
    +-1/sqrt(in_channels)). An earlier version used Detectron's small normal weights (std 0.01
    for the classes, 0.001 for the deltas). On the custom-backbone experiment of
    ``tests/research_experiment.py`` (500 steps, one CPU thread) this initialisation reaches a
    held-out AP50 of 0.351 over three seeds against 0.334 for torchvision's own model (``make
    bench``: ``custom_backbone_map50_*``); one seed with Detectron's gave 0.289 against 0.354, a
    gap within the seed-to-seed spread (0.31 to 0.39), so not evidence that it learns slower.
    """

    def __init__(self, in_channels: int = 1024, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


class ROIHeads(nn.Module):
    """The second stage: pool each proposal, classify it, refine its box per class.

    Training: the ground-truth boxes join the proposals; a proposal with IoU >= 0.5 takes its
    best box's class, else it is background; 512 per image are sampled, a quarter positive at
    most. ``roi_cls`` is the cross-entropy, ``roi_box`` the smooth-L1 (beta 1/9) of the true
    class's deltas (weights 10, 10, 5, 5) over positives, divided by the number sampled.

    Inference: softmax; for every class but the background decode its box, clip; keep scores
    above ``score_thresh``; drop boxes under ``min_size``; NMS per class at ``nms_thresh``; keep
    the ``detections_per_img`` best.
    """

    def __init__(self, roi_align: ROIAlign, box_head: nn.Module, predictor: nn.Module, *,
                 fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.5,
                 batch_size_per_image: int = 512, positive_fraction: float = 0.25,
                 box_weights: Tuple[float, ...] = (10.0, 10.0, 5.0, 5.0), score_thresh: float = 0.05,
                 nms_thresh: float = 0.5, detections_per_img: int = 100, min_size: float = 1e-2):
        super().__init__()
        self.roi_align, self.box_head, self.predictor = roi_align, box_head, predictor
        self.fg_iou_thresh, self.bg_iou_thresh = fg_iou_thresh, bg_iou_thresh
        self.batch_size_per_image, self.positive_fraction = batch_size_per_image, positive_fraction
        self.box_weights, self.score_thresh, self.nms_thresh = box_weights, score_thresh, nms_thresh
        self.detections_per_img, self.min_size = detections_per_img, min_size

    def forward(self, features: List[Tensor], proposals: List[Tensor],
                image_sizes: List[Tuple[int, int]], targets: Optional[List[Dict[str, Tensor]]] = None
                ) -> Tuple[List[Dict[str, Tensor]], Dict[str, Tensor]]:
        """Detections (eval mode) or the ROI losses (training mode, with targets)."""
        if self.training:
            proposals, labels, box_targets = self.sample(proposals, _required(targets, "ROI head"))
        pooled = self.roi_align(features, proposals, image_sizes)
        logits, deltas = self.predictor(self.box_head(pooled))
        logits, deltas = logits.float(), deltas.float()
        if self.training:
            return [], self.loss(logits, deltas, labels, box_targets)
        return self.postprocess(logits, deltas, proposals, image_sizes), {}

    def sample(self, proposals: List[Tensor], targets: List[Dict[str, Tensor]]):
        """Sampled proposals, their class labels and their regression targets, per image."""
        sampled, labels, box_targets = [], [], []
        for props, target in zip(proposals, targets):
            gt, gt_labels = target["boxes"], target["labels"]
            props = torch.cat([props, gt])
            if gt.numel() == 0:
                label = torch.zeros(props.shape[0], dtype=torch.int64, device=props.device)
                matched_gt = torch.zeros_like(props)
            else:
                matches = match_boxes(box_iou(gt, props), self.fg_iou_thresh, self.bg_iou_thresh, False)
                label = gt_labels[matches.clamp(min=0)].to(torch.int64)
                label[matches == BELOW_LOW_THRESHOLD] = 0
                label[matches == BETWEEN_THRESHOLDS] = -1
                matched_gt = gt[matches.clamp(min=0)]
            pos, neg = sample_balanced(label, self.batch_size_per_image, self.positive_fraction)
            keep = torch.where(pos | neg)[0]
            sampled.append(props[keep])
            labels.append(label[keep])
            box_targets.append(encode_boxes(props[keep], matched_gt[keep], self.box_weights))
        return sampled, labels, box_targets

    def loss(self, logits: Tensor, deltas: Tensor, labels: List[Tensor],
             box_targets: List[Tensor]) -> Dict[str, Tensor]:
        labels, box_targets = torch.cat(labels), torch.cat(box_targets)
        cls_loss = F.cross_entropy(logits, labels)
        pos = torch.where(labels > 0)[0]
        deltas = deltas.reshape(deltas.shape[0], -1, 4)[pos, labels[pos]]
        box_loss = F.smooth_l1_loss(deltas, box_targets[pos], beta=1 / 9, reduction="sum")
        return {"roi_cls": cls_loss, "roi_box": box_loss / labels.numel()}

    def postprocess(self, logits: Tensor, deltas: Tensor, proposals: List[Tensor],
                    image_sizes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        num_classes = logits.shape[-1]
        boxes = decode_boxes(torch.cat(proposals), deltas, self.box_weights)
        boxes = boxes.view(-1, num_classes, 4)
        scores = F.softmax(logits, dim=-1)
        counts = [p.shape[0] for p in proposals]
        results = []
        for img_boxes, img_scores, size in zip(boxes.split(counts), scores.split(counts), image_sizes):
            img_boxes = clip_boxes(img_boxes, size)[:, 1:].reshape(-1, 4)  # drop the background
            classes = torch.arange(1, num_classes, device=logits.device).repeat(img_scores.shape[0])
            img_scores = img_scores[:, 1:].reshape(-1)
            keep = torch.where(img_scores > self.score_thresh)[0]
            keep = keep[remove_small_boxes(img_boxes[keep], self.min_size)]
            keep = keep[run_op("batched_nms", img_boxes[keep], img_scores[keep], classes[keep],
                               self.nms_thresh)]
            keep = keep[: self.detections_per_img]
            results.append({"boxes": img_boxes[keep], "scores": img_scores[keep], "labels": classes[keep]})
        return results


# ─── 7. The detector ───────────────────────────────────────────────────────────────────────────


TINY_BOX_PIXELS = 4.0
"""A batch whose every box is under this many pixels wide and high, in images of 100 px or more,
is most likely given in fractions of the image: :func:`_warn_if_fractions`."""


class FractionBoxesWarning(UserWarning):
    """Training boxes that look like fractions of the image (:func:`_warn_if_fractions`);
    :func:`frcnn_engine.fit` shows it once a run."""


def _warn_if_fractions(targets: List[dict], checked: List[Dict[str, Tensor]],
                       image_sizes: List[Tuple[int, int]]) -> None:
    """Warn when every box of the batch (``checked``) is under ``TINY_BOX_PIXELS`` on both sides
    while the images are at least 100 px: boxes given as fractions of the image (0..1), or
    normalised ``[cx, cy, w, h]``, train without an error but teach the detector nothing. The
    warning names the first image with boxes by its ``image_id`` and shows its boxes as the data
    gave them (the sample's flip and resize undone, from ``targets``)."""
    boxes = torch.cat([t["boxes"] for t in checked])
    if boxes.numel() == 0 or min(min(size) for size in image_sizes) < 100:
        return
    sides = torch.cat([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]])
    if not bool((sides < TINY_BOX_PIXELS).all()):
        return
    i = next(k for k, t in enumerate(checked) if len(t["boxes"]))
    given = boxes_to_original(checked[i]["boxes"].cpu(), {
        k: torch.as_tensor(v).cpu() for k, v in targets[i].items()
        if k in ("flipped", "size", "scale", "orig_size")})
    height, width = (int(v) for v in targets[i].get("orig_size", image_sizes[i]))
    who = (f"image_id {int(targets[i]['image_id'])}" if "image_id" in targets[i]
           else f"target {i}")
    shown = ", ".join(str([round(v, 3) for v in box]) for box in given[:3].tolist())
    warnings.warn(FractionBoxesWarning(
        f"{who}: every box of its batch is under {TINY_BOX_PIXELS:g} px wide and high while "
        f"the image is {width}x{height} (its boxes as the data gives them: {shown}): boxes "
        "given as fractions of the image (0..1)? The model wants absolute pixels "
        "[x1, y1, x2, y2]: multiply x by the image width and y by its height."), stacklevel=2)


def keep_scoring(result: Dict[str, Tensor], score_threshold: float) -> Dict[str, Tensor]:
    """One image's detections (``boxes [N, 4]``, ``scores [N]``, ``labels [N]``, ...) scoring at
    least ``score_threshold``: what ``FasterRCNN.predict(score_threshold=...)`` keeps."""
    return {key: value[result["scores"] >= score_threshold] for key, value in result.items()}


# Input checks: what the detector refuses, and why ─────────────────────────────────────────────


def pad_images(images: Union[Tensor, List[Tensor]], divisor: int = 32
               ) -> Tuple[Tensor, List[Tuple[int, int]]]:
    """Check the images and pad them into one ``[B, 3, H', W']`` tensor, H' and W' divisible
    by ``divisor``; also return each image's own ``(H, W)``. The one place images are padded."""
    if isinstance(images, Tensor):
        if images.dim() == 3:
            raise ValueError(f"images has shape {list(images.shape)}: expected a batch "
                             "[B, 3, H, W]; use images[None] for one image, or pass a list")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images has shape {list(images.shape)}: expected [B, 3, H, W]")
    elif not (isinstance(images, (list, tuple)) and len(images) > 0):
        raise ValueError("images must be a [B, 3, H, W] tensor or a non-empty list of [3, H, W] tensors")
    images = list(images)
    for i, img in enumerate(images):
        if not isinstance(img, Tensor) or img.dim() != 3 or img.shape[0] != 3:
            shape = list(img.shape) if isinstance(img, Tensor) else type(img).__name__
            raise ValueError(f"image {i} is {shape}: each image must be a [3, H, W] tensor")
    if not images[0].is_floating_point():
        raise TypeError(f"images are {images[0].dtype}: convert to float and normalise "
                        "with IMAGENET_MEAN / IMAGENET_STD first")
    sizes = [tuple(img.shape[-2:]) for img in images]
    height = math.ceil(max(h for h, _ in sizes) / divisor) * divisor
    width = math.ceil(max(w for _, w in sizes) / divisor) * divisor
    batch = images[0].new_zeros((len(images), 3, height, width))
    for img, padded in zip(images, batch):
        padded[:, : img.shape[1], : img.shape[2]].copy_(img)
    if not torch.isfinite(batch).all():
        raise ValueError("images contain NaN or Inf: check the data pipeline (e.g. a division by zero)")
    return batch, sizes


def check_targets(targets, image_sizes: List[Tuple[int, int]], device, num_classes: int
                  ) -> List[Dict[str, Tensor]]:
    """Validate training targets for images of ``image_sizes`` and a detector of ``num_classes``;
    return them as float32 boxes / int64 labels on ``device``."""
    if targets is None:
        raise ValueError("training mode needs targets: call model(images, targets), "
                         "or model.eval() for inference")
    if isinstance(targets, dict):
        raise TypeError("targets is one dict: pass a list with one dict per image, e.g. "
                        "[target] for a single image")
    if len(targets) != len(image_sizes):
        raise ValueError(f"{len(image_sizes)} images but {len(targets)} targets: one dict per image")
    checked = []
    for i, (target, (height, width)) in enumerate(zip(targets, image_sizes)):
        if not isinstance(target, dict) or "boxes" not in target or "labels" not in target:
            raise ValueError(f"target {i} must be a dict with 'boxes' [G, 4] and 'labels' [G]")
        try:
            boxes = torch.as_tensor(target["boxes"], dtype=torch.float32, device=device)
            labels = torch.as_tensor(target["labels"], device=device)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"target {i}: boxes and labels must be tensors (or nested lists of "
                            f"numbers): {err}") from None
        if boxes.dim() != 2 or boxes.shape[1] != 4 or labels.shape != boxes.shape[:1]:
            empty = (" For an image without objects pass boxes of shape [0, 4]: "
                     "torch.zeros(0, 4), or boxes.reshape(0, 4)." if boxes.numel() == 0 else "")
            raise ValueError(f"target {i}: boxes {list(boxes.shape)} and labels {list(labels.shape)}: "
                             f"expected [G, 4] and [G].{empty}")
        if labels.is_floating_point():
            raise TypeError(f"target {i}: labels are {labels.dtype}, expected an integer type")
        if boxes.numel():
            problem = first_bad_box(boxes, labels, height, width, num_classes)
            if problem:
                raise ValueError(f"target {i}: {problem}")
        checked.append({"boxes": boxes, "labels": labels.to(torch.int64)})
    _warn_if_fractions(targets, checked, image_sizes)
    return checked

def first_bad_box(boxes: Tensor, labels: Tensor, height: int, width: int, num_classes: int
                  ) -> Optional[str]:
    """What is wrong with the first bad box of one image's target, or ``None``."""
    if not torch.isfinite(boxes).all():
        return "boxes contain NaN or Inf"
    bad = torch.where((labels < 1) | (labels >= num_classes))[0]
    if bad.numel():
        return (f"label {int(labels[bad[0]])} is outside 1..{num_classes - 1}: 0 is the "
                f"background and num_classes={num_classes} counts it, so K classes "
                f"labelled 1..K need num_classes=K+1")
    bad = torch.where((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))[0]
    if bad.numel():
        return (f"box {boxes[bad[0]].tolist()} has x2 <= x1 or y2 <= y1: boxes are "
                "[x1, y1, x2, y2] with positive size; drop degenerate boxes")
    tol = 1e-2
    outside = (boxes[:, :2] < -tol).any(1) | (boxes[:, 2] > width + tol) | (boxes[:, 3] > height + tol)
    bad = torch.where(outside)[0]
    if bad.numel():
        return (f"box {boxes[bad[0]].tolist()} lies outside the {width}x{height} image: boxes "
                "are absolute pixels of the image given; clip them to the image")
    return None


class FasterRCNN(nn.Module):
    """Faster R-CNN: backbone (+ FPN) -> region proposal network -> ROI head.

    Training mode: ``model(images, targets)`` returns the losses ``rpn_cls``, ``rpn_box``,
    ``roi_cls``, ``roi_box`` and their sum ``total``. Eval mode: ``model(images)`` returns
    ``(results, proposals)``: per image a dict of ``boxes`` ``[D, 4]``, ``scores`` ``[D]``,
    ``labels`` ``[D]`` (1..num_classes-1) and the RPN's proposals ``[P, 4]``.

    ``images`` is a list of normalised ``[3, H_i, W_i]`` images (as ``frcnn_collate_fn`` leaves
    them) or a batch ``[B, 3, H, W]`` of images that all have that size. The model pads them
    (bottom/right, zeros) to a common size divisible by 32 and clips each image's boxes to its own
    size. ``targets`` is a list with one dict per image: ``boxes`` ``[G, 4]`` (absolute x1 y1 x2 y2
    pixels) and ``labels`` ``[G]``; G may be 0. The mode decides everything: in training mode the
    targets are required and losses come back, in eval mode they are not used.

    Args:
        num_classes: classes *including the background* (81 for COCO's 80 categories).
        backbone: ``None`` builds a randomly initialised ``ResNet50`` with an FPN (the factories
            :func:`fasterrcnn_resnet50_fpn` and :func:`fasterrcnn_resnet101_fpn` build one with
            weights, frozen stages or checkpointing and hand it in). Otherwise any module mapping
            ``[B, 3, H, W]`` to one feature map (``use_fpn=False``, its stride as
            ``anchor_stride``) or to a list of maps, finest first (``use_fpn=True``: an FPN is
            built on top of them).
        feat_channels: the backbone's output channels (an int, or one per map with an FPN);
            read from ``backbone.out_channels`` when not given, checked on the first batch.
        use_fpn: default True for the built-in backbone, False for a custom one.
        fpn_channels: channels of every pyramid level (256 in torchvision's detector).
        anchor_sizes: with an FPN one size per pyramid level (default 32, 64, ... doubling);
            without, all sizes at the single level (default 128, 256, 512: COCO's objects at
            800 px; choose sizes that span your objects, see README).
        aspect_ratios: anchor height/width ratios, the same at every level.
        anchor_stride: the stride of a single-map backbone (checked against the real one).
        pool_size, sampling_ratio, hidden_dim, dropout: the RoIAlign grid and the two-layer head.
        canonical_size, canonical_level: the level rule of :class:`ROIAlign` (224, 4 for COCO).
        rpn_kwargs, roi_kwargs: overrides for ``RegionProposalNetwork`` and ``ROIHeads``.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, backbone: Optional[nn.Module] = None, *,
                 feat_channels: Union[int, Sequence[int], None] = None, use_fpn: Optional[bool] = None,
                 fpn_channels: int = 256, anchor_sizes: Optional[Sequence[float]] = None,
                 aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0), anchor_stride: int = 16,
                 pool_size: Tuple[int, int] = (7, 7), sampling_ratio: int = 2,
                 canonical_size: float = 224.0, canonical_level: int = 4,
                 hidden_dim: int = 1024, dropout: float = 0.0,
                 rpn_kwargs: Optional[dict] = None, roi_kwargs: Optional[dict] = None):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(
                f"num_classes={num_classes!r}: it counts the background, so K object classes "
                f"need num_classes=K+1 (81 for COCO), at least 2"
            )
        self.num_classes = num_classes
        if backbone is None:
            backbone, use_fpn = ResNet50(), True if use_fpn is None else use_fpn
        feat_channels = feat_channels if feat_channels is not None else getattr(backbone, "out_channels", None)
        if feat_channels is None:
            raise ValueError("pass feat_channels, the number of channels of the backbone's output")
        self.backbone, self.anchor_stride = backbone, anchor_stride
        self.feat_channels = list(feat_channels) if isinstance(feat_channels, Sequence) else [feat_channels]
        if use_fpn:
            self.fpn = FPN(self.feat_channels, fpn_channels)
            channels, levels = fpn_channels, len(self.feat_channels) + 1  # + P6
            sizes = tuple((s,) for s in anchor_sizes or [32 * 2**i for i in range(levels)])
            if len(sizes) != levels:
                raise ValueError(f"with an FPN of {levels} levels pass {levels} anchor sizes, "
                                 f"one per level; got {tuple(anchor_sizes)}")
        else:
            if len(self.feat_channels) != 1:
                raise ValueError("without an FPN the backbone returns one map: feat_channels must be an int")
            self.fpn, channels = None, self.feat_channels[0]
            sizes = (tuple(anchor_sizes or (128, 256, 512)),)
        generator = AnchorGenerator(sizes, (tuple(aspect_ratios),) * len(sizes))
        head = RPNHead(channels, generator.num_anchors_per_location()[0])
        self.rpn = RegionProposalNetwork(head, generator, **(rpn_kwargs or {}))
        self.roi_heads = ROIHeads(
            ROIAlign(pool_size, sampling_ratio, canonical_size, canonical_level),
            TwoMLPHead(channels * pool_size[0] * pool_size[1], hidden_dim, dropout),
            FastRCNNPredictor(hidden_dim, num_classes),
            **(roi_kwargs or {}),
        )

    batch_images = staticmethod(pad_images)  # the first step of ``forward``

    # -- switches -------------------------------------------------------------------------------

    @property
    def gradient_checkpointing(self) -> bool:
        return bool(getattr(self.backbone, "gradient_checkpointing", False))

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute the backbone's top stages in backward instead of storing them (training only)."""
        if not hasattr(self.backbone, "gradient_checkpointing"):
            raise ValueError("this backbone has no gradient_checkpointing attribute to switch")
        self.backbone.gradient_checkpointing = bool(enabled)

    # -- forward --------------------------------------------------------------------------------

    def forward(self, images: Union[Tensor, List[Tensor]],
                targets: Optional[List[Dict[str, Tensor]]] = None):
        batch, image_sizes = pad_images(images)
        targets = (check_targets(targets, image_sizes, batch.device, self.num_classes)
                   if self.training else None)
        features = self.features(batch)
        proposals, rpn_losses = self.rpn(features, image_sizes, tuple(batch.shape[-2:]), targets)
        pooled_levels = features[:-1] if self.fpn is not None else features  # P6 is for the RPN only
        detections, roi_losses = self.roi_heads(pooled_levels, proposals, image_sizes, targets)
        if self.training:
            losses = {**rpn_losses, **roi_losses}
            losses["total"] = sum(losses.values())
            return losses
        return detections, proposals

    def features(self, batch: Tensor) -> List[Tensor]:
        """The feature maps the RPN sees: P2..P6 with an FPN, else the backbone's one map."""
        out = self.backbone(batch)
        maps = list(out) if isinstance(out, (list, tuple)) else [out]
        got = [m.shape[1] for m in maps]
        if got != self.feat_channels:
            raise ValueError(f"the backbone's output has {got} channels but feat_channels="
                             f"{self.feat_channels if self.fpn is not None else self.feat_channels[0]}"
                             f": pass feat_channels={got if self.fpn is not None else got[0]}")
        if self.fpn is not None:
            return self.fpn(maps)
        if isinstance(out, (list, tuple)):
            raise ValueError("the backbone returned several maps: pass use_fpn=True to build an FPN on them")
        stride = batch.shape[-2] // out.shape[-2]
        if stride != self.anchor_stride:
            raise ValueError(f"the backbone's output is 1/{stride} of the image size but "
                             f"anchor_stride={self.anchor_stride}: pass anchor_stride={stride}")
        return [out]

    @torch.no_grad()
    def predict(self, images: Union[Tensor, List[Tensor]], score_threshold: Optional[float] = None,
                batch_size: Optional[int] = None) -> List[Dict[str, Tensor]]:
        """Detections for a batch, in eval mode and without gradients; keeps only scores at or
        above ``score_threshold`` if given. The module's training mode is restored afterwards.

        ``batch_size``: run the images through the model this many at a time (the memory of a
        forward pass grows with the batch and with the image size), ``None`` all at once. Each image's detections do not depend on the others
        of its chunk beyond the padding to a common size."""
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be None or >= 1, got {batch_size}")
        chunks = [images] if batch_size is None else [images[i:i + batch_size]
                                                      for i in range(0, len(images), batch_size)]
        was_training = self.training
        self.eval()
        try:
            results = [r for chunk in chunks for r in self(chunk)[0]]
        finally:
            self.train(was_training)
        if score_threshold is not None:
            results = [keep_scoring(r, score_threshold) for r in results]
        return results

    # -- input checks ---------------------------------------------------------------------------

    # -- torchvision's weights ------------------------------------------------------------------

    @classmethod
    def from_torchvision(cls, state_dict="COCO_V1", **options) -> "FasterRCNN":
        """ResNet-50 + FPN holding torchvision's ``fasterrcnn_resnet50_fpn`` weights: see
        :func:`fasterrcnn_from_torchvision` (``num_classes=K`` to fine-tune on K classes)."""
        return fasterrcnn_from_torchvision(state_dict, **options)


_TORCHVISION_KEY_RULES = [  # (pattern, replacement), applied in order
    (r"^backbone\.body\.", "backbone."),
    (r"^backbone\.fpn\.inner_blocks\.(\d+)\.(?:0\.)?", r"fpn.lateral.\1."),
    (r"^backbone\.fpn\.layer_blocks\.(\d+)\.(?:0\.)?", r"fpn.output.\1."),
    (r"^rpn\.head\.conv\.(?:0\.0\.)?", "rpn.head.conv."),
    (r"^roi_heads\.box_predictor\.", "roi_heads.predictor."),
]


def coco91_rows() -> Tuple[Tensor, Tensor]:
    """Rows of torchvision's 91-way COCO head for our 81 classes: class rows ``[81]`` (background,
    then each label's COCO id) and box-delta rows ``[324]`` (4 per class)."""
    rows = torch.tensor([0] + COCO_CATEGORY_IDS)
    return rows, (rows[:, None] * 4 + torch.arange(4)).reshape(-1)


def course_key(torchvision_key: str) -> str:
    """This module's name for a parameter of torchvision's ``fasterrcnn_resnet50_fpn``."""
    import re

    for pattern, replacement in _TORCHVISION_KEY_RULES:
        torchvision_key = re.sub(pattern, replacement, torchvision_key)
    return torchvision_key


def torchvision_to_course_state_dict(state: Dict[str, Tensor], map_coco_classes: bool = True
                                     ) -> Dict[str, Tensor]:
    """Rename a torchvision ``fasterrcnn_resnet50_fpn`` state dict to this module's names, and map
    a 91-way COCO head onto the 81 contiguous ``COCO_NAMES`` classes."""
    renamed = {course_key(key): value for key, value in state.items()}
    if map_coco_classes and renamed["roi_heads.predictor.cls_score.weight"].shape[0] == 91:
        rows, box_rows = coco91_rows()
        for name in ("weight", "bias"):
            key = f"roi_heads.predictor.cls_score.{name}"
            renamed[key] = renamed[key][rows]
            key = f"roi_heads.predictor.bbox_pred.{name}"
            renamed[key] = renamed[key][box_rows]
    return renamed


def fasterrcnn_resnet50_fpn(num_classes: int = NUM_CLASSES, weights_backbone=None, *,
                            trainable_layers: Optional[int] = None, frozen_bn: Optional[bool] = None,
                            norm_eps: float = 1e-5, gradient_checkpointing: bool = False,
                            resnet=None, **kwargs) -> FasterRCNN:
    """Faster R-CNN with a ResNet-50 + FPN backbone, torchvision's configuration.

    The backbone options are :class:`ResNet50`'s: ``weights_backbone="IMAGENET1K_V1"`` starts from
    ImageNet (then 3 trainable stages and frozen BatchNorm by default). ``resnet`` picks another
    ResNet class (:class:`ResNet101`); ``kwargs`` go to :class:`FasterRCNN`.
    """
    resnet = resnet or ResNet50
    if weights_backbone is not None:  # loaded here, so that errors name this function's argument
        import torchvision.models

        enum = getattr(torchvision.models, resnet.torchvision_weights)
        weights_backbone = load_weights(weights_backbone, enum, resnet.__name__, "weights_backbone")
    backbone = resnet(weights_backbone, trainable_layers=trainable_layers, frozen_bn=frozen_bn,
                      norm_eps=norm_eps, gradient_checkpointing=gradient_checkpointing)
    return FasterRCNN(num_classes, backbone, use_fpn=True, **kwargs)


def fasterrcnn_resnet101_fpn(num_classes: int = NUM_CLASSES, weights_backbone=None,
                             **kwargs) -> FasterRCNN:
    """Faster R-CNN with a ResNet-101 + FPN backbone: :func:`fasterrcnn_resnet50_fpn`'s options."""
    return fasterrcnn_resnet50_fpn(num_classes, weights_backbone, resnet=ResNet101, **kwargs)


def fasterrcnn_from_torchvision(state_dict="COCO_V1", *, num_classes: Optional[int] = None,
                                norm_eps: float = 0.0, map_coco_classes: bool = True,
                                **kwargs) -> FasterRCNN:
    """ResNet-50 + FPN Faster R-CNN holding torchvision's ``fasterrcnn_resnet50_fpn`` weights.

    ``state_dict`` is a state dict of that model (old or new key names), the path of one, or a
    torchvision weights name (``"COCO_V1"``, downloaded once). A 91-way COCO head (indexed by
    the sparse COCO ids) is mapped onto the 81 contiguous classes of ``COCO_NAMES`` unless
    ``map_coco_classes=False``; another head size is kept as it is. The mapping drops the 10
    unused "N/A" outputs, whose share of the softmax is negligible in the trained model.
    ``norm_eps`` is 0.0 for the published COCO weights; use 1e-5 for a model built by
    torchvision without them.

    ``num_classes=K`` (background included) fine-tunes: every weight but the predictor's is
    loaded with :func:`transfer_weights`, the predictor is new for ``K`` classes (initialised
    as torchvision's), and the names left at their initial values are printed and kept in
    ``model.new_weights``.
    """
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    state = load_weights(state_dict, FasterRCNN_ResNet50_FPN_Weights, "from_torchvision",
                         "state_dict", random_ok=False)
    state = torchvision_to_course_state_dict(state, map_coco_classes)
    head_classes = state["roi_heads.predictor.cls_score.weight"].shape[0]
    body = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    kwargs = {"frozen_bn": True, "trainable_layers": 3, **kwargs}  # pretrained, like torchvision
    model = fasterrcnn_resnet50_fpn(num_classes or head_classes, weights_backbone=body,
                                    norm_eps=norm_eps, **kwargs)
    model.new_weights = transfer_weights(model, state)
    if model.new_weights:
        say(f"from_torchvision: {len(model.new_weights)} weights left at their initial "
            f"values for num_classes={model.num_classes}: {model.new_weights}")
    return model


# Fast mode's detector ──────────────────────────────────────────────────────────────────────────


def tiny_detector(num_classes: int, widths: Sequence[int] = (32, 64, 64, 64),
                  **overrides) -> nn.Module:
    """The small detector of fast mode, the tests and the benchmark: a feature pyramid like
    ResNet-50 + FPN's, scaled down to 128 px images of shapes 15 to 90 px.

    :class:`TinyBackbone` gives C2, C3, C4 (strides 4, 8, 16); an :class:`FPN` with 64 channels
    makes P2, P3, P4 and a pooled P5 (stride 32) for the RPN, with one anchor size per level (16,
    32, 64, 128 px, three ratios). RoIAlign pools from P2..P4 with the level rule's canonical
    size scaled down from 224 to 64 px (level 4): a box of side s goes to level
    ``floor(4 + log2(s / 64))``, so every box spans 4 to 8 cells of its level (ResNet-50 + FPN's
    rule gives 14 to 28 at 800 px). With the COCO value, 224, every shape here would land on P2.
    Measured on one CPU thread, 8 images a step: with 64 the recipe's 850 steps reach a held-out
    AP50 of 0.977, 0.996 and 0.990 (seeds 0, 1, 2, in the recipe's channels_last layout). Earlier
    runs in the default layout: a canonical size of 32 (boxes spanning 2 to 4 cells) reached 0.44
    after 600 steps, 32 FPN channels 0.69 after 500, and 450 steps with these settings 0.66; 800
    steps 0.89 in one run. A 256-wide box head and fewer proposals and sampled ROIs than COCO's
    defaults (a few objects per image need no more; cutting the training proposals to 300 per
    level made one run fail, AP50 0.03). ``overrides`` replace any ``FasterRCNN`` argument.
    """
    settings = dict(
        use_fpn=True, fpn_channels=64,
        anchor_sizes=(16, 32, 64, 128), aspect_ratios=(0.5, 1.0, 2.0),
        canonical_size=64.0, canonical_level=4,
        pool_size=(7, 7), hidden_dim=256,
        rpn_kwargs=dict(pre_nms_top_n=(600, 300), post_nms_top_n=(300, 100)),
        roi_kwargs=dict(batch_size_per_image=64),
    )
    settings.update(overrides)
    return FasterRCNN(num_classes, TinyBackbone(widths, num_outputs=3), **settings)


# Weights from a checkpoint or another model ────────────────────────────────────────────────────
# ``frcnn_engine.save_checkpoint`` writes a run's checkpoint; these read its weights (or a plain
# state dict) into a detector, the whole of it or whatever fits.


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def read_checkpoint(path: str, map_location) -> dict:
    """``torch.load`` of ``path`` (tensors only), with errors that name the file and the fix."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No checkpoint at {path}. Check the path, or start a fresh run (fit(..., resume=True) "
            "starts from scratch when the file does not exist yet)."
        )
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "*.pt")))[:5]
        raise IsADirectoryError(f"{path} is a directory, not a checkpoint file: pass the path of "
                                f"the .pt file (.pt files in it: {found or 'none'})")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several types for a bad file
        if "Weights only load failed" in str(err):
            reason = ("it holds Python objects besides tensors, numbers and strings, so it was "
                      "not written by save_checkpoint or torch.save(model.state_dict()). If you "
                      "trust its origin, load it with torch.load(path, weights_only=False) and "
                      "pass the state dict on")
        else:
            reason = (f"it is not a readable torch file ({os.path.getsize(path)} bytes; "
                      f"{type(err).__name__}): truncated or corrupt. Delete it to start afresh, "
                      "or restore a copy")
        raise ValueError(f"cannot load checkpoint {path}: {reason}") from None


def transfer_weights(model: nn.Module, source) -> List[str]:
    """Load into ``model`` every weight of ``source`` whose name and shape match; return the names
    of the model's weights left at their initial values (sorted).

    ``source`` is a checkpoint path (of :func:`frcnn_engine.save_checkpoint` or a saved state
    dict), a state dict, or a model. This is how a detector trained on one set of classes starts
    training on another: build the model with the new ``num_classes`` and transfer; the predictor (its
    shapes depend on ``num_classes``) stays new, everything else is loaded. Raises a
    ``ValueError`` when no weight matches (a different architecture, or torchvision's names: use
    :meth:`FasterRCNN.from_torchvision`).
    """
    what = source if isinstance(source, (str, os.PathLike)) else type(source).__name__
    if isinstance(source, nn.Module):
        source = unwrap_model(source).state_dict()
    elif isinstance(source, (str, os.PathLike)):
        source = read_checkpoint(os.fspath(source), "cpu")
    if isinstance(source, dict) and isinstance(source.get("model"), dict):
        source = source["model"]  # a training checkpoint
    if not isinstance(source, dict):
        raise TypeError(f"transfer_weights needs a checkpoint path, a state dict or a model, "
                        f"got {what}")
    net = unwrap_model(model)
    own = net.state_dict()
    matching = {k: v for k, v in source.items()
                if k in own and isinstance(v, Tensor) and v.shape == own[k].shape}
    if not matching:
        raise ValueError(f"no weight of {what} matches this model by name and shape (e.g. "
                         f"{list(source)[:3]}): it is another architecture. For torchvision's "
                         "weights use FasterRCNN.from_torchvision(..., num_classes=K)")
    net.load_state_dict(matching, strict=False)
    return sorted(k for k in own if k not in matching)


# Names that moved ───────────────────────────────────────────────────────────────────────────────
# Training and evaluation moved to frcnn_engine.py, the notebooks' helpers to frcnn_course.py. An
# old script's ``fc.fit`` gets an error that names the new home (no re-export: the imports run one
# way, frcnn_common <- frcnn_engine <- frcnn_course).

_MOVED = {
    "frcnn_engine": """make_optimizer make_scheduler NonFiniteLossError TrainState get_rng_state
        set_rng_state amp_dtype amp_scaler PROGRESS_FILE_SECONDS ProgressBar TrainingInterrupted
        train_one_epoch train_step CHECKPOINT_FORMAT save_checkpoint load_checkpoint fit DistInfo
        setup_distributed wrap_distributed cleanup_distributed make_loader loader_workers
        COCO_METRICS match_detections average_precision coco_map evaluate""".split(),
    "frcnn_course": """SHAPES_RECIPE shapes_experiment pooled_levels write_shapes_coco_folder
        shapes_detector COCO_RECIPE FULL_MODE_KNOBS full_mode_settings coco_experiment
        training_step_flops saved_activation_bytes resident_memory_mb training_step_memory
        measure_in_fresh_process unnormalize outline_box draw_boxes show_predictions setup_notebook
        notebook_threads coco_source show_source check_exercise random_boxes check_score_filter
        check_box_iou check_encode_boxes check_anchor_grid check_nms check_level_mapper
        check_average_precision draw_detector_overview""".split(),
}
_HOME = {name: module for module, names in _MOVED.items() for name in names}


def __getattr__(name: str):
    if name in _HOME:
        home = _HOME[name]
        raise AttributeError(f"frcnn_common.{name} moved to {home}.py: import {home} and use "
                             f"{home}.{name}")
    raise AttributeError(f"module 'frcnn_common' has no attribute {name!r}")
