#!/usr/bin/env python
"""Execute the course notebooks in order, each on a fresh kernel, in fast mode by default.

    python tools/run_notebooks.py --out out          # executed copies + every figure into out/
    python tools/run_notebooks.py --in-place         # refresh the outputs stored in notebooks/
    python tools/run_notebooks.py --out out 03 05    # only the notebooks whose names start so

Each notebook runs with ``notebooks/`` as its working directory (so ``checkpoints/`` written by
05 is read by 06), with ``FRCNN_FAST=1`` unless ``--full`` is given, and with matplotlib's inline
backend so that figures become PNG outputs. ``--out DIR`` writes the executed notebooks and every
PNG figure, named like ``03_rpn_fig02.png``, into DIR. The script prints each notebook's run time
and its three slowest cells (on stderr) and, when a cell fails, the notebook, the cell number,
its first lines and the error, then stops with exit status 1 (the partly executed copy is still
written under ``--out``; ``--in-place`` leaves a failing notebook unchanged).

Figures are stored as 256-colour PNGs (``--full-colour`` keeps them as rendered), which keeps the
committed notebooks small; progress bars are ipywidgets whose final state is saved in the
notebook's metadata. Outputs are only ever produced by running the notebooks, never edited.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"


def find_notebooks(prefixes: list[str]) -> list[Path]:
    found = sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if prefixes:
        found = [p for p in found if any(p.name.startswith(x) for x in prefixes)]
    if not found:
        wanted = f" matching {prefixes}" if prefixes else ""
        sys.exit(f"error: no notebooks{wanted} in {NOTEBOOKS}")
    return found


def describe_failure(path: Path, index: int, count: int, cell, err: Exception) -> str:
    source = cell.source.strip().splitlines()
    head = "\n".join(f"    | {line}" for line in source[:6]) + ("\n    | ..." if len(source) > 6 else "")
    ename, evalue = getattr(err, "ename", type(err).__name__), getattr(err, "evalue", str(err))
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(getattr(err, "traceback", "") or ""))  # no colours
    text = text.rsplit("------------------", 1)[-1]  # nbclient repeats the cell's source first
    lines = [line for line in text.strip().splitlines() if line.strip()]
    tail = "\n".join("    " + line for line in lines[-12:])
    return (f"\nFAILED: {path.relative_to(ROOT)}, cell {index + 1} of {count} (id {cell.get('id', '?')}):\n"
            f"{head}\n  {ename}: {evalue}\n{tail}\n")


def execute(path: Path, timeout: int, kernel: str, progress: bool = True):
    """Run one notebook on a fresh kernel; return (notebook, seconds, failure text or None).
    With ``progress``, a bar counts the code cells as they run (stderr, so logs stay readable)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel, record_timing=False,
                            store_widget_state=True, coalesce_streams=True,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    from tqdm import tqdm

    start = time.perf_counter()
    failure = None
    cell_times = []  # (seconds, cell index, source) of each code cell that ran
    code_cells = sum(cell.cell_type == "code" for cell in nb.cells)
    bar = tqdm(total=code_cells, desc=f"  {path.name}", unit="cell", disable=not progress,
               leave=False, file=sys.stderr, dynamic_ncols=True)
    # The kernel process's own stderr (start-up notices, a crash) goes to a log shown on failure;
    # what the cells print is captured in the notebook's outputs.
    with tempfile.TemporaryFile("w+") as log:
        try:
            with client.setup_kernel(stderr=log):
                for index, cell in enumerate(nb.cells):
                    if cell.cell_type != "code":
                        continue
                    cell_start = time.perf_counter()
                    try:
                        client.execute_cell(cell, index)
                    except (CellExecutionError, CellTimeoutError) as err:
                        failure = describe_failure(path, index, len(nb.cells), cell, err)
                        break
                    cell_times.append((time.perf_counter() - cell_start, index, cell.source))
                    bar.update(1)
                client.set_widgets_metadata()  # the progress bars' final state
        except DeadKernelError as err:
            failure = f"\nFAILED: {path.relative_to(ROOT)}: the kernel died ({err})\n"
        if failure is not None:
            log.seek(0)
            lines = [line for line in log.read().splitlines()
                     if line.strip() and "without encryption" not in line]
            if lines:
                failure += "  kernel log:\n" + "\n".join("    " + line for line in lines[-15:]) + "\n"
    bar.close()
    if progress:
        for seconds, index, source in sorted(cell_times, reverse=True)[:3]:
            first = next((line for line in source.splitlines() if line.strip()), "")[:60]
            print(f"      {seconds:6.1f} s  cell {index + 1}: {first}", file=sys.stderr)
    return nb, time.perf_counter() - start, failure


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


def write_index(out: Path, runs: list[tuple[str, float, list[tuple[Path, str]]]]) -> Path:
    """out/index.md: each notebook, its run time, and its figures with their sections."""
    lines = ["# What `make run` produced", ""]
    for name, seconds, figures in runs:
        lines += [f"## {name} ({seconds:.0f} s)", "", f"Executed copy: [{name}]({name})", ""]
        lines += [f"- [{path.name}]({path.name}): {section}" for path, section in figures]
        lines.append("")
    index = out / "index.md"
    index.write_text("\n".join(lines))
    return index


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prefixes", nargs="*", help="run only notebooks whose names start so (e.g. 03)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="folder for the executed copies and their figures")
    where.add_argument("--in-place", action="store_true", help="write the outputs back into notebooks/")
    parser.add_argument("--full", action="store_true", help="full mode (FRCNN_FAST=0) instead of fast")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per cell (default 900)")
    parser.add_argument("--full-colour", action="store_true",
                        help="keep the figures as rendered (default: 256-colour PNGs, 3x smaller)")
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel name (default python3)")
    args = parser.parse_args()

    import nbformat

    os.environ["FRCNN_FAST"] = "0" if args.full else "1"
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"  # figures as PNG outputs
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # quiets a debugger warning
    paths = find_notebooks(args.prefixes)
    out = None
    if args.out is not None:
        out = args.out.resolve()
        out.mkdir(parents=True, exist_ok=True)
    mode = "full" if args.full else "fast"
    print(f"Executing {len(paths)} notebooks in {mode} mode, each on a fresh kernel "
          f"(working directory {NOTEBOOKS.relative_to(ROOT)}/).", flush=True)

    runs, total = [], time.perf_counter()
    for number, path in enumerate(paths, start=1):
        print(f"[{number}/{len(paths)}] {path.name} running", file=sys.stderr, flush=True)
        nb, seconds, failure = execute(path, args.timeout, args.kernel)
        if not args.full_colour:
            shrink_figures(nb)
        if out is not None:
            nbformat.write(nb, out / path.name)
            runs.append((path.name, seconds, save_figures(nb, path.stem, out)))
        elif failure is None:
            nbformat.write(nb, path)
        if failure is not None:
            print(f"  {path.name:28s} failed after {seconds:.0f} s")
            print(failure, file=sys.stderr)
            if out is not None:
                print(f"The partly executed copy is {out / path.name}.", file=sys.stderr)
            else:
                print(f"{path.name} was left unchanged.", file=sys.stderr)
            return 1
        print(f"  {path.name:28s} {seconds:6.1f} s", flush=True)

    print(f"All {len(paths)} notebooks ran in {time.perf_counter() - total:.0f} s.")
    if out is not None:
        index = write_index(out, runs)
        figures = sum(len(r[2]) for r in runs)
        print(f"Executed notebooks and {figures} figures are in {out}/; {index} lists them by "
              "notebook and section.")
    else:
        print(f"Outputs written back into {NOTEBOOKS}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
