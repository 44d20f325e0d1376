"""Full mode's own code paths on the CPU: its knobs, its COCO run from the official layout with
stand-in ImageNet weights under torchvision's cached file name, chunked inference, and the
official-layout records notebook 01 reads."""

import os

import pytest
import torch

import frcnn_common as fc
import frcnn_engine as engine
import frcnn_course as course


README_DEFAULTS = {"steps": 5000, "batch_size": 4, "image_size": 400, "eval_images": 500,
                   "test_images": 24, "test_size": 800, "minutes": None}
"""Full mode's knobs unset, as README's "Full mode's knobs" states them."""


def test_full_mode_settings_read_each_knob_from_the_environment(monkeypatch):
    for variable in course.FULL_MODE_KNOBS.values():
        monkeypatch.delenv(variable, raising=False)
    config = course.full_mode_settings()
    assert {key: config[key] for key in README_DEFAULTS} == README_DEFAULTS
    assert config["lr_per_16_images"] == 0.02  # torchvision's recipe (DESIGN.md)
    monkeypatch.setenv("FRCNN_STEPS", "20")
    monkeypatch.setenv("FRCNN_IMAGE_SIZE", "256")
    config = course.full_mode_settings(batch_size=2)
    assert (config["steps"], config["image_size"], config["batch_size"]) == (20, 256, 2)
    assert config["eval_images"] == README_DEFAULTS["eval_images"]


@pytest.mark.parametrize("text", ["abc", "0", "-3", "2.5"])
def test_full_mode_settings_refuse_a_bad_value_by_its_name(monkeypatch, text):
    monkeypatch.setenv("FRCNN_BATCH", text)
    with pytest.raises(ValueError, match=f"FRCNN_BATCH={text!r}.*positive whole number"):
        course.full_mode_settings()


@pytest.mark.parametrize("cores, wanted, expected", [
    (2, 4, 2), (2, 64, 2), (3, 2, 2), (16, 4, 4), (1, 4, 1), (2, 1, 1), (2, 0, 0)])
def test_loader_workers_never_exceed_the_usable_cores(monkeypatch, cores, wanted, expected):
    """On a machine (or a CPU set, as Colab's 2 cores) of ``cores`` usable cores."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert engine.loader_workers(wanted) == expected


def test_predict_in_chunks_gives_the_detections_of_one_batch():
    torch.manual_seed(0)
    model = fc.tiny_detector(4).eval()
    images = [torch.randn(3, 64, 80) for _ in range(5)]
    whole = model.predict(images)
    chunked = model.predict(images, batch_size=2)
    assert len(chunked) == 5 and any(len(r["boxes"]) for r in whole)
    for a, b in zip(whole, chunked):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(a[key], b[key])
    with pytest.raises(ValueError, match="batch_size"):
        model.predict(images, batch_size=0)


def test_official_layout_rows_become_corner_records_as_notebook_01_reads_them(coco_dir, coco_kit):
    stream = fc.COCOStreamDataset("val", source=coco_dir)
    raw = next(iter(stream.rows))
    assert "objects" not in raw  # a record of the JSON file, not a row of the hub
    record = stream.to_record(raw)
    boxes, _ = coco_kit.expected_objects(coco_kit.SCENES[0])
    assert torch.as_tensor(record["boxes"]).tolist() == boxes
    width, height = coco_kit.SCENES[0]["size"]
    assert tuple(fc.load_rgb(record["image"]).shape) == (3, height, width)


def test_coco_experiment_trains_scores_and_resumes_from_its_checkpoint(tmp_path, monkeypatch,
                                                                         simulated_coco, cpu, coco_kit):
    """Two steps of ResNet-50 + FPN on a COCO folder, then a rerun asked for one step more.

    Two steps from random weights learn nothing, so the score is checked for what it must be
    whatever the weights: every COCO metric and one per class present in the 3 held-out images,
    none of them pycocotools' -1 of "no ground truth" (a stream that lost its boxes gives it) but
    those of sizes the scenes do not have (no object over 96² px, none strictly under 32²)."""
    monkeypatch.setenv("TORCH_HOME", simulated_coco.torch_home)
    run = dict(source=simulated_coco.coco, device=cpu, progress=False, batch_size=2,
               image_size=64, eval_images=3, checkpoint_path=str(tmp_path / "coco.pt"))
    first = course.coco_experiment(steps=2, **run)
    assert len(first["history"]["total"]) == 2
    assert torch.load(run["checkpoint_path"], weights_only=False)["step"] == 2
    present = {fc.COCO_NAMES[category + 1] for scene in coco_kit.SCENES[:3]
               for category, _, _ in scene["objects"]}
    assert set(first["metrics"]) == {*engine.COCO_METRICS, *(f"AP/{name}" for name in present),
                                     *(f"AP50/{name}" for name in present)}
    scored = [key for key in first["metrics"] if key not in ("APs", "APl", "ARs", "ARl")]
    assert all(first["metrics"][key] != -1.0 for key in scored), first["metrics"]  # no large
    assert first["config"]["image_size"] == 64 and first["held_out"].max_samples == 3
    again = course.coco_experiment(steps=3, **run)
    assert again["history"]["step"] == [1, 2, 3]  # the checkpoint's history, and one step more
    assert again["history"]["total"][:2] == first["history"]["total"]


def forward_flops_by_hand(model, images, targets):
    """2 x multiply-adds of every convolution and linear layer in one training-mode forward pass,
    counted from each layer's output shape and weight size (hooks, not FlopCounterMode)."""
    total = 0

    def count(layer, _inputs, output):
        nonlocal total
        per_output = layer.weight[0].numel()  # (in / groups) x kh x kw, or in_features
        total += 2 * output.numel() * per_output

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        model.train()
        with torch.no_grad():
            model(images, targets)
    finally:
        for hook in hooks:
            hook.remove()
        model.eval()
    return total


def test_training_step_flops_grow_with_the_batch_and_leave_no_gradients():
    torch.manual_seed(0)
    data = fc.SyntheticShapesDataset(4, 96, seed=0, train=True)
    model = fc.tiny_detector(data.num_classes).eval()
    batch = fc.frcnn_collate_fn([data[0], data[1]])
    one = course.training_step_flops(model, *batch)
    two = course.training_step_flops(model, *fc.frcnn_collate_fn([data[i] for i in range(4)]))
    # A step is the forward pass plus a backward pass that costs up to two forwards (the gradient
    # of each layer's input and of its weight; the image needs none): between 2 and 3 forwards.
    torch.manual_seed(0)  # the same sampled anchors and ROIs as the step above
    forward = forward_flops_by_hand(model, *batch)
    assert 2 * forward < one <= 3 * forward, (one, forward)
    assert 1.7 < two / one < 2.3  # the ROI head's fixed 512 boxes an image scale too
    assert not model.training and all(p.grad is None for p in model.parameters())


FAST_MODE_WRITES = ("shapes_tiny", "own_data")
"""What fast-mode notebooks write below notebooks/ (05's checkpoint, 06's folder): ``make test``
runs them beside the unit tests, so these may change while the full-mode test runs."""


def files_below(folder, skip=()):
    """{path: (size, mtime)} of every file below ``folder``, but those whose path contains a
    name in ``skip``."""
    found = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            if any(part in os.path.join(parent, name) for part in skip):
                continue
            info = os.stat(os.path.join(parent, name))
            found[os.path.join(parent, name)] = (info.st_size, info.st_mtime_ns)
    return found


def test_every_notebook_runs_in_full_mode_on_a_simulated_coco(tmp_path, simulated_coco):
    """All six notebooks with FRCNN_FAST=0 on the CPU: COCO from a folder in the official layout,
    torchvision's ImageNet and COCO weights replaced by random ones under their cached names,
    full mode's knobs at tiny sizes (about 3 minutes here). The notebooks run from a copy in a
    temporary folder, so what they write (notebook 05's checkpoint) never lands in the tree,
    where a learner's full-mode run would resume from it. Fails on any error output."""
    import json
    import shutil
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    books = tmp_path / "course" / "notebooks"
    shutil.copytree(os.path.join(root, "notebooks"), books,
                    ignore=shutil.ignore_patterns("checkpoints", ".ipynb_checkpoints"))
    env = {**os.environ, "TORCH_HOME": simulated_coco.torch_home, "FRCNN_COCO": simulated_coco.coco,
           "PYTHONPATH": root, "MPLBACKEND": "Agg", "FRCNN_STEPS": "2", "FRCNN_BATCH": "2",
           "FRCNN_IMAGE_SIZE": "96", "FRCNN_EVAL_IMAGES": "4", "FRCNN_TEST_IMAGES": "6",
           "FRCNN_TEST_SIZE": "96"}
    env.pop("FRCNN_PROGRESS_FILE", None)
    tree_before = files_below(os.path.join(root, "notebooks"), skip=FAST_MODE_WRITES)
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, os.path.join(root, "tools", "run_notebooks.py"), "--full",
                          "--out", str(out), "--notebooks", str(books)],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # nothing written there (full mode's checkpoint is coco_resnet50_fpn.pt; own_data/, skipped
    # there, is written in the copy)
    assert files_below(os.path.join(root, "notebooks"), skip=FAST_MODE_WRITES) == tree_before
    assert (books / "own_data").is_dir()
    checkpoint = torch.load(books / "checkpoints" / "coco_resnet50_fpn.pt", weights_only=False,
                            mmap=True)
    assert checkpoint["step"] == 2  # notebook 05 trained the FRCNN_STEPS it was given
    for name in sorted(p.name for p in out.glob("*.ipynb")):
        cells = json.loads((out / name).read_text())["cells"]
        outputs = [o for c in cells if c["cell_type"] == "code" for o in c["outputs"]]
        assert outputs, f"{name} kept no outputs"
        errors = [o for o in outputs if o["output_type"] == "error"
                  or "Traceback" in "".join(o.get("text", ""))]
        assert not errors, f"{name}: {errors[0]}"
    assert len(list(out.glob("*.ipynb"))) == 6


def test_saved_activations_count_an_input_shaped_like_a_weight_and_leave_out_weight_copies():
    layer = torch.nn.Linear(8, 16)
    x = torch.randn(16, 8)  # the shape of the layer's weight, and saved for its gradient
    assert course.saved_activation_bytes(layer, x) == {"float32": x.numel() * 4}
    # under CPU autocast: x's bfloat16 copy is an activation; the weight's copy is not
    assert course.saved_activation_bytes(layer, x, amp=True) == {"bfloat16": x.numel() * 2}


def test_saved_tensors_are_put_under_the_module_that_kept_them_first():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(5, 8)
    saved = course.saved_tensors_by_module(model, x)
    # the first layer keeps its input; the ReLU keeps its output, which the last layer reads
    # (the same storage, counted once, under the ReLU); no weight is counted
    assert [(r["module"], r["dtype"], r["shape"], r["bytes"]) for r in saved] == [
        ("0", "float32", (5, 8), 5 * 8 * 4), ("1", "float32", (5, 16), 5 * 16 * 4)]
    assert course.saved_bytes_by(saved) == {"1": 5 * 16 * 4, "0": 5 * 8 * 4}  # largest first
    assert course.saved_bytes_by(saved, "dtype") == {"float32": 5 * 24 * 4}
    assert course.saved_bytes_by(saved, dtype="bfloat16") == {}
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert torch.equal(model(x), model[2](model[1](model[0](x))))  # the hooks changed nothing


def test_saved_tensors_of_a_detector_add_up_by_module_and_by_dtype():
    row = course.training_step_memory(image_size=64, batch=1, steps=0, threads=1)
    assert set(row["saved_by_module_mb"]) <= {"", "backbone", "fpn", "rpn", "roi_heads"}
    for split in ("saved_by_module_mb", "saved_by_dtype_mb"):
        assert abs(sum(row[split].values()) - row["saved_mb"]) < 1e-6
    assert row["peak_mb"] is None and row["step_s"] is None
    assert next(iter(row["float32_by_module_mb"])).startswith("roi_heads.")  # fc6's input


def test_training_step_memory_measures_a_step_in_a_fresh_process():
    row = course.measure_in_fresh_process(image_size=64, batch=1, steps=1, threads=1)
    assert row["saved_mb"] > 1 and row["peak_mb"] > 0 and row["step_s"] > 0
    assert abs(sum(row["saved_by_dtype_mb"].values()) - row["saved_mb"]) < 1e-6
    with pytest.raises(RuntimeError, match="no_such_setting"):  # the child's own error line
        course.measure_in_fresh_process(image_size=64, steps=0, no_such_setting=1)


def test_an_out_of_memory_in_the_measurement_becomes_a_row_not_a_stop(monkeypatch):
    import subprocess

    failed = subprocess.CompletedProcess([], 1, "", "Traceback ...\ntorch.OutOfMemoryError: "
                                         "CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed)
    row = course.measure_in_fresh_process(image_size=64)
    assert row["error"] == "out of memory" and "2.00 GiB" in row["detail"]


def test_a_time_budget_is_a_knob_unset_by_default(monkeypatch):
    monkeypatch.delenv("FRCNN_MINUTES", raising=False)
    assert course.full_mode_settings()["minutes"] is None
    monkeypatch.setenv("FRCNN_MINUTES", "45")
    assert course.full_mode_settings()["minutes"] == 45
    monkeypatch.setenv("FRCNN_MINUTES", "soon")
    with pytest.raises(ValueError, match="FRCNN_MINUTES='soon'.*the default is not set"):
        course.full_mode_settings()


def test_a_time_budget_becomes_the_steps_that_fit_it():
    assert course.steps_in_budget(10, 2.0) == 300  # 600 s at 2 s a step
    assert course.steps_in_budget(1, 0.7) == 85    # 60 / 0.7 = 85.7: only whole steps that fit
    assert course.steps_in_budget(0.01, 30.0) == 1  # a budget under one step still trains one
    for minutes, step_s in ((0, 1.0), (5, 0.0), (-1, 2.0)):
        with pytest.raises(ValueError, match="must both be positive"):
            course.steps_in_budget(minutes, step_s)
