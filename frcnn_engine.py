"""Running the detector: training, checkpoints, data-parallel runs and evaluation.

``frcnn_common.py`` is the detector; this file holds the loops that run it, as torchvision keeps
``references/detection/engine.py`` apart from ``models/detection``. Read top to bottom:

1. optimiser and schedule   SGD with torchvision's recipe, warm-up then step or cosine decay
2. training state           the step counter, random-number states, AMP's dtype and scaler
3. one step, one epoch      ``train_step`` (nanoGPT-sized), ``train_one_epoch`` with its progress bar
4. checkpoints              ``save_checkpoint`` / ``load_checkpoint``: a run resumes exactly
5. the fit loop             ``fit``: epochs, resume, Ctrl-C that saves, non-finite steps skipped
6. torchrun                 process groups, DDP, loaders sharded by rank
7. evaluation               matching and AP by hand, COCO mAP with pycocotools, ``evaluate``

Everything here works with any model that follows the detector's training interface:
``model(images, targets)`` returns a dict of scalar losses with a ``"total"`` entry, and
``model(images)`` in eval mode returns ``(results, proposals)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import random
import signal
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm  # plain-text bars: they also show in notebooks saved and read on the web

from frcnn_common import (DEVICE, FractionBoxesWarning, Tensor, box_iou, boxes_to_original,
                          frcnn_collate_fn, rank_and_world_size, read_checkpoint, say,
                          unwrap_model)


# ─── 1. Optimiser and learning-rate schedule ─────────────────────────────────────────────────
# Gradient checkpointing and frozen stages are the model's own switches
# (``set_gradient_checkpointing``, ``trainable_layers``); the helpers here only train the
# parameters that have ``requires_grad``.


def make_optimizer(
    model: nn.Module, lr: float = 0.02, momentum: float = 0.9, weight_decay: float = 1e-4
) -> torch.optim.SGD:
    """SGD with momentum and weight decay over the parameters that have ``requires_grad``.

    Frozen stages (``trainable_layers`` of the backbone) are left out, so they cost no optimiser
    memory and weight decay never shrinks them. ``lr=0.02`` is the reference value for a total batch
    of 16 images; scale it linearly with your batch (``lr = 0.02 * batch / 16``).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "make_optimizer: the model has no trainable parameters (every requires_grad is False). "
            "Unfreeze some stages, e.g. build the detector with trainable_layers=3."
        )
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: Optional[int] = None,
    schedule: str = "cosine",
    *,
    warmup_factor: float = 0.001,
    milestones: Optional[List[int]] = None,
    gamma: float = 0.1,
    min_factor: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine or step decay, stepped once per training step.

    Warm-up: the learning rate starts at ``warmup_factor * lr`` and grows linearly to ``lr`` over
    ``warmup_steps`` steps. A freshly initialised detector gives large, noisy gradients (the RPN and
    the box head start from random guesses), and a full learning rate at step 0 can throw the
    weights far enough to produce NaN losses; a few hundred gentle steps avoid that.

    After warm-up:
      * ``"cosine"``: lr follows half a cosine from ``lr`` down to ``min_factor * lr`` at
        ``total_steps``;
      * ``"step"``: lr is multiplied by ``gamma`` at each step in ``milestones`` (default: at 2/3
        and 8/9 of training, the shape of torchvision's detection recipe).

    Args:
        total_steps: the number of optimiser steps of the whole run (epochs x steps per epoch).
        warmup_steps: default ``min(1000, total_steps // 10)``.

    Returns:
        A ``LambdaLR``: its ``state_dict`` holds the step count, so a checkpoint resumes the curve.
        The shape itself is not stored: rebuild it with the same arguments when you resume.
    """
    if total_steps < 1:
        raise ValueError(f"make_scheduler: total_steps must be at least 1, got {total_steps}.")
    if schedule not in ("cosine", "step"):
        raise ValueError(f"make_scheduler: schedule must be 'cosine' or 'step', got {schedule!r}.")
    if warmup_steps is None:
        warmup_steps = min(1000, total_steps // 10)
    if milestones is None:
        milestones = [int(total_steps * 2 / 3), int(total_steps * 8 / 9)]

    def factor(step: int) -> float:
        warm = 1.0
        if step < warmup_steps:
            warm = warmup_factor + (1.0 - warmup_factor) * step / warmup_steps
        if schedule == "step":
            return warm * gamma ** sum(step >= m for m in milestones)
        if step < warmup_steps:
            return warm
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ─── 2. Training state, random-number state, AMP ─────────────────────────────────────────────


class NonFiniteLossError(RuntimeError):
    """Raised when too many training steps in a row had a NaN or infinite loss or gradient."""


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint so a resumed run continues exactly.

    Attributes:
        epoch: completed epochs.
        step: training steps taken (skipped ones included: the schedule counts them too).
        batch_in_epoch: batches of the current epoch already used (non-zero only mid-epoch).
        skipped_steps: steps whose update was skipped because a loss or gradient was not finite.
        bad_in_row: how many of the latest steps were skipped in a row.
        total_steps: the steps the learning-rate schedule was planned over (``fit`` sets it).
        steps_per_epoch: the run's steps per epoch (``fit`` sets it; a run started again with
            another value continues the same steps in the new layout).
        history: per-step records, ``{"step": [...], "epoch": [...], "lr": [...], "total": [...],
            <each loss>: [...], "grad_norm": [...], "skipped": [...]}``.
    """

    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    skipped_steps: int = 0
    bad_in_row: int = 0
    total_steps: Optional[int] = None
    steps_per_epoch: Optional[int] = None
    history: Dict[str, List[float]] = field(default_factory=dict)
    epoch_rng: Optional[dict] = None  # random state at the start of the current epoch
    resume_rng: Optional[dict] = None  # random state to restore when a loaded run continues

    def saved_fields(self) -> dict:
        """The fields a checkpoint stores by name (all but the random states)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not f.name.endswith("_rng")}


def get_rng_state() -> dict:
    """The state of every random generator a training step may use: torch (CPU and CUDA),
    Python's ``random`` and NumPy's global generator. Plain tensors, lists and numbers only, so
    a checkpoint holding it loads with ``torch.load(weights_only=True)``."""
    np_state = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`get_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _is_main_process() -> bool:
    return rank_and_world_size()[0] == 0


def _is_distributed() -> bool:
    return rank_and_world_size()[1] > 1


def amp_dtype(device: torch.device, amp: bool) -> Optional[torch.dtype]:
    """float16 on CUDA (with a gradient scaler), bfloat16 on CPU, None when AMP is off."""
    if not amp:
        return None
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def amp_scaler(device: torch.device, amp: bool) -> Optional[torch.amp.GradScaler]:
    """The gradient scaler AMP needs: one for float16 (CUDA), None for bfloat16 or no AMP."""
    return torch.amp.GradScaler("cuda") if amp_dtype(device, amp) == torch.float16 else None


def _to_device(images, targets, device: torch.device):
    non_blocking = device.type == "cuda"
    if isinstance(images, torch.Tensor):
        images = images.to(device, non_blocking=non_blocking)
    else:
        images = [img.to(device, non_blocking=non_blocking) for img in images]
    targets = [
        {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
         for k, v in t.items()}
        for t in targets
    ]
    return images, targets


# ─── 3. One step, one epoch ──────────────────────────────────────────────────────────────────


PROGRESS_FILE_SECONDS = 10.0
"""How often a :class:`ProgressBar` appends its line to the file ``FRCNN_PROGRESS_FILE`` names."""


class ProgressBar(tqdm):
    """tqdm's bar, which also appends its state as one plain line to the file that the environment
    variable ``FRCNN_PROGRESS_FILE`` names (if set), every ``PROGRESS_FILE_SECONDS`` and when it
    closes: ``epoch 0: 120/850 [00:41<04:10, total=1.234, lr=0.12]`` (steps done/planned,
    [elapsed<left, ...]). ``make run`` and ``make test`` relay that file to the terminal, so a
    notebook's long cell shows its progress there while it runs; the bar itself reaches only the
    notebook."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._copy_to = None if self.disable else os.environ.get("FRCNN_PROGRESS_FILE") or None
        self._copied, self._copied_n = time.monotonic(), None

    def update(self, n=1):
        shown = super().update(n)
        self._copy_if_due()
        return shown

    def __iter__(self):
        for done, item in enumerate(super().__iter__(), start=self.n + 1):
            yield item
            self._copy_if_due(done)  # tqdm's own count lags while it iterates

    def _copy_if_due(self, done: Optional[int] = None):
        if self._copy_to and time.monotonic() - self._copied >= PROGRESS_FILE_SECONDS:
            self._copy_line(done)

    def close(self):
        if getattr(self, "_copy_to", None) and self._copied_n != self.n:
            self._copy_line()
        self._copy_to = None  # tqdm may close a bar twice
        super().close()

    def _copy_line(self, done: Optional[int] = None):
        self._copied, self._copied_n = time.monotonic(), self.n if done is None else done
        shown = self.format_dict if done is None else {**self.format_dict, "n": done}
        line = self.format_meter(**{**shown, "bar_format":
                                    "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"})
        try:
            with open(self._copy_to, "a") as f:
                f.write(line + "\n")
        except OSError:  # a path that cannot be written: the bar goes on without its copy
            self._copy_to = None


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by :func:`fit` when Ctrl-C (or a notebook's interrupt) stops a run; its message is
    one line saying at which step and where the checkpoint is."""


class _InterruptedMidStep(KeyboardInterrupt):
    """A KeyboardInterrupt that came during a step: the weights may be half updated (BatchNorm's
    statistics, the optimiser), so :func:`fit` keeps the last checkpoint instead of saving."""


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    *,
    device=DEVICE,
    amp: bool = True,
    scaler: Optional[torch.amp.GradScaler] = None,
    max_grad_norm: Optional[float] = None,
    max_bad_steps: int = 20,
    max_steps: Optional[int] = None,
    progress: bool = True,
    state: Optional[TrainState] = None,
    on_step=None,
) -> Dict[str, List[float]]:
    """Train for one pass over ``loader`` (or ``max_steps`` batches) and return the loss history.

    Each batch is one :func:`train_step`; this loop adds the progress bar, the history, the
    count of skipped steps and the replay of a resumed epoch.

    Args:
        model: a detector in the course's interface (or its ``DistributedDataParallel`` wrapper),
            already on ``device``. Its ``gradient_checkpointing`` switch and frozen stages apply.
        loader: yields ``(images, targets)`` as ``frcnn_collate_fn`` builds them.
        optimizer, scheduler: e.g. from :func:`make_optimizer` and :func:`make_scheduler`; the
            scheduler is stepped once per training step.
        amp: mixed precision. On CUDA, float16 autocast with a ``GradScaler`` (pass ``scaler`` to
            keep its scale across epochs; one is made if missing); on CPU, bfloat16 autocast.
        max_grad_norm: clip the gradient's global L2 norm to this value (None: no clipping).
        max_bad_steps: stop with :class:`NonFiniteLossError` after this many skipped steps in a row.
        max_steps: end the epoch after this many batches (fast mode, or streams without a length);
            a loader that runs out first ends the epoch with a message saying after how many.
        progress: show a :class:`ProgressBar` with the running losses (only on rank 0 under DDP).
        state: a :class:`TrainState` to continue and update (the fit loop passes one); the
            epoch restarts at ``state.batch_in_epoch`` when a checkpoint was loaded mid-epoch.
        on_step: called as ``on_step(state)`` after every step (the fit loop saves checkpoints).

    Returns:
        This epoch's history, ``{"step": [...], "lr": [...], "total": [...], ...}``: one value per
        step for every loss the model returned, plus the gradient norm and a ``skipped`` flag.

    """
    state = state if state is not None else TrainState()
    device = torch.device(device)
    dtype = amp_dtype(device, amp)
    if scaler is None:
        scaler = amp_scaler(device, amp)
    model.train()
    batches = _epoch_batches(loader, state)
    first = len(state.history.get("step", []))
    bar = ProgressBar(total=_epoch_length(loader, max_steps), initial=state.batch_in_epoch,
                      desc=f"epoch {state.epoch}", disable=not (progress and _is_main_process()),
                      dynamic_ncols=True)
    running: Dict[str, float] = {}
    with bar:
        while max_steps is None or state.batch_in_epoch < max_steps:
            try:
                images, targets = next(batches)
            except StopIteration:
                break
            images, targets = _to_device(images, targets, device)
            lr = optimizer.param_groups[0]["lr"]
            try:
                losses, grad_norm, finite = train_step(model, images, targets, optimizer, scheduler,
                                                       scaler=scaler, amp_dtype=dtype,
                                                       max_grad_norm=max_grad_norm)
            except KeyboardInterrupt:
                raise _InterruptedMidStep from None
            record = {"step": state.step + 1, "epoch": state.epoch, "lr": lr, **losses,
                      "grad_norm": grad_norm, "skipped": float(not finite)}
            _count_step(state, record, finite, max_bad_steps, bar)
            bar.set_postfix(_running_postfix(running, losses, finite, lr, state), refresh=False)
            bar.update(1)
            if on_step is not None:
                on_step(state)
    if max_steps is not None and state.batch_in_epoch < max_steps:
        _report_short_epoch(state, max_steps)
    return {key: values[first:] for key, values in state.history.items()}


def _report_short_epoch(state: TrainState, planned: int) -> None:
    """Say that the loader ran out before ``planned`` steps, and what to change."""
    rank, world_size = rank_and_world_size()
    who = f"process {rank} of {world_size}: " if world_size > 1 else ""
    say(f"{who}epoch {state.epoch} ended after {state.batch_in_epoch} of its {planned} steps: the "
        "data ran out (a stream is split between the processes and the DataLoader workers, each "
        f"reading its share). Pass steps_per_epoch={state.batch_in_epoch} or fewer (train.py: "
        "--steps-per-epoch), or give the loader more data.")


def train_step(model: nn.Module, images, targets, optimizer: torch.optim.Optimizer,
               scheduler=None, *, scaler: Optional[torch.amp.GradScaler] = None,
               amp_dtype: Optional[torch.dtype] = None, max_grad_norm: Optional[float] = None
               ) -> Tuple[Dict[str, float], float, bool]:
    """One optimiser step: forward under autocast, backward, gradient norm (clipped to
    ``max_grad_norm`` if given), then the update unless a loss or the gradient is not finite,
    and the schedule. Returns the losses and the gradient norm as floats and whether the step
    was taken.

    Why skip non-finite steps: one NaN (a degenerate box, an overflow, a too-high learning rate)
    would propagate through the update into every weight and silently ruin the rest of a long run.
    The check costs one device sync per step: the losses and the gradient norm are read together,
    once, which the progress bar needs anyway. Backward always runs first, so under DDP every rank
    joins the gradient all-reduce; the losses are then averaged over the ranks, so all ranks see
    the same numbers and skip the same steps. With float16 on CUDA, an overflow of the scaled
    gradients is how the ``GradScaler`` learns to lower its scale: such steps are skipped and
    counted the same way (a few at the start of a run are normal).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    with torch.autocast(_device_type(images), dtype=amp_dtype or torch.float32,
                        enabled=amp_dtype is not None):
        losses = model(images, targets)
    if scaler is not None:
        scaler.scale(losses["total"]).backward()
        scaler.unscale_(optimizer)
    else:
        losses["total"].backward()
    if max_grad_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    values = torch.stack([loss.detach().float() for loss in losses.values()] + [grad_norm.float()])
    if _is_distributed():  # a NaN on any rank becomes a NaN on every rank
        dist.all_reduce(values)
        values = values / dist.get_world_size()
    values = values.tolist()  # the one device sync of the step
    finite = all(math.isfinite(v) for v in values)
    if finite and scaler is not None:
        scaler.step(optimizer)
    elif finite:
        optimizer.step()
    if scaler is not None:
        scaler.update()  # lowers the loss scale after an overflow
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return dict(zip(losses, values[:-1])), values[-1], finite


def _device_type(images) -> str:
    return (images if isinstance(images, Tensor) else images[0]).device.type


def _epoch_batches(loader, state: TrainState) -> Iterator:
    """The loader's batches from ``state.batch_in_epoch`` on, in the order of an uninterrupted run.

    The loader's shuffling and its workers' seeds are drawn from the global generator when the
    epoch starts; so a run resumed mid-epoch restores that state, replays the epoch's first
    batches without training on them, then restores the state saved at the checkpoint.
    """
    if state.batch_in_epoch == 0:
        if state.resume_rng is not None:
            set_rng_state(state.resume_rng)
            state.resume_rng = None
        state.epoch_rng = get_rng_state()
    elif state.epoch_rng is not None:
        set_rng_state(state.epoch_rng)
    batches = iter(loader)
    for _ in range(state.batch_in_epoch):
        next(batches)
    if state.resume_rng is not None:
        set_rng_state(state.resume_rng)
        state.resume_rng = None
    return batches


def _epoch_length(loader, max_steps: Optional[int]) -> Optional[int]:
    """Batches in the epoch, for the progress bar: ``None`` for a stream without a length."""
    try:
        length = len(loader)
    except TypeError:
        length = None
    if max_steps is not None:
        length = max_steps if length is None else min(length, max_steps)
    return length


def _count_step(state: TrainState, record: Dict[str, float], finite: bool, max_bad_steps: int,
                bar) -> None:
    """Advance ``state`` by one step, record it, and report a skipped one; raise
    :class:`NonFiniteLossError` after ``max_bad_steps`` skipped steps in a row."""
    state.step += 1
    state.batch_in_epoch += 1
    state.bad_in_row = 0 if finite else state.bad_in_row + 1
    state.skipped_steps += 0 if finite else 1
    for key, value in record.items():
        state.history.setdefault(key, []).append(value)
    if finite:
        return
    shown = ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k not in ("step", "epoch"))
    if _is_main_process():
        tqdm.write(f"step {state.step}: non-finite loss or gradient ({shown}); update skipped "
                   f"({state.bad_in_row} in a row, {state.skipped_steps} in this run)",
                   file=sys.stderr)
    if state.bad_in_row >= max_bad_steps:
        bar.close()
        raise NonFiniteLossError(
            f"{state.bad_in_row} training steps in a row had a non-finite loss or gradient "
            f"(last: {shown}). Their updates were skipped, so the weights are those of step "
            f"{state.step - state.bad_in_row}. Fix: lower the learning rate or lengthen the "
            "warm-up, clip gradients (max_grad_norm=10.0), try amp=False, and check the data for "
            "boxes with zero or negative width or height."
        )


def _running_postfix(running: Dict[str, float], losses: Dict[str, float], finite: bool,
                     lr: float, state: TrainState) -> Dict[str, str]:
    """The progress bar's text: exponential moving averages of the losses, lr, skipped steps."""
    if finite:
        for key, value in losses.items():
            running[key] = 0.9 * running.get(key, value) + 0.1 * value
    postfix = {k: f"{v:.3f}" for k, v in running.items()}
    postfix["lr"] = f"{lr:.2g}"
    if state.skipped_steps:
        postfix["skipped"] = str(state.skipped_steps)
    return postfix


# ─── 4. Checkpoints ──────────────────────────────────────────────────────────────────────────

CHECKPOINT_FORMAT = "frcnn_common/train-checkpoint-v1"


def _gather_rng(rng: Optional[dict]) -> List[Optional[dict]]:
    """Every rank's random state (a list by rank): each rank draws its own random numbers."""
    if _is_distributed():
        gathered: List[Optional[dict]] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rng)
        return gathered
    return [rng]


def save_checkpoint(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    scheduler=None, scaler: Optional[torch.amp.GradScaler] = None,
                    state: Optional[TrainState] = None, *, provenance: Optional[dict] = None,
                    **extra) -> None:
    """Write everything a run needs to continue: the weights, the optimiser's momentum, the
    scheduler's step, the AMP scaler, the epoch/step and every rank's random state, and
    ``provenance``, what the run trains on (see :func:`fit`).

    The file is written atomically: to a temporary file beside ``path``, flushed to disk, then
    renamed over ``path`` in one step. A crash or Ctrl-C while saving leaves the previous
    checkpoint intact, never a half-written file. Under DDP every rank must call this (the random
    states are gathered); rank 0 writes. ``extra`` keyword arguments are stored as they are (keep
    them to tensors, numbers, strings, lists and dicts so the file loads with ``weights_only``).
    """
    state = state if state is not None else TrainState()
    net = unwrap_model(model)
    rng = _gather_rng(get_rng_state())
    epoch_rng = _gather_rng(state.epoch_rng)
    if not _is_main_process():
        return
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "num_classes": getattr(net, "num_classes", None),
        "model": net.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        **state.saved_fields(),
        "rng": rng,
        "epoch_rng": epoch_rng,
        "provenance": provenance,
        "extra": extra,
    }
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def describe_source(source) -> str:
    """Data or weights as a checkpoint's provenance records them: a file or folder by its
    absolute path, a name (a hub dataset, torchvision's weights) as it is, an object by its repr."""
    if isinstance(source, (str, os.PathLike)):
        return os.path.abspath(source) if os.path.exists(source) else str(source)
    return repr(source)


class ProvenanceMismatch(ValueError):
    """Raised when a run would resume from a checkpoint trained on something else."""


def _check_provenance(path: str, checkpoint, provenance: dict) -> None:
    """Refuse a checkpoint whose recorded provenance differs from ``provenance``, naming each
    difference and what to pass; a checkpoint that records none resumes, with a one-line note."""
    recorded = checkpoint.get("provenance") if isinstance(checkpoint, dict) else None
    if recorded is None:
        if _is_main_process():
            say(f"Note: {path} does not record what it was trained on (an older checkpoint): "
                "resuming it unchecked.")
        return
    differ = [f"{key} {recorded.get(key, 'not recorded')!r} (this run: "
              f"{provenance.get(key, 'not recorded')!r})"
              for key in sorted(set(recorded) | set(provenance), key=str)
              if recorded.get(key) != provenance.get(key)]
    if differ:
        raise ProvenanceMismatch(
            f"{path} was trained on something else than this run: {'; '.join(differ)}. To keep "
            "it, pass another checkpoint path (train.py: --checkpoint OTHER.pt); to start over "
            "and overwrite it, pass resume=False (train.py: --no-resume).")


def _check_compatible(path: str, model: nn.Module, checkpoint: dict, weights: dict) -> None:
    """Refuse weights that do not fit the model, naming what differs and how to fix it."""
    model_classes = getattr(model, "num_classes", None)
    ckpt_classes = checkpoint.get("num_classes")
    if model_classes is not None and ckpt_classes is not None and model_classes != ckpt_classes:
        raise ValueError(
            f"Checkpoint {path} was trained with num_classes={ckpt_classes} (background "
            f"included) but this model has num_classes={model_classes}. To continue that run, "
            f"build the model with num_classes={ckpt_classes}. To fine-tune on your own classes, "
            f"start a fresh run from its weights: transfer_weights(model, {path!r}) loads every "
            "weight that fits and leaves the new predictor as it is."
        )
    own = model.state_dict()
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in weights.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if wrong:
        raise ValueError(
            f"Checkpoint {path} does not fit this model; {len(wrong)} tensors differ in shape, "
            f"e.g. {'; '.join(wrong[:3])}. Build the model with the settings the checkpoint was "
            "trained with (num_classes, hidden_dim, feat_channels, anchors, ...), or, to "
            f"fine-tune from it, call transfer_weights(model, {path!r}), which loads only the "
            "weights that fit."
        )


def load_checkpoint(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    scheduler=None, scaler: Optional[torch.amp.GradScaler] = None, *,
                    map_location="cpu", provenance: Optional[dict] = None) -> TrainState:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` (and the optimiser,
    scheduler and scaler when given) and return the :class:`TrainState` to continue from.

    Pass the returned state to :func:`train_one_epoch` (``fit`` does this for you) and the run
    continues where it stopped, down to the data order and the random numbers. A plain
    ``state_dict`` file (no training state) loads too; the returned state is then a fresh one.
    With ``provenance`` (what this run trains on), a checkpoint that records another is refused
    before anything loads; one that records none loads with a note.

    Raises:
        ProvenanceMismatch: the checkpoint records another ``provenance``.
        ValueError: the checkpoint was made for a different ``num_classes`` or architecture.
        FileNotFoundError: no file at ``path``.
    """
    checkpoint = read_checkpoint(path, map_location)
    if provenance is not None:
        _check_provenance(path, checkpoint, provenance)
    net = unwrap_model(model)
    if not (isinstance(checkpoint, dict) and checkpoint.get("format") == CHECKPOINT_FORMAT):
        weights = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
        if not isinstance(weights, dict):
            raise ValueError(
                f"{path} is neither a training checkpoint nor a state_dict. Save with "
                "save_checkpoint(...) or torch.save(model.state_dict(), path)."
            )
        _check_compatible(path, net, {}, weights)
        net.load_state_dict(weights)
        return TrainState()

    _check_compatible(path, net, checkpoint, checkpoint["model"])
    net.load_state_dict(checkpoint["model"])
    for name, part in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if part is not None and checkpoint[name] is not None:
            part.load_state_dict(checkpoint[name])

    rank, world_size = rank_and_world_size()
    rng, epoch_rng = checkpoint["rng"], checkpoint["epoch_rng"]
    if len(rng) != world_size:
        warnings.warn(f"{path} was written by a run of {len(rng)} processes and is resumed by "
                      f"{world_size}: weights, optimiser and schedule continue, but the data order "
                      "and random numbers differ from those of an uninterrupted run", stacklevel=2)
    fields = {name: checkpoint[name] for name in TrainState().saved_fields() if name in checkpoint}
    fields["history"] = {k: list(v) for k, v in fields.get("history", {}).items()}
    return TrainState(**fields, epoch_rng=epoch_rng[rank % len(epoch_rng)],
                      resume_rng=rng[rank % len(rng)])


# ─── 5. The fit loop ─────────────────────────────────────────────────────────────────────────


def _default_checkpoint_every(total_steps: int) -> int:
    """:func:`fit`'s checkpoint interval when a path is given without ``checkpoint_every``:
    about 20 checkpoints a run, never more than 1000 steps apart."""
    return max(1, min(1000, total_steps // 20))


def _start_state(path: Optional[str], resume: bool, parts: tuple, epochs: int,
                 steps_per_epoch: int, every: Optional[int], verbose: bool,
                 provenance: Optional[dict]) -> TrainState:
    """The state :func:`fit` starts from: the checkpoint at ``path`` (``parts``: model,
    optimizer, scheduler, scaler) when resuming, else a fresh one; says which."""
    if path is not None and resume and os.path.exists(path):
        return _resume(path, *parts, epochs, steps_per_epoch, verbose, provenance)
    if path is not None and verbose:
        why = (f"resume=False: starting fresh, {path} is overwritten" if os.path.exists(path)
               else f"No checkpoint at {path}, starting fresh")
        cadence = "" if not every else "after every step and " if every == 1 else f"every {every} steps and "
        say(f"{why} (checkpoints there {cadence}at the end of each epoch).")
    return TrainState(total_steps=epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch)


def _relayout(state: TrainState, steps_per_epoch: int, path: str, verbose: bool) -> None:
    """A checkpoint of a run with another ``steps_per_epoch``: its steps continue in the new
    layout (epoch ``step // steps_per_epoch``, the rest into it). The data order is that of an
    uninterrupted run when the run stays in the epoch it was in, a fresh shuffle otherwise."""
    old, state.steps_per_epoch = state.steps_per_epoch, steps_per_epoch
    if old is None or old == steps_per_epoch:
        return
    epoch_of_rng = state.epoch if state.batch_in_epoch else state.epoch - 1
    state.epoch, state.batch_in_epoch = divmod(state.step, steps_per_epoch)
    if state.epoch != epoch_of_rng:
        state.epoch_rng = None  # that epoch's first batches are not known: a fresh order
    if verbose:
        say(f"{path} was saved by a run of {old} steps per epoch and this run has "
            f"{steps_per_epoch}: its {state.step} steps count as epoch {state.epoch}, batch "
            f"{state.batch_in_epoch}.")


def _resume(path: str, model, optimizer, scheduler, scaler, epochs: int, steps_per_epoch: int,
            verbose: bool, provenance: Optional[dict]) -> TrainState:
    """Load ``path`` for :func:`fit` and say what goes on: where the run stands (re-laid out for a
    changed ``steps_per_epoch``), a schedule re-planned for a new length (its learning rate set
    for the current step at once, so that no step runs at the old schedule's final rate), or that
    there is nothing left to train. A checkpoint of another ``provenance`` is refused."""
    state = load_checkpoint(path, model, optimizer, scheduler, scaler, provenance=provenance)
    total_steps = epochs * steps_per_epoch
    planned, state.total_steps = state.total_steps, total_steps
    _relayout(state, steps_per_epoch, path, verbose)
    if state.epoch >= epochs:
        if verbose:
            say(f"Nothing to train: {path} already holds {state.epoch} epochs ({state.step} "
                f"steps) and this run asks for {epochs} epochs of {steps_per_epoch} steps. Pass "
                "more epochs or steps to continue it, or resume=False (train.py: --no-resume) "
                "to start over.")
        return state
    if verbose:
        say(f"Resuming from {path}: epoch {state.epoch}, step {state.step} (batch "
            f"{state.batch_in_epoch} of the epoch), continuing to step {total_steps} "
            f"({epochs} epochs in all).")
    if planned is not None and planned != total_steps and isinstance(
            scheduler, torch.optim.lr_scheduler.LambdaLR):
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs,
                                       scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
        if verbose:
            say(f"The run was planned over {planned} steps and now spans {total_steps}: the "
                f"learning-rate schedule is re-planned and continues at "
                f"{optimizer.param_groups[0]['lr']:.3g}.")
    return state


class _StopAfterStep:
    """While active, in the main thread of a single-process run, the first Ctrl-C (SIGINT) asks
    the training loop to stop after the step in progress, so the checkpoint saved then is exact;
    a second Ctrl-C stops at once. Under DDP a stop must reach every process in the same step,
    so there Ctrl-C keeps its usual effect and the periodic checkpoints are what resumes.

    Python runs a signal's handler between bytecodes, once for all the signals that came while
    the main thread was in one long C call (a backward pass); its C-level handler writes a byte
    per signal to the wakeup fd, so the presses are counted there and two count as the second."""

    wakeup_fd: Optional[int] = None  # the fd of the active instance, cleared in forked children

    def __init__(self):
        self.asked, self._previous, self._pid = False, None, os.getpid()

    def __enter__(self) -> "_StopAfterStep":
        if threading.current_thread() is threading.main_thread() and not _is_distributed():
            self._presses, self._writer = socket.socketpair()
            for end in (self._presses, self._writer):
                end.setblocking(False)
            self._wakeup = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
            _StopAfterStep.wakeup_fd = self._writer.fileno()
            self._previous = signal.signal(signal.SIGINT, self._ask)
        return self

    def _ask(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: it serves on, the loop stops
            return
        try:
            presses = self._presses.recv(4096).count(signal.SIGINT)
        except OSError:  # nothing written (a handler called directly)
            presses = 1
        if self.asked or presses > 1:
            raise KeyboardInterrupt
        self.asked = True
        say("\nCtrl-C: stopping after this step to save a checkpoint (Ctrl-C again stops at once).")

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            signal.set_wakeup_fd(self._wakeup)
            _StopAfterStep.wakeup_fd = None
            self._presses.close()
            self._writer.close()


def _forget_wakeup_fd() -> None:
    """In a process forked while a run counts its Ctrl-C presses (a DataLoader worker): its own
    signals must not count as the parent's presses."""
    if _StopAfterStep.wakeup_fd is not None:
        _StopAfterStep.wakeup_fd = None
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(-1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_wakeup_fd)


@contextlib.contextmanager
def _warnings_above_the_bar() -> Iterator[None]:
    """Within :func:`fit`: each warning is printed above the progress bar (``tqdm.write``), not
    into it, and a :class:`FractionBoxesWarning` only the first time, once a run."""
    shown = set()

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, FractionBoxesWarning):
            if category in shown:
                return
            shown.add(category)
        text = warnings.formatwarning(message, category, filename, lineno, line)
        tqdm.write(text.rstrip("\n"), file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def _interruption(err: KeyboardInterrupt, state: TrainState, path: Optional[str], save,
                  saved_step: Optional[int]) -> TrainingInterrupted:
    """Save the state an interruption between two steps leaves (one process), and return the
    one-line :class:`TrainingInterrupted` that says where the run can resume from."""
    between_steps = not isinstance(err, _InterruptedMidStep)
    if path is None:
        where = "nothing saved (no checkpoint_path)"
    elif between_steps and not _is_distributed() and state.step > 0:
        if saved_step != state.step:
            save(state)
        where = f"saved {path}; run the same again to resume from there"
    elif saved_step is not None:
        where = f"{path} holds step {saved_step}, where the same run resumes"
    else:
        where = "no checkpoint written yet"
    return TrainingInterrupted(f"Interrupted at step {state.step} of {state.total_steps}: {where}.")


def fit(
    model: nn.Module,
    train_loader,
    epochs: int,
    *,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler=None,
    lr: float = 0.02,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    warmup_steps: Optional[int] = None,
    schedule: str = "cosine",
    steps_per_epoch: Optional[int] = None,
    device=DEVICE,
    amp: bool = True,
    max_grad_norm: Optional[float] = None,
    max_bad_steps: int = 20,
    gradient_checkpointing: Optional[bool] = None,
    checkpoint_path: Optional[str] = None,
    checkpoint_every: Optional[int] = None,
    resume: bool = True,
    progress: bool = True,
    on_epoch_end=None,
    provenance: Optional[dict] = None,
) -> Dict[str, List[float]]:
    """Train for ``epochs`` epochs with checkpoints, and return the loss history of the whole run.

    Builds what is not given: SGD (:func:`make_optimizer` with ``lr``, ``momentum``,
    ``weight_decay``), the warm-up + ``schedule`` (:func:`make_scheduler` over
    ``epochs * steps_per_epoch`` steps) and, on CUDA with ``amp``, a ``GradScaler``.

    With ``checkpoint_path``, a checkpoint is written at the end of every epoch, every
    ``checkpoint_every`` steps (default: about 20 times a run, at most 1000 steps apart; 0: only
    at the ends of epochs) and when Ctrl-C stops the run: the first Ctrl-C lets the step in
    progress finish, saves, and raises :class:`TrainingInterrupted`, whose message says where (a
    second Ctrl-C stops at once, keeping the last checkpoint). Warnings print above the progress
    bar, boxes that look like fractions of the image once a run. With ``resume=True`` and an
    existing file, training continues from it and says so (or says that it starts fresh): an
    interrupted run picks up at the last checkpoint and produces the same weights and loss curve
    as a run that was never interrupted. The returned history then covers the whole run, the
    steps before the interruption included. A run started again with another ``steps_per_epoch``
    or ``epochs`` continues the checkpoint's steps up to the new total (schedule re-planned), or
    says there is nothing to train when the checkpoint holds as many.

    Args:
        model: the detector (or its DDP wrapper from :func:`wrap_distributed`), moved to ``device``.
        steps_per_epoch: batches per epoch; default ``len(train_loader)``. Required for streams
            without a length, and a way to make short epochs (fast mode).
        gradient_checkpointing: when not None, switched on or off on the model before training.
        on_epoch_end: called as ``on_epoch_end(epoch, state)`` after each epoch's checkpoint,
            e.g. to evaluate.
        provenance: what the run trains on, e.g. ``{"data": ..., "weights": ..., "model": ...,
            "num_classes": ...}`` (plain values); stored in each checkpoint. Resuming from a
            checkpoint that records another raises :class:`ProvenanceMismatch`, naming what
            differs; one that records none (an older checkpoint) resumes with a note.
        The other arguments are those of :func:`train_one_epoch`.
    """
    device = torch.device(device)
    net = unwrap_model(model)
    model.to(device)
    if gradient_checkpointing is not None:
        net.set_gradient_checkpointing(gradient_checkpointing)
    if steps_per_epoch is None:
        steps_per_epoch = _epoch_length(train_loader, None)
    if steps_per_epoch is None:
        raise ValueError("fit: the loader has no length (a streaming dataset); pass "
                         "steps_per_epoch=N to say how many batches make one epoch.")
    if optimizer is None:
        optimizer = make_optimizer(model, lr=lr, momentum=momentum, weight_decay=weight_decay)
    total_steps = epochs * steps_per_epoch
    if scheduler is None:
        scheduler = make_scheduler(optimizer, total_steps, warmup_steps, schedule)
    scaler = amp_scaler(device, amp)
    if checkpoint_path is not None and checkpoint_every is None:
        checkpoint_every = _default_checkpoint_every(total_steps)
    state = _start_state(checkpoint_path, resume, (model, optimizer, scheduler, scaler), epochs,
                         steps_per_epoch, checkpoint_every, progress and _is_main_process(),
                         provenance)
    saved = {"step": state.step if state.step else None, "rng": get_rng_state()}

    def save(current: TrainState, every: Optional[int] = 1) -> None:
        if checkpoint_path is not None and every and current.step % every == 0:
            save_checkpoint(checkpoint_path, model, optimizer, scheduler, scaler, current,
                            provenance=provenance)
            saved["step"] = current.step

    def after_step(current: TrainState) -> None:
        save(current, checkpoint_every)
        if checkpoint_path is not None:
            saved["rng"] = get_rng_state()  # what a save between this step and the next holds
        if stop.asked:
            raise KeyboardInterrupt

    try:
        with _StopAfterStep() as stop, _warnings_above_the_bar():
            while state.epoch < epochs:
                _set_epoch(train_loader, state.epoch)
                train_one_epoch(
                    model, train_loader, optimizer, scheduler,
                    device=device, amp=amp, scaler=scaler, max_grad_norm=max_grad_norm,
                    max_bad_steps=max_bad_steps, max_steps=steps_per_epoch, progress=progress,
                    state=state, on_step=after_step,
                )
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                save(state)
                if on_epoch_end is not None:
                    on_epoch_end(state.epoch - 1, state)
                saved["rng"] = get_rng_state()
    except KeyboardInterrupt as err:
        if checkpoint_path is not None and not isinstance(err, _InterruptedMidStep):
            set_rng_state(saved["rng"])  # as it was after the last step, not mid-way to the next
        raise _interruption(err, state, checkpoint_path, save, saved["step"]) from None
    return state.history


def _set_epoch(loader, epoch: int) -> None:
    """Tell the loader's sampler and dataset which epoch starts: a new shuffle for each epoch
    (``DistributedSampler``, ``COCOStreamDataset``)."""
    for source in (getattr(loader, "sampler", None), getattr(loader, "dataset", None)):
        if hasattr(source, "set_epoch"):
            source.set_epoch(epoch)


# ─── 6. Data-parallel training (torchrun) and loaders ────────────────────────────────────────


@dataclass
class DistInfo:
    """This process's place in a data-parallel run: ``rank`` of ``world_size``, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = DEVICE


def setup_distributed(backend: Optional[str] = None) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment.

    ``torchrun --nproc_per_node=N script.py`` starts N copies of the script and sets ``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in each. This reads them,
    picks the process's GPU (``cuda:LOCAL_RANK``) or the CPU, and initialises the group (NCCL on
    GPUs, gloo on CPU). Run without torchrun it returns rank 0 of 1 and changes nothing, so the
    same script trains on one device too.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, device)


def wrap_distributed(model: nn.Module, device=None, **ddp_kwargs) -> nn.Module:
    """Wrap a model (already on its device) in ``DistributedDataParallel`` when a process group
    with more than one process is running; otherwise return it unchanged.

    DDP gives every rank the same initial weights (broadcast from rank 0) and averages the
    gradients across ranks during backward, so one step on N ranks with B images each is one
    step on the N * B images.
    """
    if not _is_distributed():
        return model
    device = torch.device(device) if device is not None else next(model.parameters()).device
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, **ddp_kwargs)


def cleanup_distributed() -> None:
    """Leave the process group (call at the end of a torchrun script)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def make_loader(
    dataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    num_workers: int = 0,
    drop_last: bool = False,
    seed: int = 0,
    collate_fn=None,
    **loader_kwargs,
) -> torch.utils.data.DataLoader:
    """A training ``DataLoader`` that shards the data by rank under DDP.

    A map-style dataset gets a ``DistributedSampler`` when a process group is running: rank r of
    N reads every N-th sample of the (seeded, per-epoch) shuffled order, so the ranks see disjoint
    data. An iterable dataset (a stream) is passed through: it must shard itself by rank and
    worker (``COCOStreamDataset`` does). ``batch_size`` is per rank.
    """
    streamed = isinstance(dataset, torch.utils.data.IterableDataset)
    sampler = None
    if _is_distributed() and not streamed:
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=shuffle, seed=seed,
                                                      drop_last=drop_last)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and sampler is None and not streamed,
        sampler=sampler, num_workers=num_workers, drop_last=drop_last,
        collate_fn=collate_fn or frcnn_collate_fn, **loader_kwargs,
    )


def loader_workers(wanted: int = 4) -> int:
    """``wanted`` DataLoader workers, or fewer on a machine with fewer usable CPU cores (a
    DataLoader warns when it is given more workers than cores: Colab has 2)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(wanted, cores or 1))


# ─── 7. Evaluation ───────────────────────────────────────────────────────────────────────────
# Matching and AP written out (what notebook 05 teaches), COCO's box mAP computed by pycocotools
# itself (the numbers papers report), and a loop that runs a detector over a loader.

COCO_METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl",
                "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
"""The twelve numbers of ``COCOeval.summarize()``, in its order: AP averaged over IoU 0.50:0.95,
AP at IoU 0.50 and 0.75, AP of small (< 32² px²), medium and large (> 96² px²) objects, then the
average recall with at most 1, 10, 100 detections per image and by object size."""


def _xywh(boxes: Tensor) -> List[List[float]]:
    """Boxes [N, 4] x1, y1, x2, y2 -> COCO's [x, y, width, height] as Python floats."""
    boxes = boxes.detach().cpu().double().reshape(-1, 4)
    return torch.cat((boxes[:, :2], boxes[:, 2:] - boxes[:, :2]), 1).tolist()


def match_detections(boxes: Tensor, scores: Tensor, gt_boxes: Tensor,
                     iou_threshold: float = 0.5) -> Tensor:
    """Which detections of one class in one image are true positives, by COCO's rule.

    Detections are visited from the highest score down (ties in index order); each takes the
    ground-truth box it overlaps most among those still free, if that IoU is at least
    ``iou_threshold``. A second detection of an already matched object is a false positive (a
    duplicate), however well it overlaps. Returns bool ``[D]`` in the order of ``boxes``.
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    iou = box_iou(boxes, gt_boxes) if gt_boxes.numel() else boxes.new_zeros(len(boxes), 0)
    free = torch.ones(len(gt_boxes), dtype=torch.bool)
    hit = torch.zeros(len(boxes), dtype=torch.bool)
    for d in order.tolist():
        candidates = torch.where(free, iou[d], torch.full_like(iou[d], -1.0))
        if candidates.numel() and candidates.max() >= min(iou_threshold, 1 - 1e-10):
            g = int(candidates.argmax())
            free[g], hit[d] = False, True
    return hit


def average_precision(hits: Tensor, scores: Tensor, num_gt: int) -> float:
    """COCO's 101-point interpolated average precision of one class at one IoU threshold.

    ``hits`` and ``scores`` are ``[D]`` over the detections of all images (from
    :func:`match_detections`), ``num_gt`` the number of ground-truth objects. Sorted by score,
    precision and recall after each detection trace the precision-recall curve; precision is
    made non-increasing from the right (the "envelope"), then read at the 101 recall levels
    0, 0.01, ..., 1 (0 where recall never gets there) and averaged. -1 when ``num_gt`` is 0, as
    pycocotools reports a class without ground truth.
    """
    if num_gt == 0:
        return -1.0
    order = torch.sort(scores, descending=True, stable=True).indices
    tp = torch.cumsum(hits[order].double(), 0)
    fp = torch.cumsum((~hits[order]).double(), 0)
    recall = tp / num_gt
    precision = tp / (tp + fp).clamp(min=1e-300)
    precision = torch.flip(torch.cummax(torch.flip(precision, [0]), 0).values, [0])  # envelope
    levels = torch.linspace(0, 1, 101, dtype=torch.float64)
    index = torch.searchsorted(recall, levels)  # the first detection reaching each level
    padded = torch.cat((precision, precision.new_zeros(1)))  # a level never reached counts 0
    return float(padded[index].mean())


def _per_class_ap(evaluator: COCOeval, class_names: Sequence[str]) -> Dict[str, float]:
    """``AP/<name>`` and ``AP50/<name>`` of each category of an accumulated ``COCOeval``, read
    from its precision array [IoU thresholds, recall levels, categories, areas, max detections]
    at area "all" and 100 detections; -1.0 where pycocotools has no value."""
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    out = {}
    for k, label in enumerate(evaluator.params.catIds):
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        for key, values in (("AP", precision[:, :, k]), ("AP50", precision[0, :, k])):
            valid = values[values > -1]
            out[f"{key}/{name}"] = float(valid.mean()) if valid.size else -1.0
    return out


def coco_map(predictions: List[Dict[str, Tensor]], targets: List[Dict[str, Tensor]],
             verbose: bool = False, class_names: Optional[Sequence[str]] = None
             ) -> Dict[str, float]:
    """COCO box metrics of detections against ground truth, computed by pycocotools.

    Args:
        predictions: one dict per image with ``boxes`` [D, 4] (x1, y1, x2, y2), ``scores`` [D]
            and ``labels`` [D].
        targets: one dict per image, in the same order and the same pixel frame, with ``boxes``
            [G, 4] and ``labels`` [G]; optional ``area`` [G] (square pixels; default the box area,
            it decides the small/medium/large split) and ``iscrowd`` [G] (crowd regions are
            ignored rather than counted as misses).
        verbose: print pycocotools' own log and summary table.
        class_names: names of the labels (index 0 the background, e.g. a dataset's
            ``class_names``); when given, the result also holds per-class AP.

    Returns:
        ``{name: value}`` for the names in ``COCO_METRICS`` (``AP``, ``AP50``, ``AP75``, ``APs``,
        ``APm``, ``APl``, ``AR1``, ...), each in [0, 1], exactly pycocotools' numbers. As in
        pycocotools, a metric with no ground truth to measure (e.g. ``APs`` without small
        objects) is -1.0; so is every metric when there is no ground truth at all. With
        ``class_names``, then ``AP/<name>`` and ``AP50/<name>`` of each class in the ground
        truth, from pycocotools' precision array (all areas, 100 detections).

    Images are numbered by position (the dicts' ``image_id`` is not needed), the categories are
    the labels present in the ground truth, and detections become a result set through
    ``COCO.loadRes``, exactly as one would do by hand.
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets: "
                         "give one dict per image to both, in the same order")
    images, gt_anns, dt_anns = [], [], []
    for image_id, (pred, target) in enumerate(zip(predictions, targets)):
        images.append({"id": image_id})
        boxes = _xywh(target["boxes"])
        labels = target["labels"].tolist()
        areas = target["area"].tolist() if "area" in target else [w * h for _, _, w, h in boxes]
        crowd = target["iscrowd"].tolist() if "iscrowd" in target else [0] * len(boxes)
        for box, label, area, iscrowd in zip(boxes, labels, areas, crowd):
            gt_anns.append({"id": len(gt_anns) + 1, "image_id": image_id, "category_id": label,
                            "bbox": box, "area": area, "iscrowd": int(iscrowd)})
        for box, score, label in zip(_xywh(pred["boxes"]), pred["scores"].tolist(),
                                     pred["labels"].tolist()):
            dt_anns.append({"image_id": image_id, "category_id": label, "bbox": box,
                            "score": score})
    if not gt_anns:
        return {name: -1.0 for name in COCO_METRICS}

    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        gt = COCO()
        categories = sorted({ann["category_id"] for ann in gt_anns})
        gt.dataset = {"images": images, "annotations": gt_anns,
                      "categories": [{"id": c, "name": str(c)} for c in categories]}
        gt.createIndex()
        if dt_anns:
            dt = gt.loadRes(dt_anns)
        else:  # loadRes cannot take an empty list: an empty result set scores 0 where gt exists
            dt = COCO()
            dt.dataset = dict(gt.dataset, annotations=[])
            dt.createIndex()
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics = {name: float(value) for name, value in zip(COCO_METRICS, evaluator.stats)}
    if class_names is not None:
        metrics.update(_per_class_ap(evaluator, class_names))
    return metrics


def evaluate(model: nn.Module, loader, *, verbose: bool = False, progress: bool = True,
             max_batches: Optional[int] = None, class_names: Optional[Sequence[str]] = None
             ) -> Dict[str, float]:
    """COCO box metrics of ``model`` over the images of ``loader``, in original image pixels.

    Runs the detector in eval mode under ``torch.no_grad()`` (``model(images)`` returns
    ``(results, proposals)``) on the model's device, maps every predicted and ground-truth box
    back to its source image's pixels with :func:`boxes_to_original` (areas too), and scores
    them with :func:`coco_map`. The model's training mode is restored afterwards.

    The ground truth is gathered in the same single pass over the loader and turned into one
    COCO index at the end: a stream has no index to cache it against, and gathering costs
    nothing while staying right under shuffling, ``max_samples`` or worker sharding.

    Args:
        model: a detector following the ``FasterRCNN`` interface.
        loader: yields ``(images, targets)`` as :func:`frcnn_collate_fn` batches them; images a
            tensor [B, 3, H, W] or a list of [3, H_i, W_i] tensors.
        verbose: print pycocotools' summary table.
        progress: show a tqdm progress bar.
        max_batches: stop after this many batches (``None``: the whole loader).
        class_names: the names of the labels for per-class AP; default the loader's dataset's
            ``class_names`` when it has them.

    Returns:
        The dict of :func:`coco_map`, with ``AP/<name>`` and ``AP50/<name>`` per class when the
        names are known.
    """
    if class_names is None:
        class_names = getattr(getattr(loader, "dataset", None), "class_names", None)
    device = next(model.parameters()).device
    was_training = model.training
    predictions, ground_truth = [], []
    model.eval()
    try:
        with torch.no_grad():
            for step, (images, targets) in enumerate(ProgressBar(loader, desc="evaluate",
                                                                 disable=not progress)):
                if max_batches is not None and step >= max_batches:
                    break
                images, _ = _to_device(images, [], device)
                results, _ = model(images)
                for result, target in zip(results, targets):
                    predictions.append({
                        "boxes": boxes_to_original(result["boxes"].cpu(), target),
                        "scores": result["scores"].cpu(), "labels": result["labels"].cpu()})
                    truth = {"boxes": boxes_to_original(target["boxes"], target),
                             "labels": target["labels"]}
                    if "area" in target:
                        scale = target["scale"] if "scale" in target else torch.ones(4)
                        truth["area"] = target["area"] / (scale[0] * scale[1])
                    if "iscrowd" in target:
                        truth["iscrowd"] = target["iscrowd"]
                    ground_truth.append(truth)
    finally:
        model.train(was_training)
    return coco_map(predictions, ground_truth, verbose=verbose, class_names=class_names)
