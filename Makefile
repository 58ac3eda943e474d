# MediaProxy: make deps | test | run | bench | soak | deb | clean | distclean
#
#   make deps                 system packages (apt) and the virtualenv .venv
#   make test                 the test suite; PYTEST_ARGS="-k relay -x" for more
#                             pytest options, TESTS=tests/unit for a subset
#   make run                  dispatcher and relay on this host (scripts/run-local)
#   make bench                benchmarks (root, ~8 min): bench/RESULTS.md, bench/results.json
#   make soak                 30 min of churn at 1,000 calls (root): its section of
#                             bench/RESULTS.md (SOAK_ARGS="--minutes 5" for less)
#   make deb                  Debian packages and their lintian report in build/deb/
#                             (DEB_OUT=dir for another place)
#
# `make deps` is idempotent: it runs apt-get (update, then install) only when
# a package of requirements-apt.txt is missing, and pip only when setup.py
# changed; with nothing to do it takes well under a second.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
TESTS ?= tests
PYTEST_ARGS ?=
APT_PACKAGES := $(shell sed -e 's/\#.*//' requirements-apt.txt)
DEPS_STAMP := $(VENV)/.deps-stamp

# root or, failing that, sudo for apt-get
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

export DEBIAN_FRONTEND := noninteractive
export PIP_NO_INPUT := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help deps deps-apt test run bench soak deb clean distclean

help:
	@sed -n '1,14s/^# \{0,1\}//p' $(firstword $(MAKEFILE_LIST))

deps: deps-apt $(DEPS_STAMP)

# Install the apt packages that are missing (the dpkg-query check is fast and
# needs no network).
deps-apt:
	@missing=""; \
	for p in $(APT_PACKAGES); do \
	    [ "$$(dpkg-query -W -f='$${db:Status-Status}' "$$p" 2>/dev/null)" = installed ] || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	    echo "deps: installing$$missing"; \
	    $(SUDO) apt-get -q update </dev/null; \
	    $(SUDO) apt-get -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
	        install --no-install-recommends $$missing </dev/null; \
	fi
	@if ! dpkg-checkbuilddeps >/dev/null 2>&1; then \
	    echo "deps: installing the build dependencies of debian/control"; \
	    $(SUDO) apt-get -q update </dev/null; \
	    $(SUDO) apt-get -y -q --no-install-recommends build-dep ./ </dev/null; \
	fi

$(VENV)/bin/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	    { echo "deps: MediaProxy needs Python 3.11 or newer; '$(PYTHON)' is $$($(PYTHON) -V 2>&1) (set PYTHON=...)" >&2; exit 1; }
	@echo "deps: creating $(VENV) with $$($(PYTHON) -V 2>&1)"
	@$(PYTHON) -m venv $(VENV) || \
	    { echo "deps: '$(PYTHON) -m venv' failed (Debian's python3 needs: apt-get install python3-venv)" >&2; exit 1; }

# deps-apt first: pip may have to compile python-iptables
$(DEPS_STAMP): setup.py | deps-apt $(VENV)/bin/python
	@echo "deps: installing MediaProxy and its Python packages in $(VENV) (pip install -e '.[test,bench]')"
	@$(VENV)/bin/pip install -q -e '.[test,bench]' </dev/null
	@touch $@

test: deps
	$(VENV)/bin/python -m pytest $(TESTS) $(PYTEST_ARGS)

run: deps
	scripts/run-local

# The packages are built from a copy of the files git knows (a clean tree,
# and dpkg-buildpackage writes next to the tree it builds), with Debian's own
# Python and nothing of the virtualenv or pyenv on the PATH.
DEB_OUT ?= build/deb
deb: deps-apt
	rm -rf $(DEB_OUT) && mkdir -p $(DEB_OUT)/mediaproxy
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t $(DEB_OUT)/mediaproxy
	cd $(DEB_OUT)/mediaproxy && env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$$HOME" \
	    dpkg-buildpackage -us -uc -b >../build.log 2>&1 || { tail -40 ../build.log; exit 1; }
	status=0; lintian --pedantic --info --fail-on error $(DEB_OUT)/*.changes >$(DEB_OUT)/lintian.txt 2>&1 || status=$$?; \
	    grep -v 'not recommended' $(DEB_OUT)/lintian.txt || true; exit $$status
	@echo "deb: $$(cd $(DEB_OUT) && ls *.deb | tr '\n' ' ')in $(DEB_OUT)/ (lintian: $(DEB_OUT)/lintian.txt)"

clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis ./run
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

# The benchmarks (bench/README): namespaces, the daemons, packet tools built
# into bench/build/; rewrites bench/RESULTS.md and bench/results.json.
# BENCH_ARGS="--smoke" for a quick run that writes to bench/build/smoke/.
BENCH_ARGS ?=
bench: deps
	$(VENV)/bin/python -m bench $(BENCH_ARGS)

# The soak (bench/soak.py): leaks of memory, descriptors, ports, kernel entries
# or accounting records under 30 minutes of churn; outside `make bench`.
soak: deps
	$(VENV)/bin/python -m bench.soak $(SOAK_ARGS)
