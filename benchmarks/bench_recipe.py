"""The README's own-backbone recipe, measured: a single-map backbone without an FPN, trained from
scratch on the synthetic shapes with the settings the README gives, scored on held-out images.

Run from the repository root: ``python benchmarks/bench_recipe.py`` (``--steps``, ``--lr``,
``--seed``, ``--threads``). Prints ``recipe_map50`` (COCO AP at IoU 0.5 on 200 held-out images),
``recipe_ap`` and ``recipe_train_seconds``. The model is the README's ``fc.FasterRCNN(...)`` call
with ``TinyBackbone(widths=(32, 64, 64), num_outputs=1)`` (three stride-2 stages: stride 8, 64
channels) as ``MyBackbone``; the training is ``shapes_experiment``'s (``SHAPES_RECIPE``: batch 8 at
128 px, warm-up, cosine decay, gradient clipping) with this recipe's steps and learning rate.
"""

import argparse

import common  # noqa: F401  (puts the repository root on sys.path)
from common import report

import torch

import frcnn_common as fc
import frcnn_course as course

RECIPE_STEPS = 850
RECIPE_LR = 0.12


def recipe_detector(num_classes: int = len(fc.SHAPE_NAMES)) -> torch.nn.Module:
    """The README recipe's model, with the tiny backbone standing in for ``MyBackbone``."""
    return fc.FasterRCNN(
        num_classes=num_classes,
        backbone=fc.TinyBackbone(widths=(32, 64, 64), num_outputs=1), use_fpn=False,
        anchor_stride=8,
        anchor_sizes=(16, 32, 64),
        aspect_ratios=(0.5, 1.0, 2.0),
        hidden_dim=256,
        rpn_kwargs=dict(pre_nms_top_n=(600, 300), post_nms_top_n=(300, 100)),
        roi_kwargs=dict(batch_size_per_image=64),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=RECIPE_STEPS)
    parser.add_argument("--lr", type=float, default=RECIPE_LR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--progress", action="store_true", help="show the step bar")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    run = course.shapes_experiment(args.steps, seed=args.seed, lr=args.lr, model=recipe_detector(),
                               threads=args.threads, progress=args.progress)
    report("recipe_map50", run["metrics"]["AP50"])
    report("recipe_ap", run["metrics"]["AP"])
    report("recipe_train_seconds", run["train_seconds"])


if __name__ == "__main__":
    main()
