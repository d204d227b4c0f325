# tokenclock: `make demo` runs the whole job, `make test` the test suite. Both create the
# virtual environment (.venv) and install the project into it on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
NPROC ?= 2
PREP ?= configs/prep/demo.yaml
TRAIN ?= configs/train/demo.yaml
DATA ?= data/demo
RUN ?= runs/demo
# The scaled-up run the demo projects to (see `python -m estimate project --help`).
TARGET ?= --model llama3-405b --tokens 15.6T --accelerator H100-SXM5-80GB --count 16384
# Training overrides for the demo, e.g. `make demo ARGS="mixed_precision=bf16 steps=100"`.
ARGS ?=

.PHONY: install demo prep train project test test-slow test-all lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: install
	$(PY) -m data_prep $(PREP) out_dir=$(DATA)
	NPROC=$(NPROC) PY=$(PY) launch/cpu.sh $(TRAIN) data_dir=$(DATA) out_dir=$(RUN) $(ARGS)
	$(PY) -m train.report $(RUN)
	$(PY) -m estimate project $(TARGET) --out $(RUN)/projection
	$(PY) -m estimate project $(TARGET) --mfu-from $(RUN) --out $(RUN)/projection-measured-mfu
	$(PY) -m estimate project --model deepseek-r1 --out $(RUN)/deepseek-r1

prep: install
	$(PY) -m data_prep $(PREP) out_dir=$(DATA)

train: install
	NPROC=$(NPROC) PY=$(PY) launch/cpu.sh $(TRAIN) data_dir=$(DATA) out_dir=$(RUN) $(ARGS)

test: install
	WANDB_MODE=disabled $(PY) -m pytest -q

test-slow: install
	WANDB_MODE=disabled $(PY) -m pytest -q -m slow

# Both tiers: the default one (unit tests and a smoke run, a few minutes) and the slow one
# (multi-process training, the fault suite's real runs, calibrate end to end).
test-all: test test-slow

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(DATA) $(RUN)
