"""benchmarks/bench_gpu.py on the CPU: its dry run prints every figure, a row stops at its first
out-of-memory, the time budget skips what is left, and without a GPU it asks for --dry-run."""

import contextlib
import io
import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import bench_gpu  # noqa: E402

NUMBER = re.compile(r"-?\d+(\.\d+)?(e[-+]?\d+)?")
REASONS = ("oom", "skipped (", "n/a (cpu)")


def parse(text):
    """The ``name: value`` lines of the output, as a dict (tables and titles left out)."""
    figures = {}
    for line in text.splitlines():
        match = re.fullmatch(r"([a-z0-9_]+): (.+)", line)
        if match:
            figures[match[1]] = match[2]
    return figures


def is_number_or_reason(value):
    return bool(NUMBER.fullmatch(value)) or value.startswith(REASONS)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, hang_limit_s):
    """One dry run of the whole script (about a minute here): its stdout and its --out file. Its
    time budget is the tests' hang limit, so that a busy machine skips no cell (the budget's own
    skipping is tested below with a stand-in clock)."""
    out = tmp_path_factory.mktemp("bench") / "bench_gpu.txt"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        bench_gpu.main(["--dry-run", "--out", str(out), "--budget", str(hang_limit_s)])
    return stdout.getvalue(), out.read_text()


def expected_figures(s):
    """Every figure name the plan ``s`` promises, built from the names the docstring gives."""
    names = []
    for size in s.train_sizes:
        for amp in (0, 1):
            for batch in s.batches:
                for model, ckpt in (("ours", 0), ("torchvision", 0), ("ours", 1)):
                    names += [f"train_{model}_{size[0]}_b{batch}_amp{amp}_ckpt{ckpt}_{f}"
                              for f in ("images_per_s", "peak_mib")]
    for amp in (0, 1):
        for model in ("ours", "torchvision"):
            names += [f"infer_{model}_{s.infer_size[0]}_b{s.infer_batch}_amp{amp}_{f}"
                      for f in ("images_per_s", "peak_mib")]
    for n in s.nms_counts:
        names += [f"nms_{impl}_{n}_ms" for impl in ("pure", "torchvision", "loop")]
        names += [f"nms_kept_{n}", f"nms_pure_agrees_{n}", f"nms_loop_agrees_{n}"]
    return names + ["notebooks_full_mode", "notebooks_full_mode_seconds"]


def test_dry_run_prints_every_figure_with_a_number_or_a_reason(dry_run):
    stdout, written = dry_run
    assert written == stdout
    assert stdout.splitlines()[0] == "device: cpu (dry run)"
    figures = parse(stdout)
    agreements = [k for k in figures if "_agrees_" in k]
    for name in expected_figures(bench_gpu.DRY):
        assert name in figures, f"{name} missing"
        if name not in agreements:
            assert is_number_or_reason(figures[name]), f"{name}: {figures[name]!r}"
            assert "time budget" not in figures[name], name
    assert all(figures[k] == "yes" for k in agreements) and agreements
    assert figures["notebooks_full_mode"] == "skipped (dry run)"
    first = bench_gpu.train_prefix("ours", bench_gpu.DRY.train_sizes[0], 1, False, False)
    assert float(figures[f"{first}_images_per_s"]) > 0
    assert figures[f"{first}_peak_mib"] == "n/a (cpu)"


def test_dry_run_ends_with_the_three_tables(dry_run):
    stdout, _ = dry_run
    for title in ("Training steps:", "Inference, batch", "NMS on the device"):
        assert title in stdout
    assert "torchvision's detector has no gradient-checkpointing switch" in stdout


def fake_measure(limit, calls):
    """A stand-in training measurement: ours without checkpointing runs out of memory above
    batch ``limit``; every call is logged in ``calls``."""
    def measure(name, ckpt, size, amp, batch):
        calls.append((name, ckpt, amp, batch))
        if name == "ours" and not ckpt and batch > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        return {"images_per_s": 10.0 * batch, "peak_mib": 100.0 * batch}
    return measure


def plan(batches):
    return bench_gpu.Settings(train_sizes=((32, 48),), batches=batches, warmup=0, steps=1,
                              infer_size=(32, 48), infer_batch=1, infer_runs=1, nms_counts=(),
                              nms_repeats=1, budget_s=1.0, notebook_reserve_s=0.0)


def test_an_out_of_memory_stops_its_row_and_no_other(capsys):
    calls, report = [], bench_gpu.Report()
    s = plan((2, 4, 8, 16))
    bench_gpu.train_section(report, s, lambda: False, fake_measure(4, calls))
    figures = parse(capsys.readouterr().out)
    table = bench_gpu.train_table(report.values, s).splitlines()
    ours_row = next(line for line in table if re.match(r"32 x 48 +0 +0 +ours +20", line))
    assert re.search(r"20 / 200 +40 / 400 +oom +skipped \(oom at batch 8\)$", ours_row)
    ratio_row = next(line for line in table if re.match(r"32 x 48 +0 +0 +ours / torchvision", line))
    assert ratio_row.split()[-4:] == ["1", "1", "-", "-"]  # no ratio where ours has no figure
    for amp in (False, True):
        ours = [figures[bench_gpu.train_prefix("ours", (32,), b, amp, False) + "_images_per_s"]
                for b in s.batches]
        assert ours == ["20", "40", "oom", "skipped (oom at batch 8)"]
        for name, ckpt in (("torchvision", False), ("ours", True)):
            prefix = bench_gpu.train_prefix(name, (32,), 16, amp, ckpt)
            assert figures[prefix + "_images_per_s"] == "160"
        assert ("ours", False, amp, 16) not in calls  # a stopped row is not tried again
    assert len(calls) == 2 * (3 * 4 - 1)


def test_the_time_budget_skips_every_cell_after_it_runs_out(capsys):
    calls = []
    s = plan((2, 4))
    over = iter([False] * 3 + [True] * 100).__next__  # three cells, then the budget is spent
    bench_gpu.train_section(bench_gpu.Report(), s, over, fake_measure(100, calls))
    values = list(parse(capsys.readouterr().out).values())
    assert len(calls) == 3 and len(values) == 2 * 3 * 2 * 2
    assert values[6:] == ["skipped (time budget)"] * (len(values) - 6)


def test_another_error_is_reported_in_its_cell_and_the_run_goes_on(capsys):
    def measure():
        raise RuntimeError("bad\nshape")

    report, row = bench_gpu.Report(), {}
    bench_gpu.run_cell(report, "cell", measure, lambda: False, row, 2)
    bench_gpu.run_cell(report, "next", lambda: {"images_per_s": 1.5, "peak_mib": 9.0},
                       lambda: False, row, 4)
    captured = capsys.readouterr()
    assert "cell_images_per_s: error (RuntimeError: bad shape)" in captured.out.splitlines()
    assert parse(captured.out)["next_peak_mib"] == "9" and "Traceback" in captured.err


def test_the_notebook_test_reports_pass_fail_and_a_timeout(monkeypatch, capsys):
    import subprocess

    results = iter([subprocess.CompletedProcess([], 0, "1 passed", ""),
                    subprocess.CompletedProcess([], 1, "", "AssertionError: 05.ipynb"),
                    subprocess.TimeoutExpired("pytest", 5)])

    def fake_run(command, **kwargs):
        assert command[-3:] == ["tests/test_full_mode.py", "-k", "every_notebook"]
        assert kwargs["timeout"] <= 100
        result = next(results)
        if isinstance(result, Exception):
            raise result
        return result

    monkeypatch.setattr(bench_gpu.subprocess, "run", fake_run)
    report = bench_gpu.Report()
    tails = [bench_gpu.notebooks_section(report, False, bench_gpu.Clock(100)) for _ in range(3)]
    tails.append(bench_gpu.notebooks_section(report, False, bench_gpu.Clock(10)))  # < 30 s left
    shown = [line.split(": ", 1)[1] for line in capsys.readouterr().out.splitlines()
             if line.startswith("notebooks_full_mode: ")]
    assert shown == ["pass", "fail (pytest exit 1)", "fail (stopped by the time budget)",
                     "skipped (time budget)"]
    assert tails[0] == "" and "05.ipynb" in tails[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_the_real_run_asks_for_dry_run(capsys):
    with pytest.raises(SystemExit):
        bench_gpu.main([])
    assert "--dry-run" in capsys.readouterr().err
