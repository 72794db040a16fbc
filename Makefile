# Readout: `make demo` and `make test` work on a fresh Debian 12 machine.
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := dcmtk orthanc orthanc-python orthanc-dicomweb

.PHONY: install demo test bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "apt: installing$$missing"; \
		$(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: a bare `torch` requirement would pull several GB of CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: install
	$(VENV)/bin/readout demo

test: install
	$(VENV)/bin/pytest -q -m "not slow"
	$(VENV)/bin/pytest -q -m slow

bench: install
	$(PY) bench/volume.py
	$(PY) bench/engine.py
	$(PY) bench/orthanc.py
