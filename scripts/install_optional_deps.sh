#!/usr/bin/env bash
# Install the optional loader backends (FFCV and NVIDIA DALI) into an existing virtual environment.
#
#   bash scripts/install_optional_deps.sh VENV_PYTHON        e.g. .venv/bin/python
#
# Meant for a Debian 12 machine (CI image or workstation) run as root, non-interactively; it exits
# non-zero on the first failure. Every step first checks whether its result is already there, so a
# second run only repeats its import checks (about 10 s).
#
# What and why:
#   * apt: pkg-config, libturbojpeg0-dev, libopencv-core-dev, libopencv-imgproc-dev (~4 MB). FFCV's
#     C extension decodes with libjpeg-turbo and resizes with cv::resize only. Debian ships the
#     `opencv4` pkg-config file FFCV's setup.py asks for only in the full libopencv-dev (~640 MB), so
#     instead we write a 5-line opencv4.pc plus an opencv2/opencv.hpp that pulls in just core and
#     imgproc, into a folder inside the venv (share/fdfast-opencv-shim).
#   * ffcv==1.0.2 (sdist, compiled here) with --no-cache-dir, because pip would otherwise reuse a
#     wheel built earlier against other headers. It is installed with --no-deps after its
#     dependencies, because ffcv declares `opencv-python`, whose cv2 needs libGL/libglib at import
#     time and shares the `cv2` package directory with opencv-python-headless (whichever is
#     installed last wins, file by file). We install opencv-python-headless instead; `pip check`
#     therefore reports "ffcv requires opencv-python", which is expected.
#   * nvidia-dali-cuda120 2.x. Not -cuda110: on PyPI that name is only a stub that downloads from
#     NVIDIA's own index at install time, and DALI 2.x dropped CUDA 11 altogether (last cuda110
#     build: 1.50). The cuda120 wheel runs on CPU-only machines too (device_id=None pipelines).
set -euo pipefail

usage() { echo "usage: $0 VENV_PYTHON   (the python executable of the target virtual environment)" >&2; }

if [[ $# -ne 1 ]]; then usage; exit 2; fi
PY=$1
if ! [[ -x "$PY" ]] || ! "$PY" -c 'import sys' 2>/dev/null; then
    echo "error: '$PY' is not a runnable python executable" >&2; usage; exit 2
fi

FFCV_VERSION=1.0.2
DALI_SPEC='nvidia-dali-cuda120>=2,<3'
APT_PACKAGES=(pkg-config libturbojpeg0-dev libopencv-core-dev libopencv-imgproc-dev)
# ffcv 1.0.2's install_requires, with opencv-python replaced by the headless build (see above), plus
# setuptools: ffcv.pipeline.graph imports distutils, which Python >= 3.12 only has through setuptools.
# The same list as pyproject.toml's `ffcv` extra (what a wheel user installs; the tests compare them).
FFCV_DEPS=(numba opencv-python-headless terminaltables pytorch_pfn_extras fastargs assertpy tqdm psutil setuptools)

export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_NO_INPUT=1

VENV=$("$PY" -c 'import sys; print(sys.prefix)')
SHIM="$VENV/share/fdfast-opencv-shim"
log() { echo "[install_optional_deps] $*"; }
pip_install() { "$PY" -m pip install --no-cache-dir --progress-bar off "$@"; }

# --- 1. system packages ---------------------------------------------------------------------------
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    SUDO=()
    if [[ $(id -u) -ne 0 ]]; then
        if command -v sudo >/dev/null; then SUDO=(sudo -n); else
            echo "error: apt packages ${missing[*]} are missing and this is not root (and no sudo)" >&2
            exit 1
        fi
    fi
    log "apt-get install ${missing[*]}"
    "${SUDO[@]}" apt-get update -q
    "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    log "apt packages present"
fi

# --- 2. opencv4 pkg-config shim (rewritten every run: cheap, and keeps it in sync with the system) --
OPENCV_INCLUDE=/usr/include/opencv4
if [[ ! -f "$OPENCV_INCLUDE/opencv2/core.hpp" || ! -f "$OPENCV_INCLUDE/opencv2/imgproc.hpp" ]]; then
    echo "error: OpenCV headers not found under $OPENCV_INCLUDE (is libopencv-imgproc-dev installed?)" >&2
    exit 1
fi
OPENCV_VERSION=$(dpkg-query -W -f='${Version}' libopencv-core-dev | sed 's/[+~-].*//')
mkdir -p "$SHIM/opencv2"
cat >"$SHIM/opencv4.pc" <<EOF
Name: opencv4
Description: OpenCV core + imgproc only (shim so that ffcv builds without the full libopencv-dev)
Version: $OPENCV_VERSION
Libs: -lopencv_imgproc -lopencv_core
Cflags: -I$SHIM -I$OPENCV_INCLUDE
EOF
cat >"$SHIM/opencv2/opencv.hpp" <<'EOF'
// ffcv's libffcv.cpp includes <opencv2/opencv.hpp> but only calls cv::resize.
#include <opencv2/core.hpp>
#include <opencv2/imgproc.hpp>
EOF

# --- 3. FFCV ---------------------------------------------------------------------------------------
ffcv_ok() {
    "$PY" - "$FFCV_VERSION" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
assert version("ffcv") == sys.argv[1], version("ffcv")
import cv2, numba                      # noqa: F401
from ffcv.libffcv import imdecode      # loads the compiled extension (libturbojpeg, opencv)
from ffcv.loader import Loader         # noqa: F401
from ffcv.writer import DatasetWriter  # noqa: F401
EOF
}
if ffcv_ok; then
    log "ffcv $FFCV_VERSION present"
else
    log "pip install ${FFCV_DEPS[*]}"
    pip_install "${FFCV_DEPS[@]}"
    # a plain opencv-python pulled in earlier would shadow the headless cv2 and need libGL
    if "$PY" -m pip show -q opencv-python >/dev/null 2>&1; then
        log "replacing opencv-python by opencv-python-headless"
        "$PY" -m pip uninstall -y -q opencv-python
        pip_install --force-reinstall --no-deps opencv-python-headless
    fi
    log "pip install ffcv==$FFCV_VERSION (builds its C extension)"
    PKG_CONFIG_PATH="$SHIM${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}" \
        pip_install --no-deps --force-reinstall "ffcv==$FFCV_VERSION"
    if ! ffcv_ok; then
        echo "error: ffcv was installed but does not import; run: $PY -c 'import ffcv.loader'" >&2
        exit 1
    fi
fi

# --- 4. DALI ---------------------------------------------------------------------------------------
dali_ok() {
    "$PY" - <<'EOF' >/dev/null 2>&1
import nvidia.dali as dali
from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: F401
assert int(dali.__version__.split(".")[0]) >= 2, dali.__version__
EOF
}
if dali_ok; then
    log "nvidia-dali present"
else
    log "pip install $DALI_SPEC (~0.4 GB download)"
    pip_install "$DALI_SPEC"
    if ! dali_ok; then
        echo "error: DALI was installed but does not import; run: $PY -c 'import nvidia.dali'" >&2
        exit 1
    fi
fi

log "done: $("$PY" -c 'from importlib.metadata import version as v; print("ffcv", v("ffcv"), "numba", v("numba"), "dali", v("nvidia-dali-cuda120"))')"
