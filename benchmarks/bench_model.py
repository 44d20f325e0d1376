"""The detector's speed against torchvision's ``FasterRCNN`` holding the same weights.

Run from the repository root: ``python benchmarks/bench_model.py [--repeats 5]``. Ratios are
``ours / torchvision`` of median times measured alternately in one process (< 1: ours faster).
Both models get the same normalised pixels (torchvision's transform neither resizes nor
normalises here), the same frozen BatchNorm and the same trainable layers (layer2..layer4).
"""

import argparse

from common import report, side_by_side  # (also puts the repository root on sys.path)

import torch

import frcnn_common as fc
from twin import torchvision_twin


def make_models():
    torch.manual_seed(0)
    model = fc.fasterrcnn_resnet50_fpn(weights_backbone=fc.ResNet50().state_dict(), frozen_bn=True,
                                      trainable_layers=3)
    return model, torchvision_twin(model)


def inference(model, twin, size, repeats):
    images = torch.randn(1, 3, *size)
    model.eval(), twin.eval()

    def ours():
        with torch.no_grad():
            model(images)

    def theirs():
        with torch.no_grad():
            twin(list(images))

    return side_by_side([ours, theirs], repeats)


def training_step_fns(model, twin, size, batch=2):
    """Three training steps to time: ours, torchvision's, and ours with the pure-PyTorch ops."""
    torch.manual_seed(1)
    images = torch.randn(batch, 3, *size)
    targets = [{"boxes": torch.tensor([[40.0, 60, 200, 300], [220, 100, 400, 260]]),
                "labels": torch.tensor([1, 18])} for _ in range(batch)]
    model.train(), twin.train()

    def step(module, *args):
        module.zero_grad(set_to_none=True)
        losses = module(*args)
        sum(v for k, v in losses.items() if k != "total").backward()

    def ours_pure():
        with fc.ops_backend("pure"):
            step(model, images, targets)

    return [lambda: step(model, images, targets),
            lambda: step(twin, list(images), [dict(t) for t in targets]), ours_pure]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model, twin = make_models()
    for size in [(416, 416), (800, 1088)]:
        ours, theirs = inference(model, twin, size, args.repeats)
        tag = f"{size[0]}x{size[1]}"
        report(f"inference_ms_ours_{tag}", ours * 1000)
        report(f"inference_ours_over_torchvision_{tag}", ours / theirs)
    ours, theirs, pure = side_by_side(training_step_fns(model, twin, (416, 416)), args.repeats)
    report("train_step_ms_ours_416_batch2", ours * 1000)
    report("train_step_ours_over_torchvision_416_batch2", ours / theirs)
    report("train_step_pure_ops_over_torchvision_ops_416_batch2", pure / ours)

if __name__ == "__main__":
    main()
