"""Where COCO's records come from: the hub, a local copy, or a ``datasets`` object.

``COCOStreamDataset`` (in ``frcnn_common.py``, which imports everything public from here) reads
COCO 2017 from four kinds of source. :func:`open_source` opens each of them into the same two
things: the *rows* (a list, or a ``datasets`` object) and a function that turns one row into a
*record*::

    {"image": PIL image (decoded later, only if kept), "image_id": int,
     "boxes": [G, 4] x1, y1, x2, y2 in the image's pixels, "labels": [G] 1..80,
     "area": [G] or None, "iscrowd": [G] or None}

From there on every source is treated alike: the dataset turns records into samples. Your own
data gives the same records: :func:`read_coco_file` (any COCO-format file, read with pycocotools,
which the official COCO layout uses too) and :func:`read_voc_folder` (Pascal VOC). This file
also holds the network check that makes an unreachable hub (or weights download) fail within
seconds rather than minutes. Nothing here is about the detector: it is file and network plumbing,
kept beside the module as torchvision keeps its datasets apart from its models.
"""

from __future__ import annotations

import difflib
import glob
import io
import json
import math
import os
import re
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps

HUB_COCO = "detection-datasets/coco"
"""The Hugging Face hub copy of COCO 2017 that ``COCOStreamDataset`` streams by default: splits
``train`` (118k images) and ``val`` (5k), boxes absolute ``[x_min, y_min, x_max, y_max]``,
``objects.category`` a ClassLabel 0..79 whose names are ``COCO_NAMES[1:]``."""


# Opening a source ──────────────────────────────────────────────────────────────────────────────


def open_source(source, split: str, class_names: Sequence[str], hub_timeout: float = 5.0
                ) -> Tuple[object, Callable[[dict], dict]]:
    """The rows of ``split`` in ``source`` and the function that turns a row into a record.

    ``source`` is one of the four kinds ``COCOStreamDataset`` describes: a hub name, a directory
    in the official COCO layout, a directory (or file) of the hub's parquet files, or a
    ``datasets`` object. ``class_names`` names labels 0..K (index 0 the background, as
    ``COCO_NAMES``): the source's categories are matched to them by name. The rows are a list of
    COCO-layout records, a ``datasets.Dataset`` (indexable) or a ``datasets.IterableDataset``.
    """
    path = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
    if path is None:
        rows = _datasets_split(source, split)
    elif os.path.isdir(os.path.join(path, "annotations")):
        return _read_coco_layout(path, split, class_names), _open_image
    elif os.path.isdir(path) or path.endswith(".parquet"):
        rows = _parquet_stream(path, split)
    else:
        rows = _hub_stream(path, split, hub_timeout)
    return rows, _HubRecords(_category_labels(rows.features, class_names))


def _datasets_split(source, split: str):
    """``split`` of a ``datasets`` object (or the object itself when it is one split)."""
    import datasets

    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in source:
            raise ValueError(f"split {split!r} is not in the source (splits: {list(source)})")
        source = source[split]
    if not isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        raise TypeError(f"source must be a hub name, a directory or a datasets.Dataset/"
                        f"IterableDataset, got {type(source).__name__}")
    return source


def _parquet_stream(path: str, split: str):
    """A local copy of the hub's parquet files of ``split``, streamed from disk, with the
    features of the copied ``dataset_infos.json`` when there is one."""
    import datasets

    files = [path] if os.path.isfile(path) else sorted(
        glob.glob(os.path.join(path, "**", f"{split}-*.parquet"), recursive=True)
        + glob.glob(os.path.join(path, "**", split, "*.parquet"), recursive=True))
    if not files:
        found = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
        raise FileNotFoundError(
            f"no parquet files of split {split!r} in {path} (expected "
            f"data/{split}-*.parquet as on the hub; parquet files found: {found[:5]}), "
            "and no COCO layout "
            f"(annotations/instances_{split}2017.json) either")
    infos = glob.glob(os.path.join(path, "**", "dataset_infos.json"), recursive=True)
    features = None
    if infos:  # the hub repo's own description of its features, when copied along
        with open(infos[0]) as f:
            info = next(iter(json.load(f).values()))
        features = datasets.Features.from_dict(info["features"])
    return datasets.load_dataset("parquet", data_files=files, split="train",
                                 streaming=True, features=features)


def _hub_stream(name: str, split: str, hub_timeout: float):
    """``split`` of the hub dataset ``name``, streamed, after :func:`check_hub` said it answers."""
    is_hub_name = not os.path.isabs(name) and name.count("/") == 1 and not name.startswith(".")
    if not is_hub_name:
        raise FileNotFoundError(
            f"source {name!r} does not exist: give a directory with the hub's parquet files "
            "or the official COCO layout, a datasets.Dataset, or a hub name like "
            f"{HUB_COCO!r}")
    if split not in ("train", "val"):
        hint = " (the hub calls it 'val')" if split == "validation" else ""
        raise ValueError(f"split {split!r} is not a split of {name!r}{hint}: "
                         "use 'train' or 'val'")
    check_hub(name, hub_timeout)
    import datasets

    try:
        return datasets.load_dataset(name, split=split, streaming=True)
    except OSError as err:  # ConnectionError and friends: the hub went away meanwhile
        raise _hub_error(name, f"{type(err).__name__}: {err}") from err


# The hub ───────────────────────────────────────────────────────────────────────────────────────


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_error(name: str, reason: str) -> ConnectionError:
    if name != HUB_COCO:
        reason += f" (and {name!r} is no local directory either)"
    return ConnectionError(
        f"Cannot stream {name!r} from the Hugging Face hub: {reason}.\n"
        "Offline alternatives, passed as `source=`:\n"
        "  * a directory with a local copy of the hub's parquet files (data/train-*.parquet, "
        "data/val-*.parquet),\n"
        "  * a COCO 2017 directory in the official layout (annotations/instances_val2017.json "
        "and val2017/, the same for train),\n"
        "  * a datasets.Dataset or IterableDataset with the hub's features;\n"
        "or train on SyntheticShapesDataset(...), the built-in offline data.")


def check_hub(name: str = HUB_COCO, timeout: float = 5.0) -> None:
    """Raise a ``ConnectionError`` naming the offline sources unless the hub answers in time.

    Offline mode (``HF_HUB_OFFLINE=1`` or ``HF_DATASETS_OFFLINE=1``) fails at once. Otherwise one
    HEAD request goes to ``HF_ENDPOINT`` (default https://huggingface.co, through any proxy set
    in the environment) and gets ``timeout`` seconds, name resolution included (see
    :func:`unreachable_reason`); ``datasets`` itself would retry for tens of seconds first.
    """
    if _env_flag("HF_HUB_OFFLINE") or _env_flag("HF_DATASETS_OFFLINE"):
        raise _hub_error(name, "offline mode is on (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    reason = unreachable_reason(endpoint, timeout)
    if reason:
        raise _hub_error(name, reason)


def unreachable_reason(url: str, timeout: float = 5.0) -> Optional[str]:
    """``None`` if the server of ``url`` answers a HEAD request within ``timeout`` seconds (any
    HTTP status counts as an answer), else why not, in words.

    Downloads (the Hugging Face hub, torchvision's weights) otherwise hang for minutes on a
    machine without a network. The request honours proxy settings and runs in a daemon thread,
    so that even a stuck DNS lookup or a silent server cannot block the caller.
    """
    import threading
    import urllib.error
    import urllib.request

    outcome: List[Optional[BaseException]] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout)
            outcome.append(None)
        except urllib.error.HTTPError:  # the server answered, if only with an error code
            outcome.append(None)
        except Exception as err:  # noqa: BLE001 - any other failure means "unreachable"
            outcome.append(err)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    if not outcome:
        return f"{url} gave no answer within {timeout:g} s"
    return None if outcome[0] is None else f"{url} is unreachable ({outcome[0]})"


# From rows to records ──────────────────────────────────────────────────────────────────────────


def _category_labels(features, class_names: Sequence[str]) -> List[int]:
    """Contiguous label (1..80) of each category index of a hub-schema dataset, by name.

    The hub stores ``objects.category`` as a ClassLabel 0..79; its names are looked up in
    ``class_names`` rather than trusting that index + 1 is the right label.
    """
    feature = features.get("objects") if features else None
    feature = getattr(feature, "feature", feature)  # List({...}) -> {...}
    feature = feature.get("category") if isinstance(feature, dict) else None
    names = getattr(getattr(feature, "feature", feature), "names", None)  # List(ClassLabel)
    if names is None:
        raise ValueError(
            "cannot read the category names: the source's features need `objects.category` as a "
            f"datasets.ClassLabel with the 80 COCO names (features: {features}). Cast the column "
            "with `ds.cast_column(...)` or pass the hub's files with their dataset_infos.json.")
    unknown = [n for n in names if n not in class_names[1:]]
    if unknown:
        raise ValueError(f"categories {unknown} of the source are not COCO categories (COCO_NAMES)")
    return [class_names.index(n) for n in names]


def _read_coco_layout(root: str, split: str, class_names: Sequence[str]) -> List[dict]:
    """One record per image of ``root/annotations/instances_{split}2017.json``, images under
    ``root/{split}2017/``: :func:`read_coco_file`'s records (boxes off an image's edge clipped
    later, as COCO's own files have them), with the sparse category ids (1..90) mapped onto
    labels 1..80 of ``class_names`` by name."""
    path = os.path.join(root, "annotations", f"instances_{split}2017.json")
    if not os.path.isfile(path):
        found = sorted(glob.glob(os.path.join(root, "annotations", "instances_*2017.json")))
        raise FileNotFoundError(f"{path} does not exist: split {split!r} is not in this COCO "
                                f"directory (annotation files found: {found})")
    names, records, _ = read_coco_file(os.path.join(root, f"{split}2017"), path,
                                       check_boxes=False)
    unknown = [n for n in names[1:] if n not in class_names[1:]]
    if unknown:
        raise ValueError(f"categories {unknown} of {path} are not COCO categories (COCO_NAMES)")
    to_label = np.array([0] + [list(class_names).index(n) for n in names[1:]], dtype=np.int64)
    return [{**record, "labels": to_label[record["labels"]]} for record in records]


class _HubRecords:
    """Turns a row of the hub's schema into a record: image (PIL), image_id, boxes x1 y1 x2 y2,
    labels 1..80 (``label_of`` maps the row's ClassLabel indices), the annotation area."""

    def __init__(self, label_of: List[int]):
        self.label_of = label_of

    def __call__(self, row: dict) -> dict:
        image, objects = row["image"], row["objects"]
        if isinstance(image, dict):  # undecoded {"bytes", "path"}
            image = Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"])
        size = (row["width"], row["height"]) if row.get("width") and row.get("height") else None
        image = upright(image, size)  # as the annotation's width and height describe it
        if isinstance(objects, list):  # a list of dicts rather than a dict of lists
            objects = {key: [o[key] for o in objects] for key in ("bbox", "category")}
        categories = objects["category"]
        if any(not 0 <= c < len(self.label_of) for c in categories):
            raise ValueError(f"image {row['image_id']} has category {categories}, outside the "
                             f"{len(self.label_of)} categories of the source's ClassLabel")
        return {"image": image, "image_id": row["image_id"],
                "boxes": torch.as_tensor(np.asarray(objects["bbox"], dtype=np.float32)),
                "labels": [self.label_of[c] for c in categories], "area": objects.get("area"),
                "iscrowd": None}


# Your own data: images upright, and what an annotation may say about them ─────────────────────

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
"""Extensions tried, in this order, for an image named without one (Label Studio's VOC export)."""

OVERSHOOT_PX = 2.0
"""How far a box may run past its image's edge and still be clipped to it. Tools round corners to
whole pixels and scale percentages (Label Studio) or floats (CVAT) into pixels, so a box drawn to
the edge can end a pixel or two beyond it; torchvision's detection reference and detectron2 clip
every box to its image too. A box further out is refused: it means a wrong image or size."""

_TURNED = (5, 6, 7, 8)  # EXIF orientations that turn an image by 90 degrees (width, height swap)


def _bad_file(where: str, what: str, fix: str) -> ValueError:
    return ValueError(f"{where}: {what}. {fix}")


def _misspelt(key: str, present) -> str:
    """`` ('x' looks like it, misspelt)`` when one of ``present`` is close to ``key``, else ``''``."""
    close = difflib.get_close_matches(key, [str(k) for k in present], n=1, cutoff=0.6)
    return f" ({close[0]!r} looks like it, misspelt)" if close else ""


def _number(value, where: str, fix: str) -> float:
    """``value`` (a number or a numeric string) as a finite float, else an error naming ``where``."""
    try:
        number = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise _bad_file(where, f"is {value!r}, not a number", fix)
    return number


def _given_size(width, height, where: str) -> Optional[Tuple[float, float]]:
    """The (width, height) an annotation gives its image; ``None`` when either is missing, empty,
    null or 0 (tools write these when they did not know it): the image file says it then."""
    if any(v is None or (isinstance(v, str) and not v.strip()) for v in (width, height)):
        return None
    fix = "Give the image's width and height in pixels, or leave them out to read them from the image"
    size = (_number(width, f"{where} width", fix), _number(height, f"{where} height", fix))
    return None if 0 in size else size


class _Notes:
    """What reading one annotation source mended, counted, and said in one warning per kind."""

    TEXT = {"clipped": f"boxes ran past their image's edge by at most {OVERSHOOT_PX:g} px (corners "
                       "rounded by the labelling tool) and were clipped to it",
            "stored": "images have an EXIF orientation that turns them, but their annotation gives "
                      "the stored (unturned) width and height, as a tool that ignores EXIF shows "
                      "them: they are read as stored, so that the boxes stay on their objects"}

    def __init__(self):
        self.count: dict = {}
        self.first: dict = {}

    def add(self, kind: str, example: str) -> None:
        self.count[kind] = self.count.get(kind, 0) + 1
        self.first.setdefault(kind, example)

    def warn(self, source: str) -> None:
        for kind, count in self.count.items():
            warnings.warn(f"{source}: {count} {self.TEXT[kind]} (first: {self.first[kind]})",
                          stacklevel=3)


def _orientation(image) -> int:
    """The EXIF orientation of a PIL image (1, upright as stored, when it has none)."""
    try:
        return int(image.getexif().get(0x0112, 1))
    except (OSError, ValueError, TypeError):  # a damaged EXIF block: take the pixels as stored
        return 1


def _labelled_as_stored(image, orientation: int, size) -> bool:
    """Whether an annotation giving ``size`` (width, height) describes the stored pixels of a
    non-square ``image`` that its EXIF ``orientation`` turns by 90 degrees."""
    return (orientation in _TURNED and size is not None and image.width != image.height
            and tuple(size) == image.size)


def upright(image, size=None):
    """``image`` turned as its EXIF orientation says (``ImageOps.exif_transpose``): a phone's
    portrait photo is stored sideways, and labelling tools (CVAT, Label Studio, makesense.ai in
    the browser, Roboflow on upload) show and label it upright. Kept as stored only when ``size``,
    the annotation's (width, height), is the stored size of an image turned by 90 degrees: the
    tool (LabelImg, for one) showed the stored pixels then."""
    orientation = _orientation(image)
    if orientation == 1 or _labelled_as_stored(image, orientation, size):
        return image
    return ImageOps.exif_transpose(image)


def _open_image(record: dict) -> dict:
    """A record with its image file opened upright (:func:`upright`, given the record's ``size``)."""
    return {**record, "image": upright(Image.open(record["image"]), record.get("size"))}


def _checked_size(path: str, given, where: str, notes: _Notes) -> Tuple[float, float]:
    """(width, height) of the image file ``path`` as its annotation describes it: upright, or as
    stored where :func:`upright` keeps it so (counted in ``notes``). ``given`` (the annotation's
    size) ``None``: read from the file. Any other size than the file's is an error naming both."""
    try:
        with Image.open(path) as image:
            orientation, stored = _orientation(image), image.size
            as_stored = _labelled_as_stored(image, orientation, given)
    except (OSError, SyntaxError) as err:  # PIL.UnidentifiedImageError is an OSError
        raise _bad_file(where, f"{path} is not an image Pillow can read ({err})",
                        "Put the exported image file there") from None
    turned = stored[::-1] if orientation in _TURNED else stored
    if given is None or tuple(given) == turned:
        return turned
    if as_stored:
        notes.add("stored", f"{path}, EXIF orientation {orientation}")
        return stored
    how = (f" upright (EXIF orientation {orientation} turns the stored {stored[0]} x {stored[1]})"
           if orientation in _TURNED else "")
    raise _bad_file(where, f"gives its image as {given[0]:g} x {given[1]:g} px, but {path} is "
                    f"{turned[0]} x {turned[1]} px{how}", "Fix the width and height, or put the "
                    "image that was labelled there")


def _fitted_box(box: List[float], size, where: str, what: str, notes: _Notes) -> List[float]:
    """``box`` (x1, y1, x2, y2) in an image of ``size`` (width, height): clipped to the image when
    it overshoots by at most :data:`OVERSHOOT_PX` (counted in ``notes``); an error beyond."""
    width, height = size
    over = max(-box[0], -box[1], box[2] - width, box[3] - height)
    if over > OVERSHOOT_PX:
        raise _bad_file(where, f"{what} lies outside its {width:g} x {height:g} px image by "
                        f"{over:g} px", "Fix the box, or the image's width and height")
    if over > 0:
        notes.add("clipped", where)
        box = [max(box[0], 0.0), max(box[1], 0.0), min(box[2], width), min(box[3], height)]
    return box


def find_image(dirs: Sequence[str], name: str) -> Optional[str]:
    """The first ``dir/name`` that is a file, over ``dirs`` in order; then the same with the base
    name of ``name`` (tools write paths of the annotator's machine, or URLs); a name without an
    image extension is also tried with each of :data:`IMAGE_EXTENSIONS`. ``None`` if none is."""
    name = name.strip().replace("\\", "/")
    names = [name] + ([name.rsplit("/", 1)[1]] if "/" in name else [])
    if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
        names += [n + ext for n in names for ext in IMAGE_EXTENSIONS + tuple(
            e.upper() for e in IMAGE_EXTENSIONS)]
    for candidate in names:
        for folder in dirs:
            path = os.path.join(folder, candidate)
            if os.path.isfile(path):
                return path
    return None


# Your own data: COCO-format files ─────────────────────────────────────────────────────────────

_COCO_KEYS = {"images": ("id", "file_name"), "annotations": ("id", "image_id", "category_id", "bbox"),
              "categories": ("id", "name")}


def _check_coco_keys(path: str, data: dict) -> None:
    """An error naming the entry, the key it lacks (and a key that looks like it, misspelt) for
    any entry of ``data`` without the keys that pycocotools and the reader need."""
    for part, keys in _COCO_KEYS.items():
        for number, entry in enumerate(data[part]):
            where = f"{path}: {part}[{number}]"
            if not isinstance(entry, dict):
                raise _bad_file(where, f"is {entry!r}, not an object",
                                f"Each entry of {part!r} is an object with keys {list(keys)}")
            missing = [k for k in keys if k not in entry]
            if missing:
                raise _bad_file(f"{where} (id {entry.get('id')})", f"has no key {missing[0]!r}"
                                f"{_misspelt(missing[0], entry)}; its keys: {sorted(map(str, entry))}",
                                f"Every entry of {part!r} needs {list(keys)}: rename the key, or "
                                "export the file again")


def _load_coco_json(path: str):
    """The pycocotools ``COCO`` index of the annotation file ``path``, after checking that the
    file holds COCO's format (a dict with lists ``images``, ``annotations``, ``categories``)."""
    import contextlib

    from pycocotools.coco import COCO

    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file {path} does not exist: pass the path of the "
                                "COCO-format .json your labelling tool exported")
    if os.path.getsize(path) == 0:
        raise _bad_file(path, "the file is empty", "Export the annotations again (COCO format)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _bad_file(path, f"not valid JSON ({err})", "Export it again in COCO format") from None
    missing = [k for k in ("images", "annotations", "categories")
               if not isinstance(data, dict) or not isinstance(data.get(k), list)]
    if missing:
        raise _bad_file(path, f"not in COCO's format: no list {missing} at the top level",
                        "A COCO detection file is {\"images\": [...], \"annotations\": [...], "
                        "\"categories\": [...]}; export it in that format")
    _check_coco_keys(path, data)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _coco_classes(path: str, data: dict) -> Tuple[List[str], dict]:
    """``(class_names, label of each category id)``, categories in id order. A category that no
    annotation uses and that is another category's supercategory (Roboflow's category 0, named
    after the dataset) is not a class: a warning says so."""
    categories = data["categories"]
    for number, c in enumerate(categories):
        _number(c["id"], f"{path}: categories[{number}] id", "Category ids are numbers")
    used = {a["category_id"] for a in data["annotations"]}
    parents = {c.get("supercategory") for c in categories if c.get("supercategory") != c["name"]}
    groups = [c for c in categories if c["id"] not in used and c["name"] in parents]
    if groups:
        named = ", ".join(f"{c['id']} {c['name']!r}" for c in groups)
        warnings.warn(f"{path}: category {named} "
                      "is not a class: no annotation uses it and it is the supercategory of the "
                      "others (Roboflow names it after the dataset)", stacklevel=3)
    kept = sorted((c for c in categories if c not in groups), key=lambda c: float(c["id"]))
    return ["__background__", *(str(c["name"]) for c in kept)], {
        c["id"]: i + 1 for i, c in enumerate(kept)}


def _coco_box(path: str, ann: dict, size, notes: _Notes) -> Optional[List[float]]:
    """x1, y1, x2, y2 of an annotation's ``[x, y, w, h]`` (fitted to ``size`` when given), or
    ``None`` for a box of zero or negative width or height."""
    where, bbox = f"{path}: annotation {ann['id']}", ann["bbox"]
    fix = "A COCO bbox is [x, y, width, height] in pixels"
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise _bad_file(where, f"has bbox {bbox!r}, not four numbers", fix)
    x, y, w, h = (_number(v, f"{where} bbox {bbox}", fix) for v in bbox)
    if w <= 0 or h <= 0:
        return None
    box = [x, y, x + w, y + h]
    return box if size is None else _fitted_box(box, size, where, f"bbox {bbox} ([x, y, w, h])",
                                                notes)


def _coco_record(path: str, image: dict, anns: List[dict], label_of: dict, dirs: List[str],
                 notes: Optional[_Notes]) -> dict:
    """The record of one image of a COCO-format file (see :func:`read_coco_file`), with the count
    of its degenerate boxes as ``dropped``; ``notes`` ``None``: no check against the image."""
    where = f"{path}: image {image['id']}"
    name = image["file_name"]
    file = find_image(dirs, name) if isinstance(name, str) and name.strip() else None
    if file is None:
        raise FileNotFoundError(f"{where} is file_name {name!r}, but no such image is in {dirs}. "
                                "Pass the folder holding the images as image_dir, or fix file_name")
    given = _given_size(image.get("width"), image.get("height"), where)
    size = None if notes is None else _checked_size(file, given, where, notes)
    rows, dropped = [], 0
    for ann in anns:
        if ann["category_id"] not in label_of:
            raise _bad_file(f"{path}: annotation {ann['id']}", f"has category_id "
                            f"{ann['category_id']!r}, which is not among the file's categories "
                            f"(ids {list(label_of)})", "Add that category or fix the id")
        box = _coco_box(path, ann, size, notes)
        if box is None:
            dropped += 1
            continue
        area, crowd = ann.get("area"), ann.get("iscrowd")
        fix = f"Give a number, or leave the key out (annotation {ann['id']})"
        rows.append((*box, label_of[ann["category_id"]],
                     (box[2] - box[0]) * (box[3] - box[1]) if area is None else
                     _number(area, f"{path}: annotation {ann['id']} area", fix),
                     0 if crowd is None else _number(crowd, f"{path}: annotation {ann['id']} "
                                                             "iscrowd", fix)))
    table = np.array(rows, dtype=np.float64).reshape(-1, 7)
    return {"image": file, "image_id": image["id"], "boxes": table[:, :4],
            "labels": table[:, 4].astype(np.int64), "area": table[:, 5],
            "iscrowd": table[:, 6].astype(np.int64), "size": given, "dropped": dropped}


def read_coco_file(image_dir, annotation_file: str, check_boxes: bool = True
                   ) -> Tuple[List[str], List[dict], int]:
    """``(class_names, records, dropped)`` of a COCO-format annotation file.

    ``image_dir``: the folder the file's ``file_name`` entries are relative to, or a list of
    folders tried in order (see :func:`find_image`). ``class_names`` is ``["__background__",
    *category names in id order]`` (see :func:`_coco_classes`); a label is a position there, so
    sparse ids (1, 5, 17) become labels 1, 2, 3. One record per image (in the file's order, those
    without annotations included), as :func:`open_source`'s, with the annotation's ``size``
    (width, height; ``None`` if not given). ``dropped`` counts boxes of zero width or height, left
    out. With ``check_boxes``, each image is checked against its size and boxes overshooting it
    by rounding are clipped (:func:`_fitted_box`). Errors name the file, the record and the fix.
    """
    coco = _load_coco_json(annotation_file)
    data = coco.dataset
    if not data["images"]:
        raise _bad_file(annotation_file, "lists no images", "A COCO-format file needs 'images', "
                        "'annotations' and 'categories'; export it with its images")
    stray = [a for a in data["annotations"] if a["image_id"] not in coco.imgs]
    if stray:
        raise _bad_file(annotation_file, f"annotation {stray[0]['id']} refers to image_id "
                        f"{stray[0]['image_id']!r}, which is not in the file's images",
                        "Add the image or remove the annotation")
    class_names, label_of = _coco_classes(annotation_file, data)
    dirs = [image_dir] if isinstance(image_dir, (str, os.PathLike)) else list(image_dir)
    notes, records = _Notes(), []
    for image in data["images"]:
        records.append(_coco_record(annotation_file, image, coco.imgToAnns.get(image["id"], []),
                                    label_of, dirs, notes if check_boxes else None))
    dropped = sum(r.pop("dropped") for r in records)
    notes.warn(annotation_file)
    return class_names, records, dropped


# Your own data: Pascal VOC folders ────────────────────────────────────────────────────────────
# Corners: LabelImg, CVAT (datumaro), Label Studio and makesense.ai all write the corners of the
# box as drawn on the image, in pixels from its top-left edge: xmin = x, xmax = x + width (read
# from their exporters; LabelImg raises a 0 to 1). So x1 = xmin, x2 = xmax here, as torchvision's
# VOCDetection and mmdetection read them. The original VOC devkit's 1-based inclusive corners
# (which detectron2 shifts by 1) give boxes half a pixel to a pixel larger at the left and top.


def _voc_dirs(root: str) -> Tuple[str, List[str]]:
    """(folder of the .xml files, folders the images may be in) of a VOC folder: ``Annotations/``
    or ``root`` itself (LabelImg's XML beside the images, makesense.ai's flat .zip)."""
    xml_dir = os.path.join(root, "Annotations")
    xml_dir = xml_dir if os.path.isdir(xml_dir) else root
    return xml_dir, [os.path.join(root, "JPEGImages"), os.path.join(root, "images"), xml_dir, root]


def voc_splits(root: str) -> dict:
    """Split name -> ``ImageSets/Main/{name}.txt`` of a VOC folder; the per-class lists that VOC
    and CVAT write beside them (``{class}_{split}.txt``) are left out."""
    files = {os.path.splitext(os.path.basename(p))[0]: p
             for p in sorted(glob.glob(os.path.join(root, "ImageSets", "Main", "*.txt")))}
    return {name: path for name, path in files.items()
            if not any(name.endswith("_" + other) for other in files if other != name)}


def pick_split(found: dict, split: Optional[str], where: str, what: str) -> Tuple[str, str]:
    """``(name, path)`` of ``split`` among ``found`` (name -> path); ``split`` ``None`` takes the
    only one. Errors list the names to choose from."""
    names = sorted(found)
    if split is None and len(names) == 1:
        return names[0], found[names[0]]
    if split is None:
        raise ValueError(f"{where} holds {len(names)} {what}: {names}. Ask for one by name: "
                         "folder_dataset(folder, split=NAME), or train.py --split NAME")
    if split not in found:
        raise FileNotFoundError(f"split {split!r} is not in {where} ({what}: {names}): ask for "
                                "one of those")
    return split, found[split]


def _voc_ids(root: str, split: Optional[str]) -> List[str]:
    """The image ids of ``split`` (see :func:`pick_split`) when the folder has split files, else
    (``split`` ``None``) every .xml's."""
    splits = voc_splits(root)
    if splits:
        _, path = pick_split(splits, split, f"the VOC folder {root}", "split files in ImageSets/Main")
        with open(path) as f:
            return [line.split()[0] for line in f if line.strip()]
    if split is not None:
        raise FileNotFoundError(f"split {split!r} is not in {root}: it has no ImageSets/Main/*.txt "
                                "split files, so every .xml is read: leave the split out")
    xml_dir, _ = _voc_dirs(root)
    xmls = sorted(glob.glob(os.path.join(xml_dir, "*.xml")))
    if not xmls:
        raise FileNotFoundError(f"no Annotations/*.xml in {root}: a Pascal VOC folder holds "
                                "Annotations/ (one .xml per image) and the images")
    return [os.path.splitext(os.path.basename(p))[0] for p in xmls]


def _voc_object(path: str, number: int, obj, size, notes: _Notes):
    """``(name, [x1, y1, x2, y2], difficult)`` of one ``<object>`` (corners: see above); a
    ``<difficult>`` that is no number (makesense.ai writes ``Unspecified``) counts as 0."""
    name = (obj.findtext("name") or "").strip()
    where = f"{path}: object {number}" + (f" ({name})" if name else "")
    box = obj.find("bndbox")
    if not name or box is None:
        raise _bad_file(where, "has no <name> or no <bndbox>", "Every <object> needs both")
    fix = "<bndbox> holds <xmin>, <ymin>, <xmax>, <ymax> in pixels"
    corners = []
    for key in ("xmin", "ymin", "xmax", "ymax"):
        text = box.findtext(key)
        if text is None:
            tags = [child.tag for child in box]
            raise _bad_file(where, f"has no <{key}> in <bndbox>{_misspelt(key, tags)}; it has "
                            f"{tags}", fix)
        corners.append(_number(text.strip(), f"{where} <{key}>", fix))
    corners = _fitted_box(corners, size, where, f"bndbox {corners}", notes)
    difficult = (obj.findtext("difficult") or "0").strip().lower() in ("1", "1.0", "true", "yes")
    return name, corners, int(difficult)


def _read_voc_xml(root: str, image_id: str, xml_dir: str, dirs: List[str], notes: _Notes
                  ) -> dict:
    """One ``{image_id}.xml`` in ``xml_dir``: its image (found in ``dirs``, the folders of
    :func:`_voc_dirs`, or in the ``<folder>`` it names), the size it gives, and its objects
    (:func:`_voc_object`)."""
    import xml.etree.ElementTree as ET

    path = os.path.join(xml_dir, f"{image_id}.xml")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist, but the split lists {image_id!r}: "
                                "add the annotation or remove the id from the split file")
    try:
        tree = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise _bad_file(path, f"not valid XML ({err})", "Export the annotation again") from None
    name = (tree.findtext("filename") or "").strip() or image_id
    folder = (tree.findtext("folder") or "").strip()
    image = find_image(dirs + ([os.path.join(root, folder)] if folder else []), name)
    if image is None:
        raise FileNotFoundError(f"{path}: its image {name!r} is in none of {dirs}. Put the image "
                                "in JPEGImages/ or images/, or fix <filename>")
    given = _given_size(tree.findtext("size/width"), tree.findtext("size/height"), f"{path} <size>")
    size = _checked_size(image, given, path, notes)
    objects = [_voc_object(path, number, obj, size, notes)
               for number, obj in enumerate(tree.findall("object"))]
    return {"image": image, "objects": objects, "size": given}


def read_voc_folder(root: str, split: Optional[str] = None,
                    class_names: Optional[Sequence[str]] = None) -> Tuple[List[str], List[dict]]:
    """``(class_names, records)`` of a Pascal VOC folder's ``split`` (:func:`_voc_ids`).

    ``class_names`` default: ``["__background__", *the object names found, sorted]``. Records are
    those of :func:`read_coco_file`, numbered 0.. in the split's order; ``difficult`` objects get
    ``iscrowd = 1`` (dropped in training, ignored in scoring, as VOC's own evaluation does).
    Corners are read as the tools write them (see the note above :func:`_voc_dirs`); boxes
    overshooting by rounding are clipped. Degenerate boxes are left to the sample (which drops them).
    """
    ids = _voc_ids(root, split)
    notes = _Notes()
    xml_dir, dirs = _voc_dirs(root)
    parsed = [_read_voc_xml(root, i, xml_dir, dirs, notes) for i in ids]
    notes.warn(os.path.join(xml_dir, "*.xml"))
    if class_names is None:
        class_names = ["__background__",
                       *sorted({name for p in parsed for name, _, _ in p["objects"]})]
    class_names = list(class_names)
    records = []
    for number, (image_id, p) in enumerate(zip(ids, parsed)):
        for name, _, _ in p["objects"]:
            if name not in class_names[1:]:
                raise ValueError(f"{os.path.join(xml_dir, image_id + '.xml')}: "
                                 f"object name {name!r} is not among class_names "
                                 f"{class_names[1:]}: add it, or leave class_names=None")
        boxes = np.array([b for _, b, _ in p["objects"]], dtype=np.float64).reshape(-1, 4)
        records.append({"image": p["image"], "image_id": number, "boxes": boxes,
                        "labels": np.array([class_names.index(n) for n, _, _ in p["objects"]],
                                           dtype=np.int64),
                        "area": None, "size": p["size"],
                        "iscrowd": np.array([d for _, _, d in p["objects"]], dtype=np.int64)})
    return class_names, records


# Your own data: which layout an export folder has ─────────────────────────────────────────────

_COCO_LAYOUTS = ((r"^annotations/instances_\w+2017\.json$", "the official COCO layout"),
                 (r"^annotations/instances_[^/]+\.json$", "CVAT's COCO 1.0 layout"),
                 (r"/_annotations\.coco\.json$", "Roboflow's COCO layout"),
                 (r"^result\.json$", "Label Studio's COCO layout"),
                 (r"^labels_[^/]+\.json$", "makesense.ai's COCO file"))


def coco_files(folder: str) -> dict:
    """Split name -> COCO-format .json of an export folder: ``annotations/instances_{name}.json``
    (the official layout, CVAT; other ``annotations/*.json`` only when there is none of those),
    ``{name}.json`` at the top (Label Studio's ``result``, makesense.ai's ``labels_...``), and
    the .json of a split's folder ``{name}/`` (Roboflow's ``train/_annotations.coco.json``)."""
    found = {}
    listed = sorted(glob.glob(os.path.join(folder, "annotations", "*.json")))
    for path in [p for p in listed if os.path.basename(p).startswith("instances_")] or listed:
        found[os.path.splitext(os.path.basename(path))[0].removeprefix("instances_")] = path
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        found.setdefault(os.path.splitext(os.path.basename(path))[0], path)
    for sub in sorted(e.name for e in os.scandir(folder) if e.is_dir() and e.name != "annotations"):
        inner = sorted(glob.glob(os.path.join(folder, sub, "*.json")))
        for path in inner:
            stem = os.path.splitext(os.path.basename(path))[0]
            found.setdefault(sub if len(inner) == 1 else f"{sub}/{stem}", path)
    return found


def find_export(folder: str, split: Optional[str] = None) -> dict:
    """What a labelling tool's export ``folder`` (unzipped) holds: ``{"format": "voc", "root",
    "split"}`` when it has ``Annotations/``, else ``{"format": "coco", "file", "split",
    "image_dirs"}`` for its COCO-format files (:func:`coco_files`), else VOC again for .xml files
    at its top. ``split`` picks one of several (:func:`pick_split`); ``image_dirs`` are where a
    ``file_name`` is looked for: ``images/{split}/``, ``images/``, the file's folder (and its
    ``images/``), ``{split}/``, then the export's top."""
    if not os.path.isdir(folder):
        what = ("does not exist" if not os.path.exists(folder) else "is a file, not a folder" +
                (": unzip it" if folder.endswith(".zip") else ""))
        raise FileNotFoundError(f"{folder} {what}: give the folder your labelling tool exported, "
                                "unzipped (see README, 'Fine-tune on your own data')")
    voc = {"format": "voc", "root": folder, "split": split}
    if os.path.isdir(os.path.join(folder, "Annotations")):
        splits = voc_splits(folder)
        return {**voc, "split": pick_split(splits, split, folder, "VOC split files")[0]
                if splits else split}
    files = coco_files(folder)
    if files:
        name, path = pick_split(files, split, folder, "COCO-format annotation files")
        here, short = os.path.dirname(path), name.split("/")[0]
        dirs = [os.path.join(folder, "images", short), os.path.join(folder, "images"), here,
                os.path.join(here, "images"), os.path.join(folder, short), folder]
        return {"format": "coco", "file": path, "split": name,
                "image_dirs": list(dict.fromkeys(os.path.normpath(d) for d in dirs))}
    if glob.glob(os.path.join(folder, "*.xml")):
        return voc
    raise FileNotFoundError(f"{folder} holds no annotations: no COCO-format .json (at its top, in "
                            "annotations/ or in a split's folder) and no Pascal VOC .xml (in "
                            "Annotations/ or at its top). Export the labels in COCO or Pascal VOC "
                            "format and unzip the export there")


def export_line(folder: str, export: dict, records: List[dict]) -> str:
    """One line: the layout :func:`find_export` found in ``folder`` and the files taken."""
    images = (os.path.relpath(os.path.dirname(records[0]["image"]), folder) + "/"
              if records else "none")
    if export["format"] == "coco":
        file = os.path.relpath(export["file"], folder).replace(os.sep, "/")
        layout = next((text for pattern, text in _COCO_LAYOUTS if re.search(pattern, file)),
                      "COCO format")
        return f"{folder}: {layout}, {file}, images in {images} ({len(records)} images)"
    xml_dir = os.path.relpath(_voc_dirs(folder)[0], folder) + "/"
    split = (f"split ImageSets/Main/{export['split']}.txt" if export["split"] else
             "every .xml, no split files")
    return (f"{folder}: Pascal VOC, annotations in {xml_dir} ({split}), images in {images} "
            f"({len(records)} images)")
