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

.PHONY: demo test lint install clean browser

install: $(STAMP)

# DeepSpeed is built against the torch just installed (no isolated build env that would pull
# another torch); its ops compile lazily at first use and are cached in ~/.cache.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --no-build-isolation "deepspeed>=0.15"
	$(BIN)/python -m pip install -q -e ".[dev,dist,track,tune,serve]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/noiseclr discover --config jobs/shapes.yaml --out $(OUT) --device $(DEVICE)

# The page test drives Debian's headless chromium, the dashboards test runs Debian's Prometheus,
# the endpoint's load test Debian's hey (an external HTTP load generator);
# install them when missing and apt-get can (root on Debian); elsewhere those checks skip, saying why.
APT := DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver prometheus hey >/dev/null
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v prometheus >/dev/null && \
	  command -v hey >/dev/null || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    { $(APT) || { apt-get update -q >/dev/null && $(APT); }; }; } || \
	  echo "no chromium/prometheus/hey: the page test, the dashboards' PromQL check and the external load test will skip"

test: $(STAMP) browser
	$(BIN)/ruff check platform tests jobs
	$(BIN)/python -m pytest -q --durations=25

lint: $(STAMP)
	$(BIN)/ruff check platform tests jobs
	$(BIN)/ruff format --check platform tests jobs

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
