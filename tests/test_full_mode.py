"""Full mode's own code paths on the CPU: its knobs, its COCO run from the official layout with
stand-in ImageNet weights under torchvision's cached file name, chunked inference, and the
official-layout records notebook 01 reads."""

import os

import pytest
import torch
import torchvision

import frcnn_common as fc
import frcnn_engine as engine
import frcnn_course as course
from conftest import SCENES, expected_objects, write_coco_layout


def test_full_mode_settings_read_each_knob_from_the_environment(monkeypatch):
    for variable in course.FULL_MODE_KNOBS.values():
        monkeypatch.delenv(variable, raising=False)
    assert course.full_mode_settings() == course.COCO_RECIPE
    monkeypatch.setenv("FRCNN_STEPS", "20")
    monkeypatch.setenv("FRCNN_IMAGE_SIZE", "256")
    config = course.full_mode_settings(batch_size=2)
    assert (config["steps"], config["image_size"], config["batch_size"]) == (20, 256, 2)
    assert config["eval_images"] == course.COCO_RECIPE["eval_images"]


@pytest.mark.parametrize("text", ["abc", "0", "-3", "2.5"])
def test_full_mode_settings_refuse_a_bad_value_by_its_name(monkeypatch, text):
    monkeypatch.setenv("FRCNN_BATCH", text)
    with pytest.raises(ValueError, match=f"FRCNN_BATCH={text!r}.*positive whole number"):
        course.full_mode_settings()


def test_loader_workers_never_exceed_the_usable_cores():
    cores = len(os.sched_getaffinity(0))
    assert engine.loader_workers(64) == cores
    assert engine.loader_workers(1) == 1
    assert engine.loader_workers(0) == 0


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


def test_official_layout_rows_become_corner_records_as_notebook_01_reads_them(tmp_path):
    stream = fc.COCOStreamDataset("val", source=write_coco_layout(str(tmp_path / "coco")))
    raw = next(iter(stream.rows))
    assert "objects" not in raw  # a record of the JSON file, not a row of the hub
    record = stream.to_record(raw)
    boxes, _ = expected_objects(SCENES[0])
    assert torch.as_tensor(record["boxes"]).tolist() == boxes
    width, height = SCENES[0]["size"]
    assert tuple(fc.load_rgb(record["image"]).shape) == (3, height, width)


def test_coco_experiment_trains_scores_and_resumes_from_its_checkpoint(tmp_path, monkeypatch,
                                                                         resnet50_state):
    """Two steps of ResNet-50 + FPN on a COCO folder, then a rerun asked for one step more."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights))
    os.makedirs(os.path.dirname(cached))
    torch.save(resnet50_state, cached)  # torchvision loads a cached file without a download
    root = str(tmp_path / "coco")
    write_coco_layout(root, split="train")
    write_coco_layout(root, split="val")
    run = dict(source=root, device=torch.device("cpu"), progress=False, batch_size=2,
               image_size=64, eval_images=3, checkpoint_path=str(tmp_path / "coco.pt"))
    first = course.coco_experiment(steps=2, **run)
    assert len(first["history"]["total"]) == 2
    assert os.path.isfile(run["checkpoint_path"]) and 0.0 <= first["metrics"]["AP50"] <= 1.0
    assert first["config"]["image_size"] == 64 and first["held_out"].max_samples == 3
    again = course.coco_experiment(steps=3, **run)
    assert again["history"]["step"][-1] == 3


def test_training_step_flops_grow_with_the_batch_and_leave_no_gradients():
    torch.manual_seed(0)
    data = fc.SyntheticShapesDataset(4, 96, seed=0, train=True)
    model = fc.tiny_detector(data.num_classes).eval()
    one = course.training_step_flops(model, *fc.frcnn_collate_fn([data[0], data[1]]))
    two = course.training_step_flops(model, *fc.frcnn_collate_fn([data[i] for i in range(4)]))
    assert one > 1e8 and 1.7 < two / one < 2.3  # the ROI head's fixed 512 boxes an image scale too
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_every_notebook_runs_in_full_mode_on_a_simulated_coco(tmp_path, resnet50_state):
    """All six notebooks with FRCNN_FAST=0 on the CPU: COCO from a folder in the official layout,
    torchvision's ImageNet and COCO weights replaced by random ones under their cached names,
    full mode's knobs at tiny sizes. Fails on any error output (about 3 minutes here)."""
    import json
    import subprocess
    import sys

    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    detection = torchvision.models.detection
    stand_ins = {torchvision.models.ResNet50_Weights.IMAGENET1K_V1: resnet50_state,
                 detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1: detection.fasterrcnn_resnet50_fpn(
                     weights=None, weights_backbone=None).state_dict()}
    for weights, state in stand_ins.items():
        torch.save(state, checkpoints / os.path.basename(weights.url))
    coco = str(tmp_path / "coco")
    write_coco_layout(coco, split="train")
    write_coco_layout(coco, split="val")
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "FRCNN_COCO": coco,
           "MPLBACKEND": "Agg", "FRCNN_STEPS": "2", "FRCNN_BATCH": "2", "FRCNN_IMAGE_SIZE": "96",
           "FRCNN_EVAL_IMAGES": "4", "FRCNN_TEST_IMAGES": "6", "FRCNN_TEST_SIZE": "96"}
    env.pop("FRCNN_PROGRESS_FILE", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "tools/run_notebooks.py", "--full", "--out", str(out)],
                         cwd=root, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
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
