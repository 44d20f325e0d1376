#!/usr/bin/env python
"""Execute the course notebooks in order, each on a fresh kernel, in fast mode by default.

    python tools/run_notebooks.py --out out          # executed copies + every figure into out/
    python tools/run_notebooks.py --in-place         # refresh the outputs stored in notebooks/
    python tools/run_notebooks.py --out out 03 05    # only the notebooks whose names start so

Each notebook runs with its folder as its working directory (``notebooks/``, or ``--notebooks
DIR``; so ``checkpoints/`` written by 05 is read by 06), with ``FRCNN_FAST=1`` unless ``--full``
is given, and with matplotlib's inline backend so that figures become PNG outputs. ``--out DIR``
first removes what an earlier run wrote there, then writes the executed notebooks, every PNG
figure, named like ``03_rpn_fig02.png``, and ``index.md`` (each notebook's run time, the lines of
its output that report a held-out score, and its figures by section) into DIR.

While a cell runs, a bar counts the notebook's code cells, and the progress lines of the module's
bars (training steps, losses, time left; see ``tools/with_progress.py``) are printed above it.
The script prints each notebook's run time and its three slowest cells (on stderr). A cell has no
time limit unless ``--timeout SECONDS`` is given (``make run TIMEOUT=SECONDS``). When a cell fails
or runs out of time, the script names the notebook, the code cell (counted as the bar counts),
its first lines and the error, then stops with exit status 1. Under ``--out`` the partly executed
copy keeps only what ran: the cells after the failing one lose their stored outputs, a note at
its top says where it stopped, no figure comes from a cell that did not run, and ``index.md``
says what failed and which notebooks did not run. ``--in-place`` leaves a failing notebook
unchanged.

Figures are stored as 256-colour PNGs (``--full-colour`` keeps them as rendered), which keeps the
committed notebooks small; progress bars are ipywidgets whose final state is saved in the
notebook's metadata. Outputs are only ever produced by running the notebooks, never edited.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from with_progress import ProgressRelay

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
TIMEOUT_KNOB = "make run TIMEOUT=SECONDS, or --timeout SECONDS here"
RESULT_LINE = re.compile(r"held-out.*\bA[PR]|^\s*A[PR]\w*\s+-?[0-9.]+\s*$")
"""An output line that reports a result: it names a held-out score, or is a row of an
``AP  0.856`` table; ``index.md`` lists these lines for each notebook."""


@dataclasses.dataclass
class Run:
    """One notebook's execution: the executed notebook, its run time, and where it failed."""

    path: Path
    nb: object
    seconds: float
    code_cells: int
    failure: Optional[str] = None  # the text printed on failure
    failed_at: Optional[int] = None  # index in nb.cells of the cell that failed
    summary: str = ""  # one line: what failed, as index.md and the copy's note say it


def find_notebooks(folder: Path, prefixes: list[str]) -> list[Path]:
    found = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))
    if prefixes:
        found = [p for p in found if any(p.name.startswith(x) for x in prefixes)]
    if not found:
        wanted = f" matching {prefixes}" if prefixes else ""
        sys.exit(f"error: no notebooks{wanted} in {folder}")
    return found


def shown_path(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def describe_failure(path: Path, where: str, cell, err: Exception, timeout: Optional[int]) -> str:
    source = cell.source.strip().splitlines()
    head = "\n".join(f"    | {line}" for line in source[:6]) + ("\n    | ..." if len(source) > 6 else "")
    ename, evalue = getattr(err, "ename", type(err).__name__), getattr(err, "evalue", str(err))
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(getattr(err, "traceback", "") or ""))  # no colours
    text = text.rsplit("------------------", 1)[-1]  # nbclient repeats the cell's source first
    lines = [line for line in text.strip().splitlines() if line.strip()]
    tail = "\n".join("    " + line for line in lines[-12:])
    if type(err).__name__ == "CellTimeoutError":
        evalue = (f"the cell ran past the time limit of {timeout} s set by --timeout; give it "
                  f"more time ({TIMEOUT_KNOB}) or none (leave TIMEOUT unset: no limit)")
        tail = ""
    return (f"\nFAILED: {shown_path(path)}, {where} (id {cell.get('id', '?')}):\n"
            f"{head}\n  {ename}: {evalue}\n{tail}\n")


def execute(path: Path, timeout: Optional[int], kernel: str, progress: bool = True) -> Run:
    """Run one notebook on a fresh kernel, its working directory the notebook's folder. With
    ``progress``, a bar counts the code cells as they run and the module's progress lines are
    printed above it (stderr, so logs stay readable)."""
    import nbformat
    from nbclient import NotebookClient
    from tqdm import tqdm

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel, record_timing=False,
                            store_widget_state=True, coalesce_streams=True,
                            resources={"metadata": {"path": str(path.parent)}})
    code_cells = sum(cell.cell_type == "code" for cell in nb.cells)
    run = Run(path, nb, 0.0, code_cells)
    cell_times = []  # (seconds, cell index, source) of each code cell that ran
    bar = tqdm(total=code_cells, desc=f"  {path.name}", unit="cell", disable=not progress,
               leave=False, file=sys.stderr, dynamic_ncols=True)
    start = time.perf_counter()

    def show(line: str) -> None:
        tqdm.write(f"      code cell {bar.n + 1} of {code_cells}: {line}", file=sys.stderr)

    # The kernel process's own stderr (start-up notices, a crash) goes to a log shown on failure;
    # what the cells print is captured in the notebook's outputs.
    with tempfile.TemporaryFile("w+") as log, ProgressRelay(show if progress else len) as relay:
        try:
            with client.setup_kernel(stderr=log):
                for index, cell in enumerate(nb.cells):
                    if cell.cell_type != "code":
                        continue
                    run.failed_at, cell_start = index, time.perf_counter()
                    client.execute_cell(cell, index)
                    cell_times.append((time.perf_counter() - cell_start, index, cell.source))
                    relay.flush()  # the cell's last lines before the bar moves on
                    bar.update(1)
                run.failed_at = None
                client.set_widgets_metadata()  # the progress bars' final state
        except Exception as err:  # noqa: BLE001 - an error, a timeout, a dead kernel: all reported
            if run.failed_at is None:
                raise
            record_failure(run, bar.n, err, timeout, log)
    bar.close()
    run.seconds = time.perf_counter() - start
    if progress:
        for seconds, index, source in sorted(cell_times, reverse=True)[:3]:
            first = next((line for line in source.splitlines() if line.strip()), "")[:60]
            print(f"      {seconds:6.1f} s  code cell {code_index(nb, index)}: {first}",
                  file=sys.stderr)
    return run


def code_index(nb, index: int) -> int:
    """The number (from 1) of code cell ``nb.cells[index]`` among the code cells, as the bar counts."""
    return sum(cell.cell_type == "code" for cell in nb.cells[: index + 1])


def record_failure(run: Run, done: int, err: Exception, timeout: Optional[int], log) -> None:
    """Fill in ``run.failure`` (with the kernel's own log) and ``run.summary``."""
    cell = run.nb.cells[run.failed_at]
    where = (f"code cell {done + 1} of {run.code_cells} (cell {run.failed_at + 1} of "
             f"{len(run.nb.cells)} with the text cells)")
    run.failure = describe_failure(run.path, where, cell, err, timeout)
    ename = getattr(err, "ename", type(err).__name__)
    run.summary = f"stopped at {where}: {ename}"
    log.seek(0)
    lines = [line for line in log.read().splitlines()
             if line.strip() and "without encryption" not in line]
    if lines and ename != "CellTimeoutError":  # after a timeout it holds the shutdown's noise
        run.failure += "  kernel log:\n" + "\n".join("    " + line for line in lines[-15:]) + "\n"


def keep_only_what_ran(run: Run) -> None:
    """After a failure: clear the stored outputs of the cells after the failing one (they did not
    run) and put a note at the top of the copy saying where it stopped."""
    import nbformat

    for cell in run.nb.cells[run.failed_at + 1:]:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    note = nbformat.v4.new_markdown_cell(
        f"**This executed copy is incomplete: it {run.summary}.** The cells after that one did not "
        "run, and their outputs are cleared (`tools/run_notebooks.py`).")
    note.id = "run-notebooks-failure-note"
    run.nb.cells.insert(0, note)


def shrink_figures(nb) -> None:
    """Store every PNG output as a 256-colour PNG when that is smaller (typically 3x for the
    photos of synthetic images, whose grain defeats PNG's compression): the committed notebooks
    stay small and the figures look the same."""
    import io

    from PIL import Image

    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" not in data:
                continue
            original = base64.b64decode(data["image/png"])
            image = Image.open(io.BytesIO(original))
            if image.mode not in ("RGB", "RGBA"):
                continue
            image = image.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE,
                                                  dither=Image.Dither.NONE)
            buffer = io.BytesIO()
            image.save(buffer, "PNG", optimize=True)
            if buffer.tell() < len(original):
                data["image/png"] = base64.b64encode(buffer.getvalue()).decode("ascii")


def save_figures(nb, stem: str, out: Path) -> list[tuple[Path, str]]:
    """Write every PNG output of the notebook as out/<stem>_figNN.png, numbered from 01; return
    each file with the heading of the notebook section it belongs to."""
    written, section = [], "(top)"
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            headings = [line.lstrip("#").strip() for line in cell.source.splitlines()
                        if line.startswith("#")]
            section = headings[-1] if headings else section
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" in data:
                target = out / f"{stem}_fig{len(written) + 1:02d}.png"
                target.write_bytes(base64.b64decode(data["image/png"]))
                written.append((target, section))
    return written


def result_lines(nb) -> list[str]:
    """The lines of the notebook's printed output that report a result (``RESULT_LINE``)."""
    found = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            text = output.get("text", "") if output.get("output_type") == "stream" else ""
            found += [line.strip() for line in text.splitlines() if RESULT_LINE.search(line)]
    return found


def write_index(out: Path, runs: list[tuple[Run, list[tuple[Path, str]]]],
                not_run: list[Path]) -> Path:
    """out/index.md: each notebook, its run time or where it failed, its results and its figures
    with their sections; then the notebooks that did not run."""
    failed = next((run for run, _ in runs if run.failure), None)
    title = "# What `make run` produced"
    lines = [title + (f": it stopped in {failed.path.name}" if failed else ""), ""]
    for run, figures in runs:
        name = run.path.name
        lines += [f"## {name} ({run.seconds:.0f} s)", ""]
        if run.failure:
            lines += [f"**FAILED: {run.summary}.** Only the cells before it ran; the copy keeps "
                      "their outputs alone.", ""]
        lines += [f"Executed copy: [{name}]({name})", ""]
        results = result_lines(run.nb)
        if results:
            lines += ["Results:", ""] + [f"    {line}" for line in results] + [""]
        lines += [f"- [{path.name}]({path.name}): {section}" for path, section in figures]
        lines.append("")
    if not_run:
        lines += ["## Not run", "", "After the failure above, these did not run: "
                  + ", ".join(p.name for p in not_run) + ".", ""]
    index = out / "index.md"
    index.write_text("\n".join(lines))
    return index


def clear_out(out: Path) -> None:
    """Remove what an earlier run wrote into ``out`` (executed copies, figures, index.md), so the
    folder holds this run's files only; anything else in it is left alone."""
    for pattern in ("[0-9][0-9]_*.ipynb", "[0-9][0-9]_*_fig[0-9]*.png", "index.md"):
        for old in out.glob(pattern):
            old.unlink()


def report_failure(run: Run, out: Optional[Path]) -> None:
    print(f"  {run.path.name:28s} failed after {run.seconds:.0f} s")
    print(run.failure, file=sys.stderr)
    if out is not None:
        print(f"The partly executed copy is {out / run.path.name} (only the cells that ran keep "
              f"outputs); {out / 'index.md'} says what failed.", file=sys.stderr)
    else:
        print(f"{run.path.name} was left unchanged.", file=sys.stderr)


def run_all(paths: list[Path], args, out: Optional[Path]) -> int:
    """Execute ``paths`` in order, stopping at the first failure; write the results."""
    import nbformat

    runs, total = [], time.perf_counter()
    for number, path in enumerate(paths, start=1):
        print(f"[{number}/{len(paths)}] {path.name} running", file=sys.stderr, flush=True)
        run = execute(path, args.timeout, args.kernel)
        if run.failure is not None and out is not None:
            keep_only_what_ran(run)
        if not args.full_colour:
            shrink_figures(run.nb)
        if out is not None:
            nbformat.write(run.nb, out / path.name)
            runs.append((run, save_figures(run.nb, path.stem, out)))
        elif run.failure is None:
            nbformat.write(run.nb, path)
        if run.failure is not None:
            if out is not None:
                write_index(out, runs, paths[number:])
            report_failure(run, out)
            return 1
        print(f"  {path.name:28s} {run.seconds:6.1f} s", flush=True)

    print(f"All {len(paths)} notebooks ran in {time.perf_counter() - total:.0f} s.")
    if out is not None:
        index = write_index(out, runs, [])
        figures = sum(len(figures) for _, figures in runs)
        print(f"Executed notebooks and {figures} figures are in {out}/; {index} lists them by "
              "notebook and section, with each notebook's results.")
    else:
        print(f"Outputs written back into {paths[0].parent}/")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prefixes", nargs="*", help="run only notebooks whose names start so (e.g. 03)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="folder for the executed copies and their figures")
    where.add_argument("--in-place", action="store_true", help="write the outputs back into notebooks/")
    parser.add_argument("--full", action="store_true", help="full mode (FRCNN_FAST=0) instead of fast")
    parser.add_argument("--timeout", type=int, default=None,
                        help="seconds allowed per cell (default: no limit; make run TIMEOUT=...)")
    parser.add_argument("--full-colour", action="store_true",
                        help="keep the figures as rendered (default: 256-colour PNGs, 3x smaller)")
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel name (default python3)")
    parser.add_argument("--notebooks", type=Path, default=NOTEBOOKS,
                        help="the folder of the notebooks (default: notebooks/)")
    args = parser.parse_args()

    os.environ["FRCNN_FAST"] = "0" if args.full else "1"
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"  # figures as PNG outputs
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # quiets a debugger warning
    paths = find_notebooks(args.notebooks.resolve(), args.prefixes)
    out = None
    if args.out is not None:
        out = args.out.resolve()
        out.mkdir(parents=True, exist_ok=True)
        clear_out(out)
    mode = "full" if args.full else "fast"
    limit = f"at most {args.timeout} s a cell" if args.timeout else "no time limit per cell"
    print(f"Executing {len(paths)} notebooks in {mode} mode, each on a fresh kernel "
          f"(working directory {shown_path(paths[0].parent)}/; {limit}).", flush=True)
    try:
        return run_all(paths, args, out)
    except KeyboardInterrupt:
        kept = f"; {out}/ holds the notebooks that finished before" if out is not None else ""
        print(f"\nInterrupted (Ctrl-C){kept}.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
