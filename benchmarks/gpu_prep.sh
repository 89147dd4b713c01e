#!/usr/bin/env bash
# Run here (with pip's registry), before a device session: downloads the wheels that
# benchmarks/gpu_session.sh carries to the device image (Python 3.12, x86-64), into benchmarks/_wheels
# (git-ignored). The image lacks only greenlet of what the GPU lines import (true-sequential calibration).
set -eu
cd "$(dirname "$0")/.."
mkdir -p benchmarks/_wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d benchmarks/_wheels greenlet==3.5.6
ls -la benchmarks/_wheels
