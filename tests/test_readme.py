"""README's snippets, run as a reader pastes them, from a scratch folder: every ```python block
(imports included) and every `make` and `.venv/bin/python train.py` / `torchrun` command line.

Stand-ins keep it offline and short: torchvision's weights are random ones under their cached
names (``stand_in_torch_home``), `street.jpg` is a small picture written here, and each training
command runs as written with ``SHRINK`` appended (argparse keeps the last value of an option), so
it trains 1 step of tiny images. `make` targets run with ``make -n`` (`make test` would run this
file again), `make help` for real. A block marked ``<!-- readme-test: compile only (why) -->``
(COCO from the hub, four GPUs) is compiled and the names it uses are looked up, not run.
"""

import ast
import builtins
import os
import re
import shlex
import subprocess
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "README.md")) as _f:
    README = _f.read()
COMPILE_ONLY = "<!-- readme-test: compile only"
SHRINK = ["--num-images", "8", "--image-size", "64", "--batch-size", "4", "--steps-per-epoch", "1"]
HANG = 600  # seconds: a limit for a hung command, not a speed check
RECIPE = ("my_data", "runs/shapes.pt", "runs/mine.pt")  # the fine-tune recipe: run in order


def fenced(language: str):
    """(code, compile_only) of each fenced block of ``language``, in README's order."""
    pattern = rf"(<!-- readme-test: compile only[^\n]*-->\n)?```{language}\n(.*?)```"
    return [(code, bool(marker)) for marker, code in re.findall(pattern, README, re.S)]


def command_lines():
    """(command, compile_only) of each command of README's bash blocks (continuations joined,
    comments dropped), then each inline `make ...` or `.venv/bin/python train.py ...`."""
    found = []
    for code, compile_only in fenced("bash"):
        for line in code.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if line:
                found.append((" ".join(line.split()), compile_only))
    prose = re.sub(r"```.*?```", "", README, flags=re.S)
    found += [(span, False) for span in re.findall(r"`([^`\n]+)`", prose)
              if span.startswith(("make ", ".venv/bin/python train.py"))]
    return list(dict.fromkeys(found))


def in_recipe(text: str) -> bool:
    return any(name in text for name in RECIPE)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, stand_in_torch_home):
    """A reader's folder: `.venv` and `train.py` as in the course folder (links), `street.jpg`,
    and the environment of `make setup` (the module importable from anywhere)."""
    folder = tmp_path_factory.mktemp("reader")
    os.symlink(sys.prefix, folder / ".venv")
    os.symlink(os.path.join(ROOT, "train.py"), folder / "train.py")
    Image.new("RGB", (300, 30), (90, 140, 200)).save(folder / "street.jpg")  # 1333 x 133 at 800
    env = {**os.environ, "TORCH_HOME": stand_in_torch_home, "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    for name in ("FRCNN_PROGRESS_FILE", "OMP_NUM_THREADS"):
        env.pop(name, None)
    env["PET_MASTER_PORT"] = str(free_port())  # torchrun's --master-port, left out of README
    return folder, env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(scratch, args, shell=False):
    folder, env = scratch
    done = subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True,
                          timeout=HANG, shell=shell)
    assert done.returncode == 0, f"{args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def run_python(scratch, code):
    return run(scratch, [sys.executable, "-c", code])


def check_names(code: str) -> None:
    """Compile ``code``, run its imports, and look up every name it loads and every attribute
    it takes of an imported module."""
    tree = ast.parse(compile(code, "README block", "exec", ast.PyCF_ONLY_AST))
    space = {}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            exec(compile(ast.Module([node], []), "README imports", "exec"), space)
    bound = {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets
             if isinstance(t, ast.Name)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            assert node.id in space or node.id in bound or hasattr(builtins, node.id), node.id
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                type(space.get(node.value.id)).__name__ == "module":
            assert hasattr(space[node.value.id], node.attr), f"{node.value.id}.{node.attr}"


def check_command(command: str) -> None:
    """The launcher's options and train.py's are those of their parsers (no run)."""
    sys.path.insert(0, ROOT)
    import train
    from torch.distributed.run import get_args_parser

    words = [w for w in shlex.split(command) if "=" not in w or w.startswith("-")]
    script = words.index("train.py")
    if words[0].endswith("torchrun"):
        get_args_parser().parse_args(words[1:script + 1])
    train.parse_args(words[script + 1:])


PYTHON_BLOCKS = [b for b in fenced("python") if not in_recipe(b[0])]
COMMANDS = [c for c in command_lines() if not in_recipe(c[0])]


def test_readme_has_the_snippets_these_tests_run():
    assert len(PYTHON_BLOCKS) >= 4 and len(COMMANDS) >= 8
    assert sum(in_recipe(code) for code, _ in fenced("python")) == 2
    assert sum(in_recipe(line) for line, _ in command_lines()) == 2


@pytest.mark.parametrize("code, compile_only", PYTHON_BLOCKS,
                         ids=[f"block{i}" for i in range(len(PYTHON_BLOCKS))])
def test_a_python_block_runs_as_pasted(scratch, code, compile_only):
    if compile_only:
        check_names(code)
    else:
        run_python(scratch, code)


@pytest.mark.parametrize("command, compile_only", COMMANDS, ids=[c for c, _ in COMMANDS])
def test_a_command_line_runs_as_written(scratch, command, compile_only):
    if compile_only:
        check_command(command)
    elif command.startswith("make "):
        words = shlex.split(command)
        dry = [] if words[1:] == ["help"] else ["-n"]
        shown = run(scratch, ["make", "-C", ROOT, *dry, *words[1:]])
        if not dry:
            assert all(f"make {t}" in shown.stdout for t in ("test", "run", "unit", "clean"))
    else:
        extra = [] if command.endswith("--help") else SHRINK
        done = run(scratch, " ".join([command, *extra]), shell=True)
        assert "OMP_NUM_THREADS" not in done.stderr  # torchrun's warning banner
        if extra:
            checkpoint = command.split("--checkpoint ")[1].split()[0]
            assert f"Checkpoint: {checkpoint}" in done.stdout
            assert os.path.isfile(os.path.join(scratch[0], checkpoint))


def test_the_fine_tune_recipe_runs_in_order_as_written(scratch):
    """Write my_data, train the shapes, fine-tune on my_data, score: each block as written."""
    write, score = [code for code, _ in fenced("python") if in_recipe(code)]
    run_python(scratch, write)
    assert len(os.listdir(scratch[0] / "my_data" / "images")) == 64
    shapes, mine = [line for line, _ in command_lines() if in_recipe(line)]
    run(scratch, " ".join([shapes, *SHRINK]), shell=True)
    tuned = run(scratch, " ".join([mine, "--image-size", "64", "--steps-per-epoch", "1"]),
                shell=True)
    assert "runs/shapes.pt: loaded every weight, the predictor's too" in tuned.stdout
    printed = run_python(scratch, score).stdout
    assert re.fullmatch(r"\{'AP50': [0-9.]+, 'AP50/disc': [0-9.]+, 'AP50/square': [0-9.]+, "
                        r"'AP50/wedge': [0-9.]+\}\n", printed), printed
