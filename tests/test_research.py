"""A researcher's experiment, CI-sized: a small custom backbone under our ``FasterRCNN`` learns at
least as well as under torchvision's (``tests/research_experiment.py``; the full-size run is
``benchmarks/bench_research.py``).

Two cheap, deterministic checks come first: the heads start from torchvision's initialisation
(compared as distributions, layer by layer), and with the same weights and the same random
stream one training step of each model gives the same losses and gradients. Together they say
that the two models learn alike in distribution; the short training run then checks it end to end.
"""

import time

import pytest
import torch

from frcnn_common import SyntheticShapesDataset
from research_experiment import build_ours, build_torchvision, get_batch, run_experiment

# Our parameter names for torchvision's: everything else is named alike.
RENAMES = [("rpn.head.conv.0.0.", "rpn.head.conv."), ("roi_heads.box_predictor.", "roi_heads.predictor.")]
LOSS_NAMES = {"rpn_cls": "loss_objectness", "rpn_box": "loss_rpn_box_reg",
              "roi_cls": "loss_classifier", "roi_box": "loss_box_reg"}


def our_name(torchvision_name: str) -> str:
    for theirs, ours in RENAMES:
        torchvision_name = torchvision_name.replace(theirs, ours)
    return torchvision_name


def test_heads_start_from_torchvisions_initialisation():
    """Every head layer's weights have torchvision's spread (std ratio within 0.75..1.33, four
    standard errors for the smallest layer, 192 weights) and its biases are zero exactly where
    torchvision's are: RPN head normal(0.01) with zero biases, the two-layer
    head and the predictor PyTorch's default ``nn.Linear``. A Detectron-style predictor
    (std 0.01 / 0.001, zero biases) fails here."""
    ours, theirs = build_ours(0).state_dict(), build_torchvision(0).state_dict()
    heads = [k for k in theirs if k.startswith(("rpn.head.", "roi_heads."))]
    assert len(heads) == 14  # RPN conv, cls_logits, bbox_pred; fc6, fc7; cls_score, bbox_pred
    for name in heads:
        mine, reference = ours[our_name(name)], theirs[name]
        assert mine.shape == reference.shape, name
        if name.endswith("bias"):
            assert bool((mine == 0).all()) == bool((reference == 0).all()), name
        else:
            ratio = (mine.std() / reference.std()).item()
            assert 0.75 < ratio < 1.33, f"{name}: weight std {mine.std():.4g}, torchvision's {reference.std():.4g}"


def test_same_weights_same_losses_and_gradients(one_thread):
    """With our weights copied into torchvision's model and the same random stream (the samplers
    draw the same anchors and proposals), a training step gives the same losses and gradients."""
    ours, theirs = build_ours(0), build_torchvision(0)
    theirs.load_state_dict({k: ours.state_dict()[our_name(k)] for k in theirs.state_dict()})
    # torchvision's training transform draws a random min_size per image even when there is only
    # one to choose from; without that draw both models consume the same random stream.
    theirs.transform.torch_choice = lambda sizes: sizes[0]
    images, targets = get_batch(SyntheticShapesDataset(4, 128, seed=0, train=True), 0, 4, seed=0)
    losses, grads = [], []
    for model in (ours, theirs):
        torch.manual_seed(1)
        loss = model(images, targets)
        sum(v for k, v in loss.items() if k != "total").backward()
        losses.append(loss)
        grads.append({our_name(k): p.grad for k, p in model.named_parameters()})
    for mine, theirs_name in LOSS_NAMES.items():
        torch.testing.assert_close(losses[0][mine], losses[1][theirs_name], msg=mine)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_custom_backbone_learns_as_well_as_torchvision(one_thread):
    """Both detectors trained 120 steps (batch 4, 128 sampled ROIs per image for both instead of
    the default 512, which is most of a step's time on a CPU; otherwise the benchmark's
    experiment) on the same images from the same backbone weights, seed 0, scored on 100
    held-out images.

    Margin 0.08, from the spread measured at this size over seeds 0..4: AP50 ours 0.120, 0.183,
    0.215, 0.143, 0.137, torchvision 0.169, 0.203, 0.200, 0.146, 0.120 (one run's standard
    deviation about 0.037); the runs of one seed share images and backbone, so their difference
    spreads less: -0.049, -0.020, +0.015, -0.003, +0.017 (mean -0.008, standard deviation 0.027),
    and 0.08 is three of those. The runs are seeded, so the result only moves when the libraries
    or the platform change the trajectory. What fails: a box head whose fc6 and fc7 start at
    normal(0.001) (ours 0.054 against 0.169). A Detectron-style predictor does not (0.158): it
    was not measurably slower here, and the initialisation test above catches it instead.
    About 75 s of one CPU thread.
    """
    start = time.process_time()
    settings = dict(steps=120, batch_size=4, eval_images=100, rois_per_image=128)
    ours = run_experiment("ours", 0, **settings)
    theirs = run_experiment("torchvision", 0, **settings)
    assert ours >= theirs - 0.08, f"AP50 ours {ours:.3f}, torchvision {theirs:.3f}"
    assert theirs > 0.05, f"torchvision's model learned nothing (AP50 {theirs:.3f}): the run is too short"
    print(f"AP50 ours {ours:.3f}, torchvision {theirs:.3f}, {time.process_time() - start:.0f} s CPU")
