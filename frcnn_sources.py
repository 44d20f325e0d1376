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

import glob
import io
import json
import os
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

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


def _open_image(record: dict) -> dict:
    """A COCO-layout record with its image file opened (decoded later, only if kept)."""
    return {**record, "image": Image.open(record["image"])}


class _HubRecords:
    """Turns a row of the hub's schema into a record: image (PIL), image_id, boxes x1 y1 x2 y2,
    labels 1..80 (``label_of`` maps the row's ClassLabel indices), the annotation area."""

    def __init__(self, label_of: List[int]):
        self.label_of = label_of

    def __call__(self, row: dict) -> dict:
        image, objects = row["image"], row["objects"]
        if isinstance(image, dict):  # undecoded {"bytes", "path"}
            image = Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"])
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


# Your own data: COCO-format and Pascal VOC folders ─────────────────────────────────────────────


def _bad_file(path: str, what: str, fix: str) -> ValueError:
    return ValueError(f"{path}: {what}. {fix}")


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
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _bad_file(path, f"not valid JSON ({err})", "Export it again in COCO format") from None
    missing = [k for k in ("images", "annotations", "categories")
               if not isinstance(data, dict) or not isinstance(data.get(k), list)]
    if missing:
        raise _bad_file(path, f"not in COCO's format: no list {missing} at the top level",
                        "A COCO detection file is {\"images\": [...], \"annotations\": [...], "
                        "\"categories\": [...]}; export it in that format")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _image_size(record: dict, path: str) -> Tuple[int, int]:
    """(width, height) of an image record, read from the file's header when the record has none."""
    if "width" in record and "height" in record:
        return int(record["width"]), int(record["height"])
    with Image.open(path) as image:
        return image.size


def read_coco_file(image_dir: str, annotation_file: str, check_boxes: bool = True
                   ) -> Tuple[List[str], List[dict], int]:
    """``(class_names, records, dropped)`` of a COCO-format annotation file over ``image_dir``.

    ``class_names`` is ``["__background__", *category names in id order]``; a category's label is
    its position there, so sparse ids (1, 5, 17) become labels 1, 2, 3. One record per image (in
    the file's order, images without annotations included), as :func:`open_source`'s records:
    the image's path, ``boxes`` [G, 4] x1, y1, x2, y2 (from COCO's ``[x, y, w, h]``), ``labels``,
    ``area``, ``iscrowd``. ``dropped`` counts boxes of zero or negative width or height, left out.
    Raises an error naming the file, the record and the fix for a missing image, an unknown
    category or image id, or (``check_boxes``) a box outside its image by more than 1 px.
    """
    coco = _load_coco_json(annotation_file)
    if not coco.dataset["images"]:
        raise _bad_file(annotation_file, "lists no images", "A COCO-format file needs 'images', "
                        "'annotations' and 'categories'; export it with its images")
    stray = [a for a in coco.dataset["annotations"] if a.get("image_id") not in coco.imgs]
    if stray:
        raise _bad_file(annotation_file, f"annotation {stray[0].get('id')} refers to image_id "
                        f"{stray[0].get('image_id')}, which is not in the file's images",
                        "Add the image or remove the annotation")
    categories = sorted(coco.dataset["categories"], key=lambda c: c["id"])
    class_names = ["__background__", *(str(c["name"]) for c in categories)]
    label_of = {c["id"]: i + 1 for i, c in enumerate(categories)}
    records, dropped = [], 0
    for image in coco.dataset["images"]:
        path = os.path.join(image_dir, image["file_name"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{annotation_file}: image {image['id']} is file_name "
                                    f"{image['file_name']!r}, but {path} does not exist. Pass the "
                                    "folder holding the images as image_dir, or fix file_name")
        width, height = _image_size(image, path) if check_boxes else (0, 0)
        rows = []
        for ann in coco.imgToAnns.get(image["id"], []):
            if ann["category_id"] not in label_of:
                raise _bad_file(annotation_file, f"annotation {ann.get('id')} has category_id "
                                f"{ann['category_id']}, which is not among the file's categories (ids "
                                f"{sorted(label_of)})", "Add that category or fix the id")
            x, y, w, h = (float(v) for v in ann["bbox"])
            if w <= 0 or h <= 0:
                dropped += 1
                continue
            if check_boxes and (x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1):
                raise _bad_file(annotation_file, f"annotation {ann.get('id')} has bbox "
                                f"{ann['bbox']} ([x, y, w, h]) outside its image {image['id']} "
                                f"({width} x {height} px)", "Boxes are [x, y, width, height] in "
                                "pixels: fix the box, or the image's width and height")
            rows.append((x, y, x + w, y + h, label_of[ann["category_id"]],
                         float(ann.get("area", w * h)), int(ann.get("iscrowd", 0))))
        table = np.array(rows, dtype=np.float64).reshape(-1, 7)
        records.append({"image": path, "image_id": image["id"], "boxes": table[:, :4],
                        "labels": table[:, 4].astype(np.int64), "area": table[:, 5],
                        "iscrowd": table[:, 6].astype(np.int64)})
    return class_names, records, dropped


def _voc_ids(root: str, split: str) -> List[str]:
    """The image ids of ``split``: ``ImageSets/Main/{split}.txt`` when the folder has split files,
    else every ``Annotations/*.xml``."""
    split_dir = os.path.join(root, "ImageSets", "Main")
    split_file = os.path.join(split_dir, f"{split}.txt")
    if os.path.isfile(split_file):
        with open(split_file) as f:
            return [line.split()[0] for line in f if line.strip()]
    found = sorted(glob.glob(os.path.join(split_dir, "*.txt")))
    if found:
        raise FileNotFoundError(f"{split_file} does not exist: split {split!r} is not in this VOC "
                                f"folder (split files: {[os.path.basename(p) for p in found]})")
    xmls = sorted(glob.glob(os.path.join(root, "Annotations", "*.xml")))
    if not xmls:
        raise FileNotFoundError(f"no Annotations/*.xml in {root}: a Pascal VOC folder holds "
                                "Annotations/ (one .xml per image) and JPEGImages/")
    return [os.path.splitext(os.path.basename(p))[0] for p in xmls]


def _read_voc_xml(root: str, image_id: str) -> dict:
    """One ``Annotations/{image_id}.xml``: image path, size, and its objects as
    ``(name, [x1, y1, x2, y2], difficult)``. VOC's 1-based inclusive pixel corners become edges:
    ``x1 = xmin - 1``, ``x2 = xmax``."""
    import xml.etree.ElementTree as ET

    path = os.path.join(root, "Annotations", f"{image_id}.xml")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist, but the split lists {image_id!r}: "
                                "add the annotation or remove the id from the split file")
    try:
        tree = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise _bad_file(path, f"not valid XML ({err})", "Export the annotation again") from None
    name = tree.findtext("filename") or f"{image_id}.jpg"
    image = os.path.join(root, "JPEGImages", name)
    if not os.path.isfile(image):
        raise FileNotFoundError(f"{path}: its image {image} does not exist. Put the image in "
                                "JPEGImages/ or fix <filename>")
    size = tree.find("size")
    if size is not None and size.findtext("width"):
        width, height = int(size.findtext("width")), int(size.findtext("height"))
    else:
        width, height = _image_size({}, image)
    objects = []
    for number, obj in enumerate(tree.findall("object")):
        box = obj.find("bndbox")
        if box is None or obj.findtext("name") is None:
            raise _bad_file(path, f"object {number} has no <name> or <bndbox>",
                            "Every <object> needs both")
        x1, y1, x2, y2 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        if x1 < 0 or y1 < 0 or x2 > width + 1 or y2 > height + 1:
            raise _bad_file(path, f"object {number} ({obj.findtext('name')}) has bndbox "
                            f"{[x1, y1, x2, y2]} outside its {width} x {height} px image",
                            "Fix the box or the <size>")
        difficult = int(float(obj.findtext("difficult") or 0))
        objects.append((obj.findtext("name").strip(), [x1 - 1, y1 - 1, x2, y2], difficult))
    return {"image": image, "objects": objects}


def read_voc_folder(root: str, split: str = "train", class_names: Optional[Sequence[str]] = None
                    ) -> Tuple[List[str], List[dict]]:
    """``(class_names, records)`` of a Pascal VOC folder's ``split``.

    ``class_names`` default: ``["__background__", *the object names found, sorted]``. Records are
    those of :func:`read_coco_file`, numbered 0.. in the split's order; ``difficult`` objects get
    ``iscrowd = 1`` (dropped in training, ignored in scoring, as VOC's own evaluation does).
    Degenerate boxes are left to the sample (which drops them).
    """
    ids = _voc_ids(root, split)
    parsed = [_read_voc_xml(root, i) for i in ids]
    if class_names is None:
        class_names = ["__background__",
                       *sorted({name for p in parsed for name, _, _ in p["objects"]})]
    class_names = list(class_names)
    records = []
    for number, (image_id, p) in enumerate(zip(ids, parsed)):
        for name, _, _ in p["objects"]:
            if name not in class_names[1:]:
                raise ValueError(f"{os.path.join(root, 'Annotations', image_id + '.xml')}: "
                                 f"object name {name!r} is not among class_names "
                                 f"{class_names[1:]}: add it, or leave class_names=None")
        boxes = np.array([b for _, b, _ in p["objects"]], dtype=np.float64).reshape(-1, 4)
        records.append({"image": p["image"], "image_id": number, "boxes": boxes,
                        "labels": np.array([class_names.index(n) for n, _, _ in p["objects"]],
                                           dtype=np.int64),
                        "area": None,
                        "iscrowd": np.array([d for _, _, d in p["objects"]], dtype=np.int64)})
    return class_names, records
