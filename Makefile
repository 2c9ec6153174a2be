# accept-mqtt: `make demo` and `make test` set everything up on a fresh Debian machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU build of torch that Debian/x86 machines here carry; pyproject keeps a wide range.
# The venv gets every extra (coordinator, plot, dev): `pip install accept-mqtt` alone is the
# device agent's lean set (docs/deployment.md).
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test lint setup mosquitto datasets bench clean
.PHONY: chromium

setup: mosquitto datasets $(STAMP)
setup: chromium

mosquitto:
	@bash broker/ensure_mosquitto.sh

datasets:
	@bash broker/ensure_datasets.sh

chromium:
	@bash broker/ensure_chromium.sh

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[coordinator,plot,dev]"
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/accept-mqtt train --model cnn --dataset digits --devices 3 --epochs 4 \
		--json runs/demo.json

test: setup
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .import_linter_cache
