"""The course helpers of section 10 and the evaluation functions the notebooks teach with: each
exercise checker accepts a right answer written as a learner would (loops, the paper's formula),
independently of the module, and rejects a typical wrong one."""

import math
import os

import numpy as np

import pytest
import torch

import frcnn_common as fc
import frcnn_engine as engine
import frcnn_course as course


# ─── exercise checkers: right answers written from the definitions, one box at a time ─────────


def iou_by_loops(a, b):
    """IoU from its definition, |a ∩ b| / |a ∪ b|, one pair of boxes at a time."""
    out = torch.zeros(len(a), len(b))
    for i, (ax1, ay1, ax2, ay2) in enumerate(a.tolist()):
        for j, (bx1, by1, bx2, by2) in enumerate(b.tolist()):
            overlap = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
            union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - overlap
            out[i, j] = overlap / union
    return out


def encode_from_the_paper(reference, gt, weights):
    """The R-CNN parametrisation (Girshick et al. 2014, eq. 6-9) scaled by the weights, box by box."""
    wx, wy, ww, wh = weights
    rows = []
    for (ax1, ay1, ax2, ay2), (gx1, gy1, gx2, gy2) in zip(reference.tolist(), gt.tolist()):
        wa, ha, w, h = ax2 - ax1, ay2 - ay1, gx2 - gx1, gy2 - gy1
        xa, ya, x, y = ax1 + wa / 2, ay1 + ha / 2, gx1 + w / 2, gy1 + h / 2
        rows.append([wx * (x - xa) / wa, wy * (y - ya) / ha, ww * math.log(w / wa),
                     wh * math.log(h / ha)])
    return torch.tensor(rows)


def anchors_by_hand(feature_size, stride, sizes, ratios):
    """torchvision's anchors of one level, as DESIGN.md states them: at each location (row by row)
    for each ratio r = h / w and size s, ``round([-w, -h, w, h] / 2)`` with w = s / sqrt(r),
    h = s * sqrt(r), moved to ``(x * stride, y * stride)``."""
    h, w = feature_size
    rows = []
    for y in range(h):
        for x in range(w):
            for r in ratios:
                for s in sizes:
                    half_w, half_h = s / math.sqrt(r) / 2, s * math.sqrt(r) / 2
                    rows.append([x * stride + round(-half_w), y * stride + round(-half_h),
                                 x * stride + round(half_w), y * stride + round(half_h)])
    return torch.tensor(rows, dtype=torch.float32)


def level_from_the_fpn_paper(boxes):
    """FPN's eq. (1), k = floor(4 + log2(sqrt(wh) / 224)), with torchvision's 1e-6, in 2..5."""
    levels = []
    for x1, y1, x2, y2 in boxes.tolist():
        k = math.floor(4 + math.log2(math.sqrt((x2 - x1) * (y2 - y1)) / 224) + 1e-6)
        levels.append(min(max(k, 2), 5))
    return torch.tensor(levels)


def ap_by_hand(boxes, scores, gt_boxes, iou_threshold):
    """COCO's AP of one class in one image as pycocotools defines it: detections by decreasing
    score each take the best-overlapping free object at IoU >= t; precision made monotone; its mean
    at the 101 recall points 0, 0.01, ..., 1."""
    taken, hits = set(), []
    for d in sorted(range(len(scores)), key=lambda d: -float(scores[d])):
        best, best_iou = None, iou_threshold
        for g in range(len(gt_boxes)):
            iou = iou_by_loops(boxes[d:d + 1], gt_boxes[g:g + 1]).item()
            if g not in taken and iou >= best_iou:
                best, best_iou = g, iou
        hits.append(best is not None)
        taken.add(best)
    true_positives = np.cumsum(hits)
    recall = true_positives / len(gt_boxes)
    precision = true_positives / np.arange(1, len(hits) + 1)
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = max(precision[i], precision[i + 1])
    at = np.searchsorted(recall, np.linspace(0.0, 1.0, 101), side="left")
    return float(np.mean([precision[i] if i < len(precision) else 0.0 for i in at]))


def filter_by_loop(result, score_threshold):
    """Keeps each detection whose score is at least the threshold, visited one by one."""
    keep = torch.tensor([i for i, score in enumerate(result["scores"]) if score >= score_threshold],
                        dtype=torch.int64)
    return {key: value[keep] for key, value in result.items()}


# ─── exercise checkers: each rejects a typical wrong answer ───────────────────────────────────


def iou_with_plus_one(a, b):
    """The old "+1 pixel" convention (a box from 0 to 10 is 11 pixels wide)."""
    def area(x):
        return (x[:, 2] - x[:, 0] + 1) * (x[:, 3] - x[:, 1] + 1)
    top_left = torch.max(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (bottom_right - top_left + 1).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def nms_in_index_order(boxes, scores, threshold):
    """Greedy NMS that forgets to visit the boxes by decreasing score."""
    keep = []
    for i in range(len(boxes)):
        if all(fc.box_iou(boxes[i:i + 1], boxes[j:j + 1]).item() <= threshold for j in keep):
            keep.append(i)
    return torch.tensor(keep, dtype=torch.int64)


def nms_by_score(boxes, scores, threshold):
    """The correct greedy loop, as the solution in notebook 03 writes it."""
    keep = []
    for i in torch.sort(scores, descending=True, stable=True).indices.tolist():
        if all(iou_by_loops(boxes[i:i + 1], boxes[j:j + 1]).item() <= threshold for j in keep):
            keep.append(i)
    return torch.tensor(keep, dtype=torch.int64)


def nms_suppressed_boxes_still_suppress(boxes, scores, threshold):
    """The bug notebook 03 warns about: every box visited before, kept or not, can suppress."""
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()
    iou = fc.box_iou(boxes, boxes)
    return torch.tensor([j for n, j in enumerate(order)
                         if all(iou[i, j] <= threshold for i in order[:n])], dtype=torch.int64)


def nms_at_or_above(boxes, scores, threshold):
    """Suppresses at IoU >= threshold instead of strictly above it."""
    keep = []
    for i in torch.sort(scores, descending=True, stable=True).indices.tolist():
        if all(fc.box_iou(boxes[i:i + 1], boxes[j:j + 1]).item() < threshold for j in keep):
            keep.append(i)
    return torch.tensor(keep, dtype=torch.int64)


def nms_ties_reversed(boxes, scores, threshold):
    """Sorts ascending and reverses: equal scores are visited last index first (not stable)."""
    keep = []
    for i in torch.sort(scores, stable=True).indices.flip(0).tolist():
        if all(fc.box_iou(boxes[i:i + 1], boxes[j:j + 1]).item() <= threshold for j in keep):
            keep.append(i)
    return torch.tensor(keep, dtype=torch.int64)


def encode_without_weights(reference, gt, weights):
    return encode_from_the_paper(reference, gt, (1.0, 1.0, 1.0, 1.0))  # ignores (10, 10, 5, 5)


def anchors_with_half_stride_offset(feature_size, stride, sizes, ratios):
    anchors = anchors_by_hand(feature_size, stride, sizes, ratios)
    return anchors + stride / 2  # centred on the cells, not on their corners as torchvision


def level_rounded(boxes):
    size = fc.box_area(boxes).sqrt()
    return torch.round(4 + torch.log2(size / 224)).clamp(2, 5).long()


def level_without_epsilon(boxes):
    """FPN's rule without the 1e-6: a box of 112 px up to float32 error falls one level low."""
    size = fc.box_area(boxes).sqrt()
    return torch.floor(4 + torch.log2(size / 224)).clamp(2, 5).long()


def ap_best_or_false_positive(boxes, scores, gt_boxes, iou_threshold):
    """Each detection looks only at its best-overlapping object; if that one is taken, a false
    positive, even when another free object overlaps it enough (COCO takes the free one)."""
    iou = fc.box_iou(boxes, gt_boxes)
    taken, hits = set(), torch.zeros(len(boxes), dtype=torch.bool)
    for d in torch.sort(scores, descending=True, stable=True).indices.tolist():
        best = int(iou[d].argmax())
        if iou[d, best] >= iou_threshold and best not in taken:
            taken.add(best)
            hits[d] = True
    return engine.average_precision(hits, scores, len(gt_boxes))


def filter_strictly_above(result, score_threshold):
    """Keeps scores > threshold: drops the detections scoring exactly the threshold."""
    keep = result["scores"] > score_threshold
    return {key: value[keep] for key, value in result.items()}


def ap_counting_duplicates(boxes, scores, gt_boxes, iou_threshold):
    """AP where every detection overlapping some object counts as correct, duplicates too."""
    hits = (fc.box_iou(boxes, gt_boxes).max(1).values >= iou_threshold) if len(gt_boxes) else \
        torch.zeros(len(boxes), dtype=torch.bool)
    return engine.average_precision(hits, scores, len(gt_boxes))


def ap_strictly_above_the_threshold(boxes, scores, gt_boxes, iou_threshold):
    """Matches need IoU > t: a detection overlapping its object by exactly t is a false positive."""
    return ap_by_hand(boxes, scores, gt_boxes, iou_threshold + 1e-6)


def to_original_by_hand(boxes, target, flip=True, scale=True, clip=True):
    """Box by box: mirror x about the returned width if flipped, divide by the scale, clip to the
    original size. ``flip``, ``scale``, ``clip`` False make the typical mistakes below."""
    width = float(target["size"][1])
    height0, width0 = (float(v) for v in target["orig_size"])
    factor = float(target["scale"][0])
    out = []
    for x1, y1, x2, y2 in boxes.tolist():
        if bool(target["flipped"]) and flip:
            x1, x2 = width - x2, width - x1
        x1, y1, x2, y2 = (v / factor if scale else v * factor for v in (x1, y1, x2, y2))
        if clip:
            x1, x2 = (min(max(v, 0.0), width0) for v in (x1, x2))
            y1, y2 = (min(max(v, 0.0), height0) for v in (y1, y2))
        out.append([x1, y1, x2, y2])
    return torch.tensor(out).reshape(-1, 4)


def to_original_never_clipping(boxes, target):
    """Forgets the clip: boxes reaching past the image stay past the original's edges."""
    return to_original_by_hand(boxes, target, clip=False)


def to_original_forgetting_the_flip(boxes, target):
    """Divides and clips, but leaves flipped boxes mirrored."""
    return to_original_by_hand(boxes, target, flip=False)


def to_original_times_scale(boxes, target):
    """Multiplies by the scale (the resize's direction) instead of dividing."""
    return to_original_by_hand(boxes, target, scale=False)


@pytest.mark.parametrize("checker, right, wrong", [
    (course.check_box_iou, iou_by_loops, iou_with_plus_one),
    (course.check_nms, nms_by_score, nms_in_index_order),
    (course.check_nms, nms_by_score, nms_suppressed_boxes_still_suppress),
    (course.check_nms, nms_by_score, nms_at_or_above),
    (course.check_nms, nms_by_score, nms_ties_reversed),
    (course.check_encode_boxes, encode_from_the_paper, encode_without_weights),
    (course.check_anchor_grid, anchors_by_hand, anchors_with_half_stride_offset),
    (course.check_level_mapper, level_from_the_fpn_paper, level_rounded),
    (course.check_level_mapper, level_from_the_fpn_paper, level_without_epsilon),
    (course.check_average_precision, ap_by_hand, ap_counting_duplicates),
    (course.check_average_precision, ap_by_hand, ap_best_or_false_positive),
    (course.check_average_precision, ap_by_hand, ap_strictly_above_the_threshold),
    (course.check_score_filter, filter_by_loop, filter_strictly_above),
    (course.check_boxes_to_original, to_original_by_hand, to_original_never_clipping),
    (course.check_boxes_to_original, to_original_by_hand, to_original_forgetting_the_flip),
    (course.check_boxes_to_original, to_original_by_hand, to_original_times_scale),
], ids=["iou+1", "nms-unsorted", "nms-suppressed-suppress", "nms->=", "nms-ties-reversed",
        "encode-no-weights", "anchors-offset", "level-rounded", "level-no-epsilon",
        "ap-duplicates", "ap-best-or-fp", "ap->t", "filter->", "original-no-clip",
        "original-no-flip", "original-times-scale"])
def test_each_checker_accepts_the_right_answer_and_rejects_a_typical_wrong_one(
        checker, right, wrong, capsys):
    assert checker(right) is True
    assert "Correct" in capsys.readouterr().out
    assert checker(wrong) is False
    said = capsys.readouterr().out
    assert said.startswith("Not yet") and "yours:" in said and "expected:" in said


def test_a_checker_reports_an_exception_instead_of_crashing(capsys):
    def broken(a, b):
        raise NotImplementedError("your code here")
    assert course.check_box_iou(broken) is False
    assert "raised NotImplementedError: your code here" in capsys.readouterr().out


# ─── COCO's AP, by hand and by pycocotools ──────────────────────────────────────────────────


def test_average_precision_by_hand_equals_pycocotools_ap50():
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        predictions, targets, hits, scores, num_gt = [], [], [], [], 0
        for _image in range(3):
            gt = course.random_boxes(int(torch.randint(1, 5, (1,), generator=g)), 100, g)
            near = gt + torch.randn(gt.shape, generator=g)
            near = torch.cat((torch.minimum(near[:, :2], near[:, 2:] - 1), near[:, 2:]), 1)
            boxes = torch.cat((near, near[:1] + 0.5, course.random_boxes(3, 100, g)))  # a duplicate
            score = torch.rand(len(boxes), generator=g)
            ones = torch.ones(len(boxes), dtype=torch.int64)
            predictions.append({"boxes": boxes, "scores": score, "labels": ones})
            targets.append({"boxes": gt, "labels": torch.ones(len(gt), dtype=torch.int64)})
            hits.append(engine.match_detections(boxes, score, gt, 0.5))
            scores.append(score)
            num_gt += len(gt)
        ours = engine.average_precision(torch.cat(hits), torch.cat(scores), num_gt)
        assert ours == pytest.approx(engine.coco_map(predictions, targets)["AP50"], abs=1e-12)


def test_a_duplicate_is_a_false_positive_and_no_ground_truth_gives_minus_one():
    gt = torch.tensor([[0.0, 0, 10, 10]])
    boxes = torch.tensor([[0.0, 0, 10, 10], [0.5, 0, 10, 10]])
    hits = engine.match_detections(boxes, torch.tensor([0.9, 0.8]), gt)
    assert hits.tolist() == [True, False]
    assert engine.average_precision(hits, torch.tensor([0.9, 0.8]), 0) == -1.0


# ─── notebook set-up and full mode's COCO folder ─────────────────────────────────────────────


def test_setup_notebook_reads_the_mode_and_pins_one_thread_in_fast_mode(monkeypatch, capsys):
    threads = torch.get_num_threads()
    try:
        monkeypatch.setenv("FRCNN_FAST", "1")
        monkeypatch.delenv("FRCNN_THREADS", raising=False)
        fast, device = course.setup_notebook(seed=3)
        assert fast and device.type == "cpu" and torch.get_num_threads() == 1
        assert capsys.readouterr().out.startswith("FAST mode on cpu, CPU threads: 1 for the cells, ")
        assert torch.equal(torch.rand(2), (torch.manual_seed(3), torch.rand(2))[1])
        monkeypatch.setenv("FRCNN_THREADS", "2")
        course.setup_notebook()
        assert torch.get_num_threads() == 2
        assert capsys.readouterr().out.startswith("FAST mode on cpu, CPU threads: 2 for the cells, ")
        for wrong in ("0", "two", "-1"):
            monkeypatch.setenv("FRCNN_THREADS", wrong)
            with pytest.raises(ValueError, match="FRCNN_THREADS"):
                course.setup_notebook()
    finally:
        torch.set_num_threads(threads)


def test_training_threads_are_the_idle_cores_at_least_one_at_most_two(monkeypatch):
    assert 0.0 <= course.idle_cores(0.05) <= os.cpu_count()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    for idle, threads in ((0.2, 1), (1.4, 1), (1.6, 2), (3.9, 2)):
        monkeypatch.setattr(course, "idle_cores", lambda idle=idle: idle)
        course.training_threads.cache_clear()
        assert course.training_threads() == threads, idle
        monkeypatch.setattr(course, "idle_cores", lambda: 0.0)
        assert course.training_threads() == threads  # chosen once: the machine's load later is not read
    course.training_threads.cache_clear()


def test_full_mode_reads_coco_from_the_folder_frcnn_coco_names(monkeypatch, coco_dir):
    monkeypatch.setenv("FRCNN_COCO", coco_dir)
    data = fc.COCOStreamDataset("val", source=course.coco_source(), min_size=64)
    ids = [int(target["image_id"]) for _, target in data]
    assert ids == [101, 102, 103, 104, 105, 106]
    monkeypatch.setenv("FRCNN_COCO", os.path.join(coco_dir, "missing"))
    with pytest.raises(FileNotFoundError, match="FRCNN_COCO"):
        course.coco_source()
    monkeypatch.delenv("FRCNN_COCO")
    assert course.coco_source() == fc.HUB_COCO


def test_notebook_06_alone_saves_its_detector_under_its_own_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = course.shapes_detector("checkpoints/shapes_tiny.pt", progress=False, steps=2,
                               batch_size=2, eval_images=4)
    assert not os.path.exists("checkpoints/shapes_tiny.pt")
    assert os.path.exists("checkpoints/shapes_tiny_fallback.pt") and not model.training
    again = course.shapes_detector("checkpoints/shapes_tiny.pt")  # loads the fallback, no training
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


# ─── detection figures ───────────────────────────────────────────────────────────────────────


def test_draw_boxes_puts_the_highest_score_on_top_with_labels_inside_and_apart():
    import matplotlib.pyplot as plt

    image = torch.zeros(3, 64, 64)
    boxes = torch.tensor([[0.0, 0, 30, 30], [1, 1, 31, 31], [2, 0, 32, 30], [40, 50, 64, 64]])
    scores = torch.tensor([0.5, 0.9, 0.7, 0.6])
    ax = course.draw_boxes(image, boxes, torch.tensor([1, 2, 3, 1]), scores,
                       class_names=fc.SHAPE_NAMES)
    drawn = [float(text.get_text().split()[-1]) for text in ax.texts]
    assert drawn == pytest.approx(sorted(scores.tolist()), abs=1e-6)  # the last is drawn on top
    ax.figure.canvas.draw()
    inside = ax.get_window_extent()
    extents = [text.get_window_extent() for text in ax.texts]
    for box in extents:
        assert inside.x0 - 1 <= box.x0 and box.x1 <= inside.x1 + 1
        assert inside.y0 - 1 <= box.y0 and box.y1 <= inside.y1 + 1
    for k, a in enumerate(extents):  # the three crowded labels do not cover one another
        assert not any(a.overlaps(b) for b in extents[k + 1:])
    assert ax.texts[-1].get_position()[1] == pytest.approx(0.0)  # the best label keeps the top
    plt.close("all")


def test_draw_boxes_sizes_labels_by_their_drawn_text_so_long_names_do_not_cover_others():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # boxes side by side, 22 px (about 75 pt here) apart: a label of 8 wide letters is wider
    # than 0.6 of the font size per letter, so it must be measured to move the next one down
    names = ["__background__", "triangle", "WWWWWWWW", "circle"]
    boxes = torch.tensor([[4.0 + 22 * k, 40, 20 + 22 * k, 70] for k in range(4)])
    scores = torch.tensor([0.99, 0.95, 0.9, 0.85])
    ax = course.draw_boxes(torch.zeros(3, 96, 96), boxes, torch.tensor([2, 3, 2, 1]), scores,
                           class_names=names)
    ax.figure.canvas.draw()
    patches = [text.get_bbox_patch().get_window_extent() for text in ax.texts]
    for k, a in enumerate(patches):  # the coloured boxes behind the texts, padding included
        assert not any(a.x0 + 0.5 < b.x1 and b.x0 + 0.5 < a.x1 and a.y0 + 0.5 < b.y1
                       and b.y0 + 0.5 < a.y1 for b in patches[k + 1:])
    plt.close("all")


def test_draw_boxes_labels_only_the_best_when_asked_and_says_so_in_the_title():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    boxes, scores = course.random_boxes(12, 64.0), torch.linspace(0.9, 0.35, 12)
    ax = course.draw_boxes(torch.zeros(3, 64, 64), boxes, torch.ones(12, dtype=torch.long), scores,
                           class_names=fc.SHAPE_NAMES, max_labels=5, title="twelve")
    assert len(ax.patches) == 12 and ax.get_title() == "twelve\n(labels on the 5 best)"
    assert sorted(float(t.get_text().split()[-1]) for t in ax.texts) == \
        pytest.approx(scores[:5].sort().values.tolist(), abs=1e-6)
    plt.close("all")


def test_freeze_backbone_keeps_weights_and_statistics_and_trains_the_rest():
    torch.manual_seed(0)
    model = fc.tiny_detector(4)
    x = torch.randn(2, 3, 64, 64)
    weights = sum(p.numel() for p in model.backbone.parameters())
    before = [m.clone() for m in model.backbone.eval()(x)]
    assert course.freeze_backbone(model) == weights
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    for a, b in zip(before, model.backbone(x)):  # the same function as the unfrozen one in eval
        torch.testing.assert_close(a, b)
    backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    fpn = {k: v.clone() for k, v in model.fpn.state_dict().items()}
    data = fc.SyntheticShapesDataset(4, 64, seed=0, train=True)
    engine.fit(model, engine.make_loader(data, 2), 1, lr=0.01, warmup_steps=0, amp=False,
               device="cpu", progress=False)
    for k, v in model.backbone.state_dict().items():  # weights and BatchNorm statistics
        assert torch.equal(v, backbone[k]), k
    assert any(not torch.equal(v, fpn[k]) for k, v in model.fpn.state_dict().items())


def test_draw_detector_overview_writes_the_recorded_shapes_and_names_a_missing_stage():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def stages(k, classes):
        return {"C": [torch.zeros(1, 256 * 2 ** i, 40 // 2 ** i, 48 // 2 ** i) for i in range(4)],
                "P": [torch.zeros(1, 256, 40 // 2 ** i, 48 // 2 ** i) for i in range(5)],
                "rpn_head": ([torch.zeros(1, 3, 40, 48)], [torch.zeros(1, 12, 40, 48)]),
                "rpn": ([torch.zeros(k + 7, 4)], {}), "pooled": torch.zeros(k, 256, 7, 7),
                "box_head": torch.zeros(k, 1024),
                "predictor": (torch.zeros(k, classes), torch.zeros(k, 4 * classes))}
    losses = {"rpn_cls": torch.tensor(0.5), "rpn_box": torch.tensor(0.25),
              "roi_cls": torch.tensor(1.5), "roi_box": torch.tensor(0.125)}
    infer, train = stages(30, 5), stages(12, 5)
    fig = course.draw_detector_overview(torch.zeros(3, 150, 190), torch.zeros(1, 3, 160, 192), infer, train,
                                    losses, num_anchors=1234, num_gt=2, detections=torch.zeros(9, 4))
    texts = {t.get_text() for t in fig.axes[0].texts}
    for expected in ("[3, 150, 190]", "P3: 256 x 20 x 24", "C5: 2048 x 5 x 6", "all levels: 1234 anchors",
                     "eval:  [37, 4]", "train: [12, 256, 7, 7]", "  + 2 GT boxes,", "  sample 12",
                     "boxes [9, 4]", "rpn_cls 0.50, rpn_box 0.25", "       [30, 20]"):
        assert expected in texts, expected
    assert "150 x 190 image" in fig.axes[0].get_title()
    plt.close(fig)
    del train["pooled"]
    with pytest.raises(KeyError, match="pooled"):
        course.draw_detector_overview(torch.zeros(3, 150, 190), torch.zeros(1, 3, 160, 192), infer, train,
                                  losses, 1234, 2, torch.zeros(9, 4))


def test_draw_fpn_diagram_draws_every_level_its_lateral_sum_and_output_and_the_pooled_top():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, Rectangle

    for levels in (4, 3):
        ax = course.draw_fpn_diagram(levels).axes[0]
        boxes = [p for p in ax.patches if isinstance(p, Rectangle)]
        arrows = [p for p in ax.patches if isinstance(p, FancyArrowPatch)]
        assert len(boxes) == 3 * levels + 1  # C_k, M_k, P_k per level, and the pooled level
        assert len(arrows) == 2 * levels + (levels - 1) + 1  # lateral, 3x3; top-down; max-pool
        texts = [t.get_text() for t in ax.texts]
        top = levels + 1
        for k in range(2, top + 1):
            assert f"1x1 lateral L{k}" in texts
            assert f"P{k}\n256 ch, /{2 ** k}" in texts
            assert f"C{k}\n{256 * 2 ** (k - 2)} ch, /{2 ** k}" in texts
        assert f"M{top}\nL{top}(C{top})" in texts and f"M2\nL2(C2) + up" in texts
        assert texts.count("up x2") == levels - 1 and texts.count("3x3") == levels
        assert f"P{top + 1} /{2 ** (top + 1)}" in texts
        plt.close(ax.figure)



def test_roi_pool_bins_are_the_cells_torchvision_roi_pool_takes_the_maximum_over():
    import torchvision

    g = torch.Generator().manual_seed(0)
    fmap = torch.randn(1, 1, 12, 12, generator=g)
    corners = torch.rand(20, 2, generator=g) * 6
    boxes = [[1.3, 0.8, 5.4, 5.9], [2.5, 0.5, 9.5, 3.5], [0.0, 0.0, 11.0, 11.0], [4, 4, 4.2, 4.1]]
    boxes += torch.cat([corners, corners + torch.rand(20, 2, generator=g) * 5], 1).tolist()
    for box in boxes:
        for n in (2, 3, 7):
            columns, rows = course.roi_pool_bins(torch.tensor(box), n)
            ours = torch.tensor([[float(fmap[0, 0, r0:r1, c0:c1].max()) for c0, c1 in columns]
                                 for r0, r1 in rows])
            theirs = torchvision.ops.roi_pool(fmap, torch.tensor([[0.0, *box]]), (n, n), 1.0)
            assert torch.equal(ours, theirs[0, 0]), (box, n)
    # the notebook's box: 5 cells wide once rounded, so three bins of 2, 3, 2 cells that overlap
    assert course.roi_pool_bins(torch.tensor([1.3, 0.8, 5.4, 5.9]), 3) == (
        [(1, 3), (2, 5), (4, 6)], [(1, 3), (3, 5), (5, 7)])
    # a stride: the box in pixels, divided by 16, rounded half away from zero (2.5 -> 3)
    assert course.roi_pool_bins(torch.tensor([40.0, 8.0, 72.0, 40.0]), 1, 1 / 16) == (
        [(3, 6)], [(1, 4)])


def test_the_roi_pool_picture_draws_the_cells_torchvision_roi_pool_reads():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torchvision

    box = torch.tensor([1.3, 0.8, 5.4, 5.9])
    fig = course.draw_roi_pool_vs_align(box, output_size=3, sampling_ratio=2)
    pool, align = fig.axes
    drawn = [p for p in pool.patches if not p.get_fill() and p.get_linestyle() == "solid"]
    assert len(drawn) == 9
    fmap = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    maxima = []
    for p in drawn:  # each bin is drawn inset by at most 0.11 cell inside its cells' borders
        x0, y0 = p.get_x() + 0.5, p.get_y() + 0.5
        c0, r0 = round(x0), round(y0)
        c1, r1 = round(x0 + p.get_width()), round(y0 + p.get_height())
        maxima.append(float(fmap[0, 0, r0:r1, c0:c1].max()))
    theirs = torchvision.ops.roi_pool(fmap, torch.cat([torch.zeros(1), box])[None], (3, 3), 1.0)
    assert maxima == theirs.flatten().tolist()  # bins drawn row by row, as roi_pool lays them out
    assert len(align.lines) > 0 and len(align.patches) == 1 + 9  # the exact box and 9 equal bins
    plt.close(fig)


# ─── the notebooks' code cells ──────────────────────────────────────────────────────────────


def test_every_code_cell_fits_a_screen_25_lines_of_at_most_100_characters():
    """What a learner reads at once: no code cell over 25 lines, no line over 100 characters
    (longer code belongs in a module function the cell calls)."""
    import glob
    import json

    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
    too_long = []
    for path in sorted(glob.glob(os.path.join(folder, "*.ipynb"))):
        cells = json.load(open(path))["cells"]
        for index, cell in enumerate(cells):
            if cell["cell_type"] != "code":
                continue
            lines = "".join(cell["source"]).rstrip("\n").split("\n")
            wide = [n + 1 for n, line in enumerate(lines) if len(line) > 100]
            if len(lines) > 25 or wide:
                too_long.append(f"{os.path.basename(path)} cell {index}: {len(lines)} lines"
                                + (f", lines {wide} over 100 characters" if wide else ""))
    assert len(glob.glob(os.path.join(folder, "*.ipynb"))) == 6
    assert not too_long, "\n".join(too_long)
