"""Train a detector from the command line, on one device or data-parallel under torchrun.

    .venv/bin/python train.py --epochs 2                        # one process, synthetic shapes
    OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node=2 train.py --epochs 2   # two processes
    OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node=8 train.py --data coco \\
        --model resnet50_fpn --weights-backbone IMAGENET1K_V1 --steps-per-epoch 7000 --epochs 26
    .venv/bin/python train.py --data my_folder --finetune COCO_V1 --lr 0.005  # your own data

Run from the course folder after `make setup`, with the environment's own python and torchrun
(.venv/bin/...), or after `source .venv/bin/activate` as plain `python` and `torchrun`.
``--batch-size`` is per process; ``OMP_NUM_THREADS`` is each process's CPU threads (cores divided
by processes; torchrun sets 1 with a warning banner when it is unset). Ctrl-C stops after the step
in progress and saves the checkpoint; the same command run again resumes from ``--checkpoint``,
which records what it was trained on and refuses a run on other data or weights. All the logic
lives in ``frcnn_common`` and ``frcnn_engine`` (``fit``, ``setup_distributed``,
``wrap_distributed``, ``make_loader``); this file only turns arguments into calls.
"""

import argparse
import difflib
import os
import sys

import torch
from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

from frcnn_common import (COCOStreamDataset, FasterRCNN, fasterrcnn_resnet50_fpn, folder_dataset,
                          HUB_COCO, IMG_SIZE, SyntheticShapesDataset, tiny_detector,
                          transfer_weights)
from frcnn_engine import (cleanup_distributed, describe_source, fit, make_loader,
                          ProvenanceMismatch, setup_distributed, wrap_distributed)

TORCHVISION_DETECTORS = list(FasterRCNN_ResNet50_FPN_Weights.__members__)
"""The names --finetune takes for torchvision's trained ResNet-50 + FPN (COCO_V1, DEFAULT)."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's layout and shows each option's default once: options whose
    help already says what their default does, or whose default is None or False, are left as
    written."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--data", default="shapes",
                   help="'shapes' (synthetic, offline), 'coco' (the COCO 2017 train split) or "
                        "your own folder as a labelling tool exported it, unzipped (CVAT, Label "
                        "Studio, Roboflow, LabelImg, makesense.ai: COCO format or Pascal VOC); "
                        "num_classes is taken from the data")
    p.add_argument("--split", default=None,
                   help="the split of --data FOLDER to train on, where it holds several (the "
                        "error lists them): e.g. Roboflow's train, CVAT's default")
    p.add_argument("--coco-source", default=HUB_COCO,
                   help="hub dataset name or local directory for --data coco")
    p.add_argument("--num-images", type=int, default=2048, help="synthetic images per epoch")
    p.add_argument("--image-size", type=int, default=None,
                   help="synthetic image side / COCO shorter side (default 128 / IMG_SIZE)")
    p.add_argument("--model", choices=["tiny", "resnet50_fpn"], default="tiny",
                   help="the small shapes detector or ResNet-50 + FPN")
    p.add_argument("--weights-backbone", default=None,
                   help="e.g. IMAGENET1K_V1 for resnet50_fpn (default: random weights)")
    p.add_argument("--finetune", default=None,
                   help="start from trained weights with a new predictor for the data's classes: "
                        "a torchvision weights name (COCO_V1: ResNet-50 + FPN, --model set to "
                        "it) or a checkpoint of this course (loaded by transfer_weights)")
    p.add_argument("--trainable-layers", type=int, default=None,
                   help="backbone stages trained (default 3 with --weights-backbone, 5 without)")
    p.add_argument("--epochs", type=int, default=1, help="epochs in all (a resumed run included)")
    p.add_argument("--steps-per-epoch", type=int, default=None,
                   help="batches per epoch (default: the dataset's length; required for the COCO "
                        "stream)")
    p.add_argument("--batch-size", type=int, default=8, help="images per process and step")
    p.add_argument("--lr", type=float, default=0.02,
                   help="peak learning rate (0.02 is torchvision's for 16 images per step)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up steps (default: min(1000, total steps // 10))")
    p.add_argument("--schedule", choices=["cosine", "step"], default="cosine",
                   help="learning-rate decay after the warm-up")
    p.add_argument("--max-grad-norm", type=float, default=None,
                   help="clip the gradient's L2 norm (default: no clipping)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="mixed precision (float16 on CUDA, bfloat16 on CPU)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the backbone's top stages in backward (less memory)")
    p.add_argument("--checkpoint", default="runs/train.pt",
                   help="checkpoint file: written every N steps, at each epoch's end and on Ctrl-C; "
                        "resumed from")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="write the checkpoint every N steps (default: about 20 times a run, at "
                        "most 1000 steps apart; 0: only at the ends of epochs)")
    p.add_argument("--no-resume", action="store_true", help="start over even if --checkpoint exists")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per process")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the weights")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    finetune = finetune_kind(args.finetune)
    info = setup_distributed()
    torch.manual_seed(args.seed)
    dataset = build_dataset(args, info.rank == 0)
    model = wrap_distributed(build_model(args, finetune, dataset.num_classes, info.rank == 0)
                             .to(info.device))
    loader = make_loader(dataset, args.batch_size, num_workers=args.workers, seed=args.seed,
                         drop_last=True)
    try:
        history = fit(model, loader, args.epochs, lr=args.lr, warmup_steps=args.warmup_steps,
            schedule=args.schedule, steps_per_epoch=args.steps_per_epoch, device=info.device,
            amp=args.amp, max_grad_norm=args.max_grad_norm,
            gradient_checkpointing=args.gradient_checkpointing or None,
            checkpoint_path=args.checkpoint, checkpoint_every=args.checkpoint_every,
            resume=not args.no_resume, provenance=provenance(args, finetune, dataset.num_classes))
        if info.rank == 0:
            print(summary(history, args.checkpoint), flush=True)
    except ProvenanceMismatch as err:  # names what differs and what to pass
        raise SystemExit(f"train.py: {err}") from None
    except KeyboardInterrupt as stop:  # fit's TrainingInterrupted says where it saved
        if info.rank == 0:
            print(str(stop) or "Interrupted.", file=sys.stderr, flush=True)
        raise SystemExit(130) from None  # 128 + SIGINT, the shell's code for Ctrl-C
    finally:
        cleanup_distributed()


def finetune_kind(value):
    """What ``--finetune value`` names: None, ``"file"`` (a checkpoint) or ``"torchvision"``
    (a weights name); anything else ends the run, saying what --finetune takes."""
    if value is None or value in TORCHVISION_DETECTORS:
        return None if value is None else "torchvision"
    if os.path.isfile(value):
        return "file"
    folder = os.path.dirname(value) or "."
    what = "is a folder, not a checkpoint file" if os.path.isdir(value) else "no such file"
    files = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    close = difflib.get_close_matches(os.path.basename(value), files, n=1)
    hint = f" (did you mean {os.path.join(os.path.dirname(value), close[0])}?)" if close else ""
    raise SystemExit(
        f"train.py --finetune {value}: {what}{hint}. --finetune takes the path of a checkpoint "
        "file of this course (one that train.py --checkpoint wrote) or torchvision's weights "
        f"name {' or '.join(TORCHVISION_DETECTORS)} (its COCO-trained ResNet-50 + FPN).")


def build_dataset(args, verbose: bool):
    """The training data that --data names (with --split, --image-size, --seed)."""
    if args.split is not None and args.data in ("shapes", "coco"):
        raise SystemExit(f"train.py: --split is for --data FOLDER, not --data {args.data}")
    if args.data == "shapes":
        return SyntheticShapesDataset(args.num_images, args.image_size or 128, seed=args.seed,
                                      train=True)
    if args.data == "coco":
        return COCOStreamDataset("train", source=args.coco_source,
                                 min_size=args.image_size or IMG_SIZE, shuffle_buffer=1000,
                                 seed=args.seed)
    try:
        return folder_dataset(args.data, args.split, verbose=verbose, train=True,
                              min_size=args.image_size or IMG_SIZE)
    except (FileNotFoundError, ValueError) as err:  # each names the file and the fix
        raise SystemExit(f"train.py --data {args.data}: {err}") from None


def build_model(args, finetune, num_classes: int, verbose: bool):
    """The detector that --model, --weights-backbone and --finetune describe."""
    if finetune == "torchvision":
        return FasterRCNN.from_torchvision(args.finetune, num_classes=num_classes,
                                           trainable_layers=args.trainable_layers or 3)
    if args.model == "tiny":
        model = tiny_detector(num_classes)
    else:
        model = fasterrcnn_resnet50_fpn(num_classes, weights_backbone=args.weights_backbone,
                                        trainable_layers=args.trainable_layers)
    if finetune == "file":
        new = transfer_weights(model, args.finetune)
        if verbose:
            print(f"{args.finetune}: loaded all weights but {new}" if new else
                  f"{args.finetune}: loaded every weight, the predictor's too (same num_classes: "
                  "its rows now stand for this data's classes)", flush=True)
    return model


def provenance(args, finetune, num_classes: int) -> dict:
    """What the run trains on, recorded in its checkpoint: a rerun on other data, weights or
    model refuses to resume from it. Files and folders by their absolute paths."""
    data = {"shapes": "shapes", "coco": f"coco from {describe_source(args.coco_source)}"}.get(
        args.data, describe_source(args.data))
    if finetune is not None:
        weights = f"finetune {describe_source(args.finetune)}"
    else:
        weights = f"backbone {args.weights_backbone}" if args.weights_backbone else "random"
    model = "resnet50_fpn" if finetune == "torchvision" else args.model
    return {"data": data, "split": args.split, "weights": weights, "model": model,
            "num_classes": num_classes, "trainable_layers": args.trainable_layers}


def summary(history, checkpoint: str) -> str:
    """Where the checkpoint went, and the mean losses of the run's last (up to) 50 steps."""
    steps = len(history.get("total", []))
    if steps == 0:
        return f"No steps taken; checkpoint: {checkpoint}"
    last = min(50, steps)
    names = [k for k in history if k not in ("step", "epoch", "lr", "grad_norm", "skipped")]
    losses = ", ".join(f"{k} {sum(history[k][-last:]) / last:.4f}" for k in names)
    return f"{steps} steps in all; mean of the last {last}: {losses}\nCheckpoint: {checkpoint}"


if __name__ == "__main__":
    main()
