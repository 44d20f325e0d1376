"""torchvision's own detector holding our weights: the reference the tests and benchmarks compare
the module with, stage by stage. Test tooling, so it lives here and not in the course module."""

import torch
import torch.nn as nn

from frcnn_common import FasterRCNN, FrozenBatchNorm2d, coco91_rows, course_key


def torchvision_twin(model: FasterRCNN, map_coco_classes: bool = False) -> nn.Module:
    """torchvision's own ``FasterRCNN`` holding the same weights as ``model`` (a ResNet-50 + FPN),
    for side-by-side checks: frozen BatchNorm, the same trainable layers, and a transform that
    neither resizes nor normalises, so both models see the same pixels. With an 81-class model
    and ``map_coco_classes=True`` its head is spread back onto torchvision's 91 COCO ids."""
    from torchvision.models import resnet50
    from torchvision.models.detection import FasterRCNN as TorchvisionFasterRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.misc import FrozenBatchNorm2d as TorchvisionFrozenBN

    bn = model.backbone.bn1
    norm = TorchvisionFrozenBN if isinstance(bn, FrozenBatchNorm2d) else nn.BatchNorm2d
    trainable = sum(any(p.requires_grad for p in getattr(model.backbone, n).parameters())
                    for n in ("conv1", "layer1", "layer2", "layer3", "layer4"))
    body = resnet50(norm_layer=lambda c: norm(c, eps=bn.eps))
    num_classes = 91 if map_coco_classes else model.num_classes
    twin = TorchvisionFasterRCNN(_resnet_fpn_extractor(body, trainable), num_classes=num_classes,
                                 min_size=1, max_size=100_000, image_mean=[0.0] * 3, image_std=[1.0] * 3)
    twin.transform.resize = lambda image, target=None: (image, target)  # no resizing at all
    their_name = {course_key(k): k for k in twin.state_dict()}
    state = {their_name[k]: v for k, v in model.state_dict().items()}
    if map_coco_classes:
        rows, box_rows = coco91_rows()
        for name in ("weight", "bias"):
            for head, idx, size in (("cls_score", rows, 91), ("bbox_pred", box_rows, 364)):
                key = f"roi_heads.box_predictor.{head}.{name}"
                full = torch.zeros((size, *state[key].shape[1:]))
                if head == "cls_score" and name == "bias":
                    full.fill_(-1e4)  # the unused ids never win the softmax
                full[idx] = state[key]
                state[key] = full
    twin.load_state_dict(state)
    return twin.train(model.training)
