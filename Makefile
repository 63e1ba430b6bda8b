# Two commands on a fresh machine:  `make train` (the main job)  and  `make test`.
BASE_PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_ID := $(shell date +%Y%m%d-%H%M%S)

.PHONY: install lock data train train-dense edit-demo lint test test-slow test-gpu test-slurm \
	test-latest test-lowest mutants clean-venv

# The venv holds this project, installed editable with its dev and demo extras (pyproject.toml,
# the one list of dependencies), at the exact set CI tests: constraints.txt, written by
# `make lock`. torch is installed only when none is importable, as TORCH_INSTALL (our CPU
# machines' wheel; an unpinned torch would pull a multi-GB CUDA build). A torch already in
# $(BASE_PYTHON)'s site-packages (a GPU cluster's own build) is used as it is: the venv then
# sees it.
TORCH_INSTALL ?= torch==2.13.0
export BASE_PYTHON TORCH_INSTALL
$(STAMP): pyproject.toml constraints.txt
	tools/dev/venv.sh $(VENV) locked
	touch $(STAMP)

install: $(STAMP)

# Bundled corpus -> tokenizer (byte-level BPE, 8192) -> indexed train/val datasets; idempotent.
data: $(STAMP)
	$(PY) tools/prepare_corpus.py

train: data
	$(PY) -m stem_megatron.train --config configs/tiny.yaml logging.run_dir=runs/tiny-$(RUN_ID)

train-dense: data
	$(PY) -m stem_megatron.train --config configs/tiny_dense.yaml logging.run_dir=runs/tiny_dense-$(RUN_ID)

# Knowledge editing demo (docs/knowledge_editing.md): learn country capitals, swap STEM rows,
# report edit success and locality; writes runs/knowledge_demo-<time>/knowledge_demo.json.
edit-demo: $(STAMP)
	$(PY) tools/knowledge_demo.py --out runs/knowledge_demo-$(RUN_ID)

# ruff's lint rules and formatting (settings in pyproject.toml): the tree stays clean.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The CPU suites hide any GPU (their bitwise comparisons are of CPU arithmetic, and a GPU
# machine must not run half of them on CUDA by surprise); `make test-gpu` is the GPU suite.
test: lint
	CUDA_VISIBLE_DEVICES= $(PY) -m pytest -q

test-slow: $(STAMP)
	CUDA_VISIBLE_DEVICES= $(PY) -m pytest -q -m slow

# The CUDA paths on one GPU (docs/testing.md), under 5 minutes; without CUDA every test skips
# and one line says so.
test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu

# launch/slurm.sbatch on a real one-node SLURM cluster on localhost (root; installs
# slurm-wlm and munge with apt-get if missing). About 2-3 minutes.
test-slurm: $(STAMP)
	$(PY) -m pytest -q -m slurm tests/launch

# constraints.txt anew from the newest releases of the day (torch stays TORCH_INSTALL). Written
# beside, then moved over the old lock only once the install succeeded.
lock:
	tools/dev/venv.sh .venv-lock latest
	{ echo "# Written by make lock on $$(date -u +%F) from pyproject.toml: the exact set CI installs."; \
	  echo "# torch is not here: the Makefile installs TORCH_INSTALL only when none is importable."; \
	  .venv-lock/bin/pip freeze --exclude-editable | grep -viE '^(torch|nvidia-|triton)'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-lock

# The suite against the newest releases of the day: drift shows up here before a user hits it.
test-latest:
	tools/dev/venv.sh .venv-latest latest
	.venv-latest/bin/python -m pytest -q

# The suite against every lower bound in pyproject.toml (torch 2.6.0: a CUDA build, ~3 GB).
test-lowest:
	tools/dev/venv.sh .venv-lowest lowest
	.venv-lowest/bin/python -m pytest -q

# Break the code one place at a time (tools/dev/mutants.yaml); the guarding tests must fail.
mutants: $(STAMP)
	$(PY) tools/dev/mutants.py

clean-venv:
	rm -rf $(VENV) .venv-lock .venv-latest .venv-lowest
