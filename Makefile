# parley — build, test, demo, benchmark, install.
# `make demo` and `make test` do all set-up on a fresh Debian 12 / Raspberry Pi OS machine.

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ARCH    := $(shell uname -m)

# System packages: alsa-lib and libsystemd headers to build pyalsaaudio and systemd-python,
# speexdsp for the benchmark's peer, the aarch64 cross compiler + qemu for the NEON checks.
DEB_PACKAGES := python3-venv python3-dev gcc make pkg-config libasound2-dev libsystemd-dev \
                libspeexdsp-dev alsa-utils systemd
ifeq ($(ARCH),x86_64)
DEB_PACKAGES += gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
endif

C_SOURCES := $(wildcard hw/csrc/*.c hw/csrc/*.h) setup.py

.PHONY: all deps system-deps build fault-plugin test lint typecheck pytest cross-test \
        unit-check demo bench install uninstall clean

all: build

system-deps: $(VENV)/.system-deps
$(VENV)/.system-deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
	@mkdir -p $(VENV) && touch $@

deps: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml $(VENV)/.system-deps
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[test,bench]'
	@touch $@

# Rebuild the C extension in place whenever its sources change.
build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.installed $(C_SOURCES)
	$(PY) setup.py -q build_ext --inplace
	@touch $@

# parley's own ALSA external plugin, for injecting xruns, unplugs and stalls in tests.
fault-plugin: system-deps
	$(MAKE) -s -C hw/alsa_fault

lint: deps
	$(VENV)/bin/ruff check daemon hw tests bench
typecheck: build
	$(VENV)/bin/mypy
pytest: build fault-plugin
	$(VENV)/bin/pytest -q
cross-test: build
	$(MAKE) -C hw/csrc cross-test
unit-check: deps
	$(MAKE) -C systemd check

test: lint typecheck cross-test unit-check pytest

demo: build fault-plugin
	$(PY) -m daemon.demo

bench: build
	$(PY) bench/resample_bench.py

install:
	$(MAKE) -C systemd install PYTHON=$(PYTHON) DESTDIR=$(DESTDIR)
uninstall:
	$(MAKE) -C systemd uninstall DESTDIR=$(DESTDIR)

clean:
	rm -rf build $(VENV) hw/*.so demo-out bench-out
	-$(MAKE) -C hw/csrc clean
	-$(MAKE) -C hw/alsa_fault clean
