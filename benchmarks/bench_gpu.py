"""GPU figures: training memory and speed, inference speed, NMS on the device, full-mode notebooks.

Run from the repository root on a machine with a CUDA GPU: ``python benchmarks/bench_gpu.py
[--out FILE] [--budget SECONDS]`` (``make bench-gpu``). ``--dry-run`` runs every part at tiny sizes
on the CPU (one thread) in under a minute, to check the script before GPU time is spent on it.

The first line names the device. Then one ``name: value`` line per figure, and at the end the
same figures as plain-text tables. A value is a number, or the reason there is none: ``oom`` (the
step ran out of GPU memory), ``skipped (oom at batch B)`` (a larger batch of a configuration that
already ran out at batch B), ``skipped (time budget)``, ``skipped (dry run)``, ``n/a (cpu)``,
``error (...)`` (any other failure, its traceback on stderr; the run goes on).

1. Training steps ``train_{model}_{H}_b{B}_amp{0,1}_ckpt{0,1}_{images_per_s,peak_mib}``: our
   ResNet-50 + FPN (``fc.fasterrcnn_resnet50_fpn``, 91 classes, layer2..layer4 trained, frozen
   BatchNorm) and torchvision's ``FasterRCNN`` holding the same weights (``tests/twin.py``: the
   same frozen BatchNorm and trainable layers, a transform that neither resizes nor normalises, so
   both see the same pixels), on synthetic images of H x W (800 x 1333 and 400 x 667) with three
   boxes each, batch B, float32 (amp0) or float16 autocast with a gradient scaler (amp1), our
   gradient checkpointing off or on (torchvision's detector has no such switch: ckpt0 only). A
   step is ``engine.train_step`` (forward, backward, SGD update). Each measurement loads the same
   initial weights, moves that one model to the GPU, runs warm-up steps, resets the peak, times N
   steps between ``torch.cuda.synchronize()`` calls, and moves the model back, so the peak
   (``torch.cuda.max_memory_allocated``, MiB) counts that model's weights, gradients, optimiser
   state, batch and activations and nothing of the other model. The models alternate (ours,
   torchvision's, ours with checkpointing) batch by batch. A configuration stops at its first
   out-of-memory. torchvision's published 5.2 GB (batch 2, 800 px) is the figure to compare with.
2. Inference ``infer_{model}_{H}_b{B}_amp{0,1}_{images_per_s,peak_mib}``: eval mode, no gradients,
   float32 or float16 autocast, one batch of 800 x 1333 images, the same two models.
3. NMS on the device ``nms_{pure,torchvision,loop}_{N}_ms``: ``frcnn_ops.nms`` (tensor ops),
   ``torchvision.ops.nms`` (its CUDA kernel) and a greedy Python loop with one ``.item()`` per kept
   box, on N RPN-like boxes at IoU 0.7; medians of calls alternating between the three, each call
   ended by a synchronisation. ``nms_{pure,loop}_agrees_{N}`` says whether the kept indices equal
   torchvision's, ``nms_kept_{N}`` how many it keeps.
4. ``notebooks_full_mode``: ``pytest tests/test_full_mode.py -k every_notebook`` in a subprocess
   (all six notebooks with FRCNN_FAST=0 on a simulated COCO folder, on the GPU), pass or fail, and
   its ``notebooks_full_mode_seconds``.

The whole run keeps to ``--budget`` seconds (480): the training rows stop early enough to leave
the notebooks their share, and a row whose turn comes after its time prints
``skipped (time budget)``. cuDNN autotuning stays off (PyTorch's default).
"""

import argparse
import contextlib
import gc
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from common import ROOT, format_value, side_by_side  # (also puts the repository root on sys.path)

import torch
import torchvision.ops

import frcnn_common as fc
import frcnn_engine as engine
import frcnn_ops
from bench_ops import loop_nms, rpn_like_boxes
from bench_train import TorchvisionLosses, resnet50_fpn
from twin import torchvision_twin

NUM_CLASSES = 91  # torchvision's COCO head
# (model, gradient checkpointing) in the order they take turns at every batch size
VARIANTS = (("ours", False), ("torchvision", False), ("ours", True))
FIGURES = ("images_per_s", "peak_mib")


@dataclass(frozen=True)
class Settings:
    """What one run measures. Sizes are (height, width) pixels; ``budget_s`` bounds the whole run,
    of which the last ``notebook_reserve_s`` are kept for the notebooks."""
    train_sizes: Tuple[Tuple[int, int], ...]
    batches: Tuple[int, ...]
    warmup: int
    steps: int
    infer_size: Tuple[int, int]
    infer_batch: int
    infer_runs: int
    nms_counts: Tuple[int, ...]
    nms_repeats: int
    budget_s: float
    notebook_reserve_s: float


REAL = Settings(train_sizes=((800, 1333), (400, 667)), batches=(2, 4, 8, 16), warmup=2, steps=5,
                infer_size=(800, 1333), infer_batch=4, infer_runs=10,
                nms_counts=(1000, 2000, 5000), nms_repeats=15, budget_s=480.0,
                notebook_reserve_s=240.0)
DRY = Settings(train_sizes=((64, 96),), batches=(1,), warmup=1, steps=1, infer_size=(64, 96),
               infer_batch=2, infer_runs=1, nms_counts=(100, 300), nms_repeats=3, budget_s=90.0,
               notebook_reserve_s=0.0)  # about 2 s a training step of the real model on 1 thread


class Report:
    """Figures printed as ``name: value`` lines as they come, kept by name for the tables, and
    copied line by line to ``path`` (if given), so a run stopped midway leaves what it measured."""

    def __init__(self, path: Optional[str] = None):
        self.values: Dict[str, object] = {}
        self.file = open(path, "w") if path else None

    def text(self, text: str) -> None:
        print(text, flush=True)
        if self.file:
            self.file.write(text + "\n")
            self.file.flush()

    def add(self, name: str, value) -> None:
        self.values[name] = value
        self.text(f"{name}: {format_value(value)}")

    def close(self) -> None:
        if self.file:
            self.file.close()


class Clock:
    """The run's wall-clock budget: ``over(reserve)`` once at most ``reserve`` seconds are left."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def over(self, reserve: float = 0.0) -> bool:
        return self.left() <= reserve


# ─── device helpers ────────────────────────────────────────────────────────────────────────────

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def start_peak(device: torch.device) -> None:
    """Wait for the queued work, then start counting the peak memory afresh."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device):
    """Peak memory allocated by tensors since ``start_peak``, MiB (none on the CPU)."""
    if device.type != "cuda":
        return "n/a (cpu)"
    return torch.cuda.max_memory_allocated(device) / 2**20


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def placed(model: torch.nn.Module, state: dict, device: torch.device):
    """``model`` holding ``state`` on ``device`` inside the block, back on the CPU after it."""
    model.load_state_dict(state)
    model.to(device)
    try:
        yield model
    finally:
        model.zero_grad(set_to_none=True)
        model.to("cpu")


def run_cell(report: Report, prefix: str, measure: Callable[[], dict], over: Callable[[], bool],
             row: dict, batch: int = 0) -> None:
    """Report ``prefix_images_per_s`` and ``prefix_peak_mib`` from ``measure()``, or the reason
    there are none. ``row`` is the configuration's state: its first out-of-memory (at ``batch``)
    is kept there, and later cells of that row are skipped. Any other error is printed with its
    traceback and reported as ``error (...)``, and the run goes on."""
    if over():
        values = dict.fromkeys(FIGURES, "skipped (time budget)")
    elif "oom_at" in row:
        values = dict.fromkeys(FIGURES, f"skipped (oom at batch {row['oom_at']})")
    else:
        try:
            values = measure()
        except torch.OutOfMemoryError:  # also torch.cuda.OutOfMemoryError: the same class
            values, row["oom_at"] = dict.fromkeys(FIGURES, "oom"), batch
        except Exception as err:  # one failed cell must not cost the rest of a GPU run
            traceback.print_exc()
            message = " ".join(str(err).split())[:150]  # one line
            values = dict.fromkeys(FIGURES, f"error ({type(err).__name__}: {message})")
        if "oom_at" in row:  # out of the except block, so the failed step's tensors are gone
            free_memory(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    for figure in FIGURES:
        report.add(f"{prefix}_{figure}", values[figure])


# ─── models and data ───────────────────────────────────────────────────────────────────────────

def build_models() -> Dict[str, Tuple[torch.nn.Module, dict]]:
    """Ours and torchvision's detector (behind our loss interface) with the same random weights,
    each with a CPU copy of its initial state."""
    ours = resnet50_fpn(NUM_CLASSES)
    theirs = TorchvisionLosses(torchvision_twin(ours), NUM_CLASSES)
    return {name: (model, {k: v.clone() for k, v in model.state_dict().items()})
            for name, model in (("ours", ours), ("torchvision", theirs))}


def synthetic_batch(batch: int, size: Tuple[int, int], device: torch.device):
    """``batch`` random images ``[B, 3, H, W]`` on ``device`` and three boxes (absolute x1 y1 x2 y2
    pixels, labels 1..90) an image."""
    g = torch.Generator().manual_seed(batch)
    height, width = size
    images = torch.randn(batch, 3, height, width, generator=g).to(device)
    corners = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.8], [0.6, 0.05, 0.95, 0.4]])
    boxes = (corners * torch.tensor([width, height, width, height])).to(device)
    labels = [torch.randint(1, NUM_CLASSES, (3,), generator=g).to(device) for _ in range(batch)]
    targets = [{"boxes": boxes, "labels": image_labels} for image_labels in labels]
    return images, targets


def amp_setup(device: torch.device, amp: bool):
    """The autocast dtype and gradient scaler of training, as ``engine.train_one_epoch`` picks them."""
    return engine.amp_dtype(device, amp), engine.amp_scaler(device, amp)


# ─── 1. training ───────────────────────────────────────────────────────────────────────────────

def measure_training(model, state, device, size, batch, amp, checkpointing, s: Settings) -> dict:
    """Images/s and peak MiB of ``s.steps`` training steps after ``s.warmup`` ones."""
    images, targets = synthetic_batch(batch, size, device)
    dtype, scaler = amp_setup(device, amp)
    if checkpointing:
        model.set_gradient_checkpointing(True)
    try:
        with placed(model, state, device):
            model.train()
            optimizer = engine.make_optimizer(model, lr=1e-4)

            def step():
                engine.train_step(model, images, targets, optimizer, scaler=scaler, amp_dtype=dtype)

            for _ in range(s.warmup):
                step()
            start_peak(device)
            start = time.perf_counter()
            for _ in range(s.steps):
                step()
            synchronize(device)
            seconds = time.perf_counter() - start
            return {"images_per_s": batch * s.steps / seconds, "peak_mib": peak_mib(device)}
    finally:
        if checkpointing:
            model.set_gradient_checkpointing(False)


def training_measurer(models, device, s: Settings):
    """``measure(name, checkpointing, size, amp, batch)`` for ``train_section``."""
    def measure(name, checkpointing, size, amp, batch):
        model, state = models[name]
        return measure_training(model, state, device, size, batch, amp, checkpointing, s)
    return measure


def train_prefix(name: str, size, batch: int, amp: bool, checkpointing: bool) -> str:
    return f"train_{name}_{size[0]}_b{batch}_amp{int(amp)}_ckpt{int(checkpointing)}"


def train_section(report: Report, s: Settings, over: Callable[[], bool], measure) -> None:
    """Every configuration of ``VARIANTS`` x sizes x AMP over the batch sizes, the variants taking
    turns at each batch; a configuration stops at its first out-of-memory."""
    rows: Dict[tuple, dict] = {}
    for size in s.train_sizes:
        for amp in (False, True):
            for batch in s.batches:
                for name, ckpt in VARIANTS:
                    row = rows.setdefault((name, ckpt, size, amp), {})
                    run_cell(report, train_prefix(name, size, batch, amp, ckpt),
                             lambda: measure(name, ckpt, size, amp, batch), over, row, batch)


# ─── 2. inference ──────────────────────────────────────────────────────────────────────────────

def measure_inference(name, model, state, device, amp, s: Settings) -> dict:
    """Images/s and peak MiB of ``s.infer_runs`` batches in eval mode, after one warm-up batch."""
    images, _ = synthetic_batch(s.infer_batch, s.infer_size, device)
    detector = model if name == "ours" else model.detector
    batch = images if name == "ours" else list(images)
    dtype = engine.amp_dtype(device, amp)
    with placed(model, state, device), torch.no_grad(), \
            torch.autocast(device.type, dtype=dtype or torch.float32, enabled=amp):
        detector.eval()
        detector(batch)
        start_peak(device)
        start = time.perf_counter()
        for _ in range(s.infer_runs):
            detector(batch)
        synchronize(device)
        seconds = time.perf_counter() - start
    return {"images_per_s": s.infer_batch * s.infer_runs / seconds, "peak_mib": peak_mib(device)}


def inference_section(report: Report, s: Settings, over, models, device) -> None:
    for amp in (False, True):
        for name, (model, state) in models.items():
            prefix = f"infer_{name}_{s.infer_size[0]}_b{s.infer_batch}_amp{int(amp)}"
            run_cell(report, prefix, lambda: measure_inference(name, model, state, device, amp, s),
                     over, {}, s.infer_batch)


# ─── 3. NMS ────────────────────────────────────────────────────────────────────────────────────

NMS_IMPLEMENTATIONS = (("pure", frcnn_ops.nms), ("torchvision", torchvision.ops.nms),
                       ("loop", loop_nms))


def agreement(keep: torch.Tensor, reference: torch.Tensor) -> str:
    """``yes`` when the kept indices equal the reference's (same order), else where they part."""
    keep, reference = keep.cpu(), reference.cpu()
    if torch.equal(keep, reference):
        return "yes"
    n = min(len(keep), len(reference))
    differ = (keep[:n] != reference[:n]).nonzero()
    first = differ[0, 0].item() if len(differ) else n
    return f"no ({len(keep)} kept vs {len(reference)}, first difference at position {first})"


def nms_section(report: Report, s: Settings, over, device) -> None:
    """Median ms of each NMS on ``device`` at each box count, and whether they agree."""
    g = torch.Generator().manual_seed(0)
    for n in s.nms_counts:
        names = [f"nms_kept_{n}", f"nms_pure_agrees_{n}", f"nms_loop_agrees_{n}"]
        names += [f"nms_{impl}_{n}_ms" for impl, _ in NMS_IMPLEMENTATIONS]
        if over():
            for name in names:
                report.add(name, "skipped (time budget)")
            continue
        boxes, scores = (t.to(device) for t in rpn_like_boxes(n, g))
        reference = torchvision.ops.nms(boxes, scores, 0.7)
        report.add(names[0], len(reference))
        report.add(names[1], agreement(frcnn_ops.nms(boxes, scores, 0.7), reference))
        report.add(names[2], agreement(loop_nms(boxes, scores, 0.7), reference))

        def synced(op):
            return lambda: (op(boxes, scores, 0.7), synchronize(device))

        seconds = side_by_side([synced(op) for _, op in NMS_IMPLEMENTATIONS], s.nms_repeats)
        for name, t in zip(names[3:], seconds):
            report.add(name, 1e3 * t)


# ─── 4. the notebooks in full mode ─────────────────────────────────────────────────────────────

def notebooks_section(report: Report, dry_run: bool, clock: Clock) -> str:
    """Run the full-mode notebook test in a subprocess; returns the tail of its output."""
    name = "notebooks_full_mode"
    if dry_run or clock.over(30.0):
        reason = "skipped (dry run)" if dry_run else "skipped (time budget)"
        report.add(name, reason), report.add(f"{name}_seconds", reason)
        return ""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "tests/test_full_mode.py", "-k", "every_notebook"]
    start = time.perf_counter()
    try:
        run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                             timeout=clock.left())
        result, tail = ("pass" if run.returncode == 0 else f"fail (pytest exit {run.returncode})",
                        (run.stdout + run.stderr)[-2000:])
    except subprocess.TimeoutExpired:
        result, tail = "fail (stopped by the time budget)", ""
    report.add(name, result)
    report.add(f"{name}_seconds", time.perf_counter() - start)
    return "" if result == "pass" else tail


# ─── tables ────────────────────────────────────────────────────────────────────────────────────

def format_table(title: str, header, rows) -> str:
    """Plain-text table: a title line, then columns padded to their widest cell."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [title] + ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
                       for r in [header, *rows]]
    return "\n".join(lines)


def cell(values: dict, prefix: str) -> str:
    """``images/s / peak MiB`` of one measurement, or the reason it has none."""
    ips, mib = (values.get(f"{prefix}_{f}", "missing") for f in FIGURES)
    if isinstance(ips, str):
        return ips
    return f"{format_value(ips)} / {format_value(mib) if isinstance(mib, str) else round(mib)}"


def ratio(values: dict, a: str, b: str) -> str:
    ips_a, ips_b = values.get(f"{a}_images_per_s"), values.get(f"{b}_images_per_s")
    both = isinstance(ips_a, float) and isinstance(ips_b, float)
    return format_value(ips_a / ips_b) if both else "-"


def train_table(values: dict, s: Settings) -> str:
    header = ["H x W", "amp", "ckpt", "model"] + [f"batch {b}" for b in s.batches]
    rows = []
    for size in s.train_sizes:
        for amp in (False, True):
            for ckpt in (False, True):
                tag = [f"{size[0]} x {size[1]}", int(amp), int(ckpt)]
                for name in ("ours", "torchvision"):
                    if name == "torchvision" and ckpt:
                        rows.append(tag + [name, "n/a: torchvision's detector has no "
                                                 "gradient-checkpointing switch"]
                                    + [""] * (len(s.batches) - 1))
                        continue
                    rows.append(tag + [name] + [cell(values, train_prefix(name, size, b, amp, ckpt))
                                                for b in s.batches])
                if not ckpt:
                    rows.append(tag + ["ours / torchvision"] + [
                        ratio(values, train_prefix("ours", size, b, amp, False),
                              train_prefix("torchvision", size, b, amp, False)) for b in s.batches])
    title = ("Training steps: images/s / peak MiB (torch.cuda.max_memory_allocated); "
             "ours / torchvision: ratio of images/s (> 1: ours faster)")
    return format_table(title, header, rows)


def inference_table(values: dict, s: Settings) -> str:
    rows = []
    for amp in (False, True):
        prefixes = [f"infer_{n}_{s.infer_size[0]}_b{s.infer_batch}_amp{int(amp)}"
                    for n in ("ours", "torchvision")]
        rows.append(["autocast" if amp else "float32"] + [cell(values, p) for p in prefixes]
                    + [ratio(values, *prefixes)])
    title = (f"Inference, batch {s.infer_batch} at {s.infer_size[0]} x {s.infer_size[1]}, eval "
             "mode: images/s / peak MiB; autocast is float16 on CUDA, bfloat16 on the CPU")
    return format_table(title, ["precision", "ours", "torchvision", "ours / torchvision"], rows)


def nms_table(values: dict, s: Settings) -> str:
    header = ["boxes", "kept", "pure ms", "torchvision ms", "loop ms", "pure agrees", "loop agrees"]
    rows = [[n] + [format_value(values.get(k, "missing")) for k in (
        f"nms_kept_{n}", f"nms_pure_{n}_ms", f"nms_torchvision_{n}_ms", f"nms_loop_{n}_ms",
        f"nms_pure_agrees_{n}", f"nms_loop_agrees_{n}")] for n in s.nms_counts]
    return format_table("NMS on the device, IoU 0.7, RPN-like boxes: median ms", header, rows)


# ─── the run ───────────────────────────────────────────────────────────────────────────────────

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="every part at tiny sizes on the CPU, to check the script")
    parser.add_argument("--out", help="also write the output to this file")
    parser.add_argument("--budget", type=float,
                        help=f"seconds for the whole run (default {REAL.budget_s:.0f}, "
                             f"{DRY.budget_s:.0f} with --dry-run)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run it on a machine with a GPU, or add --dry-run to "
                     "check the script on the CPU at tiny sizes")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    s = DRY if args.dry_run else REAL
    clock = Clock(s.budget_s if args.budget is None else args.budget)
    device = torch.device("cpu") if args.dry_run else torch.device("cuda")
    threads = torch.get_num_threads()
    if args.dry_run:
        torch.set_num_threads(1)  # steadier on a shared CPU
    report = Report(args.out)
    try:
        name = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(device)
        report.add("device", name)
        report.add("torch_version", torch.__version__)
        report.add("budget_s", clock.left())
        models = build_models()
        over = lambda: clock.over(s.notebook_reserve_s)  # noqa: E731  (the notebooks' share)
        nms_section(report, s, over, device)
        inference_section(report, s, over, models, device)
        train_section(report, s, over, training_measurer(models, device, s))
        free_memory(device)  # the GPU's cached blocks go back before the notebooks start
        tail = notebooks_section(report, args.dry_run, clock)
        report.add("seconds_left_of_budget", clock.left())
        for table in (train_table(report.values, s), inference_table(report.values, s),
                      nms_table(report.values, s)):
            report.text("\n" + table)
        if tail:
            report.text("\nThe notebook test's last output:\n" + tail)
    finally:
        report.close()
        torch.set_num_threads(threads)  # as it was, for a caller in the same process (the tests)


if __name__ == "__main__":
    main()
