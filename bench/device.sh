#!/usr/bin/env bash
# One command for a bare single-GPU box (no network):  bash bench/device.sh
# Installs carried wheels (.whl/*.whl, e.g. timm) into /tmp/site, puts the repo on PYTHONPATH (no
# install needed), then runs bench/device.py: env, GPU tests, step / teacher / loader / e2e
# benchmarks. Results go to $OUT (default ./bench_out). DEVICE_DRY_RUN=1: the same on the CPU, tiny.
set -u
cd "$(dirname "$0")/.."
export OUT="${OUT:-$PWD/bench_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
shopt -s nullglob
wheels=(.whl/*.whl)
if (( ${#wheels[@]} )); then
  if "$PY" -m pip install -q --no-index --no-deps --target /tmp/site "${wheels[@]}" >>"$OUT/device.log" 2>&1; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    echo "[device.sh] installed ${#wheels[@]} carried wheel(s) into /tmp/site" | tee -a "$OUT/device.log"
  else
    echo "[device.sh] WARNING: installing ${wheels[*]} failed (see $OUT/device.log); using the box's packages" \
      | tee -a "$OUT/device.log"
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" bench/device.py "$@"
