# Two commands on a fresh machine:  `make demo` (the main job) and `make test` (the tests).
# Each installs what it needs into .venv first. On a CPU-only machine TORCH_SPEC pins the
# CPU wheel; on a CUDA machine pass a CUDA build, e.g. `make demo TORCH_SPEC=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEVICE ?= auto
OUT ?= out/demo
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/noiseclr generate --model shapes --prompt "a red circle" --n 16 --seed 0 \
		--device $(DEVICE) --out $(OUT)/samples.png
	$(BIN)/noiseclr generate --model shapes --device $(DEVICE) --n 8 --seed 0 \
		--prompt "a large blue triangle at top left on a light striped background" --out $(OUT)/composed.png

test: $(STAMP)
	$(BIN)/ruff check platform tests jobs
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check platform tests jobs
	$(BIN)/ruff format --check platform tests jobs

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
