"""The notebook runner behind `make run` (tools/run_notebooks.py) and the progress relay behind
`make test` (tools/with_progress.py), on tiny notebooks written here."""

import base64
import io
import os
import subprocess
import sys

import nbformat
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")


def png_output():
    """A display_data output holding a small PNG, as a stored figure looks."""
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 30)).save(buffer, "PNG")
    return nbformat.v4.new_output("display_data",
                                  data={"image/png": base64.b64encode(buffer.getvalue()).decode()})


def write_notebook(path, cells):
    """``cells``: (kind, source, stored outputs) triples."""
    nb = nbformat.v4.new_notebook()
    for kind, source, outputs in cells:
        if kind == "markdown":
            nb.cells.append(nbformat.v4.new_markdown_cell(source))
        else:
            cell = nbformat.v4.new_code_cell(source)
            cell.outputs = outputs
            nb.cells.append(cell)
    nbformat.write(nb, path)


def run_tool(args, hang_limit_s, **env):
    environment = {**os.environ, "PYTHONPATH": ROOT, **env}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=environment,
                          timeout=hang_limit_s)


PROGRESS_CELL = """import os
with open(os.environ["FRCNN_PROGRESS_FILE"], "a") as f:  # as frcnn_engine.ProgressBar does
    f.write("demo steps: 1/2 [00:00<00:01]\\n")
print("held-out AP50 = 0.5")"""


def test_a_slow_cell_fails_with_the_knob_named_and_out_keeps_only_what_ran(tmp_path, hang_limit_s):
    books, out = tmp_path / "books", tmp_path / "out"
    books.mkdir()
    out.mkdir()
    (out / "02_slow_fig09.png").write_bytes(b"from an earlier run")
    write_notebook(books / "01_ok.ipynb", [("code", PROGRESS_CELL, [])])
    write_notebook(books / "02_slow.ipynb", [
        ("markdown", "# A slow one", []),
        ("code", "print('first')", [png_output()]),  # runs: its old figure is replaced by nothing
        ("code", "import threading\nthreading.Event().wait()", []),  # never ends by itself
        ("markdown", "## Later", []),
        ("code", "print('never')", [nbformat.v4.new_output("stream", text="STALE\n"), png_output()]),
    ])
    write_notebook(books / "03_never.ipynb", [("code", "print('never')", [])])
    run = run_tool([os.path.join(TOOLS, "run_notebooks.py"), "--out", str(out), "--timeout", "3",
                    "--notebooks", str(books)], hang_limit_s)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "code cell 2 of 3 (cell 3 of 5 with the text cells)" in run.stderr
    assert "make run TIMEOUT=SECONDS" in run.stderr and "ran past the time limit of 3 s" in run.stderr
    assert "code cell 1 of 1: demo steps: 1/2 [" in run.stderr  # 01's progress line, relayed while it ran
    assert sorted(p.name for p in out.iterdir()) == ["01_ok.ipynb", "02_slow.ipynb", "index.md"]
    copy = nbformat.read(out / "02_slow.ipynb", as_version=4)
    assert "incomplete" in copy.cells[0].source and "code cell 2 of 3" in copy.cells[0].source
    assert copy.cells[2].outputs[0]["text"] == "first\n"
    assert copy.cells[-1].outputs == [] and copy.cells[-1].execution_count is None
    index = (out / "index.md").read_text()
    assert "stopped in 02_slow.ipynb" in index and "FAILED: stopped at code cell 2 of 3" in index
    assert "held-out AP50 = 0.5" in index and "03_never.ipynb" in index.split("## Not run")[1]


def test_with_progress_relays_the_lines_of_a_command(tmp_path, hang_limit_s):
    """The child writes a progress line, then waits until the relayed line has reached the
    terminal (the test then creates ``go``): the line is shown while the command runs."""
    script = tmp_path / "child.py"
    go = tmp_path / "go"
    script.write_text("import os, sys, time\n"
                      "with open(os.environ['FRCNN_PROGRESS_FILE'], 'a') as f:\n"
                      "    f.write('epoch 0: 3/9 [00:01<00:02, total=1.0]\\n')\n"
                      f"for _ in range({hang_limit_s * 10}):  # until the test says go, or a hang\n"
                      f"    if os.path.exists({str(go)!r}):\n"
                      "        raise SystemExit(3)\n"
                      "    time.sleep(0.1)\n"
                      "raise SystemExit(4)\n")
    relay = subprocess.Popen([sys.executable, os.path.join(TOOLS, "with_progress.py"), sys.executable,
                              str(script)], stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": ROOT})
    shown = []
    for line in relay.stderr:
        shown.append(line)
        if "epoch 0: 3/9" in line:
            go.touch()
    assert relay.wait() == 3, "".join(shown)  # 4: the line never came while the child waited
    assert "    epoch 0: 3/9 [00:01<00:02, total=1.0]\n" in shown


AFFINITY = "import os; print(sorted(os.sched_getaffinity(0)))"


def test_lanes_run_side_by_side_on_their_own_cores_and_a_failure_is_named(hang_limit_s):
    """`make test`'s runner: each lane's lines carry its name; with two cores or more the lanes
    run at once, on disjoint cores (each prints the cores it may use); any failing lane makes the
    exit status 1 and the summary names it."""
    lanes = [f"one={sys.executable} -c '{AFFINITY}'", f"two={sys.executable} -c '{AFFINITY}'; exit 5"]
    done = run_tool([os.path.join(TOOLS, "run_lanes.py"), *lanes], hang_limit_s)
    assert done.returncode == 1, done.stdout + done.stderr
    cores = {name: eval(line.split("| ", 1)[1])
             for line in done.stdout.splitlines() if " | " in line for name in [line.split()[0]]}
    assert set(cores) == {"one", "two"}
    summary = done.stdout.splitlines()[-1]
    assert "one passed" in summary and "two FAILED (exit 5)" in summary
    if len(os.sched_getaffinity(0)) >= 2:
        assert not set(cores["one"]) & set(cores["two"]), cores  # no core shared
        assert set(cores["one"]) | set(cores["two"]) == os.sched_getaffinity(0)
    else:
        assert "one after another" in done.stdout


def test_lanes_split_the_cores_evenly_and_fall_back_to_one_after_another(monkeypatch):
    sys.path.insert(0, TOOLS)
    try:
        import run_lanes
    finally:
        sys.path.remove(TOOLS)
    for cores, lanes, expected in (({0, 1}, 2, [{0}, {1}]), ({0, 1, 2, 3, 4}, 2, [{0, 1}, {2, 3, 4}]),
                                   ({3}, 2, None), ({0, 1, 2}, 3, [{0}, {1}, {2}])):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, cores=cores: cores)
        assert run_lanes.split_cores(lanes) == expected, (cores, lanes)
    assert run_lanes.parse_lane("unit = make unit") == ("unit", "make unit")
    for wrong in ("make unit", "=make unit", "unit="):
        with pytest.raises(Exception, match="NAME=COMMAND"):
            run_lanes.parse_lane(wrong)
