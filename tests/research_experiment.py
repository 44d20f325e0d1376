"""A researcher's experiment: a small custom backbone under our ``FasterRCNN`` and under
torchvision's, trained the same way on the synthetic shapes and scored the same way.

Both detectors get the same backbone class with the same initial weights (built right after
``torch.manual_seed(seed)``), the same training images in the same order with the same flips,
the same plain SGD loop, and the same scoring (``coco_map``'s mAP@0.5 on held-out images).
Everything else is each library's default. With the same weights and the same random stream the
two give the same losses and gradients (``tests/test_research.py`` checks one step), so what
differs between them is the heads' initial values (drawn from the same distributions) and
the random stream of the samplers: the seed-to-seed spread is the yardstick for any gap. Used by ``tests/test_research.py`` (short) and ``benchmarks/bench_research.py`` (full).

    from tests.research_experiment import run_experiment
    run_experiment("ours", seed=0, steps=500)          # AP50 on 200 held-out images
    run_experiment("torchvision", seed=0, steps=500)
"""

import os
import sys

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from frcnn_common import FasterRCNN, SyntheticShapesDataset
from frcnn_engine import coco_map

NUM_CLASSES = 4  # circle, square, triangle + the background
IMAGE_SIZE = 128
MODEL_KINDS = ("ours", "torchvision")


class SmallBackbone(nn.Module):
    """Five conv-BN-ReLU layers, stride 8, 64 channels, one feature map: [B, 3, H, W] -> [B, 64, H/8, W/8]."""

    def __init__(self):
        super().__init__()
        layers = []
        for cin, cout, stride in [(3, 32, 2), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 64, 2)]:
            layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.out_channels = 64  # torchvision's FasterRCNN reads this

    def forward(self, x):
        return self.body(x)


def build_ours(seed: int, image_size: int = IMAGE_SIZE, rois_per_image: int = 512) -> nn.Module:
    """Our ``FasterRCNN`` on ``SmallBackbone`` (``image_size`` is only for symmetry with
    ``build_torchvision``; ``rois_per_image`` 512 is both libraries' default)."""
    torch.manual_seed(seed)  # the backbone is built first: the same weights as build_torchvision's
    backbone = SmallBackbone()
    return FasterRCNN(NUM_CLASSES, backbone, feat_channels=64, use_fpn=False,
                      anchor_sizes=(16, 32, 64), aspect_ratios=(1.0,), anchor_stride=8,
                      hidden_dim=256, dropout=0.0,
                      roi_kwargs=dict(batch_size_per_image=rois_per_image))


def build_torchvision(seed: int, image_size: int = IMAGE_SIZE, rois_per_image: int = 512) -> nn.Module:
    from torchvision.models.detection import FasterRCNN as TVFasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    torch.manual_seed(seed)
    backbone = SmallBackbone()
    return TVFasterRCNN(
        backbone, rpn_anchor_generator=AnchorGenerator(((16, 32, 64),), ((1.0,),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), box_head=TwoMLPHead(64 * 49, 256),
        box_predictor=FastRCNNPredictor(256, NUM_CLASSES),
        # the images are already ImageNet-normalised and image_size px: no resizing, no renormalising
        min_size=image_size, max_size=image_size, image_mean=[0.0] * 3, image_std=[1.0] * 3,
        box_batch_size_per_image=rois_per_image)


BUILDERS = {"ours": build_ours, "torchvision": build_torchvision}


def get_batch(data, step: int, batch_size: int, seed: int):
    """Images ``step * batch_size ...`` of ``data`` as lists (images, targets). Their random flips
    are drawn from torch's RNG reseeded by (seed, step) and then restored, so both models see the
    same pixels and the models' own random stream is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + step)
        samples = [data[i] for i in range(step * batch_size, (step + 1) * batch_size)]
    images = [image for image, _ in samples]
    targets = [{"boxes": t["boxes"], "labels": t["labels"]} for _, t in samples]
    return images, targets


def train(model, seed: int, steps: int, batch_size: int = 8, lr: float = 0.02,
          image_size: int = IMAGE_SIZE, log_every: int = 0):
    """Plain SGD (momentum 0.9, weight decay 1e-4), lr x0.1 after 70% of the steps, float32;
    every step a batch of new images."""
    data = SyntheticShapesDataset(steps * batch_size, image_size, seed=seed, train=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr if step < int(0.7 * steps) else lr * 0.1
        images, targets = get_batch(data, step, batch_size, seed)
        losses = model(images, targets)
        # ours adds a "total" to its dict, torchvision's has only the four terms
        loss = sum(v for k, v in losses.items() if k != "total")
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}: {losses}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {loss.item():.3f}", flush=True)
    return model


@torch.no_grad()
def score(model, seed: int, num_images: int = 200, image_size: int = IMAGE_SIZE,
          batch_size: int = 20) -> float:
    """mAP@0.5 (pycocotools, via ``coco_map``) on held-out images (seed + 1000)."""
    data = SyntheticShapesDataset(num_images, image_size, seed=seed + 1000)
    model.eval()
    predictions, truths = [], []
    for start in range(0, num_images, batch_size):
        samples = [data[i] for i in range(start, min(start + batch_size, num_images))]
        out = model([image for image, _ in samples])
        results = out[0] if isinstance(out, tuple) else out  # ours: (results, proposals)
        predictions += [{k: r[k] for k in ("boxes", "scores", "labels")} for r in results]
        truths += [{"boxes": t["boxes"], "labels": t["labels"]} for _, t in samples]
    return coco_map(predictions, truths)["AP50"]


def run_experiment(model_kind: str, seed: int, steps: int = 500, *, batch_size: int = 8,
                   lr: float = 0.02, eval_images: int = 200, image_size: int = IMAGE_SIZE,
                   rois_per_image: int = 512, log_every: int = 0, model=None) -> float:
    """Build (or take) the ``model_kind`` detector for ``seed``, train it ``steps`` steps and
    return its held-out AP50. ``model``: an already built model to train instead."""
    if model_kind not in BUILDERS:
        raise ValueError(f"model_kind must be one of {MODEL_KINDS}, got {model_kind!r}")
    model = BUILDERS[model_kind](seed, image_size, rois_per_image) if model is None else model
    train(model, seed, steps, batch_size, lr, image_size, log_every)
    return score(model, seed, eval_images, image_size)
