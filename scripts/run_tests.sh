#!/usr/bin/env bash
# colcon test over the built package, printing pytest's output and summary; non-zero on any failure.
# As root, the run goes into a fresh network namespace where only loopback is up, so no DDS packet can
# leave the machine whatever a test does; otherwise it relies on the loopback-only Fast DDS profile.
set -eo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source .venv/env.sh
run="colcon test --base-paths . --event-handlers console_direct+ --return-code-on-test-failure --ctest-args --output-on-failure"
if [[ "$(id -u)" == 0 ]] && unshare -n true 2>/dev/null; then
  echo "[test] isolated network namespace (loopback only)"
  unshare -n bash -c "ip link set lo up && $run"
else
  echo "[test] not root: running without a network namespace (DDS still held to loopback by params/fastdds_loopback.xml)"
  $run
fi
colcon test-result --all --verbose | tail -n 5
