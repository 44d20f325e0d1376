"""What the six notebooks share: set-up, showing code, drawing, checked exercises, recipes.

A notebook imports ``frcnn_common as fc`` (the detector), ``frcnn_engine as engine`` where it
trains or evaluates, and ``frcnn_course as course`` for what is here:

1. recipes and experiments  the shapes recipe fast mode trains, COCO's full-mode recipe and knobs
2. measurements             FLOPs of a training step, saved activations, peak memory
3. drawing                  boxes with labels, predictions beside ground truth, the overview diagram
4. notebook helpers         ``setup_notebook``, ``show_source``, the exercise checkers

Nothing here is needed to build, train or evaluate a detector: a researcher's script needs only
``frcnn_common`` and ``frcnn_engine``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from frcnn_common import (COCO_NAMES, DEVICE, HUB_COCO, IMAGENET_MEAN, IMAGENET_STD, IMG_SIZE,
                          SHAPE_NAMES, AnchorGenerator, COCOStreamDataset, ROIAlign, ResNet50,
                          SyntheticShapesDataset, Tensor, box_iou, cpu_threads, encode_boxes,
                          fasterrcnn_resnet50_fpn, keep_scoring, nms, ops_backend, tiny_detector)
from frcnn_engine import (amp_dtype, amp_scaler, average_precision, describe_source, evaluate,
                          fit, load_checkpoint, loader_workers, make_loader, make_optimizer,
                          match_detections, save_checkpoint, train_step)


# ─── 1. Recipes and experiments ──────────────────────────────────────────────────────────────
# Fast mode trains the tiny detector on synthetic shapes (``shapes_experiment``); full mode trains
# ResNet-50 + FPN on COCO (``coco_experiment``), sized by the ``FRCNN_*`` knobs.


SHAPES_RECIPE = dict(
    steps=850,  # training steps (batches), every image a new one
    batch_size=8,
    image_size=128,
    object_size=(0.12, 0.7),  # shape sides 15 to 90 px: pooled from P2, P3 and P4
    lr=0.12,
    warmup_steps=90,
    schedule="cosine",
    max_grad_norm=10.0,
    eval_images=200,
    ops="pure",  # frcnn_ops' NMS and RoIAlign: faster here than torchvision's kernels (make bench)
    channels_last=True,  # convolutions on NHWC tensors: a step about 8 % faster here (make bench)
)
"""The synthetic-shapes experiment of :func:`shapes_experiment`: small enough to train from
scratch in minutes on a laptop CPU, and the one place its settings live (the tests, the
benchmark and the notebooks all run it from here)."""


def shapes_experiment(steps: Optional[int] = None, *, seed: int = 0, device=DEVICE,
                      progress: bool = True, model: Optional[nn.Module] = None,
                      threads: Optional[int] = None, **recipe) -> dict:
    """Train :func:`tiny_detector` (or ``model``) from scratch on :class:`SyntheticShapesDataset`
    and score it.

    Every training image is new (``steps * batch_size`` images rendered from ``seed``, randomly
    flipped); the score is COCO mAP from :func:`evaluate` on ``eval_images`` held-out images
    (seed ``seed + 1``). Seeded throughout, so a run gives the same numbers every time on the same
    machine and library versions. Float32 (``amp=False``): bfloat16 autocast is fast only on CPUs
    with native bfloat16 (AVX512-BF16, AMX) and much slower on the many without it. NMS and
    RoIAlign come from the backend ``ops`` names (see :func:`set_ops_backend`): the recipe's
    "pure" ops of ``frcnn_ops.py`` made a step of this detector faster than torchvision's kernels
    on the course's 2-core CPU (``make bench``: ``synthetic_step_s_pure_ops`` against
    ``..._torchvision_ops``).

    Args:
        steps: training steps; default ``SHAPES_RECIPE["steps"]``.
        threads: torch CPU threads while training and evaluating (default: as set; restored
            afterwards). Notebook 05 passes 2 on a 2-core machine: ``make bench`` compares
            ``synthetic_step_s_pure_ops`` (1 thread) with ``synthetic_step_s_pure_ops_2_threads``.
        recipe: overrides of ``SHAPES_RECIPE`` (``batch_size``, ``image_size``, ``lr``, ...).

    Returns:
        ``{"model", "history", "metrics", "held_out", "train_seconds", "train_cpu_seconds"}``:
        ``metrics`` is :func:`evaluate`'s dict (``metrics["AP50"]`` is the mAP at IoU 0.5) on the
        dataset ``held_out``; the training time by the wall clock and in CPU time of this process
        (all its threads together).

    ``make bench`` prints what the default recipe reaches (``synthetic_map50``) and in how long.
    """
    config = {**SHAPES_RECIPE, **recipe}
    steps = config["steps"] if steps is None else steps
    torch.manual_seed(seed)
    shapes = dict(image_size=config["image_size"], object_size=config["object_size"])
    train = SyntheticShapesDataset(steps * config["batch_size"], seed=seed, train=True, **shapes)
    held_out = SyntheticShapesDataset(config["eval_images"], seed=seed + 1, **shapes)
    model = model if model is not None else tiny_detector(train.num_classes)
    if config["channels_last"]:  # the weights' layout; the convolutions then keep it throughout
        model = model.to(memory_format=torch.channels_last)
    start, start_cpu = time.perf_counter(), time.process_time()
    with ops_backend(config["ops"]), cpu_threads(threads):
        history = fit(model, make_loader(train, config["batch_size"]), 1, lr=config["lr"],
                      warmup_steps=config["warmup_steps"], schedule=config["schedule"],
                      max_grad_norm=config["max_grad_norm"],
                      device=device, amp=False, progress=progress)
        train_seconds = time.perf_counter() - start
        train_cpu_seconds = time.process_time() - start_cpu
        metrics = evaluate(model, make_loader(held_out, 20, shuffle=False), progress=progress)
    return {"model": model, "history": history, "metrics": metrics, "held_out": held_out,
            "train_seconds": train_seconds, "train_cpu_seconds": train_cpu_seconds}


def pooled_levels(model: nn.Module, image: Tensor) -> List[int]:
    """The levels k (stride 2**k) of the maps ``model``'s RoIAlign pools from, finest first:
    P2..P5 for the ResNet-50 + FPN, a single level without a pyramid. ``image``: ``[3, H, W]``."""
    with torch.no_grad():
        batch, _ = model.batch_images([image.to(next(model.parameters()).device)])
        maps = model.features(batch)
    maps = maps[:-1] if model.fpn is not None else maps  # P6 serves the RPN only
    return [round(math.log2(batch.shape[-2] / m.shape[-2])) for m in maps]


def write_shapes_coco_folder(folder: str, num_images: int, names_of: Dict[int, str], *,
                             image_size: int = 128, seed: int = 0, **options) -> str:
    """Write :class:`SyntheticShapesDataset` images as a COCO-format folder, the format labelling
    tools export: ``folder/images/{i}.png`` and ``folder/annotations.json``; return the JSON's path.

    ``names_of`` maps each shape label (by default 1 circle, 2 square, 3 triangle; with
    ``shapes=(...)`` among ``options``, k for the k-th of them) to a class name of your own;
    shapes given one name become one class. ``options`` go to the dataset (``shapes``,
    ``object_size``, ...). Category ids are 10, 20, ... in name order (sparse, as real files
    often are); boxes are written as COCO's ``[x, y, w, h]``."""
    from PIL import Image

    names = sorted(set(names_of.values()))
    category_of = {label: 10 * (names.index(name) + 1) for label, name in names_of.items()}
    shapes = SyntheticShapesDataset(num_images, image_size, seed=seed, **options)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        pixels, boxes, labels = shapes.render(i)
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(os.path.join(folder, "images", f"{i}.png"))
        images.append({"id": i, "file_name": f"{i}.png", "width": pixels.shape[2], "height": pixels.shape[1]})
        for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": category_of[label],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                "iscrowd": 0})
    categories = [{"id": 10 * (k + 1), "name": name} for k, name in enumerate(names)]
    path = os.path.join(folder, "annotations.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return path


def freeze_backbone(model: nn.Module) -> int:
    """Stop ``model``'s backbone (a :class:`FasterRCNN`'s ``backbone``) from training: its
    weights get ``requires_grad`` False and its ``nn.BatchNorm2d`` layers become
    :class:`FrozenBatchNorm2d` with the statistics they hold, so training mode no longer moves
    them either. The FPN, RPN and ROI head still train. Returns the number of weights that were
    training and no longer do (BatchNorm's scale and shift included)."""
    from frcnn_common import FrozenBatchNorm2d

    frozen = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
    for parent in list(model.backbone.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.BatchNorm2d):
                fixed = FrozenBatchNorm2d(child.num_features, child.eps)
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(fixed, key).copy_(getattr(child, key).detach())
                setattr(parent, name, fixed.to(child.weight.device))
    for param in model.backbone.parameters():
        param.requires_grad_(False)
    return frozen


def shapes_detector(checkpoint: str, fallback: Optional[str] = None, *, progress: bool = True,
                    **recipe) -> nn.Module:
    """The shapes detector that notebook 05 trains and saves at ``checkpoint``, in eval mode.

    When ``checkpoint`` does not exist (notebook 06 run on its own), the detector is trained
    with :func:`shapes_experiment` (``recipe``: its keyword arguments, such as ``threads`` or
    overrides of ``SHAPES_RECIPE``) and saved at
    ``fallback`` (default: ``checkpoint`` with ``_fallback`` added to its name), never under
    ``checkpoint``, whose name promises 05's run; a later call loads the fallback.
    """
    if fallback is None:
        stem, ext = os.path.splitext(checkpoint)
        fallback = f"{stem}_fallback{ext}"
    model = tiny_detector(len(SHAPE_NAMES))
    for path in (checkpoint, fallback):
        if os.path.exists(path):
            load_checkpoint(path, model)
            print(f"Loaded the shapes detector from {path}")
            return model.eval()
    print(f"{checkpoint} not found (run notebook 05 first to use its detector): training one "
          f"now with shapes_experiment, saved as {fallback}")
    model = shapes_experiment(progress=progress, **recipe)["model"]
    save_checkpoint(fallback, model)
    return model.eval()


COCO_RECIPE = dict(
    steps=5000,  # FRCNN_STEPS: batches; 5000 x 4 images is about 0.17 of COCO's 118 287 train images
    batch_size=4,  # FRCNN_BATCH: images per step
    image_size=IMG_SIZE,  # FRCNN_IMAGE_SIZE: shorter side in pixels (torchvision trains at 800)
    eval_images=500,  # FRCNN_EVAL_IMAGES: held-out val2017 images scored with pycocotools
    test_images=24,  # FRCNN_TEST_IMAGES: val2017 images notebook 06 shows and scores
    test_size=800,  # FRCNN_TEST_SIZE: their shorter side (torchvision's 800; longer side at most 1333/800 of it)
    lr_per_16_images=0.02,  # torchvision's recipe: lr 0.02 for 16 images, scaled linearly
    warmup_steps=500,
    max_grad_norm=10.0,
    shuffle_buffer=1000,
    minutes=None,  # FRCNN_MINUTES: a time budget; notebook 05 turns it into steps by its measured step time
)
"""Notebook 05's full-mode run: ResNet-50 + FPN from ImageNet weights on COCO with AMP and
gradient checkpointing. Each knob is read from the environment variable named beside it by
:func:`full_mode_settings`, so a quick trial on a laptop is, for example,
``FRCNN_FAST=0 FRCNN_STEPS=20 FRCNN_BATCH=2 FRCNN_IMAGE_SIZE=256 FRCNN_EVAL_IMAGES=8
FRCNN_TEST_IMAGES=6 FRCNN_TEST_SIZE=400``."""


FULL_MODE_KNOBS = {"steps": "FRCNN_STEPS", "batch_size": "FRCNN_BATCH",
                   "image_size": "FRCNN_IMAGE_SIZE", "eval_images": "FRCNN_EVAL_IMAGES",
                   "test_images": "FRCNN_TEST_IMAGES", "test_size": "FRCNN_TEST_SIZE",
                   "minutes": "FRCNN_MINUTES"}


def full_mode_settings(**overrides) -> dict:
    """``COCO_RECIPE`` with each knob of ``FULL_MODE_KNOBS`` taken from its environment variable
    when set (a positive integer), then ``overrides``. A bad value is refused with its name."""
    config = dict(COCO_RECIPE)
    for key, variable in FULL_MODE_KNOBS.items():
        text = os.environ.get(variable)
        if text is None:
            continue
        if not text.strip().isdigit() or int(text) <= 0:
            default = "not set" if COCO_RECIPE[key] is None else COCO_RECIPE[key]
            raise ValueError(f"{variable}={text!r}: give a positive whole number "
                             f"(the default is {default})")
        config[key] = int(text)
    return {**config, **overrides}


def steps_in_budget(minutes: float, step_s: float) -> int:
    """Training steps that fit a time budget of ``minutes`` (``FRCNN_MINUTES``) at ``step_s``
    seconds a step (as notebook 05 measures it), at least one."""
    if minutes <= 0 or step_s <= 0:
        raise ValueError(f"minutes={minutes} and step_s={step_s} must both be positive")
    return max(1, int(minutes * 60 / step_s))


def coco_experiment(source=None, *, device=DEVICE, progress: bool = True,
                    checkpoint_path: Optional[str] = "checkpoints/coco_resnet50_fpn.pt",
                    resume: bool = True, **overrides) -> dict:
    """Notebook 05's full mode: :func:`fasterrcnn_resnet50_fpn` from ImageNet weights, trained
    with :func:`fit` on the COCO stream (AMP, gradient checkpointing, ``trainable_layers=3``)
    and scored with :func:`evaluate` on ``eval_images`` images of val2017.

    ``source``: as :class:`COCOStreamDataset` (default :func:`coco_source`); settings from
    :func:`full_mode_settings` (``overrides`` win); the warm-up is 500 steps, at most a tenth of
    a shorter run; the learning rate is torchvision's 0.02 per 16 images, scaled linearly to
    the batch. The checkpoint at ``checkpoint_path`` is
    written about 20 times a run (:func:`fit`'s default cadence: every 250 steps of 5000), so a
    rerun of the same call resumes; a rerun with another step count continues or says there is
    nothing to train; it records the data source and the starting weights, and a run on another
    source refuses to resume from it (``resume=False`` starts over). Returns the dict of
    :func:`shapes_experiment`, plus ``"config"``.
    """
    config = full_mode_settings(**overrides)
    source = coco_source() if source is None else source
    sizes = dict(min_size=config["image_size"])
    train = COCOStreamDataset("train", source=source, shuffle_buffer=config["shuffle_buffer"], **sizes)
    held_out = COCOStreamDataset("val", config["eval_images"], source=source, **sizes)
    model = fasterrcnn_resnet50_fpn(weights_backbone="IMAGENET1K_V1", trainable_layers=3,
                                    gradient_checkpointing=True)
    loader = make_loader(train, config["batch_size"], num_workers=loader_workers())
    lr = config["lr_per_16_images"] * config["batch_size"] / 16
    start = time.perf_counter()
    history = fit(model, loader, 1, steps_per_epoch=config["steps"], lr=lr,
                  warmup_steps=min(config["warmup_steps"], config["steps"] // 10),
                  max_grad_norm=config["max_grad_norm"], amp=True, device=device,
                  checkpoint_path=checkpoint_path, resume=resume, progress=progress,
                  provenance={"data": f"coco from {describe_source(source)}",
                              "weights": "backbone IMAGENET1K_V1", "model": "resnet50_fpn",
                              "num_classes": model.num_classes, "trainable_layers": 3})
    train_seconds = time.perf_counter() - start
    metrics = evaluate(model, make_loader(held_out, 4, shuffle=False), progress=progress)
    return {"model": model, "history": history, "metrics": metrics, "held_out": held_out,
            "train_seconds": train_seconds, "config": config}


# ─── 2. Measurements: FLOPs and memory of a training step ────────────────────────────────────


def training_step_flops(model: nn.Module, images: List[Tensor], targets: List[Dict[str, Tensor]]
                        ) -> int:
    """Floating-point operations of one training step (forward and backward of the summed loss)
    of ``model`` on this batch (its ``"total"`` loss), counted by ``torch.utils.flop_counter.FlopCounterMode``: matrix
    products and convolutions only (2 per multiply-add), so NMS, RoIAlign and the element-wise
    ops are left out. The gradients it leaves are cleared."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.train()
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            model(images, targets)["total"].backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return counter.get_total_flops()


_COPY_OR_VIEW = {"ToCopyBackward0", "TBackward0", "ViewBackward0", "UnsafeViewBackward0",
                 "PermuteBackward0", "TransposeBackward0", "ExpandBackward0", "AliasBackward0"}


def _copy_of_a_weight(t: Tensor) -> bool:
    """True when ``t`` is a parameter seen through casts and views (autocast's 16-bit copy of a
    weight, a linear layer's transposed weight): its autograd chain reaches a leaf directly."""
    node = t.grad_fn
    for _ in range(4):
        if node is None or type(node).__name__ == "AccumulateGrad":
            return node is not None
        if type(node).__name__ not in _COPY_OR_VIEW:
            return False
        inputs = [n for n, _ in node.next_functions if n is not None]
        if len(inputs) != 1:
            return False
        node = inputs[0]
    return False


def saved_tensors_by_module(model: nn.Module, *inputs, amp: bool = False) -> List[dict]:
    """The tensors autograd saves for backward during one forward ``model(*inputs)`` (a detector
    in training mode: ``(images, targets)``), one dict per storage, in the order first saved:
    ``module`` (dotted name of the innermost submodule running when it was first saved, ``""``
    for the model's own code), ``dtype`` (name, e.g. ``"float32"``), ``shape`` (the saved
    tensor's) and ``bytes`` (the storage's).

    ``torch.autograd.graph.saved_tensors_hooks`` sees every saved tensor; forward hooks on every
    submodule say which one is running. Left out: the parameters and buffers themselves and
    their copies through casts and views (autocast's 16-bit weights, a transposed weight),
    recognised by storage and by autograd chain, never by shape (an activation may have a
    weight's shape: the ROI head's ``[1024, 12544]`` features of two images, 512 sampled boxes
    each, have fc6's). ``amp``: autocast to float16 on CUDA, bfloat16 on a CPU."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: Dict[int, dict] = {}
    running: List[str] = [""]

    def keep(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in weights and ptr not in storages and not _copy_of_a_weight(t):
            storages[ptr] = {"module": running[-1], "dtype": str(t.dtype).replace("torch.", ""),
                             "shape": tuple(t.shape), "bytes": storage.nbytes()}
        return t

    def enter(name: str):
        return lambda module, args: running.append(name)  # None: the inputs stay as they are

    def leave(module, args, output) -> None:
        running.pop()

    hooks = []
    for name, module in model.named_modules():
        if name:
            hooks += [module.register_forward_pre_hook(enter(name)),
                      module.register_forward_hook(leave)]
    device = next(model.parameters()).device
    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            with torch.autocast(device.type, dtype=amp_dtype(device, True), enabled=amp):
                model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return list(storages.values())


def saved_activation_bytes(model: nn.Module, *inputs, amp: bool = False) -> Dict[str, int]:
    """Bytes of the tensors autograd saves for backward during one forward ``model(*inputs)``,
    each storage counted once, by dtype name (``{"float32": ..., "bfloat16": ...}``); what is
    counted and what is left out (weights and their copies) is :func:`saved_tensors_by_module`'s.
    ``amp``: autocast to float16 on CUDA, bfloat16 on a CPU."""
    return saved_bytes_by(saved_tensors_by_module(model, *inputs, amp=amp), "dtype")


def saved_bytes_by(saved: List[dict], key: str = "module", depth: int = 1,
                   dtype: Optional[str] = None) -> Dict[str, int]:
    """Sums the ``bytes`` of :func:`saved_tensors_by_module`'s records by ``key``: ``"dtype"``,
    or ``"module"``, cut to its first ``depth`` dotted parts (depth 1: ``backbone``, ``fpn``,
    ``rpn``, ``roi_heads``; ``""`` is the model's own code). ``dtype``: keep only records of
    that dtype. Returns ``{name: bytes}``, largest first."""
    totals: Dict[str, int] = {}
    for record in saved:
        if dtype is None or record["dtype"] == dtype:
            name = record["dtype"] if key == "dtype" else ".".join(
                record["module"].split(".")[:depth])
            totals[name] = totals.get(name, 0) + record["bytes"]
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def resident_memory_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (``VmRSS``) or its high-water mark (``VmHWM``), MiB, from
    Linux's ``/proc/self/status``. Unlike ``getrusage``'s ``ru_maxrss``, ``VmHWM`` starts afresh
    in a new program: a child started by a large parent would otherwise report the parent's size
    as its own peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status (this measurement needs Linux)")


def _reset_peak(device: torch.device) -> float:
    """Resets the peak memory counter of ``device`` and returns the memory in use now, MiB."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets VmHWM
        f.write("5")
    return resident_memory_mb()


def _peak_mb(device: torch.device) -> float:
    """The peak memory of ``device`` since :func:`_reset_peak`, MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resident_memory_mb("VmHWM")


def training_step_memory(*, image_size: int = 96, batch: int = 1, amp: bool = False,
                         steps: int = 2, device="cpu", threads: Optional[int] = None,
                         stand_in_weights: bool = False, **detector) -> dict:
    """Notebook 05's memory measurement of one configuration of :func:`fasterrcnn_resnet50_fpn`
    (``detector``: its keyword arguments; 4 classes) on ``batch`` random square images of
    ``image_size`` px with two boxes each.

    First the activations one training forward saves for backward
    (:func:`saved_tensors_by_module`), then ``steps`` steps of :func:`train_step` (SGD; AMP:
    float16 with a gradient scaler on CUDA, bfloat16 on a CPU): their peak memory above what was
    in use before them (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the process's resident
    high-water mark ``VmHWM``, Linux) and the seconds of the last step. ``stand_in_weights``:
    random ImageNet-shaped backbone weights as a state dict (``trainable_layers`` needs weights).
    To measure a peak, run each configuration in its own process
    (:func:`measure_in_fresh_process`): a process's peak includes whatever ran before; with
    ``steps=0`` (saved tensors only) any process will do. Returns, in MiB and seconds:
    ``saved_mb``; its split ``saved_by_dtype_mb``, ``saved_by_module_mb`` (by top-level module)
    and ``float32_by_module_mb`` (the float32 part by innermost module), each largest first;
    ``peak_mb`` and ``step_s`` (``None`` when ``steps`` is 0)."""
    device = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    if stand_in_weights:
        detector["weights_backbone"] = ResNet50().state_dict()
    model = fasterrcnn_resnet50_fpn(num_classes=4, **detector).to(device).train()
    optimizer = make_optimizer(model, lr=0.01)
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    boxes = torch.tensor([[0.1, 0.15, 0.45, 0.5], [0.4, 0.2, 0.95, 0.8]], device=device) * image_size
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 2], device=device)}] * batch
    torch.manual_seed(1)  # the same sampled anchors and ROIs in every configuration
    saved = saved_tensors_by_module(model, list(images), targets, amp=amp)
    scaler = amp_scaler(device, amp)
    base, seconds = (_reset_peak(device) if steps else 0.0), None
    for _ in range(steps):
        start = time.perf_counter()
        train_step(model, list(images), targets, optimizer, scaler=scaler,
                   amp_dtype=amp_dtype(device, amp))  # its loss read is the step's device sync
        seconds = time.perf_counter() - start
    mib = lambda totals: {k: v / 2**20 for k, v in totals.items()}  # noqa: E731
    return {"saved_mb": sum(record["bytes"] for record in saved) / 2**20,
            "saved_by_dtype_mb": mib(saved_bytes_by(saved, "dtype")),
            "saved_by_module_mb": mib(saved_bytes_by(saved, depth=1)),
            "float32_by_module_mb": mib(saved_bytes_by(saved, depth=99, dtype="float32")),
            "peak_mb": _peak_mb(device) - base if steps else None, "step_s": seconds}


def measure_in_fresh_process(**settings) -> dict:
    """:func:`training_step_memory` (``settings``: its keywords, JSON-able) in a new Python
    process, so that no measurement inherits another's peak. An out-of-memory is returned as
    ``{"error": "out of memory", ...}``; any other failure raises ``RuntimeError`` with the
    child's last error line."""
    import subprocess

    code = ("import json, sys; import frcnn_course as course; "
            "print(json.dumps(course.training_step_memory(**json.loads(sys.argv[1]))))")
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(settings)], env=env,
                          capture_output=True, text=True)
    if done.returncode == 0:
        return json.loads(done.stdout.strip().splitlines()[-1])
    lines = [line for line in done.stderr.splitlines() if line.strip()] or [f"exit {done.returncode}"]
    if any("out of memory" in line.lower() for line in lines[-3:]) or done.returncode == -9:
        return {"error": "out of memory", "detail": lines[-1], "saved_mb": None, "peak_mb": None,
                "step_s": None}
    raise RuntimeError(f"the memory measurement {settings} failed in its process: {lines[-1]}")


# ─── 3. Drawing ──────────────────────────────────────────────────────────────────────────────


def unnormalize(image: Tensor) -> Tensor:
    """A normalised image [3, H, W] back to displayable RGB [H, W, 3] in [0, 1]."""
    image = image.detach().cpu().float() * IMAGENET_STD + IMAGENET_MEAN
    return image.clamp(0, 1).permute(1, 2, 0)


def outline_box(ax, box, colour="yellow", label: Optional[str] = None, at=None, **style) -> None:
    """Draw box ``[4]`` (x1, y1, x2, y2) as an unfilled rectangle on a matplotlib axis, with an
    optional label: by default just above its top-left corner, or with its top-left corner at
    ``at`` = (x, y) in the image's pixels (as :func:`_label_corners` places it)."""
    import matplotlib.pyplot as plt

    x1, y1, x2, y2 = [float(v) for v in box]
    ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=colour,
                               lw=style.pop("lw", 2), **style))
    if label:
        x, y = (x1, y1) if at is None else at
        ax.text(x, y, label, color="white", fontsize=8, va="bottom" if at is None else "top",
                bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "edgecolor": "none"})


def _label_corners(corners: List[Tuple[float, float]], widths: List[float], height: float,
                   image_size: Tuple[int, int]) -> List[Tuple[float, float]]:
    """Top-left corners (x, y) in pixels for labels ``widths[i]`` x ``height`` wanted just above
    box corners ``corners[i]`` (x1, y1), placed in the order given (the first keeps its place):
    each is kept inside the ``(H, W)`` image and moved down below any label placed before it
    that it would overlap."""
    h, w = image_size
    placed: List[Tuple[float, float, float]] = []  # x, y, width of the labels placed so far
    for (x1, y1), width in zip(corners, widths):
        x = min(max(x1, 0.0), max(w - width, 0.0))
        y = min(max(y1 - height, 0.0), max(h - height, 0.0))
        for _ in range(len(placed) + 1):
            hit = [py for px, py, pw in placed if x < px + pw and px < x + width
                   and y < py + height and py < y + height]
            if not hit:
                break
            y = min(max(hit) + height, max(h - height, 0.0))  # below the lowest one it touches
        placed.append((x, y, width))
    return [(x, y) for x, y, _ in placed]


def label_sizes(ax, texts: List[str], fontsize: float = 8) -> List[Tuple[float, float]]:
    """(width, height) in the image pixels of axis ``ax`` of each label as :func:`outline_box`
    draws it: the text as the figure's renderer lays it out, plus the 1 pt padding on each side
    ((0, 0) for an empty text)."""
    ax.apply_aspect()  # the image's final place on the figure, to size the labels in its pixels
    to_display = ax.transData.transform
    per_x = abs(to_display((1, 0))[0] - to_display((0, 0))[0])  # display px per image px
    per_y = abs(to_display((0, 1))[1] - to_display((0, 0))[1])
    pad = 2 * ax.figure.dpi / 72  # 1 pt on each side, in display px
    sizes = []
    for text in texts:
        if not text:
            sizes.append((0.0, 0.0))
            continue
        artist = ax.text(0, 0, text, fontsize=fontsize)
        extent = artist.get_window_extent()
        artist.remove()
        sizes.append(((extent.width + pad) / per_x, (extent.height + pad) / per_y))
    return sizes


def label_boxes(ax, boxes: Tensor, texts: List[str], colours, image_size: Tuple[int, int],
                **style) -> None:
    """Outline ``boxes`` [N, 4] (x1, y1, x2, y2 in image pixels) in ``colours`` [N] with label
    ``texts`` [N] (an empty text: no label) just above them, sized by :func:`label_sizes` and
    placed by :func:`_label_corners` in the order given (the first keeps its place; a later one
    moves below any it would cover); drawn in reverse, so the first is on top. ``image_size`` is
    ``(H, W)``; ``style`` goes to :func:`outline_box` (``lw``, ``ls``, ...)."""
    sizes = label_sizes(ax, texts)
    height = max((h for _, h in sizes), default=0.0)
    at = _label_corners([(float(box[0]), float(box[1])) for box in boxes],
                        [w for w, _ in sizes], height, image_size)
    for k in reversed(range(len(texts))):
        outline_box(ax, boxes[k], colours[k], texts[k], at=at[k], **style)


def draw_boxes(image: Tensor, boxes: Tensor, labels: Optional[Tensor] = None,
               scores: Optional[Tensor] = None, class_names: List[str] = COCO_NAMES,
               score_threshold: float = 0.0, title: Optional[str] = None, ax=None,
               max_labels: Optional[int] = None):
    """Draw an image with its boxes, class names and scores on a matplotlib axis.

    Args:
        image: normalised [3, H, W] (as the datasets return it) or displayable [H, W, 3].
        boxes: [N, 4] x1, y1, x2, y2 in the image's pixels.
        labels: [N] class indices into ``class_names``; colours follow the class. Without
            labels and scores the boxes are drawn as plain outlines.
        scores: [N] confidences, written after the name; boxes under ``score_threshold`` are
            not drawn.
        class_names: names by label (``COCO_NAMES``, ``SHAPE_NAMES``, ...).
        title: the axis title (default: the number of boxes drawn).
        ax: the axis to draw on (default: a new figure).
        max_labels: when more boxes are drawn, only the first ``max_labels`` (the best scores)
            get a label, and a second line of the title says so; default: every box.

    Labels are sized for the figure as it is at the call (by :func:`label_sizes`): set the
    figure's size before, not after.

    Returns:
        The matplotlib axis.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 6))
    shown = (unnormalize(image) if image.ndim == 3 and image.shape[0] == 3 else image).numpy()
    ax.imshow(shown)
    boxes = boxes.detach().cpu().reshape(-1, 4)
    keep = torch.ones(len(boxes), dtype=torch.bool)
    if scores is not None:
        scores = scores.detach().cpu()
        keep = scores >= score_threshold
    order = torch.nonzero(keep).flatten()
    if scores is not None:  # the highest score first: it keeps its label's place
        order = order[torch.sort(scores[order], descending=True, stable=True).indices]
    texts = [_box_text(labels, scores, i, class_names) for i in order.tolist()]
    title = title if title is not None else f"{len(order)} boxes"
    if max_labels is not None and len(texts) > max_labels:
        texts = texts[:max_labels] + [""] * (len(texts) - max_labels)
        title += f"\n(labels on the {max_labels} best)" if scores is not None else \
            f"\n(labels on the first {max_labels})"
    colours = [plt.get_cmap("tab10")(int(labels[i]) % 10) if labels is not None else "yellow"
               for i in order.tolist()]
    label_boxes(ax, boxes[order], texts, colours, shown.shape[:2])
    ax.set_title(title)
    ax.axis("off")
    return ax


def _box_text(labels: Optional[Tensor], scores: Optional[Tensor], i: int,
              class_names: List[str]) -> str:
    """Box ``i``'s label: its class name (or number) and score, either one if only it is given."""
    texts = []
    if labels is not None:
        label = int(labels[i])
        texts.append(class_names[label] if label < len(class_names) else str(label))
    if scores is not None:
        texts.append(f"{float(scores[i]):.2f}")
    return " ".join(texts)


def show_predictions(image: Tensor, target: Dict[str, Tensor], prediction: Dict[str, Tensor],
                     class_names: List[str] = COCO_NAMES, score_threshold: float = 0.5,
                     title: Optional[str] = None):
    """Ground truth (left) beside predictions scoring at least ``score_threshold`` (right).

    ``image`` is a normalised [3, H, W] tensor; ``target`` and ``prediction`` hold boxes in its
    pixels. Returns the matplotlib figure.
    """
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 6))
    draw_boxes(image, target["boxes"], target["labels"], class_names=class_names, ax=left,
               title=f"ground truth: {len(target['boxes'])} objects")
    shown = int((prediction["scores"] >= score_threshold).sum())
    draw_boxes(image, prediction["boxes"], prediction["labels"], prediction["scores"],
               class_names=class_names, score_threshold=score_threshold, ax=right,
               title=f"predictions: {shown} with score >= {score_threshold:g}")
    image_id = target.get("image_id")
    fig.suptitle(title if title is not None else
                 "ground truth vs predictions" + (f" (image {int(image_id)})"
                                                  if image_id is not None else ""))
    fig.tight_layout()
    return fig


def roi_pool_bins(box: Tensor, output_size: int, spatial_scale: float = 1.0
                  ) -> Tuple[List[Tuple[int, int]], List[Tuple[int, int]]]:
    """The feature cells RoIPool takes the maximum over, per bin, by the rule of torchvision's
    ``roi_pool`` kernel (``torchvision/csrc/ops/cpu/roi_pool_kernel.cpp``).

    ``box`` [4] is (x1, y1, x2, y2) in pixels. Its corners are scaled and rounded to cells (half
    away from zero), the box spans those cells with both ends included (at least one), and bin
    ``k`` of ``output_size`` spans cells ``floor(k s)`` to ``ceil((k + 1) s)`` from its start,
    ``s`` = the box's cells / ``output_size`` (float32, as in the kernel). Returns
    ``(columns, rows)``: per bin the half-open cell range ``(start, end)``, not clipped to a map.
    """
    def rounded(v: float) -> int:  # C's round(), not torch.round (which rounds half to even)
        return int(math.copysign(math.floor(abs(v) + 0.5), v))

    corners = [rounded(float(v)) for v in (box.float() * spatial_scale).tolist()]
    ranges = []
    for start, end in ((corners[0], corners[2]), (corners[1], corners[3])):
        step = torch.tensor(max(end - start + 1, 1), dtype=torch.float32) / output_size
        ranges.append([(start + int(torch.floor(k * step)), start + int(torch.ceil((k + 1) * step)))
                       for k in range(output_size)])
    return ranges[0], ranges[1]


def _feature_grid(ax, cells: int) -> None:
    """Cell borders and centres of a ``cells`` x ``cells`` map, cell ``i`` centred at coordinate
    ``i`` (RoIAlign's ``aligned=False`` convention), y pointing down."""
    for v in range(cells + 1):
        ax.axhline(v - 0.5, color="lightgrey", lw=0.8)
        ax.axvline(v - 0.5, color="lightgrey", lw=0.8)
    centres = torch.arange(float(cells))
    cx, cy = torch.meshgrid(centres, centres, indexing="xy")
    ax.plot(cx.flatten(), cy.flatten(), "+", color="grey", ms=5, label="feature cells (centres)")
    ax.set(xlim=(-0.5, cells - 0.5), ylim=(cells - 0.5, -0.5), aspect="equal",
           xlabel="x (feature cells)", ylabel="y (feature cells)")


def draw_roi_pool_vs_align(box: Tensor, output_size: int = 3, sampling_ratio: int = 2,
                           cells: int = 8):
    """RoIPool's rounded bins (left) beside RoIAlign's exact ones (right) for one box.

    ``box`` [4] is in feature cells (already divided by the stride), on a ``cells`` x ``cells``
    map. Left: the box, the cells its rounded corners cover, and each bin's cells from
    :func:`roi_pool_bins` (drawn slightly inset, so that bins sharing cells show it). Right: the
    box cut into ``output_size``² equal bins and their ``sampling_ratio``² sample points each.
    Returns the matplotlib figure.
    """
    import matplotlib.pyplot as plt

    fig, (pool, align) = plt.subplots(1, 2, figsize=(11, 6.2))
    for ax in (pool, align):
        _feature_grid(ax, cells)
        outline_box(ax, box, "black", lw=1.5, ls="--")
        ax.plot([], [], color="black", ls="--", label="the box, exact")
    columns, rows = roi_pool_bins(box, output_size)
    (c0, c1), (r0, r1) = (columns[0][0], columns[-1][1]), (rows[0][0], rows[-1][1])
    pool.add_patch(plt.Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0, r1 - r0, fc="tab:red",
                                 alpha=0.12, label="cells of the rounded box"))
    colours = plt.get_cmap("tab10")
    for i, (top, bottom) in enumerate(rows):
        for j, (left, right) in enumerate(columns):
            inset = 0.06 + 0.05 * ((i + j) % 2)
            corners = (left - 0.5 + inset, top - 0.5 + inset, right - 0.5 - inset,
                       bottom - 0.5 - inset)
            outline_box(pool, corners, colours(i * output_size + j), lw=1.5)
    pool.plot([], [], color=colours(0), lw=1.5, label="one bin's cells (max), each a colour")
    widths, heights = [b - a for a, b in columns], [b - a for a, b in rows]
    pool.set_title(f"RoIPool: bins {widths} cells wide, {heights} high", fontsize=10)
    _draw_roi_align_bins(align, box, output_size, sampling_ratio)
    for ax in (pool, align):
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8)
    fig.tight_layout()
    return fig


def _draw_roi_align_bins(ax, box: Tensor, output_size: int, sampling_ratio: int) -> None:
    """RoIAlign's equal bins on ``box`` and the bilinear sample points of each."""
    x1, y1, x2, y2 = [float(v) for v in box]
    bw, bh = (x2 - x1) / output_size, (y2 - y1) / output_size
    offsets = (torch.arange(sampling_ratio) + 0.5) / sampling_ratio
    for i in range(output_size):
        for j in range(output_size):
            outline_box(ax, (x1 + j * bw, y1 + i * bh, x1 + (j + 1) * bw, y1 + (i + 1) * bh),
                        "tab:blue", lw=1.5)
            yy, xx = torch.meshgrid(y1 + (i + offsets) * bh, x1 + (j + offsets) * bw,
                                    indexing="ij")
            ax.plot(xx.flatten(), yy.flatten(), "o", color="tab:orange", ms=4,
                    label="bilinear sample points (mean)" if i == j == 0 else None)
    ax.plot([], [], color="tab:blue", lw=1.5, label=f"{output_size}x{output_size} equal bins")
    ax.set_title(f"RoIAlign: no rounding, {sampling_ratio}x{sampling_ratio} samples per bin",
                 fontsize=10)


# ─── 4. Notebook helpers: set-up, showing code, checked exercises ────────────────────────────
# What the six notebooks share, so that none of them repeats it: the first cell's set-up, printing
# the module's code where a notebook teaches it, and the checks of the exercises, which compare a
# learner's function with the module's on random and edge-case inputs.


def setup_notebook(seed: int = 0) -> Tuple[bool, torch.device]:
    """Prepare a notebook in one call and return ``(fast, device)``.

    Fast mode (``FRCNN_FAST=1``, the default without a GPU): the CPU, one thread unless
    ``FRCNN_THREADS`` says otherwise (one was measured faster and steadier for the course's small
    tensors on a shared 2-core machine), synthetic data, no
    network. Full mode (``FRCNN_FAST=0``, the default with a GPU): ``DEVICE``, COCO from the hub
    or from the folder ``FRCNN_COCO`` names, published weights. Seeds torch, NumPy and Python's
    ``random``, sets a plain plot style, and prints one line saying which mode runs.
    """
    import matplotlib.pyplot as plt

    fast = os.environ.get("FRCNN_FAST", "0" if torch.cuda.is_available() else "1") == "1"
    device = torch.device("cpu") if fast else DEVICE
    if fast:
        torch.set_num_threads(notebook_threads())
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    plt.rcParams.update({"figure.dpi": 80, "axes.grid": False})
    threads = (f", CPU threads: {torch.get_num_threads()} for the cells, {training_threads()} "
               "for training" if fast else "")
    print(f"{'FAST' if fast else 'FULL'} mode on {device}{threads} "
          f"(set FRCNN_FAST={0 if fast else 1} before starting Jupyter to switch)")
    return fast, device


def notebook_threads() -> int:
    """The torch CPU threads of a fast-mode notebook's cells: ``FRCNN_THREADS``, else 1.

    ``make test-portable`` runs the notebooks with 1 and 2 to show that no checked output depends
    on the thread count (another count sums in another order: the last digits of a float move)."""
    text = os.environ.get("FRCNN_THREADS", "1")
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"FRCNN_THREADS={text!r}: give a whole number of threads, 1 or more")
    return int(text)


def idle_cores(sample_s: float = 0.3) -> float:
    """How many of this machine's cores sat idle over the last ``sample_s`` seconds (``/proc/stat``,
    Linux; elsewhere every core counts as idle)."""
    def cpu_times():
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, all
    try:
        idle_before, total_before = cpu_times()
        time.sleep(sample_s)
        idle_after, total_after = cpu_times()
    except (OSError, ValueError, IndexError):
        return float(os.cpu_count() or 1)
    share = (idle_after - idle_before) / max(total_after - total_before, 1e-9)
    return share * (os.cpu_count() or 1)


@functools.lru_cache(maxsize=None)
def training_threads(most: int = 2) -> int:
    """Torch threads for a notebook's training run, chosen once per process: the cores idle now,
    rounded, at least 1 and at most ``most`` (and the cores this process may use).

    Two threads on two cores are faster on a quiet machine, but while another process keeps a core
    busy, two OpenMP threads wait for each other at every parallel region and a step of the tiny
    detector took 15 times as long; one thread on the free core keeps its own speed
    (``make bench``'s ``busy_*`` figures measure both, side by side)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(most, usable or 1, round(idle_cores())))


def coco_source() -> str:
    """Where full mode reads COCO: the folder named by ``FRCNN_COCO`` (the official layout or the
    hub's parquet files), else the hub's ``HUB_COCO``."""
    folder = os.environ.get("FRCNN_COCO")
    if folder and not os.path.isdir(folder):
        raise FileNotFoundError(f"FRCNN_COCO={folder!r} is not a directory: point it at a COCO "
                                "folder (annotations/ + val2017/) or at the hub's parquet files")
    return folder or HUB_COCO


def show_source(obj) -> None:
    """Print the source code of a function or class of this module, where a notebook teaches it."""
    import inspect

    print(f"# {obj.__module__}.{obj.__qualname__}\n{inspect.getsource(obj)}")


def _first_difference(yours, reference, cases, compare) -> Optional[str]:
    """Where ``yours`` and ``reference`` first disagree over ``cases`` (tuples of arguments)."""
    for number, args in enumerate(cases):
        try:
            mine = yours(*args)
        except Exception as err:  # noqa: BLE001 - a learner's error is a finding, not a crash
            return f"input {number} {_show(args)} raised {type(err).__name__}: {err}"
        expected = reference(*args)
        if not compare(mine, expected):
            return (f"input {number}: {_show(args)}\n  yours:    {_show(mine)}\n"
                    f"  expected: {_show(expected)}")
    return None


def _show(value) -> str:
    if isinstance(value, Tensor):
        return f"tensor {list(value.shape)} {value.tolist()}" if value.numel() <= 24 else \
            f"tensor {list(value.shape)} starting {value.flatten()[:8].tolist()}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(_show(v) for v in value)
        return "(" + inner + ("," if isinstance(value, tuple) and len(value) == 1 else "") + ")"
    return repr(value)


def _close(a, b) -> bool:
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-4, rtol=1e-4, equal_nan=True)


def _equal(a, b) -> bool:
    return torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def check_exercise(yours, reference, cases, compare=_close, name: Optional[str] = None) -> bool:
    """Run ``yours`` and ``reference`` on every case and say where they first differ (the input
    and both values) or that they agree. Returns True when they agree everywhere."""
    name = name or getattr(reference, "__name__", "the module's function")
    problem = _first_difference(yours, reference, cases, compare)
    if problem:
        print(f"Not yet: your function and {name} differ on {problem}")
        return False
    print(f"Correct: your function agrees with {name} on all {len(cases)} inputs.")
    return True


def random_boxes(n: int, size: float = 100.0, generator: Optional[torch.Generator] = None
                 ) -> Tensor:
    """``n`` random boxes ``[n, 4]`` inside a ``size`` x ``size`` image, each at least 1 px wide."""
    xy = torch.rand(n, 2, generator=generator) * (size - 1)
    wh = 1 + torch.rand(n, 2, generator=generator) * (size - xy).clamp(min=1) * 0.6
    return torch.cat((xy, (xy + wh).clamp(max=size)), 1)


def check_score_filter(yours) -> bool:
    """Exercise: ``yours(result, score_threshold)`` against :func:`keep_scoring`, on made-up
    results that include scores equal to the threshold (kept: "at least")."""
    g = torch.Generator().manual_seed(5)
    cases = []
    for t in (0.05, 0.3, 0.5, 0.9):
        scores = torch.cat((torch.rand(5, generator=g), torch.tensor([t, t])))
        result = {"boxes": random_boxes(7, generator=g), "scores": scores,
                  "labels": torch.randint(1, 4, (7,), generator=g)}
        cases.append((result, t))

    def same(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return check_exercise(yours, keep_scoring, cases, compare=same, name="keep_scoring")


def original_cases() -> List[Tuple[Tensor, Dict[str, Tensor]]]:
    """The inputs of :func:`check_boxes_to_original`: (boxes [N, 4] in a returned image's pixels,
    its target) for three images resized from 90 x 120 to 150 x 200 px, flipped and not. The
    boxes are each object's box grown by 3 px, one past all four edges and one past the right
    edge only (the left one once flipped back): clipping to the original size matters."""
    cases = []
    for flip in (1.0, 0.0):
        data = SyntheticShapesDataset(3, (90, 120), seed=3, resize="shorter", min_size=150,
                                      train=True, flip_prob=flip)
        for i in range(len(data)):
            target = data[i][1]
            height, width = (float(v) for v in target["size"])
            outside = torch.tensor([[-12.0, -7, width + 9, height + 15],
                                    [width - 20, 10, width + 25, 40]])
            grown = target["boxes"] + torch.tensor([-3.0, -3, 3, 3])
            cases.append((torch.cat((grown, outside)), target))
    return cases


def check_boxes_to_original(yours) -> bool:
    """Exercise: ``yours(boxes, target)`` against :func:`boxes_to_original` on
    :func:`original_cases`: undo the flip, divide by the scale, clip to the original size."""
    from frcnn_common import boxes_to_original

    return check_exercise(yours, boxes_to_original, original_cases())


def _box_cases(generator: torch.Generator) -> List[Tuple[Tensor, Tensor]]:
    """Pairs of box sets: edge cases (identical, touching, nested, disjoint) and random ones."""
    a = torch.tensor([[0.0, 0, 10, 10]])
    edge = [(a, a.clone()), (a, torch.tensor([[10.0, 0, 20, 10]])),
            (a, torch.tensor([[2.0, 2, 5, 5]])), (a, torch.tensor([[50.0, 50, 60, 70]]))]
    return edge + [(random_boxes(4, generator=generator), random_boxes(5, generator=generator))
                   for _ in range(6)]


def check_box_iou(yours) -> bool:
    """Exercise: ``yours(boxes_a [N, 4], boxes_b [M, 4]) -> [N, M]`` IoU, against :func:`box_iou`."""
    return check_exercise(yours, box_iou, _box_cases(torch.Generator().manual_seed(0)))


def check_encode_boxes(yours) -> bool:
    """Exercise: ``yours(reference, gt_boxes, weights)`` against :func:`encode_boxes`."""
    g = torch.Generator().manual_seed(1)
    cases = [(random_boxes(6, generator=g), random_boxes(6, generator=g), weights)
             for weights in ((1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)) for _ in range(3)]
    return check_exercise(yours, encode_boxes, cases)


def _anchor_grid(feature_size, stride: int, sizes, ratios) -> Tensor:
    """The module's anchors for one level: what ``check_anchor_grid`` compares with."""
    h, w = feature_size
    return AnchorGenerator((tuple(sizes),), (tuple(ratios),))((h * stride, w * stride), [(h, w)])


def check_anchor_grid(yours) -> bool:
    """Exercise: ``yours((h, w), stride, sizes, ratios) -> [h * w * A, 4]`` anchors of one level
    in :class:`AnchorGenerator`'s order, against it."""
    cases = [((2, 3), 16, (32,), (0.5, 1.0, 2.0)), ((1, 1), 4, (32,), (1.0,)),
             ((3, 2), 8, (16, 32), (0.5, 2.0)), ((4, 4), 32, (256,), (0.5, 1.0, 2.0))]
    return check_exercise(yours, _anchor_grid, cases, name="AnchorGenerator")


def check_nms(yours) -> bool:
    """Exercise: ``yours(boxes, scores, iou_threshold) -> kept indices by decreasing score``,
    against :func:`nms`."""
    g = torch.Generator().manual_seed(2)
    square, half = torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([[0.0, 0, 10, 5]])  # IoU 0.5
    five = torch.tensor([[20.0, 15, 70, 65], [10, 10, 60, 60], [28, 20, 78, 70],
                         [105, 28, 152, 75], [100, 20, 150, 70]])  # notebook 03's A..E
    cases = [(torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]]),
              torch.tensor([0.5, 0.9, 0.3]), 0.5),
             (five, torch.tensor([0.80, 0.90, 0.70, 0.55, 0.65]), 0.5),  # suppressed A: C kept
             (torch.cat((square, half)), torch.tensor([0.9, 0.8]), 0.5),  # IoU = t: both kept
             (torch.cat((square, square + 1, half + 40)), torch.tensor([0.7, 0.7, 0.7]), 0.5)]
    cases += [(random_boxes(12, 60, g), torch.rand(12, generator=g), t)
              for t in (0.3, 0.5, 0.7) for _ in range(3)]
    return check_exercise(yours, nms, cases, compare=_equal)


def _level_of(boxes: Tensor) -> Tensor:
    """The module's pyramid level (2..5) of each box, for ``check_level_mapper``."""
    return ROIAlign().level_of(boxes, 2, 5) + 2


def check_level_mapper(yours) -> bool:
    """Exercise: ``yours(boxes [K, 4]) -> [K]`` pyramid level 2..5 of each box (FPN's rule),
    against :meth:`ROIAlign.level_of`."""
    sides = torch.tensor([8.0, 56, 111, 112, 113, 224, 447, 448, 1000,
                          111.99997, 223.99994, 447.99988])  # 112, 224, 448 up to float32 error
    edge = torch.stack((torch.zeros(12), torch.zeros(12), sides, sides), 1)
    g = torch.Generator().manual_seed(3)
    return check_exercise(yours, _level_of, [(edge,), (random_boxes(20, 800, g),)],
                          compare=_equal, name="ROIAlign.level_of")


def _ap_at(boxes, scores, gt_boxes, iou_threshold) -> float:
    """The module's AP of one class in one image: what ``check_average_precision`` compares with."""
    return average_precision(match_detections(boxes, scores, gt_boxes, iou_threshold), scores,
                             len(gt_boxes))


def check_average_precision(yours) -> bool:
    """Exercise: ``yours(boxes, scores, gt_boxes, iou_threshold) -> AP`` of one class in one image,
    COCO's 101-point rule, against :func:`match_detections` + :func:`average_precision`."""
    g = torch.Generator().manual_seed(4)
    gt = torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40]])
    pair = torch.tensor([[0.0, 0, 10, 10], [0, 1, 10, 10]])  # two objects, IoU 0.9
    cases = [(gt.clone(), torch.tensor([0.9, 0.8]), gt, 0.5),
             (torch.cat((gt, gt[:1] + 0.5)), torch.tensor([0.9, 0.8, 0.95]), gt, 0.5),
             (pair[:1].repeat(2, 1), torch.tensor([0.9, 0.8]), pair, 0.5),  # 2nd takes the free one
             (gt[:1, :] * torch.tensor([1.0, 1, 1, 0.5]), torch.tensor([0.9]), gt[:1], 0.5)]  # IoU = t
    for t in (0.5, 0.75):
        truth = random_boxes(4, 80, g)
        guesses = torch.cat((truth + torch.randn(4, 4, generator=g) * 2, random_boxes(4, 80, g)))
        cases.append((guesses, torch.rand(8, generator=g), truth, t))
    return check_exercise(yours, _ap_at, cases, name="the module's AP")


# The overview diagram of notebook 01 ───────────────────────────────────────────────────────────


_PATH_INK = {"both": "black", "infer": "tab:blue", "train": "tab:red"}


_OVERVIEW_COLUMNS, _OVERVIEW_TOP, _OVERVIEW_LOW = (0.2, 3.05, 5.9, 8.75, 11.6), 4.4, 1.5
"""The overview diagram's layout: the left edge of each stage column and the bottom of its two rows."""


def _shape(t: Tensor) -> str:
    """A tensor's shape as notebook 01 prints it: ``[3, 200, 266]``."""
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _overview_stage(ax, x: float, y: float, title: str, lines, path: str = "both",
                    w: float = 2.4, h: float = 2.3) -> None:
    """One rounded box of the overview diagram: a bold title and monospace ``(text, path)`` lines,
    coloured by path (black: both, blue: inference, red: training, dashed)."""
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.04", fc="white",
                                ec=_PATH_INK[path], lw=1.8, ls="--" if path == "train" else "-"))
    ax.text(x + w / 2, y + h - 0.12, title, ha="center", va="top", fontsize=9.5,
            fontweight="bold", color=_PATH_INK[path])
    for i, (text, kind) in enumerate(lines):
        ax.text(x + 0.1, y + h - 0.55 - 0.3 * i, text, ha="left", va="top", fontsize=7.5,
                family="monospace", color=_PATH_INK[kind])


def _overview_arrow(ax, start, end, path: str = "both") -> None:
    """An arrow of the overview diagram, coloured and dashed like the stage boxes."""
    ax.annotate("", xy=end, xytext=start, arrowprops={
        "arrowstyle": "-|>", "color": _PATH_INK[path], "lw": 1.6,
        "ls": "--" if path == "train" else "-"})


def _overview_stages(image, batch, infer, train, losses, num_anchors, num_gt, detections):
    """The eleven boxes of :func:`draw_detector_overview`: ``(x, y, title, lines, path, h)``."""
    dims = lambda t: " x ".join(str(s) for s in t.shape[1:])  # noqa: E731
    both = lambda texts: [(t, "both") for t in texts]  # noqa: E731
    split = lambda a, b: [(f"eval:  {_shape(a)}", "infer"), (f"train: {_shape(b)}", "train")]  # noqa: E731
    logits, deltas = infer["rpn_head"]
    pair = lambda key: ", ".join(f"{k} {float(losses[k]):.2f}" for k in key)  # noqa: E731
    xs, top, low = _OVERVIEW_COLUMNS, _OVERVIEW_TOP, _OVERVIEW_LOW
    return [
        (xs[0], top, "image", both([_shape(image), "resized by the dataset", "padded by the model to",
                                    _shape(batch)]), "both", 2.3),
        (xs[1], top, "ResNet-50", both([f"C{k}: {dims(c)}" for k, c in enumerate(infer["C"], 2)]
                                       + ["strides 4, 8, 16, 32"]), "both", 2.3),
        (xs[2], top, "FPN", both([f"P{k}: {dims(p)}" for k, p in enumerate(infer["P"], 2)]), "both", 2.3),
        (xs[3], top, "RPN head + anchors", both(["3 anchors per position", f"logits {dims(logits[0])} (P2)",
                                                 f"deltas {dims(deltas[0])} (P2)",
                                                 f"all levels: {num_anchors} anchors",
                                                 "decode, top-k, NMS 0.7"]), "both", 2.3),
        (xs[4], top, "proposals", split(infer["rpn"][0][0], train["rpn"][0][0])
         + [(f"  + {num_gt} GT boxes,", "train"), (f"  sample {train['pooled'].shape[0]}", "train")],
         "both", 2.3),
        (xs[4], low, "RoIAlign (P2..P5)", both(["each box -> 7 x 7 cells"])
         + split(infer["pooled"], train["pooled"]), "both", 2.3),
        (xs[3], low, "two-layer head", both(["fc6, fc7 (1024 each)"])
         + split(infer["box_head"], train["box_head"]), "both", 2.3),
        (xs[2], low, "predictor", both(["classes, one box per class"])
         + [(f"eval:  {_shape(infer['predictor'][0])}", "infer"),
            (f"       {_shape(infer['predictor'][1])}", "infer"),
            (f"train: {_shape(train['predictor'][0])}", "train"),
            (f"       {_shape(train['predictor'][1])}", "train")], "both", 2.3),
        (xs[1], low, "post-processing", [(t, "infer") for t in ("softmax, score > 0.05,", "NMS 0.5 per class,",
                                                                 "best 100:", f"boxes {_shape(detections)}")],
         "infer", 2.3),
        (xs[3], 6.95, "RPN losses", [(pair(("rpn_cls", "rpn_box")), "train")], "train", 1.0),
        (xs[2], 0.15, "ROI losses", [(pair(("roi_cls", "roi_box")), "train")], "train", 1.0),
        (xs[0], low, "key", [("black: both paths", "both"), ("blue: inference only", "infer"),
                             ("red: training only", "train"), ("(all shapes for", "both"),
                             ("  this one image)", "both")], "both", 2.3)]


def draw_detector_overview(image: Tensor, batch: Tensor, infer: Dict[str, object],
                           train: Dict[str, object], losses: Dict[str, Tensor], num_anchors: int,
                           num_gt: int, detections: Tensor):
    """Draw notebook 01's diagram of Faster R-CNN's stages, with the shapes recorded on one image.

    Args:
        image: the dataset's image ``[3, H, W]``; batch: the padded batch ``[1, 3, H', W']``.
        infer, train: each stage's output in eval and in training mode, as forward hooks record
            them: ``"C"`` and ``"P"`` (lists of ``[1, C, h, w]`` maps), ``"rpn_head"`` (lists of
            logits and deltas), ``"rpn"`` (proposals, losses), ``"pooled"`` ``[K, 256, 7, 7]``,
            ``"box_head"`` ``[K, 1024]``, ``"predictor"`` (logits ``[K, C]``, deltas ``[K, 4C]``).
        losses: the training path's loss dict (``rpn_cls``, ``rpn_box``, ``roi_cls``, ``roi_box``).
        num_anchors: anchors over all levels; num_gt: ground-truth boxes added in training.
        detections: the inference path's boxes ``[D, 4]``.

    Returns the matplotlib figure: black boxes and arrows for both paths, blue for inference
    only, red (dashed) for training only.
    """
    import matplotlib.pyplot as plt

    missing = [k for k in ("C", "P", "rpn_head", "rpn", "pooled", "box_head", "predictor")
               if k not in infer or k not in train]
    if missing:
        raise KeyError(f"draw_detector_overview: no recorded output for stage(s) {missing}; "
                       "register a forward hook on each stage in both modes first")
    fig, ax = plt.subplots(figsize=(14, 8))
    ax.set(xlim=(0, 14.2), ylim=(0, 8.3), title=f"Faster R-CNN, ResNet-50 + FPN, on one "
           f"{image.shape[-2]} x {image.shape[-1]} image: the shape of every stage (computed above)")
    ax.axis("off")
    for x, y, title, lines, path, h in _overview_stages(image, batch, infer, train, losses,
                                                        num_anchors, num_gt, detections):
        _overview_stage(ax, x, y, title, lines, path, h=h)
    xs, top, low = _OVERVIEW_COLUMNS, _OVERVIEW_TOP, _OVERVIEW_LOW
    for a, b in zip(xs[:4], xs[1:]):
        _overview_arrow(ax, (a + 2.45, top + 1.15), (b - 0.05, top + 1.15))
    _overview_arrow(ax, (xs[4] + 1.2, top - 0.05), (xs[4] + 1.2, low + 2.35))
    for a, b in ((xs[4], xs[3]), (xs[3], xs[2])):
        _overview_arrow(ax, (a - 0.05, low + 1.15), (b + 2.45, low + 1.15))
    _overview_arrow(ax, (xs[2] - 0.05, low + 1.15), (xs[1] + 2.45, low + 1.15), "infer")
    _overview_arrow(ax, (xs[3] + 1.2, top + 2.35), (xs[3] + 1.2, 6.9), "train")
    _overview_arrow(ax, (xs[2] + 1.2, low - 0.05), (xs[2] + 1.2, 1.2), "train")
    ax.text(xs[2] + 1.2, top - 0.35, "P2..P5 also feed RoIAlign", ha="center", fontsize=8, style="italic")
    return fig


# The FPN diagram of notebook 02 ────────────────────────────────────────────────────────────────


def draw_fpn_diagram(levels: int = 4):
    """Draw notebook 02's diagram of the feature pyramid network, bottom (fine) to top (coarse).

    For each level k = 2 .. levels + 1: the ResNet stage C_k (blue, 256 * 2^(k-2) channels, stride
    2^k), its 1x1 lateral into the top-down sum M_k (orange; the coarser sum, upsampled x2, is added,
    red arrows), and the 3x3 convolution to P_k (green, 256 channels, same stride); above the top
    level, the extra level max-pooled from it (P6 for the default 4 levels). Returns the figure:
    3 * levels + 1 boxes, 2 * levels + (levels - 1) + 1 arrows (``FancyArrowPatch``).
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, Rectangle

    fig, ax = plt.subplots(figsize=(9.5, 4.8))

    def arrow(start, end, text=None, at=None, colour="black"):
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="->", mutation_scale=12, color=colour))
        if text:
            ax.text(*at, text, fontsize=7, ha="center", color=colour)

    def box(x, y, width, height, colour, text, alpha=0.35):
        ax.add_patch(Rectangle((x, y), width, height, fc=colour, alpha=alpha))
        ax.text(x + width / 2, y + height / 2, text, ha="center", va="center", fontsize=8)

    for i in range(levels):  # C_k (left), the sums M_k (middle), P_k (right)
        y, w, k, stride = 1.2 * i, 1.6 - 0.3 * i, i + 2, 4 * 2 ** i
        box(0, y, w, 0.8, "tab:blue", f"C{k}\n{256 * 2 ** i} ch, /{stride}")
        summed = f"L{k}(C{k})" + (" + up" if i < levels - 1 else "")
        box(3, y, 1.3, 0.8, "tab:orange", f"M{k}\n{summed}")
        box(5.6, y, w, 0.8, "tab:green", f"P{k}\n256 ch, /{stride}")
        arrow((w + 0.05, y + 0.4), (2.95, y + 0.4), f"1x1 lateral L{k}", ((w + 3) / 2, y + 0.47))
        arrow((4.35, y + 0.4), (5.55, y + 0.4), "3x3", (4.95, y + 0.47))
        if i < levels - 1:  # the coarser sum comes down, upsampled, before its own 3x3
            arrow((3.65, y + 1.2), (3.65, y + 0.8), colour="tab:red")
            ax.text(3.72, y + 0.93, "up x2", color="tab:red", fontsize=7)
    top, k = 1.2 * levels, levels + 2
    box(5.6, top, 0.6, 0.6, "tab:green", f"P{k} /{4 * 2 ** levels}", alpha=0.2)
    arrow((5.9, top - 0.4), (5.9, top))
    ax.text(6.05, top - 0.3, f"max-pool (1x1, stride 2) of P{k - 1}", fontsize=7)
    for x, name, colour in ((0.8, "ResNet-50 stages", "tab:blue"),
                            (3.65, "top-down sums", "tab:orange"),
                            (6.4, "pyramid levels", "tab:green")):
        ax.text(x, -0.35, name, ha="center", fontsize=8, color=colour)
    ax.set(xlim=(-0.2, 8.4), ylim=(-0.5, top + 0.8),
           title="FPN: laterals and top-down sums M_k, then a 3x3 convolution to each P_k")
    ax.axis("off")
    return fig
