"""Shared pytest fixtures."""

import json
import os

import pytest
from PIL import Image, ImageDraw

from frcnn_common import COCO_CATEGORY_IDS, COCO_NAMES

# ─── data and evaluation fixtures: small COCO-like scenes made here, no network ─────────────────
# Each scene: an image id, (width, height), a PIL mode, and objects (hub category 0..79, box
# x1, y1, x2, y2 in pixels, RGB colour) painted as filled rectangles on a dark background, so a
# box "sits on its object" exactly when its inside is painted and its outside is background.
BACKGROUND = (30, 30, 30)
SCENES = [
    {"image_id": 101, "size": (160, 96), "mode": "RGB", "objects": [
        (0, [10, 12, 50, 80], (230, 60, 60)), (16, [80, 20, 150, 60], (60, 200, 80))]},
    {"image_id": 102, "size": (96, 128), "mode": "L", "objects": [
        (79, [20, 30, 70, 100], (200, 200, 200))]},
    {"image_id": 103, "size": (120, 120), "mode": "P", "objects": [
        (2, [8, 8, 40, 40], (70, 90, 230)), (41, [60, 50, 110, 112], (240, 220, 40))]},
    {"image_id": 104, "size": (100, 80), "mode": "CMYK", "objects": [
        (56, [30, 10, 90, 70], (250, 120, 20))]},
    {"image_id": 105, "size": (64, 64), "mode": "RGB", "objects": []},
    # a zero-width box (dropped) and a box running off the right edge (clipped to 140)
    {"image_id": 106, "size": (140, 90), "mode": "RGB", "objects": [
        (15, [30, 20, 30, 60], (255, 255, 255)), (17, [100, 40, 160, 85], (90, 220, 220))]},
]


def draw_scene(scene) -> Image.Image:
    """The scene's image, in its PIL mode."""
    image = Image.new("RGB", scene["size"], BACKGROUND)
    draw = ImageDraw.Draw(image)
    for _, (x1, y1, x2, y2), colour in scene["objects"]:
        if x2 > x1 and y2 > y1:
            draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=colour)  # covers pixels x1..x2-1
    if scene["mode"] == "P":
        return image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return image.convert(scene["mode"])


def expected_objects(scene):
    """(boxes clipped to the image with degenerate ones dropped, labels 1..80) of a scene."""
    width, height = scene["size"]
    boxes, labels = [], []
    for category, (x1, y1, x2, y2), _ in scene["objects"]:
        box = [min(max(x1, 0), width), min(max(y1, 0), height),
               min(max(x2, 0), width), min(max(y2, 0), height)]
        if box[2] > box[0] and box[3] > box[1]:
            boxes.append(box)
            labels.append(category + 1)
    return boxes, labels


def make_hub_dataset(scenes=SCENES, names=None):
    """A ``datasets.Dataset`` with the features of the hub's ``detection-datasets/coco``.

    ``names`` (default the 80 COCO names in the hub's order) is the ClassLabel of
    ``objects.category``; the scenes' categories index it, as on the hub.
    """
    import datasets

    names = list(COCO_NAMES[1:]) if names is None else names
    features = datasets.Features({
        "image_id": datasets.Value("int64"),
        "image": datasets.Image(),
        "width": datasets.Value("int64"),
        "height": datasets.Value("int64"),
        "objects": datasets.Sequence({
            "bbox_id": datasets.Value("int64"),
            "category": datasets.ClassLabel(names=names),
            "bbox": datasets.Sequence(datasets.Value("float64"), length=4),
            "area": datasets.Value("int64"),
        }),
    })
    rows = {"image_id": [], "image": [], "width": [], "height": [], "objects": []}
    for scene in scenes:
        objects = scene["objects"]
        rows["image_id"].append(scene["image_id"])
        rows["image"].append(draw_scene(scene))
        rows["width"].append(scene["size"][0])
        rows["height"].append(scene["size"][1])
        rows["objects"].append({
            "bbox_id": [scene["image_id"] * 10 + i for i in range(len(objects))],
            "category": [names.index(COCO_NAMES[c + 1]) for c, _, _ in objects],
            "bbox": [[float(v) for v in box] for _, box, _ in objects],
            "area": [(b[2] - b[0]) * (b[3] - b[1]) for _, b, _ in objects],
        })
    return datasets.Dataset.from_dict(rows, features=features)


def write_coco_layout(root, scenes=SCENES, split="val"):
    """The scenes in the official COCO layout: ``annotations/instances_{split}2017.json`` with
    boxes ``[x, y, w, h]`` and sparse category ids, images under ``{split}2017/``."""
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    os.makedirs(os.path.join(root, f"{split}2017"), exist_ok=True)
    images, annotations = [], []
    for scene in scenes:
        name = f"{scene['image_id']:012d}." + ("tif" if scene["mode"] == "CMYK" else "png")
        draw_scene(scene).save(os.path.join(root, f"{split}2017", name))
        width, height = scene["size"]
        images.append({"id": scene["image_id"], "file_name": name, "width": width,
                       "height": height})
        for category, (x1, y1, x2, y2), _ in scene["objects"]:
            annotations.append({
                "id": len(annotations) + 1, "image_id": scene["image_id"],
                "category_id": COCO_CATEGORY_IDS[category], "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    categories = [{"id": cid, "name": COCO_NAMES[i + 1], "supercategory": "thing"}
                  for i, cid in enumerate(COCO_CATEGORY_IDS)]
    with open(os.path.join(root, "annotations", f"instances_{split}2017.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return root


# ─── hangs: caught by a limit only a hang reaches, never by a speed ─────────────────────────────
HANG_LIMIT_S = 600
"""Seconds after which a call that should end counts as hung (an offline download that retries,
a silent server, a stuck child process). Ten minutes: no working call comes near it, however
busy the machine; speed is measured by ``make bench``, not asserted by the tests."""


@pytest.fixture(scope="session")
def hang_limit_s():
    return HANG_LIMIT_S


@pytest.fixture(scope="session")
def no_hang():
    """``no_hang(fn, *args, **kwargs)``: ``fn``'s result (or its exception, raised again), run in a
    daemon thread; the test fails if ``fn`` has not ended after ``HANG_LIMIT_S``."""
    import threading

    def call(fn, *args, **kwargs):
        outcome = {}

        def run():
            try:
                outcome["value"] = fn(*args, **kwargs)
            except BaseException as err:  # noqa: BLE001 - handed to the test's thread
                outcome["error"] = err

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(HANG_LIMIT_S)
        if thread.is_alive():
            pytest.fail(f"{getattr(fn, '__name__', fn)} hung: no end after {HANG_LIMIT_S} s")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    return call


@pytest.fixture(scope="session")
def gen():
    """``gen(seed)``: a fresh ``torch.Generator`` seeded with ``seed``, one per random input."""
    import torch

    return lambda seed: torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def cpu():
    """The device the tests train and run on."""
    import torch

    return torch.device("cpu")


@pytest.fixture(scope="session")
def resnet50_state():
    """Random ResNet-50 weights as a state dict (``detectors.random_resnet50_state``, seed 0):
    given as ``weights``, they count as pretrained (so stages can be frozen) without a download."""
    from detectors import random_resnet50_state

    return random_resnet50_state(0)


@pytest.fixture
def empty_target():
    """The target of an image without objects: no boxes, no labels."""
    import torch

    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}


@pytest.fixture
def one_thread():
    """The test runs on one torch CPU thread (``cpu_threads(1)``); the count is restored after."""
    from frcnn_common import cpu_threads

    with cpu_threads(1):
        yield


@pytest.fixture
def simulated_coco(tmp_path, stand_in_torch_home):
    """Full mode's world without a network: a COCO folder in the official layout (``train`` and
    ``val`` of the scenes above) and a torch hub cache (``torch_home``, for ``TORCH_HOME``) holding
    random weights under the file names torchvision caches its ImageNet and COCO weights by
    (:func:`stand_in_torch_home`), so they load without a download."""
    from types import SimpleNamespace

    coco = str(tmp_path / "coco")
    write_coco_layout(coco, split="train")
    write_coco_layout(coco, split="val")
    return SimpleNamespace(torch_home=stand_in_torch_home, coco=coco)


@pytest.fixture
def hub_dataset():
    return make_hub_dataset()


@pytest.fixture
def coco_dir(tmp_path):
    return write_coco_layout(str(tmp_path / "coco"))


@pytest.fixture
def coco_kit():
    """The scene helpers above, for tests that build their own variants."""
    from types import SimpleNamespace

    return SimpleNamespace(SCENES=SCENES, BACKGROUND=BACKGROUND, draw_scene=draw_scene,
                           expected_objects=expected_objects, make_hub_dataset=make_hub_dataset,
                           write_coco_layout=write_coco_layout)


@pytest.fixture(scope="module")
def pair():
    """Our ResNet-50 + FPN detector and torchvision's twin with the same random weights, both in
    eval mode (see ``detectors.detector_pair``). Shared by a test module: a test that switches
    the mode switches it back."""
    from detectors import detector_pair

    return detector_pair()


# ─── your own data: COCO-format and VOC folders of drawn shapes, with names COCO does not have ──
OWN_NAMES = {1: "disc", 2: "block", 3: "wedge"}  # SyntheticShapesDataset's circle, square, triangle
OWN_IDS = {1: 10, 2: 3, 3: 7}  # sparse, unordered category ids of the COCO-format file


def own_scenes(count: int = 6):
    """``count`` drawn images (uint8 [3, 64, 64]) with boxes [G, 4] and shape labels 1..3."""
    from frcnn_common import SyntheticShapesDataset

    shapes = SyntheticShapesDataset(count, image_size=64, seed=1, texture=0.0, objects=(1, 3),
                                    object_size=(0.25, 0.45))
    return [shapes.render(i) for i in range(count)]


@pytest.fixture
def own_kit():
    """The helpers above: ``NAMES`` (label -> name) and ``scenes(count)``, the drawn images."""
    from types import SimpleNamespace

    return SimpleNamespace(NAMES=OWN_NAMES, IDS=OWN_IDS, scenes=own_scenes)


def _save(pixels, path: str) -> None:
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(path, quality=95)  # JPEG: near exact


@pytest.fixture(scope="session")
def own_coco_folder(tmp_path_factory):
    """A COCO-format folder (``train.json``, ``images/``): 6 drawn images and one without
    objects, category ids 10, 3, 7, a crowd box and a zero-width box on the last image."""
    root = tmp_path_factory.mktemp("own_coco")
    os.makedirs(root / "images")
    images, annotations = [], []
    import torch

    empty = (torch.full((3, 64, 64), 128, dtype=torch.uint8), torch.zeros(0, 4), torch.zeros(0))
    for index, (pixels, boxes, labels) in enumerate(own_scenes() + [empty]):
        name = f"{index}.png"
        _save(pixels, str(root / "images" / name))
        images.append({"id": 100 + index, "file_name": name, "width": 64, "height": 64})
        for box, label in zip(boxes.tolist(), labels.tolist()):
            x1, y1, x2, y2 = box
            annotations.append({"id": len(annotations) + 1, "image_id": 100 + index,
                                "category_id": OWN_IDS[label], "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    annotations += [{"id": 900, "image_id": 105, "category_id": 3, "bbox": [0, 0, 8, 8],
                     "area": 64, "iscrowd": 1},
                    {"id": 901, "image_id": 105, "category_id": 3, "bbox": [4, 4, 0, 9]}]
    categories = [{"id": OWN_IDS[k], "name": OWN_NAMES[k]} for k in (1, 2, 3)]
    with open(root / "train.json", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return root


@pytest.fixture(scope="session")
def own_voc_folder(tmp_path_factory):
    """A Pascal VOC folder of the same 6 drawn images (PNG files), split ``train`` listing 5 of
    them, the first object of image 0 marked difficult."""
    root = tmp_path_factory.mktemp("own_voc")
    for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
        os.makedirs(root / sub)
    for index, (pixels, boxes, labels) in enumerate(own_scenes()):
        _save(pixels, str(root / "JPEGImages" / f"img{index}.png"))
        objects = "".join(
            f"<object><name>{OWN_NAMES[label]}</name><difficult>{int(index == 0 and k == 0)}"
            f"</difficult><bndbox><xmin>{x1:g}</xmin><ymin>{y1:g}</ymin><xmax>{x2:g}"
            f"</xmax><ymax>{y2:g}</ymax></bndbox></object>"
            for k, ((x1, y1, x2, y2), label) in enumerate(zip(boxes.tolist(), labels.tolist())))
        (root / "Annotations" / f"img{index}.xml").write_text(
            f"<annotation><filename>img{index}.png</filename><size><width>64</width>"
            f"<height>64</height><depth>3</depth></size>{objects}</annotation>")
    (root / "ImageSets" / "Main" / "train.txt").write_text("".join(f"img{i}\n" for i in range(5)))
    return root


# ─── your own data as labelling tools export it: one writer per tool, from their exporters ──────
# Each writes own_scenes() (6 drawn 64 x 64 images, classes block, disc, wedge) as the tool's
# export, unzipped. Corners as the tools write them: x, y from the image's top-left edge, xmax =
# x + width (CVAT/datumaro, Label Studio's converter, makesense.ai; LabelImg raises 0 to 1).
TOOL_NAMES = ["block", "disc", "wedge"]  # the labels in the tools' order (as they were created)
TOOL_EXPORTS = {  # tool layout -> (the split to ask for, or None; what the one line names)
    "cvat_coco": (None, "CVAT's COCO 1.0 layout, annotations/instances_default.json"),
    "cvat_voc": (None, "Pascal VOC, annotations in Annotations/ (split ImageSets/Main/default.txt)"),
    "labelstudio_coco": (None, "Label Studio's COCO layout, result.json"),
    "labelstudio_voc": (None, "Pascal VOC, annotations in Annotations/ (every .xml"),
    "roboflow_coco": ("train", "Roboflow's COCO layout, train/_annotations.coco.json"),
    "labelimg_voc": (None, "Pascal VOC, annotations in ./ (every .xml"),
    "makesense_coco": (None, "makesense.ai's COCO file, labels_my-shapes_20240102030405.json"),
    "makesense_voc": (None, "Pascal VOC, annotations in ./ (every .xml"),
}


def tool_objects(tool: str, boxes, labels):
    """(boxes as the tool writes them, x1 y1 x2 y2; class names) of one drawn image."""
    rows = [[float(v) for v in box] for box in boxes.tolist()]
    if tool == "labelimg_voc":  # LabelImg's convertPoints2BndBox raises a 0 corner to 1
        rows = [[max(x1, 1.0), max(y1, 1.0), x2, y2] for x1, y1, x2, y2 in rows]
    return rows, [OWN_NAMES[label] for label in labels.tolist()]


def _write_json(path, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def _coco_export(tool, root, json_path, image_dir, prefix, first_id, scenes, categories):
    """A COCO-format file of ``scenes`` (index, pixels, boxes, labels), images written to
    ``image_dir`` and named ``prefix + file`` in the file; category ids from ``categories``."""
    os.makedirs(image_dir, exist_ok=True)
    ids = {c["name"]: c["id"] for c in categories}
    images, annotations = [], []
    for index, pixels, boxes, labels in scenes:
        name = {"labelstudio_coco": f"8f3a{index}c-photo{index}.jpg",
                "roboflow_coco": f"photo{index}_jpg.rf.5e1d{index}.jpg"}.get(tool, f"IMG_{index}.jpg")
        _save(pixels, os.path.join(image_dir, name))
        images.append({"id": first_id + index, "file_name": prefix + name, "width": 64,
                       "height": 64})
        for (x1, y1, x2, y2), label in zip(*tool_objects(tool, boxes, labels)):
            annotations.append({"id": len(annotations) + first_id, "image_id": first_id + index,
                                "category_id": ids[label], "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": (x2 - x1) * (y2 - y1), "segmentation": [], "iscrowd": 0})
    _write_json(json_path, {"info": {"contributor": tool}, "images": images,
                            "annotations": annotations, "categories": categories})


def _voc_xml(tool, folder, filename, boxes, labels) -> str:
    """One Pascal VOC .xml as ``tool`` writes it (makesense.ai: ``Unspecified`` flags)."""
    flag = "Unspecified" if tool == "makesense_voc" else "0"
    objects = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>{flag}</truncated>"
        f"<difficult>{flag}</difficult><bndbox><xmin>{x1:g}</xmin><ymin>{y1:g}</ymin>"
        f"<xmax>{x2:g}</xmax><ymax>{y2:g}</ymax></bndbox></object>"
        for (x1, y1, x2, y2), name in zip(*tool_objects(tool, boxes, labels)))
    return (f"<annotation><folder>{folder}</folder><filename>{filename}</filename>"
            f"<path>/home/someone/{folder}/{filename}</path><source><database>Unknown</database>"
            f"</source><size><width>64</width><height>64</height><depth>3</depth></size>"
            f"<segmented>0</segmented>{objects}</annotation>")


def _voc_export(tool, root, scenes) -> None:
    """CVAT (Annotations/, JPEGImages/, ImageSets/Main/default.txt and per-class lists,
    labelmap.txt), Label Studio (Annotations/, images/, <filename> without extension), LabelImg
    (.xml beside the images) or makesense.ai (flat .xml, images put in images/)."""
    xml_dir, image_dir, folder = {
        "cvat_voc": ("Annotations", "JPEGImages", ""),
        "labelstudio_voc": ("Annotations", "images", "images"),
        "labelimg_voc": ("", "", os.path.basename(root)),
        "makesense_voc": ("", "images", "my-shapes")}[tool]
    os.makedirs(os.path.join(root, xml_dir, image_dir), exist_ok=True)
    os.makedirs(os.path.join(root, image_dir), exist_ok=True)
    for index, pixels, boxes, labels in scenes:
        stem = f"c0ffee{index}-photo{index}" if tool == "labelstudio_voc" else f"IMG_{index}"
        _save(pixels, os.path.join(root, image_dir, stem + ".jpg"))
        filename = stem if tool == "labelstudio_voc" else stem + ".jpg"
        with open(os.path.join(root, xml_dir, stem + ".xml"), "w") as f:
            f.write(_voc_xml(tool, folder, filename, boxes, labels))
    if tool == "cvat_voc":
        main = os.path.join(root, "ImageSets", "Main")
        os.makedirs(main)
        with open(os.path.join(main, "default.txt"), "w") as f:
            f.write("".join(f"IMG_{index}\n" for index, *_ in scenes))
        for name in TOOL_NAMES:  # datumaro's classification lists, beside the split file
            with open(os.path.join(main, f"{name}_default.txt"), "w") as f:
                f.write("".join(f"IMG_{index}  1\n" for index, *_ in scenes))
        with open(os.path.join(root, "labelmap.txt"), "w") as f:
            f.write("# label:color_rgb:parts:actions\nbackground:0,0,0::\n" +
                    "".join(f"{name}:{40 * i},0,0::\n" for i, name in enumerate(TOOL_NAMES)))


def write_tool_export(root: str, tool: str) -> str:
    """``own_scenes()`` written to ``root`` as ``tool`` (a key of TOOL_EXPORTS) exports it."""
    scenes = [(i, *scene) for i, scene in enumerate(own_scenes())]
    if tool.endswith("_voc"):
        _voc_export(tool, root, scenes)
        return root
    cats = [{"id": i + 1, "name": n, "supercategory": ""} for i, n in enumerate(TOOL_NAMES)]
    if tool == "cvat_coco":
        _coco_export(tool, root, os.path.join(root, "annotations", "instances_default.json"),
                     os.path.join(root, "images", "default"), "", 1, scenes, cats)
    elif tool == "labelstudio_coco":  # ids from 0, file_name relative to the export's top
        cats = [{"id": i, "name": n} for i, n in enumerate(TOOL_NAMES)]
        _coco_export(tool, root, os.path.join(root, "result.json"), os.path.join(root, "images"),
                     "images/", 0, scenes, cats)
    elif tool == "roboflow_coco":  # category 0: the dataset's name, the others' supercategory
        cats = [{"id": 0, "name": "shapes", "supercategory": "none"}] + [
            {"id": i + 1, "name": n, "supercategory": "shapes"} for i, n in enumerate(TOOL_NAMES)]
        for split, part in (("train", scenes), ("valid", scenes[4:])):
            _coco_export(tool, root, os.path.join(root, split, "_annotations.coco.json"),
                         os.path.join(root, split), "", 0, part, cats)
        with open(os.path.join(root, "README.roboflow.txt"), "w") as f:
            f.write("exported from roboflow.com\n")
    else:  # makesense.ai: one labels_<project>_<date>.json; the images put beside it in images/
        _coco_export(tool, root, os.path.join(root, "labels_my-shapes_20240102030405.json"),
                     os.path.join(root, "images"), "", 1, scenes, cats)
    return root


@pytest.fixture(scope="session")
def tool_exports(tmp_path_factory):
    """Tool layout -> the folder of its export (see write_tool_export), written once."""
    return {tool: write_tool_export(str(tmp_path_factory.mktemp(tool)), tool)
            for tool in TOOL_EXPORTS}


# ─── torchvision's weights, stood in for: random weights under the names torchvision caches ────


@pytest.fixture(scope="session")
def stand_in_torch_home(tmp_path_factory, resnet50_state):
    """A ``TORCH_HOME`` whose ``hub/checkpoints`` holds random weights under the file names of
    torchvision's ResNet-50 ImageNet classifier and COCO Faster R-CNN, which torchvision then
    loads without a download: set ``TORCH_HOME`` to it (the weights are not trained)."""
    import torch
    import torchvision

    home = tmp_path_factory.mktemp("torch_home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    detection = torchvision.models.detection
    coco = detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    for weights, state in ((torchvision.models.ResNet50_Weights.IMAGENET1K_V1, resnet50_state),
                           (detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1, coco)):
        torch.save(state, checkpoints / os.path.basename(weights.url))
    return str(home)


# ─── tests that run for minutes: named as they start ───────────────────────────────────────────
LONG_TESTS = {"test_every_notebook_runs_in_full_mode_on_a_simulated_coco":
              "about 3 minutes, printing nothing until it ends"}


@pytest.fixture(autouse=True)
def name_a_long_test(request):
    """``pytest -q`` (``make unit``) prints a dot after each test: one of ``LONG_TESTS`` is named
    on the terminal as it starts, so a long silence says what runs."""
    how_long = LONG_TESTS.get(getattr(request.node, "originalname", request.node.name))
    if how_long:
        capture = request.config.pluginmanager.getplugin("capturemanager")
        reporter = request.config.pluginmanager.getplugin("terminalreporter")
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\n{request.node.nodeid} starts: {how_long}")
    yield
