# Two commands on a fresh machine:  `make demo` (the main job) and `make test` (the tests).
# Each installs what it needs into .venv first. On a CPU-only machine TORCH_SPEC pins the
# CPU wheel; on a CUDA machine pass a CUDA build, e.g. `make demo TORCH_SPEC=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEVICE ?= auto
OUT ?= out/discovery
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean

install: $(STAMP)

# DeepSpeed is built against the torch just installed (no isolated build env that would pull
# another torch); its ops compile lazily at first use and are cached in ~/.cache.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --no-build-isolation "deepspeed>=0.15"
	$(BIN)/python -m pip install -q -e ".[dev,dist,track,tune]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/noiseclr discover --config jobs/shapes.yaml --out $(OUT) --device $(DEVICE)

test: $(STAMP)
	$(BIN)/ruff check platform tests jobs
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check platform tests jobs
	$(BIN)/ruff format --check platform tests jobs

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
