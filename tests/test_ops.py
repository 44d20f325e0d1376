"""The plain-PyTorch ops (nms, batched_nms, roi_align) against torchvision's compiled kernels."""

import pytest
import torch
import torchvision.ops as tv

import frcnn_common as fc
import frcnn_ops
from box_sets import rpn_like_boxes, uniform_boxes


# ─── nms ──────────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("n", [1, 7, 300, 1100])  # 1100 spans several CPU blocks
@pytest.mark.parametrize("make", [rpn_like_boxes, uniform_boxes])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_matches_torchvision(n, make, threshold, gen):
    boxes, scores = make(n, gen(n))
    expected = tv.nms(boxes, scores, threshold)
    got = fc.nms(boxes, scores, threshold)
    assert got.dtype == torch.int64
    assert torch.equal(got, expected)
    if n > 100:
        assert 0 < len(got) < n  # the case really suppresses something


def test_nms_ties_are_in_index_order_like_torchvision(gen):
    g = gen(1)
    boxes, _ = rpn_like_boxes(600, g)
    scores = torch.randint(0, 4, (600,), generator=g).float()  # many equal scores
    expected = tv.nms(boxes, scores, 0.5)
    got = fc.nms(boxes, scores, 0.5)
    assert torch.equal(got, expected)
    # torchvision's CPU kernel sorts stably: equal scores come out by increasing index
    key = -scores[got] * 10_000 + got.float()
    assert torch.equal(key, key.sort().values)


def test_nms_ties_on_disjoint_boxes_keep_everything_in_index_order():
    boxes = torch.tensor([[10.0 * i, 0, 10.0 * i + 5, 5] for i in range(12)])
    scores = torch.tensor([float(i % 3) for i in range(12)])
    got = fc.nms(boxes, scores, 0.5)
    assert got.tolist() == [2, 5, 8, 11, 1, 4, 7, 10, 0, 3, 6, 9]
    assert torch.equal(got, tv.nms(boxes, scores, 0.5))


def test_nms_duplicate_boxes_keep_the_first_of_the_best():
    box = torch.tensor([[5.0, 5, 25, 30]])
    boxes = torch.cat((box.repeat(4, 1), torch.tensor([[100.0, 100, 120, 120]])))
    scores = torch.tensor([0.5, 0.9, 0.9, 0.1, 0.2])
    got = fc.nms(boxes, scores, 0.7)
    assert got.tolist() == [1, 4]
    assert torch.equal(got, tv.nms(boxes, scores, 0.7))


def test_nms_empty_input():
    for impl in (fc.nms, tv.nms):
        got = impl(torch.zeros(0, 4), torch.zeros(0), 0.5)
        assert got.dtype == torch.int64 and got.shape == (0,)
    got = fc.batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5)
    assert got.dtype == torch.int64 and got.shape == (0,)


def test_nms_zero_area_boxes_are_never_suppressed_by_nan_iou():
    boxes = torch.tensor([[1.0, 1, 1, 1], [1.0, 1, 1, 1], [0, 0, 10, 10], [2.0, 2, 2, 8]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    got = fc.nms(boxes, scores, 0.5)
    assert got.tolist() == [0, 1, 2, 3]  # 0/0 IoU is NaN and never above the threshold
    assert torch.equal(got, tv.nms(boxes, scores, 0.5))


def test_nms_iou_equal_to_the_rounded_threshold_is_decided_like_torchvision():
    # IoU = 30 / 100 = float32(0.3) = 0.30000001 > 0.3 (double): torchvision suppresses it,
    # while a naive float32 comparison `iou > 0.3` would keep it.
    boxes = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 3, 10]])
    scores = torch.tensor([0.9, 0.8])
    assert tv.nms(boxes, scores, 0.3).tolist() == [0]
    assert fc.nms(boxes, scores, 0.3).tolist() == [0]
    assert fc.nms(boxes, scores, 0.5).tolist() == [0, 1]
    # IoU exactly 0.5 at threshold 0.5: kept (suppression needs IoU strictly above)
    boxes = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 5]])
    assert tv.nms(boxes, scores, 0.5).tolist() == fc.nms(boxes, scores, 0.5).tolist() == [0, 1]
    assert fc.nms(boxes, scores, 0.49).tolist() == [0]


def test_nms_float64_and_autocast(gen):
    boxes, scores = uniform_boxes(400, gen(3))
    expected = tv.nms(boxes, scores, 0.5)
    assert torch.equal(fc.nms(boxes.double(), scores.double(), 0.5), tv.nms(boxes.double(), scores.double(), 0.5))
    half_boxes = boxes.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fc.nms(half_boxes, scores.bfloat16(), 0.5)
        ref = tv.nms(half_boxes, scores.bfloat16(), 0.5)  # torchvision computes in float32 here
    assert torch.equal(got, ref)
    assert not torch.equal(got, expected)  # the bfloat16 rounding did change the problem


def test_ops_leave_the_thread_count_as_it_was(one_thread, gen):
    boxes, scores = uniform_boxes(300, gen(4))
    with fc.cpu_threads(2):  # the ops pin one thread inside, then give the caller's 2 back
        fc.nms(boxes, scores, 0.5)
        fc.batched_nms(boxes, scores, torch.arange(300) % 2, 0.5)
        fc.roi_align(torch.randn(1, 2, 8, 8), [boxes[:4] / 50], 2)
        assert torch.get_num_threads() == 2


def test_cpu_threads_sets_the_count_inside_and_restores_it_after_an_error(one_thread):
    assert torch.get_num_threads() == 1
    with pytest.raises(RuntimeError):
        with fc.cpu_threads(2):
            assert torch.get_num_threads() == 2
            raise RuntimeError
    assert torch.get_num_threads() == 1
    with fc.cpu_threads(None):
        assert torch.get_num_threads() == 1


# ─── batched_nms ──────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("n", [500, 1500])  # torchvision: coordinate trick / per-class loop
def test_batched_nms_matches_torchvision(n, gen):
    g = gen(n)
    boxes, scores = rpn_like_boxes(n, g)
    idxs = torch.randint(0, 6, (n,), generator=g)
    expected = tv.batched_nms(boxes, scores, idxs, 0.5)
    got = fc.batched_nms(boxes, scores, idxs, 0.5)
    assert torch.equal(got, expected)
    assert len(got) > len(fc.nms(boxes, scores, 0.5))  # classes do protect each other


def test_batched_nms_ties_match_torchvision(gen):
    g = gen(5)
    boxes, _ = rpn_like_boxes(800, g)
    scores = torch.randint(0, 3, (800,), generator=g).float()
    idxs = torch.randint(0, 4, (800,), generator=g)
    assert torch.equal(fc.batched_nms(boxes, scores, idxs, 0.5), tv.batched_nms(boxes, scores, idxs, 0.5))


def test_batched_nms_large_category_ids_stay_apart():
    boxes = torch.tensor([[0.0, 0, 10, 10]]).repeat(3, 1)
    scores = torch.tensor([0.9, 0.8, 0.7])
    idxs = torch.tensor([10**9, 10**9 + 1, 10**9])  # equal in float32, but different categories
    assert fc.batched_nms(boxes, scores, idxs, 0.5).tolist() == [0, 1]


# ─── roi_align ────────────────────────────────────────────────────────────────────────────────


def _rois(g, n_images=2, k=40, extent=64.0):
    """Boxes of many kinds, in image pixels: inside, partly and fully outside the map, tiny,
    zero-area and inverted."""
    xy = torch.rand(k, 2, generator=g) * extent * 1.2 - extent * 0.1
    wh = torch.rand(k, 2, generator=g) * extent * 0.6
    boxes = torch.cat((xy, xy + wh), 1)
    special = torch.tensor([
        [-30.0, -30, -10, -10],      # fully outside (top-left)
        [70.0, 70, 90, 90],          # fully outside (bottom-right)
        [-8.0, 10, 20, 80],          # partly outside
        [12.0, 12, 12, 12],          # zero area
        [20.0, 30, 20.5, 30.2],      # tiny
        [40.0, 40, 30, 35],          # inverted
        [0.0, 0, 64, 64],            # the whole map
        [62.0, 62, 66, 66],          # over the last row and column
    ])  # fmt: skip
    boxes = torch.cat((boxes, special))
    batch = torch.randint(0, n_images, (len(boxes), 1), generator=g).float()
    return torch.cat((batch, boxes), 1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("scale,out", [(0.25, 7), (0.5, (3, 5)), (1.0, 2)])
def test_roi_align_matches_torchvision(aligned, sampling_ratio, scale, out, gen):
    g = gen(11)
    size = int(64 * scale)
    x = torch.randn(2, 3, size, size + 3, generator=g)
    rois = _rois(g)
    expected = tv.roi_align(x, rois, out, scale, sampling_ratio, aligned)
    got = fc.roi_align(x, rois, out, scale, sampling_ratio, aligned)
    assert got.shape == expected.shape and got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
    assert (expected.abs().sum((1, 2, 3)) > 0).sum() > 30  # most boxes really sample values


def test_roi_align_float64_is_exact_to_rounding(gen):
    g = gen(12)
    x = torch.randn(2, 4, 16, 20, generator=g, dtype=torch.float64)
    rois = _rois(g).double()
    for aligned in (False, True):
        expected = tv.roi_align(x, rois, 5, 0.25, -1, aligned)
        got = fc.roi_align(x, rois, 5, 0.25, -1, aligned)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_roi_align_outside_boxes_give_zeros_and_legacy_boxes_are_at_least_one_pixel(gen):
    x = torch.randn(1, 2, 8, 8, generator=gen(13))
    rois = torch.tensor([[0.0, -30, -30, -10, -10], [0.0, 3, 3, 3, 3]])
    got = fc.roi_align(x, rois, 2, 1.0, 2, aligned=False)
    assert torch.equal(got[0], torch.zeros(2, 2, 2))
    # legacy mode widens the zero-area box to 1 x 1: samples at 3.25 and 3.75 on each axis
    assert got[1].abs().sum() > 0
    torch.testing.assert_close(got, tv.roi_align(x, rois, 2, 1.0, 2, False), rtol=0, atol=1e-6)
    aligned = fc.roi_align(x, rois, 2, 1.0, -1, aligned=True)
    assert torch.equal(aligned[1], torch.zeros(2, 2, 2))  # empty adaptive grid -> zeros


def test_roi_align_box_formats_agree(gen):
    g = gen(14)
    x = torch.randn(3, 4, 16, 16, generator=g)
    per_image = [torch.rand(5, 4, generator=g) * 32, torch.zeros(0, 4), torch.rand(3, 4, generator=g) * 64]
    per_image = [torch.cat((b[:, :2], b[:, :2] + b[:, 2:]), 1) for b in per_image]
    rois = torch.cat([torch.cat((torch.full((len(b), 1), float(i)), b), 1) for i, b in enumerate(per_image)])
    from_list = fc.roi_align(x, per_image, 4, 0.25, 2)
    from_tensor = fc.roi_align(x, rois, 4, 0.25, 2)
    assert from_list.shape == (8, 4, 4, 4)
    assert torch.equal(from_list, from_tensor)
    torch.testing.assert_close(from_list, tv.roi_align(x, per_image, 4, 0.25, 2), rtol=0, atol=1e-6)


@pytest.mark.parametrize("sampling_ratio,k", [(-1, 400), (2, 5500)])
def test_roi_align_many_sampling_points_are_processed_in_chunks(sampling_ratio, k, gen):
    # over 2**20 sampling points: the pure version splits the boxes into chunks
    g = gen(20)
    x = torch.randn(2, 1, 64, 64, generator=g)
    xy = torch.rand(k, 2, generator=g) * 8
    rois = torch.cat((torch.randint(0, 2, (k, 1), generator=g).float(), xy, xy + 56), 1)
    got = fc.roi_align(x, rois, 7, 1.0, sampling_ratio)
    torch.testing.assert_close(got, tv.roi_align(x, rois, 7, 1.0, sampling_ratio), rtol=0, atol=2e-6)


def test_roi_align_no_boxes():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    for boxes in (torch.zeros(0, 5), [torch.zeros(0, 4), torch.zeros(0, 4)]):
        for ratio in (-1, 2):
            out = fc.roi_align(x, boxes, (7, 6), 0.5, ratio)
            assert out.shape == (0, 3, 7, 6)
            out.sum().backward()  # the graph exists even when empty
            assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_roi_align_gradient_matches_torchvision(aligned, sampling_ratio, gen):
    g = gen(15)
    x = torch.randn(2, 3, 16, 17, generator=g)
    rois = _rois(g)
    weight = torch.randn(len(rois), 3, 4, 4, generator=g)
    grads = []
    for impl in (fc.roi_align, tv.roi_align):
        xi = x.clone().requires_grad_()
        (impl(xi, rois, 4, 0.25, sampling_ratio, aligned) * weight).sum().backward()
        grads.append(xi.grad)
    assert grads[1].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-5)


def test_roi_align_autocast_computes_in_float32_and_returns_input_dtype(gen):
    g = gen(17)
    x = torch.randn(1, 4, 16, 16, generator=g).bfloat16()
    rois = _rois(g, n_images=1)[:10]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fc.roi_align(x, rois, 3, 0.25, 2)
        ref = tv.roi_align(x, rois, 3, 0.25, 2)
    assert got.dtype == ref.dtype == torch.bfloat16
    exact = tv.roi_align(x.float(), rois, 3, 0.25, 2).bfloat16()
    assert torch.equal(got, exact) and torch.equal(ref, exact)


# ─── the backend switch ───────────────────────────────────────────────────────────────────────


def _torchvision_ops_called(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("torchvision::")} - {
        "torchvision::_cuda_version"
    }


def test_backend_switch_changes_the_implementation(gen):
    boxes, scores = rpn_like_boxes(200, gen(18))
    idxs = torch.arange(200) % 3
    x = torch.randn(1, 2, 20, 20)
    calls = [  # (the kernel torchvision's backend must run, the call)
        ("torchvision::nms", lambda: fc.run_op("nms", boxes, scores, 0.5)),
        ("torchvision::nms", lambda: fc.run_op("batched_nms", boxes, scores, idxs, 0.5)),
        ("torchvision::roi_align", lambda: fc.run_op("roi_align", x, [boxes[:5] / 4], 3, 0.25, 2)),
    ]
    results = {}
    for backend in ("torchvision", "pure"):
        with fc.ops_backend(backend):
            for kernel, call in calls:  # each private op, profiled on its own
                called = _torchvision_ops_called(call)
                assert called == ({kernel} if backend == "torchvision" else set()), (kernel, backend)
            results[backend] = [call() for _, call in calls]
    for a, b in zip(results["torchvision"], results["pure"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("setting, said", [
    (None, "['torchvision::nms']"), ("pure", "[]"),
    ("cuda", "FRCNN_OPS_BACKEND must be one of ('torchvision', 'pure'), got 'cuda'")])
def test_the_environment_variable_picks_the_ops_at_import(setting, said):
    """``FRCNN_OPS_BACKEND`` is read when ``frcnn_ops`` is imported: a fresh python with it set
    runs the model's NMS on the kernels it names (none of torchvision's for ``pure``) or stops
    at the import, naming the choices."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "FRCNN_OPS_BACKEND"}
    env.update({} if setting is None else {"FRCNN_OPS_BACKEND": setting})
    code = ("import torch, frcnn_common as fc\n"
            "with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:\n"
            "    fc.run_op('nms', torch.tensor([[0., 0, 4, 4], [0, 0, 4, 5]]), torch.ones(2), 0.5)\n"
            "print(sorted({e.name for e in p.events() if e.name.startswith('torchvision::')}\n"
            "             - {'torchvision::_cuda_version'}))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if setting == "cuda":
        assert run.returncode != 0 and said in run.stderr.splitlines()[-1]
    else:
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == said


def test_set_ops_backend_returns_previous_and_rejects_unknown_names():
    start = fc.set_ops_backend("pure")
    try:
        assert fc.set_ops_backend("torchvision") == "pure"
        with pytest.raises(ValueError, match="torchvision.*pure"):
            fc.set_ops_backend("cuda")
        assert fc.set_ops_backend("torchvision") == "torchvision"  # the refused name changed nothing
    finally:
        fc.set_ops_backend(start)


def test_ops_backend_context_restores_after_an_error():
    start = fc.set_ops_backend("torchvision")
    try:
        with pytest.raises(RuntimeError):
            with fc.ops_backend("pure"):
                assert frcnn_ops._ops_backend == "pure"
                raise RuntimeError
        assert frcnn_ops._ops_backend == "torchvision"
    finally:
        fc.set_ops_backend(start)


@pytest.mark.parametrize("backend", ["torchvision", "pure"])
def test_run_op_accepts_low_precision_inputs(backend, gen):
    g = gen(19)
    x = torch.randn(1, 3, 16, 16, generator=g)
    rois = _rois(g, n_images=1)[:12]
    boxes, scores = uniform_boxes(100, g)
    with fc.ops_backend(backend):
        # torchvision alone refuses a bfloat16 map with float32 boxes outside autocast
        out = fc.run_op("roi_align", x.bfloat16(), rois, 3, 0.25, 2)
        keep = fc.run_op("nms", boxes.half(), scores.half(), 0.5)
        keep_b = fc.run_op("batched_nms", boxes.half(), scores.half(), torch.arange(100) % 2, 0.5)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, tv.roi_align(x.bfloat16().float(), rois, 3, 0.25, 2).bfloat16())
    assert torch.equal(keep, tv.nms(boxes.half().float(), scores.half().float(), 0.5))
    assert torch.equal(keep_b, tv.batched_nms(boxes.half().float(), scores.half().float(), torch.arange(100) % 2, 0.5))


def test_batched_nms_of_no_boxes_is_empty_whatever_else_is_passed():
    empty = torch.empty((0,), dtype=torch.int64)  # torchvision's own test passes exactly this
    for impl in (fc.batched_nms, tv.batched_nms):
        assert torch.equal(impl(empty, None, None, None), empty)


@pytest.mark.parametrize("call, name", [
    (lambda: fc.nms(torch.zeros(3, 4), None, 0.5), "scores is NoneType"),
    (lambda: fc.batched_nms(torch.zeros(3, 4), torch.zeros(3), None, 0.5), "idxs is NoneType"),
    (lambda: fc.batched_nms([[0, 0, 1, 1]], torch.zeros(1), torch.zeros(1), 0.5), "boxes is list"),
])
def test_nms_inputs_that_are_not_tensors_are_named(call, name):
    with pytest.raises(TypeError, match=name):
        call()
