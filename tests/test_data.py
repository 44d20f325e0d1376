"""Data section: the COCO stream and its sources, synthetic shapes, collate (no network)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from frcnn_common import (
    COCO_NAMES, IMAGENET_MEAN, IMAGENET_STD, SHAPE_NAMES, COCOStreamDataset,
    SyntheticShapesDataset, boxes_to_original, frcnn_collate_fn,
)


def foreground(image, background):
    """Bool [H, W]: pixels of a normalised image [3, H, W] that are not the background colour."""
    rgb = (image * IMAGENET_STD + IMAGENET_MEAN) * 255
    return (rgb - torch.tensor(background, dtype=torch.float32).view(3, 1, 1)).abs().amax(0) > 40


def assert_boxes_on_objects(image, boxes, background, margin=2):
    """Inside each box (less a margin) is painted, just outside it is background."""
    fg = foreground(image, background)
    height, width = fg.shape
    for x1, y1, x2, y2 in boxes.round().long().tolist():
        inside = fg[y1 + margin:y2 - margin, x1 + margin:x2 - margin]
        assert inside.float().mean() > 0.99, (x1, y1, x2, y2)
        outside = []  # one-pixel lines just beyond each side, where they lie in the image
        if x1 - margin - 1 >= 0:
            outside.append(fg[y1 + margin:y2 - margin, x1 - margin - 1])
        if x2 + margin < width:
            outside.append(fg[y1 + margin:y2 - margin, x2 + margin])
        if y1 - margin - 1 >= 0:
            outside.append(fg[y1 - margin - 1, x1 + margin:x2 - margin])
        if y2 + margin < height:
            outside.append(fg[y2 + margin, x1 + margin:x2 - margin])
        for line in outside:
            assert line.float().mean() < 0.01, (x1, y1, x2, y2)


# ─── the hub schema ─────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("resize", ["shorter", "square", None])
@pytest.mark.parametrize("flip", [False, True])
def test_hub_schema_boxes_sit_on_objects(hub_dataset, coco_kit, resize, flip):
    data = COCOStreamDataset("val", source=hub_dataset, resize=resize, min_size=80,
                             flip_prob=1.0 if flip else 0.0)
    samples = list(data)
    assert len(samples) == len(coco_kit.SCENES)  # evaluation keeps the image without objects
    for (image, target), scene in zip(samples, coco_kit.SCENES):
        boxes, labels = coco_kit.expected_objects(scene)
        width0, height0 = scene["size"]
        height, width = image.shape[1:]
        assert int(target["image_id"]) == scene["image_id"]
        assert target["orig_size"].tolist() == [height0, width0]
        assert target["size"].tolist() == [height, width]
        assert bool(target["flipped"]) == flip
        if resize == "square":
            assert (height, width) == (80, 80)
        elif resize == "shorter":
            assert min(height, width) <= 80 and max(height, width) <= int(80 * 1333 / 800)
            assert abs(width / height - width0 / height0) < 0.03  # aspect ratio kept
        else:
            assert (height, width) == (height0, width0)
        # labels by name: hub category c is COCO_NAMES[c + 1]
        assert target["labels"].tolist() == labels
        assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
        assert_boxes_on_objects(image, target["boxes"], coco_kit.BACKGROUND)
        original = boxes_to_original(target["boxes"], target)
        expected = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        torch.testing.assert_close(original, expected, atol=1e-3, rtol=0)


def test_flip_mirrors_image_and_boxes(hub_dataset):
    plain = list(COCOStreamDataset("val", source=hub_dataset, flip_prob=0.0, min_size=80))
    flipped = list(COCOStreamDataset("val", source=hub_dataset, flip_prob=1.0, min_size=80))
    for (image, target), (image_f, target_f) in zip(plain, flipped):
        torch.testing.assert_close(image_f, image.flip(-1))
        width = image.shape[-1]
        mirrored = torch.stack([width - target["boxes"][:, 2], target["boxes"][:, 1],
                                width - target["boxes"][:, 0], target["boxes"][:, 3]], 1)
        torch.testing.assert_close(target_f["boxes"], mirrored)


def test_category_names_come_from_the_features(coco_kit):
    """A ClassLabel in another order still gives labels by name, not by index."""
    names = list(reversed(COCO_NAMES[1:]))
    data = COCOStreamDataset("val", source=coco_kit.make_hub_dataset(names=names), resize=None)
    for (_, target), scene in zip(data, coco_kit.SCENES):
        assert target["labels"].tolist() == coco_kit.expected_objects(scene)[1]


def test_train_mode_skips_empty_images_and_flips(hub_dataset, coco_kit):
    torch.manual_seed(0)
    train = COCOStreamDataset("train", source=hub_dataset, min_size=80)
    assert train.options.train and train.options.flip_prob == 0.5 and train.options.skip_empty
    ids = [int(t["image_id"]) for _, t in train]
    assert ids == [s["image_id"] for s in coco_kit.SCENES if s["image_id"] != 105]
    flips = [bool(t["flipped"]) for _ in range(4) for _, t in train]
    assert any(flips) and not all(flips)
    keep = COCOStreamDataset("train", source=hub_dataset, skip_empty=False)
    assert len(list(keep)) == len(coco_kit.SCENES)


def test_image_modes_become_rgb(hub_dataset):
    for image, target in COCOStreamDataset("val", source=hub_dataset, resize=None):
        assert image.shape[0] == 3 and image.dtype == torch.float32  # L, P and CMYK included


def test_max_samples(hub_dataset):
    assert len(list(COCOStreamDataset("val", 3, source=hub_dataset))) == 3
    assert len(list(COCOStreamDataset("val", 0, source=hub_dataset))) == 0


# ─── other sources give the same samples ──────────────────────────────────────────────────────


def assert_same_samples(samples_a, samples_b, pixels=True):
    assert len(samples_a) == len(samples_b)
    for (image_a, target_a), (image_b, target_b) in zip(samples_a, samples_b):
        assert int(target_a["image_id"]) == int(target_b["image_id"])
        assert target_a["labels"].tolist() == target_b["labels"].tolist()
        torch.testing.assert_close(target_a["boxes"], target_b["boxes"])
        if pixels:
            torch.testing.assert_close(image_a, image_b)


@pytest.mark.parametrize("resize", ["shorter", None])
def test_coco_layout_matches_hub_schema(hub_dataset, coco_dir, resize):
    hub = list(COCOStreamDataset("val", source=hub_dataset, resize=resize, min_size=80))
    coco = list(COCOStreamDataset("val", source=coco_dir, resize=resize, min_size=80))
    assert_same_samples(hub, coco)


def test_coco_layout_crowd_regions(coco_kit, tmp_path):
    root = coco_kit.write_coco_layout(str(tmp_path / "coco"), coco_kit.SCENES[:1])
    path = tmp_path / "coco" / "annotations" / "instances_val2017.json"
    coco = json.loads(path.read_text())
    coco["annotations"][0]["iscrowd"] = 1
    path.write_text(json.dumps(coco))
    _, target = next(iter(COCOStreamDataset("val", source=root, resize=None)))
    assert target["iscrowd"].tolist() == [1, 0]  # kept, flagged, for evaluation
    _, target = next(iter(COCOStreamDataset("val", source=root, resize=None, train=True)))
    assert target["iscrowd"].tolist() == [0] and target["labels"].tolist() == [17]


def test_local_parquet_copy_matches_hub_schema(hub_dataset, tmp_path):
    (tmp_path / "data").mkdir()
    for shard, rows in enumerate([range(3), range(3, 6)]):
        path = tmp_path / "data" / f"val-0000{shard}-of-00002.parquet"
        hub_dataset.select(rows).to_parquet(str(path))
    hub = list(COCOStreamDataset("val", source=hub_dataset, min_size=80))
    local = list(COCOStreamDataset("val", source=str(tmp_path), min_size=80))
    assert_same_samples(hub, local)
    with pytest.raises(FileNotFoundError, match="split 'train'"):
        COCOStreamDataset("train", source=str(tmp_path))


def test_hub_files_without_metadata_use_dataset_infos(hub_dataset, tmp_path):
    """Parquet files as the hub's repo holds them, described by its dataset_infos.json."""
    import pyarrow.parquet as pq

    hub_dataset.to_parquet(str(tmp_path / "full.parquet"))
    table = pq.read_table(str(tmp_path / "full.parquet")).replace_schema_metadata(None)
    (tmp_path / "full.parquet").unlink()
    (tmp_path / "data").mkdir()
    pq.write_table(table, str(tmp_path / "data" / "val-00000-of-00001-0123abcd.parquet"))
    with pytest.raises(ValueError, match="cannot read the category names"):
        COCOStreamDataset("val", source=str(tmp_path))

    def value(dtype):
        return {"dtype": dtype, "id": None, "_type": "Value"}

    category = {"num_classes": 80, "names": COCO_NAMES[1:], "id": None, "_type": "ClassLabel"}
    bbox = {"feature": value("float64"), "length": 4, "id": None, "_type": "Sequence"}
    objects = {"bbox_id": value("int64"), "category": category, "bbox": bbox,
               "area": value("int64")}
    features = {"image_id": value("int64"), "image": {"decode": True, "id": None, "_type": "Image"},
                "width": value("int64"), "height": value("int64"),
                "objects": {"feature": objects, "length": -1, "id": None, "_type": "Sequence"}}
    (tmp_path / "dataset_infos.json").write_text(
        json.dumps({"detection-datasets--coco": {"description": "", "features": features}}))
    hub = list(COCOStreamDataset("val", source=hub_dataset, min_size=80))
    assert_same_samples(hub, list(COCOStreamDataset("val", source=str(tmp_path), min_size=80)))


def test_datasets_iterable_and_dict_sources(hub_dataset):
    import datasets

    reference = list(COCOStreamDataset("val", source=hub_dataset, min_size=80))
    stream = hub_dataset.to_iterable_dataset(num_shards=2)
    assert_same_samples(reference, list(COCOStreamDataset("val", source=stream, min_size=80)))
    splits = datasets.DatasetDict({"val": hub_dataset})
    assert_same_samples(reference, list(COCOStreamDataset("val", source=splits, min_size=80)))
    with pytest.raises(ValueError, match="split 'train' is not in the source"):
        COCOStreamDataset("train", source=splits)


# ─── DataLoader workers and shuffling ─────────────────────────────────────────────────────────


def image_ids(loader):
    return [int(t["image_id"]) for _, targets in loader for t in targets]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("kind", ["map", "stream"])
@pytest.mark.parametrize("workers", [2, 3])
def test_workers_yield_each_sample_once(coco_kit, kind, workers):
    scenes = [dict(s, image_id=s["image_id"] + 100 * k) for k in range(3) for s in coco_kit.SCENES]
    source = coco_kit.make_hub_dataset(scenes)
    if kind == "stream":
        source = source.to_iterable_dataset(num_shards=6)  # 6 shards: by shard for 2 or 3 workers
    data = COCOStreamDataset("val", source=source, resize="square", min_size=32)
    loader = DataLoader(data, batch_size=2, num_workers=workers, collate_fn=frcnn_collate_fn)
    ids = image_ids(loader)
    assert sorted(ids) == sorted(s["image_id"] for s in scenes)
    limited = COCOStreamDataset("val", 7, source=source, resize="square", min_size=32)
    ids = image_ids(DataLoader(limited, batch_size=2, num_workers=workers,
                               collate_fn=frcnn_collate_fn))
    assert len(ids) == len(set(ids)) == 7


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_two_ranks_of_two_workers_each_read_their_own_images(coco_dir, monkeypatch):
    """Under torchrun (faked here: ``rank_and_world_size`` is how the stream asks) each of the
    2 ranks x 2 DataLoader workers reads its own images: none twice, none left out."""
    import frcnn_common

    seen = {}
    for rank in (0, 1):
        monkeypatch.setattr(frcnn_common, "rank_and_world_size", lambda: (rank, 2))
        data = COCOStreamDataset("val", source=coco_dir, resize="square", min_size=32)
        seen[rank] = image_ids(DataLoader(data, batch_size=1, num_workers=2,
                                          collate_fn=frcnn_collate_fn))
    everyone = seen[0] + seen[1]
    assert seen[0] and seen[1], seen
    assert len(everyone) == len(set(everyone)), f"an image read twice: {seen}"
    assert sorted(everyone) == [101, 102, 103, 104, 105, 106]


@pytest.mark.parametrize("kind", ["map", "stream"])
def test_shuffle(coco_kit, kind):
    scenes = [dict(s, image_id=s["image_id"] + 100 * k) for k in range(4) for s in coco_kit.SCENES]
    source = coco_kit.make_hub_dataset(scenes)
    if kind == "stream":
        source = source.to_iterable_dataset(num_shards=4)
    make = lambda: COCOStreamDataset("val", source=source, resize="square", min_size=32,  # noqa
                                     shuffle_buffer=8, seed=1)
    order = [int(t["image_id"]) for _, t in make()]
    assert sorted(order) == sorted(s["image_id"] for s in scenes)
    assert order != [s["image_id"] for s in scenes]
    assert order == [int(t["image_id"]) for _, t in make()]  # seeded
    data = make()
    data.set_epoch(1)
    assert [int(t["image_id"]) for _, t in data] != order


# ─── bad input ────────────────────────────────────────────────────────────────────────────────


def test_unknown_split(coco_dir):
    with pytest.raises(ValueError, match="split 'test'.*'train' or 'val'"):
        COCOStreamDataset("test")
    with pytest.raises(ValueError, match="calls it 'val'"):
        COCOStreamDataset("validation")
    with pytest.raises(FileNotFoundError, match="split 'test'.*instances_val2017"):
        COCOStreamDataset("test", source=coco_dir)


def test_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        COCOStreamDataset("val", source=str(tmp_path / "no_such_dir"))
    with pytest.raises(FileNotFoundError, match="no parquet files"):
        COCOStreamDataset("val", source=str(tmp_path))  # exists, but holds nothing usable
    with pytest.raises(TypeError, match="source must be"):
        COCOStreamDataset("val", source=42)


def test_coco_json_without_images(coco_kit, tmp_path):
    root = coco_kit.write_coco_layout(str(tmp_path / "coco"))
    path = tmp_path / "coco" / "annotations" / "instances_val2017.json"
    coco = json.loads(path.read_text())
    path.write_text(json.dumps(dict(coco, images=[])))
    with pytest.raises(ValueError, match="lists no images"):
        COCOStreamDataset("val", source=root)


def test_category_outside_the_list(coco_kit, tmp_path):
    root = coco_kit.write_coco_layout(str(tmp_path / "coco"))
    path = tmp_path / "coco" / "annotations" / "instances_val2017.json"
    coco = json.loads(path.read_text())
    coco["annotations"][0]["category_id"] = 12  # one of the 11 unused ids of COCO's 1..90
    path.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="category_id 12, which is not among"):
        COCOStreamDataset("val", source=root)
    names = ["person", "unicorn"]  # a ClassLabel with a non-COCO name
    scenes = [dict(coco_kit.SCENES[0], objects=coco_kit.SCENES[0]["objects"][:1])]
    with pytest.raises(ValueError, match="unicorn"):
        COCOStreamDataset("val", source=coco_kit.make_hub_dataset(scenes, names=names))


def test_bad_resize_mode(hub_dataset):
    with pytest.raises(ValueError, match="resize='stretch'"):
        COCOStreamDataset("val", source=hub_dataset, resize="stretch")


# ─── the hub, unreachable ─────────────────────────────────────────────────────────────────────


def assert_names_offline_sources(message):
    for alternative in ("parquet", "instances_val2017.json", "datasets.Dataset",
                        "SyntheticShapesDataset"):
        assert alternative in message


def test_hub_offline_mode_fails_without_touching_the_network(monkeypatch, no_hang):
    """HF_HUB_OFFLINE set: the error comes at once, without a connection tried (``datasets`` left
    alone retries an unreachable hub for tens of seconds)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tried = []
    connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect",
                        lambda sock, address: (tried.append(address), connect(sock, address))[1])
    with pytest.raises(ConnectionError) as error:
        no_hang(COCOStreamDataset, "val")
    assert tried == []
    assert_names_offline_sources(str(error.value))


def test_hub_that_never_answers_fails_within_the_timeout(monkeypatch, no_hang):
    """A server that accepts the connection and then stays silent: no hang."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        with pytest.raises(ConnectionError) as error:
            no_hang(COCOStreamDataset, "train", hub_timeout=1.0)
    assert_names_offline_sources(str(error.value))


def test_hub_refusing_connections_fails_fast(monkeypatch, no_hang):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(ConnectionError, match="unreachable"):
        no_hang(COCOStreamDataset, "val")
    with pytest.raises(ConnectionError, match="no local directory either"):
        no_hang(COCOStreamDataset, "val", source="my/coco")


# ─── synthetic shapes ─────────────────────────────────────────────────────────────────────────


def test_synthetic_is_deterministic_and_varied():
    a, b = SyntheticShapesDataset(8, seed=3), SyntheticShapesDataset(8, seed=3)
    for i in range(8):
        torch.testing.assert_close(a[i][0], b[i][0])
        torch.testing.assert_close(a[i][1]["boxes"], b[i][1]["boxes"])
    assert not torch.equal(a[0][0], SyntheticShapesDataset(8, seed=4)[0][0])
    assert not torch.equal(a[0][0], a[1][0])


def test_synthetic_targets():
    data = SyntheticShapesDataset(200, image_size=128, seed=0)
    assert data.class_names == SHAPE_NAMES and data.num_classes == 4
    sides, labels, counts = [], [], []
    for i in range(len(data)):
        image, target = data[i]
        assert image.shape == (3, 128, 128)
        boxes = target["boxes"]
        assert ((boxes[:, :2] >= 0) & (boxes[:, 2:] <= 128) & (boxes[:, 2:] > boxes[:, :2])).all()
        sides += (boxes[:, 2:] - boxes[:, :2]).amax(1).tolist()
        labels += target["labels"].tolist()
        counts.append(len(boxes))
    assert set(labels) == {1, 2, 3} and min(counts) >= 1 and max(counts) == 4
    assert min(sides) < 20 and max(sides) > 55  # small to large objects
    assert len(set(counts)) == 4


def test_synthetic_boxes_are_tight_on_the_shapes():
    data = SyntheticShapesDataset(20, image_size=96, seed=1)
    for i in range(len(data)):
        pixels, boxes, _ = data.render(i)
        image = pixels.float()
        for x1, y1, x2, y2 in boxes.long().tolist():
            patch = image[:, y1:y2, x1:x2]
            # the shape touches all four sides of its box: the box's border rows and columns
            # each hold pixels of the shape's colour, i.e. the colour at the box's centre row
            colour = image[:, (y1 + y2) // 2, (x1 + x2) // 2].view(3, 1)
            near = lambda strip: ((strip - colour).abs().amax(0) < 25).any()  # noqa: E731
            assert near(patch[:, 0, :]) and near(patch[:, -1, :])
            assert near(patch[:, :, 0]) and near(patch[:, :, -1])


def test_synthetic_default_shapes_render_as_before_the_shapes_option():
    pixels, boxes, labels = SyntheticShapesDataset(4, 128, seed=0).render(0)
    # the values rendered before the option existed
    assert boxes.tolist() == [[13, 1, 66, 54], [70, 35, 107, 72], [42, 63, 61, 82],
                              [33, 90, 60, 117]]
    assert labels.tolist() == [2, 2, 3, 1]
    assert float(pixels.float().mean()) == pytest.approx(114.1584, abs=1e-3)
    same = SyntheticShapesDataset(4, 128, seed=0, shapes=("circle", "square", "triangle"))
    assert torch.equal(same.render(0)[0], pixels)
    with pytest.raises(ValueError, match="shapes must be distinct names"):
        SyntheticShapesDataset(4, shapes=("ring", "donut"))


def _kind_of(patch, background):
    """Which new shape fills ``patch`` [3, h, w] (the pixels of its tight box), by its pixels."""
    inked = (patch - background.view(3, 1, 1)).abs().amax(0) > 45
    h, w = inked.shape
    rows, cols = torch.nonzero(inked, as_tuple=True)
    assert (rows.min(), cols.min(), rows.max(), cols.max()) == (0, 0, h - 1, w - 1)  # tight
    fill = float(inked.float().mean())
    centre, corner = bool(inked[h // 2, w // 2]), bool(inked[0, 0])
    if w > 2 * h:
        return "bar"
    if not centre:
        return "ring"
    if not corner and 0.45 < fill < 0.65:
        return "cross"
    return "star" if fill < 0.45 else "unknown"


def test_synthetic_new_shapes_are_drawn_with_their_labels_and_tight_boxes():
    kinds = ("ring", "cross", "star", "bar")
    data = SyntheticShapesDataset(30, 96, seed=2, texture=0.0, object_size=(0.25, 0.5),
                                  shapes=kinds)
    assert data.class_names == ["__background__", *kinds] and data.num_classes == 5
    seen = set()
    for i in range(len(data)):
        pixels, boxes, labels = data.render(i)
        image, free = pixels.float(), torch.ones(pixels.shape[1:], dtype=torch.bool)
        for x1, y1, x2, y2 in boxes.long().tolist():
            free[y1:y2, x1:x2] = False
        background = image[:, free].median(1).values  # texture 0: one flat colour and grain
        for (x1, y1, x2, y2), label in zip(boxes.long().tolist(), labels.tolist()):
            assert _kind_of(image[:, y1:y2, x1:x2], background) == kinds[label - 1]
            seen.add(label)
    assert seen == {1, 2, 3, 4}


def test_synthetic_flip_and_loader():
    torch.manual_seed(0)
    data = SyntheticShapesDataset(16, image_size=64, seed=0, train=True)
    plain = SyntheticShapesDataset(16, image_size=64, seed=0)
    flipped = 0
    for i in range(16):
        image, target = data[i]
        image0, target0 = plain[i]
        if bool(target["flipped"]):
            flipped += 1
            torch.testing.assert_close(image, image0.flip(-1))
            torch.testing.assert_close(boxes_to_original(target["boxes"], target), target0["boxes"])
    assert 0 < flipped < 16
    loader = DataLoader(plain, batch_size=4, num_workers=2, collate_fn=frcnn_collate_fn)
    images, targets = next(iter(loader))
    assert [image.shape for image in images] == [(3, 64, 64)] * 4 and len(targets) == 4
    torch.testing.assert_close(images[1], plain[1][0])


def test_synthetic_resize_options():
    image, target = SyntheticShapesDataset(2, image_size=(96, 128), resize="shorter",
                                           min_size=48)[0]
    assert image.shape == (3, 48, 64)
    torch.testing.assert_close(target["scale"], torch.full((4,), 0.5))


# ─── collate ─────────────────────────────────────────────────────────────────────────────────


def test_collate_keeps_each_image_at_its_own_size():
    a, b = torch.randn(3, 50, 70), torch.randn(3, 64, 40)
    targets = [{"boxes": torch.zeros(0, 4)}, {"boxes": torch.ones(1, 4)}]
    images, out = frcnn_collate_fn([(a, targets[0]), (b, targets[1])])
    assert isinstance(images, list) and out == targets
    assert images[0] is a and images[1] is b


def test_collate_with_stream_of_mixed_sizes(hub_dataset):
    data = COCOStreamDataset("val", source=hub_dataset, min_size=80)
    images, targets = next(iter(DataLoader(data, batch_size=3, collate_fn=frcnn_collate_fn)))
    assert [int(t["image_id"]) for t in targets] == [101, 102, 103]
    assert [tuple(image.shape[-2:]) for image in images] == [tuple(t["size"].tolist()) for t in targets]


# ─── inference on your own images: resized as torchvision's transform, boxes mapped back ────────


@pytest.mark.parametrize("height, width", [(480, 640), (375, 500), (800, 800), (100, 1000),
                                           (1999, 333), (57, 75)])
def test_make_sample_resizes_as_torchvisions_transform(gen, height, width):
    """Shorter side 800, longer at most 1333: the size, the pixels and the boxes of
    ``GeneralizedRCNNTransform`` (its ``_resize_image_and_masks`` and ``resize_boxes``), and a
    box of the resized image (flipped too) maps back onto the original with ``boxes_to_original``."""
    from torchvision.models.detection.transform import _resize_image_and_masks, resize_boxes

    from frcnn_common import make_sample, resized_size

    pixels = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=gen(0))
    box = torch.tensor([[width * 0.1, height * 0.2, width * 0.7, height * 0.9]])
    image, target = make_sample(pixels, box, torch.ones(1), 0, min_size=800, max_size=1333,
                                flip_prob=1.0)
    normalised = (pixels.float() / 255 - IMAGENET_MEAN) / IMAGENET_STD
    theirs, _ = _resize_image_and_masks(normalised, 800, 1333)
    assert resized_size(height, width, min_size=800, max_size=1333) == tuple(theirs.shape[1:])
    torch.testing.assert_close(image.flip(-1), theirs)
    their_box = resize_boxes(box, [height, width], list(theirs.shape[1:]))
    x1, y1, x2, y2 = target["boxes"][0].tolist()
    unflipped = torch.tensor([[theirs.shape[2] - x2, y1, theirs.shape[2] - x1, y2]])
    torch.testing.assert_close(unflipped, their_box)
    torch.testing.assert_close(boxes_to_original(target["boxes"], target), box)


# ─── the files beside the module ─────────────────────────────────────────────────────────────


@pytest.mark.parametrize("name, loads", [
    ("frcnn_ops", ["frcnn_ops"]),
    ("frcnn_sources", ["frcnn_sources"]),
    ("frcnn_common", ["frcnn_common", "frcnn_ops", "frcnn_sources"]),
    ("frcnn_engine", ["frcnn_common", "frcnn_engine", "frcnn_ops", "frcnn_sources"]),
])
def test_the_module_files_import_only_those_above_them(name, loads):
    """ops, sources, then common, engine, course: a cycle would break whichever a user imports
    first, and the detector must not need the training or notebook code."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = f"import sys, {name}; print(sorted(m for m in sys.modules if m.startswith('frcnn')))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == repr(loads)


def test_the_installed_module_imports_from_any_folder(tmp_path, hang_limit_s):
    """What ``make setup`` does (``pip install --no-deps -e .``), into a folder of this test, then
    a python started elsewhere, without the repository on its path, imports every module file:
    each from this repository. A file left out of pyproject.toml's ``py-modules`` fails here."""
    import glob
    import site

    pytest.importorskip("setuptools", reason="pip builds the editable install with setuptools")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    target = str(tmp_path / "site")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                              "--no-build-isolation", "--no-index", "--disable-pip-version-check",
                              "-e", root, "--target", target],
                             capture_output=True, text=True, timeout=hang_limit_s)
    assert install.returncode == 0, install.stderr
    names = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(root, "frcnn_*.py")))
    assert len(names) == 5, names
    # -S: not the .venv's own site set-up, whose editable install may be another checkout's;
    # this test's install first, then the .venv's packages (torch, ...) as plain folders
    code = (f"import os, site, sys; site.addsitedir({target!r}); sys.path += {site.getsitepackages()!r}; "
            f"assert {root!r} not in [os.path.abspath(p) for p in sys.path], sys.path; "
            f"import {', '.join(names)}; print({', '.join(n + '.__file__' for n in names)})")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=hang_limit_s)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [os.path.join(root, n + ".py") for n in names]


@pytest.mark.parametrize("name, home", [("fit", "frcnn_engine"), ("coco_map", "frcnn_engine"),
                                        ("draw_boxes", "frcnn_course"), ("setup_notebook", "frcnn_course")])
def test_a_name_that_moved_out_of_frcnn_common_names_its_new_home(name, home):
    import importlib

    import frcnn_common

    with pytest.raises(AttributeError, match=f"moved to {home}.py: import {home} and use {home}.{name}"):
        getattr(frcnn_common, name)
    assert callable(getattr(importlib.import_module(home), name))
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        frcnn_common.no_such_name
