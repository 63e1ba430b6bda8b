# Two commands on a fresh machine:  `make train` (the main job)  and  `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_ID := $(shell date +%Y%m%d-%H%M%S)

.PHONY: install data train train-dense edit-demo test test-slow test-slurm clean-venv

# torch is installed only when none is importable, as TORCH_INSTALL (our CPU machines' wheel;
# an unpinned torch would pull a multi-GB CUDA build). A torch already in $(PYTHON)'s
# site-packages (a GPU cluster's own build) is used as it is: the venv then sees it.
TORCH_INSTALL ?= torch==2.13.0
$(STAMP): requirements.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv \
	    $$($(PYTHON) -c "import torch" 2>/dev/null && echo --system-site-packages) $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_INSTALL)
	$(PY) -m pip install -q -c constraints.txt -r requirements.txt
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

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# launch/slurm.sbatch on a real one-node SLURM cluster on localhost (root; installs
# slurm-wlm and munge with apt-get if missing). About 2-3 minutes.
test-slurm: $(STAMP)
	$(PY) -m pytest -q -m slurm tests/launch

clean-venv:
	rm -rf $(VENV)
