"""Evaluation section: coco_map against pycocotools, evaluate, drawing helpers (no network)."""

import contextlib
import io
import json

import matplotlib
import pytest
import torch
from torch.utils.data import DataLoader

from frcnn_common import COCOStreamDataset, frcnn_collate_fn, SHAPE_NAMES, SyntheticShapesDataset
from frcnn_engine import coco_map, COCO_METRICS, evaluate
from frcnn_course import draw_boxes, show_predictions
from detectors import OracleDetector

matplotlib.use("Agg")


def random_scene(generator, num_images=12, num_classes=4):
    """Random ground truth, and detections near it plus false ones, in a 200 x 160 frame."""
    targets, predictions = [], []
    for _ in range(num_images):
        g = int(torch.randint(0, 6, (), generator=generator))
        xy = torch.rand(g, 2, generator=generator) * torch.tensor([150.0, 110.0])
        wh = 4 + torch.rand(g, 2, generator=generator) * 60
        boxes = torch.cat([xy, xy + wh], 1)
        labels = torch.randint(1, num_classes, (g,), generator=generator)
        targets.append({"boxes": boxes, "labels": labels})
        jitter = torch.randn(g, 4, generator=generator) * 4
        extra = int(torch.randint(0, 4, (), generator=generator))
        xy = torch.rand(extra, 2, generator=generator) * 150
        false = torch.cat([xy, xy + 5 + torch.rand(extra, 2, generator=generator) * 40], 1)
        predictions.append({
            "boxes": torch.cat([boxes + jitter, false]),
            "scores": torch.rand(g + extra, generator=generator),
            "labels": torch.cat([labels, torch.randint(1, num_classes, (extra,),
                                                       generator=generator)]),
        })
    return predictions, targets


def pycocotools_by_hand(predictions, targets, tmp_path):
    """The textbook route: a ground-truth json file, detections through loadRes."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, results = [], [], []
    for i, (pred, target) in enumerate(zip(predictions, targets)):
        images.append({"id": i, "width": 200, "height": 160})
        for (x1, y1, x2, y2), label in zip(target["boxes"].double().tolist(),
                                           target["labels"].tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": label,
                                "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        for (x1, y1, x2, y2), score, label in zip(pred["boxes"].double().tolist(),
                                                  pred["scores"].tolist(), pred["labels"].tolist()):
            results.append({"image_id": i, "category_id": label, "score": score,
                            "bbox": [x1, y1, x2 - x1, y2 - y1]})
    categories = sorted({a["category_id"] for a in annotations})
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": c, "name": str(c)} for c in categories]}))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats.tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coco_map_equals_pycocotools_by_hand(tmp_path, seed):
    predictions, targets = random_scene(torch.Generator().manual_seed(seed))
    ours = coco_map(predictions, targets)
    assert list(ours) == COCO_METRICS
    assert [ours[name] for name in COCO_METRICS] == pycocotools_by_hand(predictions, targets,
                                                                        tmp_path)
    assert 0 < ours["AP"] < 1  # a real mix of hits and misses, not a degenerate case


def test_coco_map_perfect_and_disjoint():
    _, targets = random_scene(torch.Generator().manual_seed(5))
    perfect = [{"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"]}
               for t in targets]
    metrics = coco_map(perfect, targets)
    assert metrics["AP"] == metrics["AP50"] == metrics["AP75"] == metrics["AR100"] == 1.0
    disjoint = [dict(p, boxes=p["boxes"] + 1000) for p in perfect]  # nowhere near any object
    metrics = coco_map(disjoint, targets)
    assert metrics["AP"] == metrics["AP50"] == metrics["AR100"] == 0.0
    wrong_class = [dict(p, labels=p["labels"] % 3 + 1) for p in perfect]
    assert coco_map(wrong_class, targets)["AP"] == 0.0


def test_coco_map_empty_cases():
    _, targets = random_scene(torch.Generator().manual_seed(6))
    none = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
             "labels": torch.zeros(0, dtype=torch.int64)} for _ in targets]
    assert coco_map(none, targets)["AP"] == 0.0  # nothing detected
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 3
    assert coco_map(none[:3], empty) == {name: -1.0 for name in COCO_METRICS}  # nothing to find
    assert coco_map([], []) == {name: -1.0 for name in COCO_METRICS}
    with pytest.raises(ValueError, match="predictions for"):
        coco_map(none[:2], targets[:3])


def test_coco_map_ignores_crowd_regions():
    target = {"boxes": torch.tensor([[0.0, 0, 50, 50], [100, 100, 190, 150]]),
              "labels": torch.tensor([1, 1]), "iscrowd": torch.tensor([0, 1])}
    pred = {"boxes": target["boxes"].clone(), "scores": torch.tensor([0.9, 0.8]),
            "labels": torch.tensor([1, 1])}
    assert coco_map([pred], [target])["AP"] == pytest.approx(1.0)  # hitting a crowd: no error
    assert coco_map([pred], [dict(target, iscrowd=torch.tensor([0, 0]))])["AP"] == pytest.approx(1)
    miss = dict(pred, boxes=pred["boxes"][:1], scores=pred["scores"][:1], labels=pred["labels"][:1])
    assert coco_map([miss], [target])["AP"] == pytest.approx(1.0)  # missing a crowd costs nothing
    assert coco_map([miss], [dict(target, iscrowd=torch.tensor([0, 0]))])["AP"] < 0.9


def test_coco_map_is_quiet(capsys):
    predictions, targets = random_scene(torch.Generator().manual_seed(7))
    coco_map(predictions, targets)
    assert capsys.readouterr().out == ""
    coco_map(predictions, targets, verbose=True)
    assert "Average Precision" in capsys.readouterr().out


# ─── evaluate, with a stand-in detector that follows the contract ─────────────────────────────


def test_evaluate_maps_back_to_original_pixels(hub_dataset):
    """Resized and flipped inputs: the oracle's boxes, in the input frame, must score 1.0."""
    data = COCOStreamDataset("val", source=hub_dataset, min_size=80, flip_prob=1.0)
    loader = DataLoader(data, batch_size=2, collate_fn=frcnn_collate_fn)
    model = OracleDetector(data)
    model.train()
    metrics = evaluate(model, loader, progress=False)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    assert model.training  # mode restored
    assert model.calls and all(device == model.weight.device for device in model.calls)
    assert model.sizes == [tuple(image.shape[-2:]) for image, _ in data]  # each image's own size
    shifted = evaluate(OracleDetector(data, shift=6.0), loader, progress=False)
    assert 0 < shifted["AP50"] and shifted["AP"] < 1.0


def test_evaluate_uses_the_original_frame(hub_dataset, coco_kit, tmp_path):
    """Ground truth is scored in original pixels: a prediction shifted by 6 px in the resized
    frame (scales 0.63 to 1.25 here) is a shift of 6 / scale original pixels. pycocotools, given
    the scenes' own boxes and those boxes moved (and clipped to the image) by hand, agrees."""
    data = COCOStreamDataset("val", source=hub_dataset, min_size=80)
    loader = DataLoader(data, batch_size=3, collate_fn=frcnn_collate_fn)
    metrics = evaluate(OracleDetector(data, shift=6.0), loader, progress=False)
    predictions, targets = [], []
    for (image, _), scene in zip(data, coco_kit.SCENES):
        boxes, labels = coco_kit.expected_objects(scene)
        width, height = scene["size"]
        dx, dy = 6.0 * width / image.shape[2], 6.0 * height / image.shape[1]
        moved = [[x1 + dx, y1 + dy, min(x2 + dx, width), min(y2 + dy, height)]
                 for x1, y1, x2, y2 in boxes]
        labels = torch.tensor(labels, dtype=torch.int64)
        predictions.append({"boxes": torch.tensor(moved).reshape(-1, 4),
                            "scores": torch.ones(len(labels)), "labels": labels})
        targets.append({"boxes": torch.tensor(boxes).reshape(-1, 4), "labels": labels})
    expected = pycocotools_by_hand(predictions, targets, tmp_path)
    assert [metrics[name] for name in COCO_METRICS] == pytest.approx(expected, abs=1e-6)
    assert 0 < metrics["AP50"] and metrics["AP"] < metrics["AP50"]  # some hits, none perfect


def test_evaluate_on_synthetic_shapes_with_max_batches():
    data = SyntheticShapesDataset(12, image_size=64, seed=0)
    model = OracleDetector(data)
    loader = DataLoader(data, batch_size=4, collate_fn=frcnn_collate_fn)
    assert evaluate(model, loader, progress=False, max_batches=2)["AP"] == pytest.approx(1.0)
    assert len(model.calls) == 2 * 4  # two batches of four images


# ─── drawing ──────────────────────────────────────────────────────────────────────────────────


def test_draw_boxes_labels_everything():
    import matplotlib.pyplot as plt

    image, target = SyntheticShapesDataset(1, image_size=64)[0]
    scores = torch.linspace(0.3, 0.9, len(target["boxes"]))
    ax = draw_boxes(image, target["boxes"], target["labels"], scores, class_names=SHAPE_NAMES,
                    score_threshold=0.5)
    kept = int((scores >= 0.5).sum())
    assert len(ax.patches) == kept and len(ax.texts) == kept
    assert all(text.get_text().split()[0] in SHAPE_NAMES for text in ax.texts)
    assert ax.get_title() == f"{kept} boxes"
    plt.close("all")


def test_show_predictions_titles_both_panels():
    import matplotlib.pyplot as plt

    image, target = SyntheticShapesDataset(1, image_size=64)[0]
    prediction = {"boxes": target["boxes"], "labels": target["labels"],
                  "scores": torch.ones(len(target["boxes"]))}
    fig = show_predictions(image, target, prediction, class_names=SHAPE_NAMES)
    left, right = fig.axes
    assert left.get_title().startswith("ground truth") and right.get_title().startswith("predic")
    assert fig._suptitle is not None and "image 0" in fig._suptitle.get_text()
    plt.close(fig)


def test_coco_map_reports_ap_per_class_by_name():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 40.0]])
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 3])}]
    found = [{"boxes": boxes[:1], "scores": torch.ones(1), "labels": torch.tensor([1])}]
    metrics = coco_map(found, targets, class_names=SHAPE_NAMES)
    assert metrics["AP/circle"] == pytest.approx(1.0) and metrics["AP50/circle"] == pytest.approx(1.0)
    assert metrics["AP/triangle"] == 0.0 and "AP/square" not in metrics  # no square in the truth
    assert metrics["AP"] == pytest.approx(0.5)  # the mean over the two classes
    assert list(coco_map(found, targets)) == COCO_METRICS  # no names, no per-class keys
