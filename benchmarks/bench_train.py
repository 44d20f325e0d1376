"""Training figures: throughput against torchvision, peak memory of a step, and the synthetic proof.

Run from the repository root: ``python benchmarks/bench_train.py`` (``--help`` for the parts).
Prints one ``name: value`` line per figure:

* ``train_img_per_s_*_416``: images per second of a full training step (forward, backward, SGD
  update, driven by ``train_one_epoch``, float32, batch 2 at 416 x 416) for our ResNet-50 + FPN
  and torchvision's ``FasterRCNN`` holding the same weights (``torchvision_twin``: frozen
  BatchNorm, layer2..layer4 trainable, no resize or normalisation in its transform). Medians of
  steps alternating between the two models after a warm-up; ``..._ours_over_torchvision`` > 1
  means ours is faster.
* ``train_step_peak_rss_mb_ckpt_{off,on}``: peak resident memory (``VmHWM`` in /proc) of
  a fresh process that builds our ResNet-50 + FPN and runs one training step (batch 2, 416 px),
  with gradient checkpointing off and on; ``train_step_rss_growth_mb_*`` is that peak minus the
  resident memory just before the step (activations, gradients, optimiser state). The children
  run with ``MALLOC_MMAP_THRESHOLD_`` set so that freed memory leaves the process at once.
* ``synthetic_step_s_{torchvision,pure}_ops``: seconds per training step of ``tiny_detector`` on
  one batch of the recipe (8 images, 128 px) with each ops backend, medians of alternating steps
  (``--threads``, default 1); ``..._pure_ops_2_threads``: the pure ops with 2 threads, alternating
  with the others, as notebook 05 trains. ``synthetic_image_ms``: milliseconds to draw one such
  image with its boxes (median); ``synthetic_data_share_of_step``: a batch's drawing time over the
  pure-ops step time (well under 1: the data never holds training back; the tests once asserted
  under 20 ms an image).
* ``busy_*``: seconds per training step of ``tiny_detector`` (the recipe's batch, pure ops) with
  2 threads and with the threads ``course.training_threads`` picks (``busy_threads_chosen_*``),
  alternating, first on the machine as it is, then while a CPU-bound process this script starts
  runs beside them; ``busy_over_quiet_*`` divides the second by the first (a fair share of two
  cores would be 2).
* ``synthetic_map50`` / ``synthetic_train_seconds``: ``shapes_experiment()``, the small detector
  trained from scratch on the synthetic shapes and scored (COCO AP at IoU 0.5) on held-out images.
* ``--r50-curve``: the ResNet-50 + FPN detector trained briefly on the synthetic shapes; prints its
  loss curve (mean total loss per block of steps).

``--threads`` (default 1) sets torch's threads for everything: on a CPU shared with other jobs,
two OpenMP threads on two cores made a training step up to 9x slower than one thread.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import common  # noqa: F401  (puts the repository root on sys.path)
from common import ROOT, report, side_by_side

import torch

import frcnn_common as fc
import frcnn_engine as engine
import frcnn_course as course
from twin import torchvision_twin

CPU = torch.device("cpu")


def batch_of_shapes(num_images: int = 2, size: int = 416):
    """``num_images`` synthetic images of ``size`` px with their targets (labels 1..3)."""
    data = fc.SyntheticShapesDataset(num_images, size, seed=0)
    return fc.frcnn_collate_fn([data[i] for i in range(num_images)])


class TorchvisionLosses(torch.nn.Module):
    """torchvision's detector behind our interface: its four losses renamed, plus ``total``."""

    names = {"loss_objectness": "rpn_cls", "loss_rpn_box_reg": "rpn_box",
             "loss_classifier": "roi_cls", "loss_box_reg": "roi_box"}

    def __init__(self, detector, num_classes):
        super().__init__()
        self.detector, self.num_classes = detector, num_classes

    def forward(self, images, targets):
        losses = self.detector(list(images), [dict(t) for t in targets])
        losses = {self.names[k]: v for k, v in losses.items()}
        losses["total"] = sum(losses.values())
        return losses


def resnet50_fpn(num_classes: int = fc.NUM_CLASSES):
    """Our ResNet-50 + FPN as it is fine-tuned from ImageNet weights (frozen BatchNorm, layer2..
    layer4 trainable), randomly initialised (seed 0): no download."""
    torch.manual_seed(0)
    return fc.fasterrcnn_resnet50_fpn(num_classes, weights_backbone=fc.ResNet50().state_dict(),
                                      frozen_bn=True, trainable_layers=3)


def throughput(repeats: int) -> None:
    ours = resnet50_fpn()
    theirs = TorchvisionLosses(torchvision_twin(ours), ours.num_classes)
    images, targets = batch_of_shapes(2, 416)

    def step_fn(model):
        optimizer = engine.make_optimizer(model, lr=1e-3)
        batch = [(images, targets)]
        return lambda: engine.train_one_epoch(model, batch, optimizer, device=CPU, amp=False,
                                          progress=False)

    seconds = side_by_side([step_fn(ours), step_fn(theirs)], repeats, warmup=1)
    ours_ips, theirs_ips = 2 / seconds[0], 2 / seconds[1]
    report("train_img_per_s_ours_416", ours_ips)
    report("train_img_per_s_torchvision_416", theirs_ips)
    report("train_img_per_s_ours_over_torchvision_416", ours_ips / theirs_ips)


def rss_child(checkpointing: bool) -> None:
    """Runs in a fresh process: build the model, run one training step, print memory as JSON."""
    model = resnet50_fpn()
    model.set_gradient_checkpointing(checkpointing)
    images, targets = batch_of_shapes(2, 416)
    optimizer = engine.make_optimizer(model, lr=1e-3)
    before = course.resident_memory_mb("VmRSS")
    engine.train_one_epoch(model, [(images, targets)], optimizer, device=CPU, amp=False, progress=False)
    print(json.dumps({"peak_mb": course.resident_memory_mb("VmHWM"), "before_mb": before}))


def peak_memory() -> None:
    # Large blocks straight from mmap, returned to the system when freed: the resident size then
    # follows the live tensors. With glibc's default (a threshold that grows to 32 MB), freed
    # activations stay in the heap and the peak varied by +-300 MB from run to run.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    growth = {}
    for tag in ("off", "on"):
        out = subprocess.run(
            [sys.executable, __file__, "--rss-child", tag, "--threads", str(torch.get_num_threads())],
            check=True, capture_output=True, text=True, cwd=ROOT, env=env,
        ).stdout
        figures = json.loads(out.strip().splitlines()[-1])
        growth[tag] = figures["peak_mb"] - figures["before_mb"]
        report(f"train_step_peak_rss_mb_ckpt_{tag}", round(figures["peak_mb"]))
        report(f"train_step_rss_growth_mb_ckpt_{tag}", round(growth[tag]))
    report("train_step_rss_growth_ckpt_on_over_off", growth["on"] / growth["off"])


def recipe_step(layout: torch.memory_format = torch.contiguous_format):
    """One batch of the shapes recipe and a fresh ``tiny_detector`` (seed 0) in memory ``layout``
    with its optimiser: a function ``step(backend, threads)`` that trains one step on that batch."""
    recipe = course.SHAPES_RECIPE
    data = fc.SyntheticShapesDataset(recipe["batch_size"], recipe["image_size"], seed=0, train=True,
                                     object_size=recipe["object_size"])
    images, targets = next(iter(engine.make_loader(data, recipe["batch_size"], shuffle=False)))
    torch.manual_seed(0)
    model = fc.tiny_detector(data.num_classes).train().to(memory_format=layout)
    optimizer = engine.make_optimizer(model, lr=0.01)

    def step(backend, threads=None):
        with fc.ops_backend(backend), fc.cpu_threads(threads):
            engine.train_step(model, images, targets, optimizer)

    return step


def synthetic_step_by_ops(repeats: int) -> None:
    """Seconds per training step of ``tiny_detector`` on one batch of the recipe: torchvision's
    ops, the pure ops, and the pure ops on 2 threads, steps alternating between the three (same
    model, same batch)."""
    recipe = course.SHAPES_RECIPE
    step = recipe_step()

    tv, pure, pure_2 = side_by_side([lambda: step("torchvision"), lambda: step("pure"),
                                     lambda: step("pure", 2)], repeats * 4)
    report("synthetic_step_s_torchvision_ops", tv)
    report("synthetic_step_s_pure_ops", pure)
    report("synthetic_step_pure_over_torchvision_ops", pure / tv)
    report("synthetic_step_s_pure_ops_2_threads", pure_2)
    report("synthetic_step_2_threads_over_1_pure_ops", pure_2 / pure)
    shapes = fc.SyntheticShapesDataset(100, recipe["image_size"], seed=0, train=True,
                                       object_size=recipe["object_size"])
    index = iter(range(10**9))
    (render,) = side_by_side([lambda: shapes[next(index) % len(shapes)]], repeats * 20)
    report("synthetic_image_ms", render * 1000)
    report("synthetic_data_share_of_step", render * recipe["batch_size"] / pure)


def synthetic_step_by_layout(repeats: int) -> None:
    """Seconds per training step of ``tiny_detector`` on the recipe's batch, its weights (and so
    its feature maps) in the default NCHW layout against ``channels_last`` (NHWC, which
    ``course.shapes_experiment`` uses), on 1 and 2 threads, steps alternating between the two
    models (same start, same batch)."""
    ops = course.SHAPES_RECIPE["ops"]
    in_nchw, in_nhwc = recipe_step(), recipe_step(torch.channels_last)
    for threads in (1, 2):
        nchw, nhwc = side_by_side([lambda: in_nchw(ops, threads), lambda: in_nhwc(ops, threads)],
                                  repeats * 4)
        report(f"synthetic_step_s_nchw_{threads}_threads", nchw)
        report(f"synthetic_step_s_channels_last_{threads}_threads", nhwc)
        report(f"synthetic_step_channels_last_over_nchw_{threads}_threads", nhwc / nchw)


def busy_machine(repeats: int) -> None:
    """Training steps of ``tiny_detector`` (the recipe's batch) on a quiet machine and while one
    other CPU-bound process runs (this script starts it, and stops it after): 2 threads, and the
    threads ``course.training_threads`` picks, each measured in both states."""
    step = recipe_step()

    def steps(threads):
        step("pure", threads)

    def measure():
        chosen = course.training_threads.__wrapped__()  # the rule, asked afresh
        two, picked = side_by_side([lambda: steps(2), lambda: steps(chosen)], repeats * 2)
        return chosen, two, picked

    quiet = measure()
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        busy = measure()
    finally:
        burner.kill()
        burner.wait()
    report("busy_threads_chosen_quiet", quiet[0])
    report("busy_threads_chosen_busy", busy[0])
    report("busy_step_s_quiet_chosen", quiet[2])
    report("busy_step_s_busy_chosen", busy[2])
    report("busy_step_s_quiet_2_threads", quiet[1])
    report("busy_step_s_busy_2_threads", busy[1])
    report("busy_over_quiet_chosen_threads", busy[2] / quiet[2])
    report("busy_over_quiet_2_threads", busy[1] / quiet[1])


def synthetic_proof() -> None:
    result = course.shapes_experiment(progress=False)
    report("synthetic_map50", result["metrics"]["AP50"])
    report("synthetic_map", result["metrics"]["AP"])
    report("synthetic_train_seconds", result["train_seconds"])
    report("synthetic_train_cpu_seconds", result["train_cpu_seconds"])


def r50_curve(steps: int, block: int) -> None:
    torch.manual_seed(0)
    data = fc.SyntheticShapesDataset(steps * 2, 192, seed=0, train=True)
    model = fc.fasterrcnn_resnet50_fpn(data.num_classes)
    start = time.perf_counter()
    history = engine.fit(model, engine.make_loader(data, 2), 1, lr=0.01,
                         warmup_steps=min(50, steps // 5), device=CPU, amp=False,
                         max_grad_norm=10.0, progress=False)
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
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["throughput", "memory", "busy", "synthetic"])
    parser.add_argument("--r50-curve", type=int, default=0, metavar="STEPS",
                        help="also train ResNet-50 + FPN for STEPS steps and print its loss curve")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--rss-child", choices=["off", "on"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args.rss_child == "on")
        return
    report("train_bench_threads", torch.get_num_threads())
    if "throughput" not in args.skip:
        throughput(args.repeats)
    if "memory" not in args.skip:
        peak_memory()
    if "busy" not in args.skip:
        busy_machine(args.repeats)
    if "synthetic" not in args.skip:
        synthetic_step_by_ops(args.repeats)
        synthetic_step_by_layout(args.repeats)
        synthetic_proof()
    if args.r50_curve:
        r50_curve(args.r50_curve, max(1, args.r50_curve // 10))


if __name__ == "__main__":
    main()
