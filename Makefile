# fdfast: set-up, demo and tests on a fresh Debian 12 / Python 3.11 machine (CPU is enough).
#
#   make demo   # venv + dependencies, then a tiny distillation on generated images, interrupted and resumed
#   make test   # venv + dependencies, then the test suite (what CI runs)
#
# The venv lives in .venv; everything is installed by `make setup` (idempotent, stamp file).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fdfast-setup
DEMO   := runs/demo
DEMO_DATA := $(DEMO)/images

.PHONY: setup demo demo-finetune test clean-demo

$(STAMP): pyproject.toml scripts/install_optional_deps.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# pinned for this machine class: the CUDA build that also runs on CPU (PyPI's torchvision
	# does not import beside the bare torch 2.13 CPU wheel)
	$(BIN)/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install -q -e ".[test]"
	bash scripts/install_optional_deps.sh $(BIN)/python
	touch $@

setup: $(STAMP)

clean-demo:
	rm -rf $(DEMO)

# Part 1 stops at step 160 as an interrupted job would; part 2 is the same command, which resumes
# from the latest checkpoint and finishes the 320 steps.
demo: setup clean-demo
	$(BIN)/python -m pipelines.generate --demo $(DEMO_DATA)
	$(BIN)/fdfast-train --config configs/pretrain/demo_cpu.yaml --set train.max_steps=160
	@echo "---- same command again: resumes from the latest checkpoint ----"
	$(BIN)/fdfast-train --config configs/pretrain/demo_cpu.yaml

test: setup
	$(BIN)/python -m pytest -q

# The second half of FD on the demo student: fine-tune + evaluate (top-1 on a generated validation
# set), export the distilled student in the official FD layout and the fine-tuned one for timm, then
# evaluate the best fine-tuned weights and the timm export with fdfast-eval (the same top-1).
demo-finetune: setup
	test -d $(DEMO)/checkpoints || $(MAKE) demo
	$(BIN)/python -m pipelines.generate --demo $(DEMO_DATA)
	rm -rf runs/demo_finetune runs/demo_export
	$(BIN)/fdfast-train --config configs/finetune/demo_cpu.yaml
	$(BIN)/fdfast-export $(DEMO) --format official --out runs/demo_export/fd_student_official.pth
	$(BIN)/fdfast-export runs/demo_finetune --format timm --out runs/demo_export/finetuned_timm
	$(BIN)/fdfast-eval runs/demo_finetune/best runs/demo_export/finetuned_timm --data $(DEMO_DATA)/val --workers 2
