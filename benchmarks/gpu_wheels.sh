#!/usr/bin/env bash
# The wheels the GPU machine lacks (issue 10), for its Python 3.12, into the ignored folder .whl/ that a device call
# carries: zarr and its dependencies at the versions installed here. torch is never among them.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for name in zarr numcodecs donfig google-crc32c; do
  version=$(python3 -c "import importlib.metadata as m; print(m.version('$name'))")
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$name==$version"
done
ls -l .whl
