# Two commands for a newcomer (see README): `make demo` and `make test`. Everything else is a helper.
SHELL := /bin/bash
.ONESHELL:
.SHELLFLAGS := -eo pipefail -c
ENV := source .venv/env.sh
# interfaces/: standard message packages the PyPI ROS wheels lack (tf2_msgs, diagnostic_msgs), built only if missing
MISSING_MSGS := $$(for p in tf2_msgs diagnostic_msgs; do env -u PYTHONPATH .venv/bin/python -c "import $$p" 2>/dev/null \
	|| echo interfaces/$$p; done)
COLCON_BUILD := colcon build --base-paths . $(MISSING_MSGS) --event-handlers console_cohesion- summary+ \
	--cmake-args -DPython3_EXECUTABLE=$$(readlink -f .venv)/bin/python -DBUILD_TESTING=ON
DEMO_ARGS ?= --episodes 3 --duration 120

.PHONY: venv build demo lint test bench soak clean
venv:
	bash scripts/setup_env.sh

build: venv
	$(ENV)
	$(COLCON_BUILD)

# Main job on the embedded defaults.
demo: build
	$(ENV)
	python -m spanvla_ros.cli.drive $(DEMO_ARGS)

# ruff + mypy (pyproject.toml); also the pre-commit hooks (.pre-commit-config.yaml).
lint: venv
	$(ENV)
	ruff check src test
	cd src && mypy -p spanvla_ros --config-file ../pyproject.toml

# Whole test suite: lint, colcon build + colcon test (pytest summary printed), isolated network namespace when root.
test: lint build
	bash scripts/run_tests.sh

bench: build
	$(ENV)
	python -m spanvla_ros.cli.bench_model
	python -m spanvla_ros.cli.bench_latency --json results/bench_latency.json

# Soak (not part of `make test`): the composed drive in real time for SOAK_S seconds (default 30 min), a line per
# minute (RSS, plan / reasoner rate, degraded / withheld / limited plans, episodes, recorded MB), split recording.
SOAK_S ?= 1800
soak: build
	$(ENV)
	python -m spanvla_ros.cli.drive --duration $(SOAK_S) --report-every 60 --split-duration-s 600 \
		--record runs/soak-{time} --json runs/soak.json

clean:
	rm -rf build install log
