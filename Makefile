# The course's commands. `make test` and `make run` set everything up by themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
OUT    ?= out
# seconds a notebook cell may run before `make run` / `make test` stop it (empty: no limit)
TIMEOUT ?=

.PHONY: help setup test test-portable unit notebooks run bench bench-gpu notebooks-refresh clean
.DEFAULT_GOAL := help

## this list of targets
help:
	@awk '/^## /{text=substr($$0, 4); next} /^[a-z-]+:/{if (text) printf "  make %-18s %s\n", substr($$1, 1, length($$1)-1), text; text=""}' $(MAKEFILE_LIST)

## create .venv and install requirements.txt and the module (about 1.5 min here, once)
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	@echo "Installing the course's packages into $(VENV) (about 1.5 min here, once); pip lists each one..."
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -m pip install --disable-pip-version-check --progress-bar off -r requirements.txt 2>&1 | grep -v -e "^WARNING: Location" -e "^Requirement already satisfied" || true
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import torch, torchvision, datasets, pycocotools, nbval, matplotlib, tqdm, frcnn_common, frcnn_engine, frcnn_course"
	touch $@

# The two tests that train a detector to a score (100 to 112 s on one core, measured) run in
# make test's notebooks lane, which would otherwise finish some 200 s before the unit tests' lane.
TO_NOTEBOOKS_LANE := tests/test_research.py::test_custom_backbone_learns_as_well_as_torchvision \
                     tests/test_train.py::test_small_detector_learns_the_shapes

## unit tests and every notebook (nbval, fast mode, CPU, offline) side by side, a core each (times in README)
# (plain `make` in the lanes, not $(MAKE): `make -n test` must only print, and make runs any line
# that names $(MAKE) even under -n)
test: setup
	@$(PY) tools/run_lanes.py \
	    "unit=make --no-print-directory unit UNIT_ARGS='$(addprefix --deselect ,$(TO_NOTEBOOKS_LANE))'" \
	    "notebooks=make --no-print-directory notebooks && $(PY) -m pytest -q $(TO_NOTEBOOKS_LANE)"

## the unit tests only (tests/)
unit: setup
	$(PY) -m pytest -q --durations=10 $(UNIT_ARGS) tests

## every notebook executed by nbval in fast mode, training progress shown as it runs (TIMEOUT=s per cell)
notebooks: setup
	FRCNN_FAST=1 MPLBACKEND=Agg $(PY) tools/with_progress.py $(PY) -m pytest -q --nbval-lax \
	    --nbval-sanitize-with notebooks/nbval_sanitize.cfg \
	    -p no:cacheprovider --nbval-cell-timeout=$(or $(TIMEOUT),864000) notebooks

## make test under each instruction-set limit and 1 and 2 threads, as other CPUs run it (6 x make test; TARGET=notebooks)
test-portable: setup
	tools/test_portable.sh $(or $(TARGET),test)

## execute the six notebooks in fast mode (times in README); copies, figures, results in out/ (TIMEOUT=s per cell)
run: setup
	FRCNN_FAST=1 $(PY) tools/run_notebooks.py --out $(OUT) $(if $(TIMEOUT),--timeout $(TIMEOUT))

## rewrite the outputs stored in notebooks/ from a real fast-mode run
notebooks-refresh: setup
	FRCNN_FAST=1 $(PY) tools/run_notebooks.py --in-place

## speed, memory and learning figures, one `name: value` line each (over an hour here: six 500-step runs)
bench: setup
	$(PY) benchmarks/bench_ops.py
	$(PY) benchmarks/bench_model.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_research.py
	$(PY) benchmarks/bench_recipe.py
	$(PY) benchmarks/bench_course.py

## GPU figures: training memory and speed, inference, NMS, full-mode notebooks (8 min; copy in out/bench_gpu.txt); ARGS=--dry-run: tiny sizes on the CPU (~1 min)
bench-gpu: setup
	@mkdir -p $(OUT)
	$(PY) benchmarks/bench_gpu.py --out $(OUT)/bench_gpu.txt $(ARGS)

## remove what the commands wrote: out/, checkpoints (notebooks/checkpoints/, runs/), notebooks/own_data/, README's my_data/, pytest's cache
clean:
	rm -rf $(OUT) notebooks/checkpoints notebooks/own_data runs my_data .pytest_cache
