# Two commands do all the set-up on a fresh machine (see README):
#   make demo   -- creates .venv, installs everything, runs the end-to-end demo on generated data (CPU)
#   make test   -- creates .venv, installs everything, runs the test suite (CPU, simulated devices)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: venv beam-venv demo test lint faults clean

$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || { \
	  echo "python3 -m venv failed; installing Debian's python3-venv"; \
	  (apt-get update -qq && apt-get install -y -qq python3-venv) && $(PY) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	# torchvision has no CPU build on the registries: the wheel matching torch 2.13 is installed without
	# its CUDA dependencies; tests/reference.py registers its two custom op schemas before import.
	$(BIN)/pip install -q --no-deps torchvision==0.28.0
	# clip-benchmark ships the zero-shot class names and templates (JSON); its heavy deps are not needed.
	$(BIN)/pip install -q --no-deps clip-benchmark==1.6.2
	# WordNet 3.0 for the offline metadata build (Debian); its tests skip when it cannot be installed.
	@test -d /usr/share/wordnet || (apt-get update -qq && apt-get install -y -qq wordnet-base) \
	  || echo "note: wordnet-base not installed; the WordNet metadata tests will skip"
	touch $(STAMP)

# Apache Beam conflicts with the main environment's protobuf/pyarrow pins: it gets its own venv, used by
# tests/test_curation_beam.py (Beam DirectRunner vs the local runner).
BEAM_VENV ?= .venv-beam
BEAM_STAMP := $(BEAM_VENV)/.installed

$(BEAM_STAMP): requirements-beam.txt
	@test -x $(BEAM_VENV)/bin/python || $(PY) -m venv $(BEAM_VENV)
	$(BEAM_VENV)/bin/pip install -q --upgrade pip
	$(BEAM_VENV)/bin/pip install -q -r requirements-beam.txt
	touch $(BEAM_STAMP)

# libtpu (from PyPI, the version jax[tpu] pins) lets launch.aot compile for TPU topologies on this CPU machine.
# It lives outside .venv: installed there, every jax import would probe for TPUs.
TPU_DIR ?= .venv-tpu
TPU_STAMP := $(TPU_DIR)/.installed

$(TPU_STAMP): $(STAMP)
	$(BIN)/pip install -q --no-deps --target $(TPU_DIR) "$$($(BIN)/python -c "import importlib.metadata as m; \
	  print([r for r in m.requires('jax') if r.startswith('libtpu')][0].split(';')[0])")"
	touch $(TPU_STAMP)

venv: $(STAMP)

beam-venv: $(BEAM_STAMP)

demo: $(STAMP)
	$(BIN)/python -m launch.demo --workdir $(WORKDIR)

test: $(STAMP) $(BEAM_STAMP) $(TPU_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --timeout 900 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

faults: $(STAMP)
	$(BIN)/python -m pytest -m faults tests/faults

clean:
	rm -rf $(VENV) $(BEAM_VENV) $(TPU_DIR) runs .pytest_cache .ruff_cache
