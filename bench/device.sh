#!/usr/bin/env bash
# One command for a bare single-GPU box (no network):  bash bench/device.sh
#
#   bash bench/device.sh --stash   only move the wheel parts carried by this call (.whl/parts/*) to
#                                  .whl/stash/, out of the way of the next transfer (one call per part)
#   bash bench/device.sh           stash, reassemble the parts, check every wheel against bench/wheels.sha256,
#                                  install those that match into $SITE_DIR (default /tmp/site) with
#                                  --no-deps --target (record: $OUT/wheels.json), put it and the repository on
#                                  PYTHONPATH (no install, no network) and run bench/device.py: env, GPU tests,
#                                  step / profile / e2e / teacher / loader benchmarks. Results go to $OUT
#                                  (default ./bench_out). DEVICE_DRY_RUN=1: the same on the CPU, tiny.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [[ "${1:-}" == "--stash" ]]; then
  exec "$PY" bench/wheels.py stash
fi
export DEVICE_START_EPOCH="${DEVICE_START_EPOCH:-$(date +%s)}"
export OUT="${OUT:-$PWD/bench_out}"
SITE="${SITE_DIR:-/tmp/site}"
mkdir -p "$OUT" "$SITE"
# a wheel that fails its check is recorded (and fails the run at the end); the benchmarks still run
"$PY" bench/wheels.py install --target "$SITE" --record "$OUT/wheels.json" 2>&1 | tee -a "$OUT/device.log"
if [ -n "$(ls -A "$SITE")" ]; then
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" bench/device.py "$@"
