"""The detector against torchvision's with the same weights, its learning, and its input checks."""

import re
import socket
import threading
import warnings

import pytest
import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.ops.misc import FrozenBatchNorm2d as TorchvisionFrozenBN

import frcnn_common as fc
from detectors import detector_pair, small_detector
from twin import torchvision_twin


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(2, 3, 256, 320)


def twin_stages(twin, batch, image_sizes):
    """torchvision's features, proposals and detections, called stage by stage (no transform)."""
    image_list = ImageList(batch, image_sizes)
    features = twin.backbone(batch)
    proposals, _ = twin.rpn(image_list, features)
    detections, _ = twin.roi_heads(features, proposals, image_sizes)
    return features, proposals, detections


def assert_same_detections(ours, theirs, box_tol=1e-3, score_tol=1e-5):
    """The same detections of each image: the same sorted scores, and each of ours has one of
    theirs with the same label, score and box. Matched by value, not by position: scores that
    agree to their last bits come in an order that another processor's kernels change (seen
    under torch's plain build, ``make test-portable``); detections tied with the last one kept
    may differ in which of them the top 100 keeps."""
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a["boxes"].shape[0] > 0, "the comparison needs detections to compare"
        torch.testing.assert_close(a["scores"], b["scores"], atol=score_tol, rtol=0)
        cut = float(b["scores"].min()) + score_tol
        for box, score, label in zip(a["boxes"], a["scores"], a["labels"]):
            same = ((b["boxes"] - box).abs().amax(1) < box_tol) & (b["labels"] == label) \
                & ((b["scores"] - score).abs() <= score_tol)
            assert same.any() or score <= cut, f"no detection of theirs like {box.tolist()}, " \
                f"score {float(score)}, label {int(label)}"


# ─── equal to torchvision, stage by stage ──────────────────────────────────────────────────────


@torch.no_grad()
def test_backbone_and_fpn_features_equal_torchvision(pair, images):
    model, twin = pair
    ours = model.features(images)
    theirs = list(twin.backbone(images).values())
    assert [f.shape[-1] for f in ours] == [80, 40, 20, 10, 5]  # strides 4..64 on a 320-wide image
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("size", [(256, 320), (800, 1088)])
def test_anchors_equal_torchvision(pair, size):
    model, twin = pair
    batch = torch.zeros(1, 3, *size)
    shapes = [(-(-size[0] // s), -(-size[1] // s)) for s in (4, 8, 16, 32, 64)]  # ceil, as the convs
    features = [torch.zeros(1, 256, h, w) for h, w in shapes]
    theirs = twin.rpn.anchor_generator(ImageList(batch, [size]), features)[0]
    ours = model.rpn.anchor_generator(size, shapes)
    # equal also at 800 px, where P6's stride is image size // feature size = 800 // 13 = 61
    assert torch.equal(ours, theirs)


def test_anchor_layout_matches_the_docstring():
    generator = fc.AnchorGenerator(((32,),), ((0.5, 1.0, 2.0),))
    anchors = generator((64, 64), [(2, 2)])
    # ratio 0.5 (h/w) is wide: w = 32 / sqrt(0.5) = 45.25 -> half-width 22.6 rounds to 23
    assert anchors[:3].tolist() == [[-23.0, -11.0, 23.0, 11.0], [-16.0, -16.0, 16.0, 16.0],
                                    [-11.0, -23.0, 11.0, 23.0]]
    # next location: x moves by the stride (32), no half-stride offset
    assert anchors[3].tolist() == [9.0, -11.0, 55.0, 11.0]


@torch.no_grad()
def test_proposals_roi_pooling_and_detections_equal_torchvision(pair, images):
    model, twin = pair
    sizes = [(256, 320)] * 2
    features, their_props, their_dets = twin_stages(twin, images, sizes)
    our_dets, our_props = model(images)
    for a, b in zip(our_props, their_props):
        assert a.shape[0] > 100
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    levels = list(features.values())[:4]
    pooled_theirs = twin.roi_heads.box_roi_pool(features, their_props, sizes)
    pooled_ours = model.roi_heads.roi_align(levels, our_props, sizes)
    torch.testing.assert_close(pooled_ours, pooled_theirs, atol=1e-5, rtol=1e-5)
    assert_same_detections(our_dets, their_dets)


@torch.no_grad()
def test_the_pure_ops_give_torchvisions_detections(pair, images):
    model, twin = pair
    _, their_props, their_dets = twin_stages(twin, images, [(256, 320)] * 2)
    with fc.ops_backend("pure"):
        our_dets, our_props = model(images)
    for a, b in zip(our_props, their_props):
        # the same boxes; only equal scores may come in another order (torchvision's CPU
        # batched_nms re-sorts its per-level results with an unstable sort)
        assert a.shape == b.shape
        exact = "donot_use_mm_for_euclid_dist"
        assert torch.cdist(a, b, compute_mode=exact).min(dim=1).values.max() < 1e-3
    assert_same_detections(our_dets, their_dets)


@torch.no_grad()
def test_images_of_different_sizes_are_padded_and_clipped_like_torchvision(pair):
    model, twin = pair
    torch.manual_seed(2)
    imgs = [torch.randn(3, 200, 300), torch.randn(3, 250, 170)]
    batch, sizes = model.batch_images(imgs)
    assert batch.shape == (2, 3, 256, 320) and sizes == [(200, 300), (250, 170)]
    their_list, _ = twin.transform(imgs)
    assert torch.equal(batch, their_list.tensors)
    dets, _ = model(imgs)
    _, _, their_dets = twin_stages(twin, batch, sizes)
    assert_same_detections(dets, their_dets)
    for det, (h, w) in zip(dets, sizes):
        assert det["boxes"][:, 2].max() <= w and det["boxes"][:, 3].max() <= h


@torch.no_grad()
def test_bilinear_padding_of_a_batch_tensor_is_zero_on_the_right_and_bottom(pair):
    batch, sizes = pair[0].batch_images(torch.ones(1, 3, 400, 400))
    assert batch.shape == (1, 3, 416, 416) and sizes == [(400, 400)]
    assert batch[..., 400:, :].abs().sum() == 0 and batch[..., :400, :400].min() == 1


def test_training_losses_and_gradients_equal_torchvision(images, empty_target):
    model, twin = detector_pair(seed=3)
    model.train(), twin.train()
    targets = [
        {"boxes": torch.tensor([[10.0, 20, 200, 220], [150, 100, 300, 250]]), "labels": torch.tensor([1, 5])},
        empty_target,  # no objects
    ]
    torch.manual_seed(7)  # both samplers then draw the same random permutations
    image_list = ImageList(images, [(256, 320)] * 2)
    features = twin.backbone(images)
    proposals, rpn_losses = twin.rpn(image_list, features, targets)
    _, roi_losses = twin.roi_heads(features, proposals, image_list.image_sizes, targets)
    theirs = {**rpn_losses, **roi_losses}
    torch.manual_seed(7)
    ours = model(images, targets)
    names = {"rpn_cls": "loss_objectness", "rpn_box": "loss_rpn_box_reg",
             "roi_cls": "loss_classifier", "roi_box": "loss_box_reg"}
    for our_name, their_name in names.items():
        torch.testing.assert_close(ours[our_name], theirs[their_name], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours["total"], sum(theirs.values()), atol=1e-5, rtol=1e-5)
    ours["total"].backward()
    sum(theirs.values()).backward()
    their_params = {fc.course_key(k): p for k, p in twin.named_parameters()}
    trained = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    assert len(trained) == sum(p.requires_grad for p in twin.parameters())
    for name, param in trained:
        torch.testing.assert_close(param.grad, their_params[name].grad, atol=1e-5, rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")


def test_training_on_a_mixed_size_batch_equals_torchvision_given_the_list():
    """Images of different sizes go through collate as a list; the model pads them itself and
    clips proposals to each image's own size, exactly as torchvision's model does."""
    model, twin = detector_pair(seed=4)
    model.train(), twin.train()
    torch.manual_seed(2)
    samples = [(torch.randn(3, 200, 260), {"boxes": torch.tensor([[10.0, 20, 120, 150]]),
                                           "labels": torch.tensor([3])}),
               (torch.randn(3, 160, 300), {"boxes": torch.tensor([[150.0, 30, 290, 150]]),
                                           "labels": torch.tensor([7])})]
    images, targets = fc.frcnn_collate_fn(samples)
    image_list, _ = twin.transform(images, targets)
    assert image_list.image_sizes == [(200, 260), (160, 300)]
    torch.manual_seed(7)
    features = twin.backbone(image_list.tensors)
    their_proposals, rpn_losses = twin.rpn(image_list, features, targets)
    _, roi_losses = twin.roi_heads(features, their_proposals, image_list.image_sizes, targets)
    torch.manual_seed(7)
    ours = model(images, targets)
    for ours_name, theirs_value in zip(("rpn_cls", "rpn_box", "roi_cls", "roi_box"),
                                       [*rpn_losses.values(), *roi_losses.values()]):
        torch.testing.assert_close(ours[ours_name], theirs_value, atol=1e-6, rtol=1e-5)
    model.eval()
    with torch.no_grad():
        _, our_proposals = model(images)
    twin.eval()
    with torch.no_grad():
        their_proposals, _ = twin.rpn(image_list, twin.backbone(image_list.tensors))
    for ours_p, theirs_p, (h, w) in zip(our_proposals, their_proposals, image_list.image_sizes):
        torch.testing.assert_close(ours_p, theirs_p)
        assert ours_p[:, 2].max() <= w and ours_p[:, 3].max() <= h  # not the padded canvas


# ─── torchvision's weights ─────────────────────────────────────────────────────────────────────


def test_from_torchvision_reads_old_and_new_key_names_and_maps_coco_ids(pair, images):
    model, _ = pair
    twin91 = torchvision_twin(model, map_coco_classes=True)
    state = twin91.state_dict()
    assert state["roi_heads.box_predictor.cls_score.weight"].shape[0] == 91
    old_names = {re.sub(r"(_blocks\.\d+)\.0\.", r"\1.", k.replace("rpn.head.conv.0.0.", "rpn.head.conv.")): v
                 for k, v in state.items()}  # the names before torchvision 0.13
    assert "rpn.head.conv.weight" in old_names and "backbone.fpn.inner_blocks.0.weight" in old_names
    for source in (state, old_names):
        loaded = fc.FasterRCNN.from_torchvision(source, norm_eps=model.backbone.bn1.eps).eval()
        assert loaded.num_classes == 81
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
    # the class rows follow the names: torchvision's COCO category list names the same classes
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    their_names = FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    assert [their_names[i] for i in fc.coco91_rows()[0]] == fc.COCO_NAMES
    with torch.no_grad():
        theirs = twin91(list(images))
    to_label = {cid: i + 1 for i, cid in enumerate(fc.COCO_CATEGORY_IDS)}
    theirs = [{**d, "labels": torch.tensor([to_label[int(i)] for i in d["labels"]])} for d in theirs]
    with torch.no_grad():
        assert_same_detections(model(images)[0], theirs)


def test_from_torchvision_keeps_a_fine_tuned_head_size(pair):
    model, _ = pair
    state = torchvision_twin(model).state_dict()
    state = {k: (v[:5] if "box_predictor.cls_score" in k else v[:20] if "box_predictor.bbox_pred" in k else v)
             for k, v in state.items()}
    assert fc.FasterRCNN.from_torchvision(state).num_classes == 5


def test_from_torchvision_with_num_classes_keeps_all_but_a_new_predictor(pair, capsys):
    model, _ = pair
    state = torchvision_twin(model).state_dict()
    loaded = fc.FasterRCNN.from_torchvision(state, num_classes=4, norm_eps=model.backbone.bn1.eps)
    head = [f"roi_heads.predictor.{p}.{w}" for p in ("bbox_pred", "cls_score") for w in ("bias", "weight")]
    assert loaded.num_classes == 4 and loaded.new_weights == head
    assert "4 weights left at their initial values" in capsys.readouterr().err
    assert loaded.roi_heads.predictor.cls_score.weight.shape[0] == 4
    for key, value in model.state_dict().items():
        if "predictor" not in key:
            assert torch.equal(loaded.state_dict()[key], value), key


def _offline(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # nothing cached

    def unreachable(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)


def test_named_weights_offline_fail_fast_with_the_way_out(monkeypatch, tmp_path, no_hang):
    _offline(monkeypatch, tmp_path)
    with pytest.raises(ConnectionError, match="weights=None"):
        no_hang(fc.ResNet50, "IMAGENET1K_V1")
    with pytest.raises(ConnectionError, match="download.pytorch.org"):
        no_hang(fc.FasterRCNN.from_torchvision, "COCO_V1")


def test_the_offline_advice_works_when_followed(monkeypatch, tmp_path, resnet50_state):
    """Each way out an offline error names is followed, as written, and works."""
    _offline(monkeypatch, tmp_path)
    with pytest.raises(ConnectionError) as error:
        fc.fasterrcnn_resnet50_fpn(weights_backbone="IMAGENET1K_V1")
    advice = str(error.value)
    assert "weights_backbone=None" in advice and "weights_backbone=<the path" in advice
    assert fc.fasterrcnn_resnet50_fpn(weights_backbone=None).num_classes == fc.NUM_CLASSES
    path = tmp_path / "resnet50.pt"
    torch.save(resnet50_state, path)
    model = fc.fasterrcnn_resnet50_fpn(weights_backbone=str(path))
    assert not model.backbone.layer1[0].conv1.weight.requires_grad  # pretrained: 3 stages train
    with pytest.raises(ConnectionError) as error:
        fc.FasterRCNN.from_torchvision("COCO_V1")
    assert "state_dict=<the path" in str(error.value) and "None" not in str(error.value)
    saved = tmp_path / "coco.pt"
    torch.save(torchvision_twin(model).state_dict(), saved)
    assert fc.FasterRCNN.from_torchvision(str(saved)).num_classes == fc.NUM_CLASSES
    with pytest.raises(ValueError, match="state_dict=None: from_torchvision needs weights"):
        fc.FasterRCNN.from_torchvision(None)


def test_a_connection_that_hangs_is_cut_off(monkeypatch, no_hang):
    never = threading.Event()  # the answer that never comes; set at the end to free the thread
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: never.wait())
    try:
        said = no_hang(fc.unreachable_reason, "https://example.org/x", timeout=0.5)
    finally:
        never.set()
    assert "no answer within 0.5 s" in said


def test_backbone_weights_load_from_a_file_and_unknown_names_are_refused(tmp_path, resnet50_state):
    path = tmp_path / "resnet50.pt"
    torch.save({**resnet50_state, "fc.weight": torch.zeros(1000, 2048)}, path)  # a classifier's
    loaded = fc.ResNet50(str(path))
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, resnet50_state[key]), key
    assert isinstance(loaded.bn1, fc.FrozenBatchNorm2d), "pretrained weights keep their statistics"
    assert not loaded.layer1[0].conv1.weight.requires_grad and loaded.layer2[0].conv1.weight.requires_grad
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        fc.ResNet50("IMAGENET_V9")


# ─── frozen layers, checkpointing, learning ────────────────────────────────────────────────────


@pytest.mark.parametrize("trainable, first_trained", [(0, None), (1, "layer4"), (3, "layer2"), (5, "conv1")])
def test_trainable_layers_freeze_the_stages_below(resnet50_state, trainable, first_trained):
    backbone = fc.ResNet50(resnet50_state, trainable_layers=trainable, frozen_bn=True)
    trained = [n for n, p in backbone.named_parameters() if p.requires_grad]
    order = ["conv1", "layer1", "layer2", "layer3", "layer4"]
    stages = {n.split(".")[0] for n in trained}
    assert stages == set(order[len(order) - trainable:])
    if first_trained:
        assert first_trained in stages


def test_a_trainable_stem_trains_its_batchnorm_too(resnet50_state):
    backbone = fc.ResNet50(resnet50_state, trainable_layers=5, frozen_bn=False)
    assert backbone.bn1.weight.requires_grad and isinstance(backbone.bn1, torch.nn.BatchNorm2d)
    assert not fc.ResNet50(resnet50_state, trainable_layers=4, frozen_bn=False).bn1.weight.requires_grad


def test_frozen_batchnorm_changes_nothing_in_training():
    torch.manual_seed(0)
    model = fc.fasterrcnn_resnet50_fpn(trainable_layers=5, frozen_bn=True).train()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    before = {k: v.clone() for k, v in model.state_dict().items() if "bn" in k or "downsample.1" in k}
    assert before and all("bn" not in n for n, _ in model.named_parameters())
    target = [{"boxes": torch.tensor([[8.0, 8, 60, 60]]), "labels": torch.tensor([3])}]
    model(torch.randn(1, 3, 128, 128) * 3 + 1, target)["total"].backward()
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_gradient_checkpointing_gives_the_same_losses_and_gradients():
    torch.manual_seed(0)
    model = fc.fasterrcnn_resnet50_fpn().train()
    images = torch.randn(2, 3, 160, 160)
    targets = [{"boxes": torch.tensor([[8.0, 8, 90, 120]]), "labels": torch.tensor([2])}] * 2
    results = []
    for enabled in (False, True):
        model.set_gradient_checkpointing(enabled)
        assert model.gradient_checkpointing is enabled
        model.zero_grad()
        torch.manual_seed(1)
        loss = model(images, targets)["total"]
        loss.backward()
        results.append((loss.detach(), model.backbone.layer3[0].conv1.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


class TwoLevelBackbone(torch.nn.Module):
    """A small backbone returning two maps (strides 4 and 8), for an FPN built on top."""

    out_channels = [32, 64]

    def __init__(self):
        super().__init__()
        self.c2 = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, 2, 1), torch.nn.ReLU(),
                                      torch.nn.Conv2d(32, 32, 3, 2, 1), torch.nn.ReLU())
        self.c3 = torch.nn.Sequential(torch.nn.Conv2d(32, 64, 3, 2, 1), torch.nn.ReLU())

    def forward(self, x):
        c2 = self.c2(x)
        return [c2, self.c3(c2)]


def test_one_batch_is_learned_and_images_without_objects_train(empty_target):
    torch.manual_seed(0)
    model = fc.FasterRCNN(3, TwoLevelBackbone(), use_fpn=True, anchor_sizes=(16, 32, 64), hidden_dim=128,
                          fpn_channels=32).train()  # 32 channels: 6 s here instead of 40
    assert len(model.rpn.anchor_generator.cell_anchors) == 3  # P2, P3 and the pooled P4
    images = torch.randn(2, 3, 128, 128)
    targets = [{"boxes": torch.tensor([[16.0, 20, 80, 100], [70, 10, 120, 50]]), "labels": torch.tensor([1, 2])},
               empty_target]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    history = []
    for _ in range(40):
        losses = model(images, targets)
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in losses.items()})
    assert all(torch.isfinite(torch.tensor(h["total"])) for h in history)
    assert history[-1]["total"] < 0.3 * history[0]["total"], [h["total"] for h in history]
    assert history[-1]["roi_cls"] < 0.2 * history[0]["roi_cls"]


# ─── bad input gets a clear error ──────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return fc.fasterrcnn_resnet50_fpn(num_classes=5)


def box_target(boxes, labels):
    return [{"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)}]


@pytest.mark.parametrize("images, targets, error, match", [
    (torch.zeros(1, 3, 64, 64), None, ValueError, "needs targets"),
    (torch.zeros(1, 3, 64, 64), box_target([[1, 1, 9, 9]], [5]), ValueError, "num_classes=5 counts it"),
    (torch.zeros(1, 3, 64, 64), box_target([[1, 1, 9, 9]], [0]), ValueError, "outside 1..4"),
    (torch.zeros(1, 3, 64, 64), box_target([[9, 1, 2, 9]], [1]), ValueError, "x2 <= x1"),
    (torch.zeros(1, 3, 64, 64), box_target([[1, 1, 90, 9]], [1]), ValueError, "outside the 64x64 image"),
    (torch.zeros(1, 3, 64, 64), box_target([[1, 1, float("nan"), 9]], [1]), ValueError, "NaN"),
    (torch.zeros(3, 64, 64), box_target([[1, 1, 9, 9]], [1]), ValueError, r"images\[None\]"),
    (torch.full((1, 3, 64, 64), float("inf")), box_target([[1, 1, 9, 9]], [1]), ValueError, "NaN or Inf"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), box_target([[1, 1, 9, 9]], [1]), TypeError, "normalise"),
    (torch.zeros(1, 3, 64, 64), box_target([[1, 1, 9, 9]], [1]) * 2, ValueError, "1 images but 2 targets"),
])
def test_bad_training_input_is_refused_clearly(small_model, images, targets, error, match):
    small_model.train()
    with pytest.raises(error, match=match):
        small_model(images, targets)


def test_num_classes_must_count_the_background():
    with pytest.raises(ValueError, match="counts the background"):
        fc.FasterRCNN(num_classes=1)


# ─── the generic API ───────────────────────────────────────────────────────────────────────────


def test_a_custom_single_map_backbone_trains_and_predicts():
    torch.manual_seed(0)
    backbone = fc.TinyBackbone((32, 64, 32), num_outputs=1)  # one map, stride 8
    model = fc.FasterRCNN(4, backbone, anchor_stride=8, anchor_sizes=(16, 32), hidden_dim=64,
                          dropout=0.1)
    assert model.fpn is None
    losses = model.train()(torch.randn(2, 3, 64, 64), box_target([[4, 4, 40, 30]], [3]) * 2)
    assert set(losses) == {"rpn_cls", "rpn_box", "roi_cls", "roi_box", "total"}
    losses["total"].backward()
    results = model.predict(torch.randn(1, 3, 64, 64), score_threshold=0.0)
    assert model.training, "predict restores the training mode"
    assert set(results[0]) == {"boxes", "scores", "labels"}
    assert (results[0]["labels"] >= 1).all() and (results[0]["labels"] <= 3).all()


def test_predict_keeps_no_autograd_graph(gen):
    """README: ``predict`` runs without gradients, even where they are enabled: no result holds a
    graph of the forward pass (which for a large image costs seconds and gigabytes)."""
    model = small_detector().train()
    assert torch.is_grad_enabled()
    results = model.predict([torch.randn(3, 64, 64, generator=gen(0)),
                             torch.randn(3, 48, 80, generator=gen(1))])
    assert all(len(r["boxes"]) > 0 for r in results), "the check needs detections"
    for result in results:
        for key, value in result.items():
            assert value.grad_fn is None and not value.requires_grad, key


def test_a_wrong_feat_channels_is_named():
    model = fc.FasterRCNN(4, fc.TinyBackbone((32, 64, 64), num_outputs=1), feat_channels=128,
                          anchor_stride=8).eval()
    with pytest.raises(ValueError, match="pass feat_channels=64"):
        model(torch.randn(1, 3, 64, 64))


def test_a_target_given_as_one_dict_is_named():
    model = fc.FasterRCNN(4, fc.TinyBackbone((32, 64, 64), num_outputs=1), anchor_stride=8).train()
    with pytest.raises(TypeError, match="one dict per image"):
        model([torch.randn(3, 64, 64)], {"boxes": torch.tensor([[1.0, 1, 20, 20]]),
                                         "labels": torch.tensor([1])})


def test_a_wrong_anchor_stride_is_named():
    model = fc.FasterRCNN(4, fc.TinyBackbone((32, 64, 64), num_outputs=1), anchor_stride=16).eval()
    with pytest.raises(ValueError, match="pass anchor_stride=8"):
        model(torch.randn(1, 3, 64, 64))


def test_resnet101_factory_matches_torchvision_parameter_count():
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.models.detection import FasterRCNN as TorchvisionFasterRCNN

    ours = fc.fasterrcnn_resnet101_fpn(num_classes=91, frozen_bn=True)
    theirs = TorchvisionFasterRCNN(resnet_fpn_backbone(backbone_name="resnet101", weights=None,
                                                       norm_layer=TorchvisionFrozenBN), 91)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


# ─── precision ─────────────────────────────────────────────────────────────────────────────────


def test_bfloat16_autocast_on_cpu_runs_the_whole_model(pair, images):
    model, _ = pair
    targets = box_target([[10, 20, 200, 220]], [1]) * 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        try:
            losses = model.train()(images, targets)
        finally:
            model.eval()  # the shared pair stays in eval mode
        with torch.no_grad():
            results, proposals = model(images)
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values())
    assert results[0]["boxes"].dtype == torch.float32 and results[0]["boxes"].shape[0] > 0
    assert torch.isfinite(proposals[0]).all()


def test_an_empty_image_given_torch_tensor_of_nothing_is_told_the_shape():
    model = fc.FasterRCNN(4, fc.TinyBackbone((32, 64, 64), num_outputs=1), anchor_stride=8).train()
    with pytest.raises(ValueError, match=r"boxes \[0\].*reshape\(0, 4\)"):
        model(torch.randn(1, 3, 64, 64), [{"boxes": torch.tensor([]), "labels": torch.tensor([])}])
    with pytest.raises(TypeError, match="target 0: boxes and labels must be tensors"):
        model(torch.randn(1, 3, 64, 64), [{"boxes": None, "labels": torch.tensor([1])}])


def test_boxes_given_as_fractions_of_the_image_are_warned_about():
    model = fc.FasterRCNN(4, fc.TinyBackbone((32, 64, 64), num_outputs=1), anchor_stride=8).train()
    fractions = [{"boxes": torch.tensor([[0.1, 0.2, 0.5, 0.6]]), "labels": torch.tensor([1])}] * 2
    with pytest.warns(UserWarning, match=r"under 4 px.*160x128.*fractions of the image"):
        model(torch.randn(2, 3, 128, 160), fractions)
    pixels = [{"boxes": torch.tensor([[10.0, 20, 50, 60], [1, 1, 3, 3]]), "labels": torch.tensor([1, 2])}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one real box in the batch: no warning
        model(torch.randn(1, 3, 128, 160), pixels)
        model(torch.randn(1, 3, 64, 64), [{"boxes": torch.tensor([[0.1, 0.2, 0.5, 0.6]]),
                                           "labels": torch.tensor([1])}])  # small images: no warning
