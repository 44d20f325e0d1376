"""Speed of the plain-PyTorch ops of frcnn_common against torchvision's compiled kernels.

Run from the repository root: ``python benchmarks/bench_ops.py [--repeats 15]``.
Prints one ``name: value`` line per figure: times in milliseconds (``*_ms``) and ratios
(``a_over_b`` = time of a / time of b, so < 1 means a is faster). The implementations are timed
side by side, alternating call by call after a warm-up, and each figure is the median of the
repeats, so a background load slows both alike. torchvision's CPU kernels and the pure ops run on
one thread (the pure ones set it themselves); the Python-loop NMS uses the default threads.
"""

import argparse

from common import report, side_by_side  # (also puts the repository root on sys.path)

import torch
import torchvision.ops

import box_sets  # the tests' box generators
import frcnn_common as fc


def rpn_like_boxes(n: int, g: torch.Generator):
    """Proposals as an RPN makes them at 800 px: clusters around 50 objects of 20..250 px."""
    return box_sets.rpn_like_boxes(n, g, objects=50, extent=800.0, log_sizes=(3.0, 5.5))


def uniform_boxes(n: int, g: torch.Generator):
    """Boxes with uniform random corners (1..200 px sides) in 800 px, random scores."""
    return box_sets.uniform_boxes(n, g, extent=800.0, max_side=200.0)


def loop_nms(boxes, scores, iou_threshold):
    """Greedy NMS with a Python loop: one ``.item()`` (a device sync on a GPU) per kept box."""
    order = scores.argsort(descending=True)
    keep = []
    while order.numel() > 0:
        i = order[0]
        keep.append(i.item())
        rest = order[1:]
        iou = fc.box_iou(boxes[i][None], boxes[rest])[0]
        order = rest[iou <= iou_threshold]
    return torch.tensor(keep, dtype=torch.int64)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    report("torch_threads", torch.get_num_threads())
    g = torch.Generator().manual_seed(0)

    # NMS at 2000 boxes (the RPN's post-NMS budget), IoU threshold 0.7 as in the RPN
    for kind, make in (("", rpn_like_boxes), ("_uniform", uniform_boxes)):
        boxes, scores = make(2000, g)
        tv_keep = torchvision.ops.nms(boxes, scores, 0.7)
        assert torch.equal(fc.nms(boxes, scores, 0.7), tv_keep), "pure nms disagrees"
        assert torch.equal(loop_nms(boxes, scores, 0.7), tv_keep), "loop nms disagrees"
        report(f"nms{kind}_kept_2000", len(tv_keep))
        t_tv, t_pure, t_loop = side_by_side(
            [
                lambda: torchvision.ops.nms(boxes, scores, 0.7),
                lambda: fc.nms(boxes, scores, 0.7),
                lambda: loop_nms(boxes, scores, 0.7),
            ],
            args.repeats,
        )
        report(f"nms{kind}_torchvision_2000_ms", 1e3 * t_tv)
        report(f"nms{kind}_pure_2000_ms", 1e3 * t_pure)
        report(f"nms{kind}_loop_2000_ms", 1e3 * t_loop)
        report(f"nms{kind}_pure_over_torchvision_2000", t_pure / t_tv)
        report(f"nms{kind}_loop_over_pure_2000", t_loop / t_pure)

    # batched NMS as in the ROI head's post-processing: 4000 boxes, 20 classes, threshold 0.5
    boxes, scores = rpn_like_boxes(4000, g)
    idxs = torch.randint(1, 21, (4000,), generator=g)
    assert torch.equal(
        fc.batched_nms(boxes, scores, idxs, 0.5),
        torchvision.ops.batched_nms(boxes, scores, idxs, 0.5),
    ), "pure batched_nms disagrees"
    t_tv, t_pure = side_by_side(
        [
            lambda: torchvision.ops.batched_nms(boxes, scores, idxs, 0.5),
            lambda: fc.batched_nms(boxes, scores, idxs, 0.5),
        ],
        args.repeats,
    )
    report("batched_nms_torchvision_4000_ms", 1e3 * t_tv)
    report("batched_nms_pure_4000_ms", 1e3 * t_pure)
    report("batched_nms_pure_over_torchvision_4000", t_pure / t_tv)

    # RoIAlign: 1000 boxes of 16..300 px in a 400 x 400 image, on its stride-4 map [1,256,100,100]
    feature = torch.randn(1, 256, 100, 100, generator=g)
    centres = torch.rand(1000, 2, generator=g) * 400
    sides = torch.exp(torch.empty(1000, 2).uniform_(2.77, 5.70, generator=g))
    boxes = torch.cat((centres - sides / 2, centres + sides / 2), 1).clamp(0, 400)
    rois = torch.cat((torch.zeros(1000, 1), boxes), 1)
    args_ra = (rois, 7, 0.25, 2, False)
    error = (fc.roi_align(feature, *args_ra) - torchvision.ops.roi_align(feature, *args_ra)).abs()
    report("roi_align_max_abs_diff_1000", error.max().item())
    t_tv, t_pure = side_by_side(
        [
            lambda: torchvision.ops.roi_align(feature, *args_ra),
            lambda: fc.roi_align(feature, *args_ra),
        ],
        max(3, args.repeats // 2),
    )
    report("roi_align_torchvision_1000_ms", 1e3 * t_tv)
    report("roi_align_pure_1000_ms", 1e3 * t_pure)
    report("roi_align_pure_over_torchvision_1000", t_pure / t_tv)

    grad_out = torch.randn(1000, 256, 7, 7, generator=g)
    leaf = feature.clone().requires_grad_()

    def forward_backward(op):
        leaf.grad = None
        op(leaf, *args_ra).backward(grad_out)

    t_tv, t_pure = side_by_side(
        [
            lambda: forward_backward(torchvision.ops.roi_align),
            lambda: forward_backward(fc.roi_align),
        ],
        max(3, args.repeats // 2),
    )
    report("roi_align_fwd_bwd_torchvision_1000_ms", 1e3 * t_tv)
    report("roi_align_fwd_bwd_pure_1000_ms", 1e3 * t_pure)
    report("roi_align_fwd_bwd_pure_over_torchvision_1000", t_pure / t_tv)


if __name__ == "__main__":
    main()
