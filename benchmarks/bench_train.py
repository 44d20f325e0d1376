"""Training figures: throughput against torchvision, peak memory of a step, and the synthetic proof.

Run from the repository root: ``python benchmarks/bench_train.py`` (``--help`` for the parts).
Prints one ``name: value`` line per figure:

* ``train_img_per_s_*_416``: images per second of a full training step (forward, backward, SGD
  update, driven by ``train_one_epoch``, float32, batch 2 at 416 x 416) for our ResNet-50 + FPN
  and torchvision's ``FasterRCNN`` holding the same weights (frozen BatchNorm, layer2..layer4
  trainable, no resize or normalisation in its transform). Medians of steps alternating between
  the two models after a warm-up; ``..._ours_over_torchvision`` > 1 means ours is faster.
* ``train_step_peak_rss_mb_ckpt_{off,on}``: peak resident memory (``getrusage`` ``ru_maxrss``) of
  a fresh process that builds the model and runs one training step, with gradient checkpointing
  off and on; ``train_step_rss_growth_mb_*`` is that peak minus the resident memory just before
  the step (activations, gradients, optimiser state).
* ``synthetic_map50`` / ``synthetic_train_seconds``: ``shapes_experiment()``, the small detector
  trained from scratch on the synthetic shapes and scored (COCO AP at IoU 0.5) on held-out images.
* ``--r50-curve``: the ResNet-50 + FPN detector trained briefly on the synthetic shapes; prints its
  loss curve (mean total loss per block of steps).
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import common  # noqa: F401  (puts the repository root on sys.path)
from common import ROOT, report, side_by_side

import torch

import frcnn_common as fc

CPU = torch.device("cpu")


def batch_of_shapes(num_images: int = 2, size: int = 416):
    """``num_images`` synthetic images of ``size`` px with their targets (labels 1..3)."""
    data = fc.SyntheticShapesDataset(num_images, size, seed=0)
    return fc.frcnn_collate_fn([data[i] for i in range(num_images)])


class TorchvisionLosses(torch.nn.Module):
    """torchvision's detector behind our interface: its four losses renamed, plus ``total``."""

    num_classes = 91
    names = {"loss_objectness": "rpn_cls", "loss_rpn_box_reg": "rpn_box",
             "loss_classifier": "roi_cls", "loss_box_reg": "roi_box"}

    def __init__(self, detector):
        super().__init__()
        self.detector = detector

    def forward(self, images, targets):
        losses = self.detector(list(images), targets)
        losses = {self.names[k]: v for k, v in losses.items()}
        losses["total"] = sum(losses.values())
        return losses


def torchvision_resnet50_fpn():
    """torchvision's ``fasterrcnn_resnet50_fpn`` without downloaded weights: frozen BatchNorm,
    layer2..layer4 trainable, and a transform that neither resizes a 416 px image nor normalises."""
    from torchvision.models import resnet50
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    backbone = _resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3)
    return FasterRCNN(backbone, num_classes=91, min_size=416, max_size=416,
                      image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])


def throughput(repeats: int) -> None:
    theirs = torchvision_resnet50_fpn()
    ours = fc.FasterRCNN.from_torchvision(theirs.state_dict(), map_coco_classes=False, norm_eps=1e-5)
    theirs = TorchvisionLosses(theirs)
    images, targets = batch_of_shapes(2, 416)

    def step_fn(model):
        optimizer = fc.make_optimizer(model, lr=1e-3)
        batch = [(images, targets)]
        return lambda: fc.train_one_epoch(model, batch, optimizer, device=CPU, amp=False,
                                          progress=False)

    seconds = side_by_side([step_fn(ours), step_fn(theirs)], repeats, warmup=1)
    ours_ips, theirs_ips = 2 / seconds[0], 2 / seconds[1]
    report("train_img_per_s_ours_416", ours_ips)
    report("train_img_per_s_torchvision_416", theirs_ips)
    report("train_img_per_s_ours_over_torchvision_416", ours_ips / theirs_ips)


def rss_child(checkpointing: bool) -> None:
    """Runs in a fresh process: build the model, run one training step, print memory as JSON."""
    torch.manual_seed(0)
    try:
        model = fc.fasterrcnn_resnet50_fpn(91, trainable_layers=3, frozen_bn=True)
    except TypeError:  # a factory without the frozen_bn switch
        model = fc.fasterrcnn_resnet50_fpn(91, trainable_layers=3)
    model.set_gradient_checkpointing(checkpointing)
    images, targets = batch_of_shapes(2, 416)
    optimizer = fc.make_optimizer(model, lr=1e-3)
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    fc.train_one_epoch(model, [(images, targets)], optimizer, device=CPU, amp=False, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    print(json.dumps({"peak_mb": peak, "before_mb": before}))


def peak_memory() -> None:
    growth = {}
    for flag, tag in ((False, "off"), (True, "on")):
        out = subprocess.run(
            [sys.executable, __file__, "--rss-child", tag], check=True, capture_output=True,
            text=True, cwd=ROOT,
        ).stdout
        figures = json.loads(out.strip().splitlines()[-1])
        growth[tag] = figures["peak_mb"] - figures["before_mb"]
        report(f"train_step_peak_rss_mb_ckpt_{tag}", figures["peak_mb"])
        report(f"train_step_rss_growth_mb_ckpt_{tag}", growth[tag])
    report("train_step_rss_growth_ckpt_on_over_off", growth["on"] / growth["off"])


def synthetic_proof() -> None:
    result = fc.shapes_experiment(progress=False)
    report("synthetic_map50", result["metrics"]["AP50"])
    report("synthetic_map", result["metrics"]["AP"])
    report("synthetic_train_seconds", result["train_seconds"])


def r50_curve(steps: int, block: int) -> None:
    torch.manual_seed(0)
    data = fc.SyntheticShapesDataset(steps * 2, 192, seed=0, train=True)
    model = fc.fasterrcnn_resnet50_fpn(data.num_classes)
    start = time.perf_counter()
    history = fc.fit(model, fc.make_loader(data, 2), 1, lr=0.01, warmup_steps=min(50, steps // 5),
                     device=CPU, amp=False, max_grad_norm=10.0, progress=False)
    seconds = time.perf_counter() - start
    totals = history["total"]
    for i in range(0, len(totals), block):
        report(f"r50_fpn_synthetic_loss_steps_{i + 1}_{min(i + block, len(totals))}",
               sum(totals[i:i + block]) / len(totals[i:i + block]))
    report("r50_fpn_synthetic_s_per_step_batch2_192", seconds / steps)
    report("r50_fpn_synthetic_skipped_steps", int(sum(history["skipped"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip", nargs="*", default=[], choices=["throughput", "memory", "synthetic"])
    parser.add_argument("--r50-curve", type=int, default=0, metavar="STEPS",
                        help="also train ResNet-50 + FPN for STEPS steps and print its loss curve")
    parser.add_argument("--rss-child", choices=["off", "on"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child == "on")
        return
    if "throughput" not in args.skip:
        throughput(args.repeats)
    if "memory" not in args.skip:
        peak_memory()
    if "synthetic" not in args.skip:
        synthetic_proof()
    if args.r50_curve:
        r50_curve(args.r50_curve, max(1, args.r50_curve // 10))


if __name__ == "__main__":
    main()
