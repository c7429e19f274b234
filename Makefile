# GeoChange: `make demo` and `make test` each set up what is missing first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := qgis python3-qgis qgis-providers python3-rasterio gdal-bin python3-venv
# The engine's and trainer's packages are listed once, in requirements.txt (pyproject.toml and QGIS's set-up
# algorithm read it too); these are the development tools.
DEV_DEPS := pytest ruff
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system-packages demo test bench clean plugin

setup: system-packages $(VENV)/.deps-installed

# Debian's QGIS, its Python bindings and rasterio built on the same GDAL; installed only if missing.
system-packages:
	@missing=$$(for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

# The venv sees Debian's site-packages (qgis, osgeo, rasterio), so it is made after them (else pip would bring
# rasterio and pyproj with GDAL and PROJ of their own); made again where a stopped set-up left it without pip;
# re-run only when the dependencies change.
$(VENV)/.deps-installed: pyproject.toml requirements.txt constraints.txt Makefile | system-packages
	@$(PY) -m pip --version >/dev/null 2>&1 || /usr/bin/python3 -m venv --clear --system-site-packages $(VENV)
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt $(DEV_DEPS)
	$(PY) -m pip install -q --no-deps -e .
	@touch $@

demo: setup
	$(PY) scripts/demo.py --out demo_out

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# Engine benchmark on mirrored LEVIR mosaics; appends to bench/results.md. On this 2-core CPU the
# 16384^2 run is TinyCD only, its compute floor timed on 6 of 37 tile rows and scaled (M2CD would take hours).
bench: setup
	$(PY) bench/run.py --sizes 4096 --models tinycd m2cd_mit_b0 --repeats 3
	$(PY) bench/run.py --sizes 16384 --models tinycd --floor-sample-rows 6

# The QGIS plugin zip ("Install from ZIP"): one top folder geochange/ with the runtime files only (no tests,
# bench, docs or scripts).
VERSION := $(shell sed -n 's/^version=//p' metadata.txt)
DIST := dist
PLUGIN_BUILD := build/plugin
PLUGIN_FILES := __init__.py LICENSE metadata.txt icon.png requirements.txt engine trainer qgis_plugin $(wildcard zoo)

# In a git checkout, the files git tracks (no editor's backups, caches or untracked experiments in a release).
plugin:
	@rm -rf $(PLUGIN_BUILD) && mkdir -p $(PLUGIN_BUILD)/geochange $(DIST)
	@set -o pipefail; if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
		git ls-files -z -- $(PLUGIN_FILES) | tar --null -T - -cf - | tar -xf - -C $(PLUGIN_BUILD)/geochange; \
	else cp -r $(PLUGIN_FILES) $(PLUGIN_BUILD)/geochange/; fi
	@find $(PLUGIN_BUILD) \( -name __pycache__ -o -name '*.pyc' \) -prune -exec rm -rf {} +
	@rm -f $(DIST)/geochange-$(VERSION).zip
	@cd $(PLUGIN_BUILD) && python3 -m zipfile -c $(abspath $(DIST))/geochange-$(VERSION).zip geochange
	@echo $(DIST)/geochange-$(VERSION).zip

clean:
	rm -rf demo_out dist build *.egg-info .pytest_cache
