"""A researcher's experiment, ours against torchvision: a small custom backbone (5 conv-BN-ReLU
layers, stride 8, 64 channels) under our ``FasterRCNN`` and under torchvision's, the same initial
backbone weights, the same images and the same plain SGD loop (lr 0.02, batch 8, 500 steps, lr x0.1
at 70%, float32), scored by ``coco_map`` on 200 held-out synthetic images. The experiment itself is
``tests/research_experiment.py``.

Run from the repository root: ``python benchmarks/bench_research.py``. Prints
``custom_backbone_map50_ours``, ``custom_backbone_map50_torchvision`` (mAP@0.5, means over the
seeds) and ``custom_backbone_map50_ours_minus_torchvision``. The runs alternate between the two
models (ours seed 0, torchvision seed 0, ours seed 1, ...). ``--per-seed`` also prints each run.
About 13 minutes of one CPU thread per run, 76 for all six (torchvision's RoIAlign backward is
most of a step); more by the wall clock on a shared machine.
"""

import argparse
import statistics
import time

import os
import sys

import common  # noqa: F401  (puts the repository root on sys.path)
from common import ROOT, report

import torch

sys.path.insert(0, os.path.join(ROOT, "tests"))  # the experiment is shared with tests/test_research.py
from research_experiment import MODEL_KINDS, run_experiment  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--eval-images", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--per-seed", action="store_true", help="also print every run's AP50")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    scores = {kind: [] for kind in MODEL_KINDS}
    for seed in range(args.seeds):
        for kind in MODEL_KINDS:
            start = time.perf_counter()
            ap50 = run_experiment(kind, seed, args.steps, eval_images=args.eval_images)
            scores[kind].append(ap50)
            if args.per_seed:
                report(f"custom_backbone_map50_{kind}_seed{seed}", ap50)
                report(f"custom_backbone_seconds_{kind}_seed{seed}", time.perf_counter() - start)
    ours, theirs = statistics.mean(scores["ours"]), statistics.mean(scores["torchvision"])
    report("custom_backbone_map50_ours", ours)
    report("custom_backbone_map50_torchvision", theirs)
    report("custom_backbone_map50_ours_minus_torchvision", ours - theirs)


if __name__ == "__main__":
    main()
