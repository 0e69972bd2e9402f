#!/usr/bin/env bash
# Run on a machine that reaches the package index, before bench/gpu.sh on one that does not:
# fills .whl/ (gitignored; carry it along) with
#   - the gpuvars wheel built from this checkout (gpu.sh refuses a wheel older than the sources),
#   - xxhash wheels for CPython 3.10-3.14 on x86_64 and aarch64 Linux (a gpuvars dependency
#     GPU images often lack; numpy, safetensors, ml_dtypes, pytest and hypothesis they have).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
mkdir -p .whl
rm -f .whl/gpuvars-*.whl
echo "building the gpuvars wheel into .whl/"
"$py" .ci/wheel.py build .whl
for version in 3.10 3.11 3.12 3.13 3.14; do
  for arch in x86_64 aarch64; do
    "$py" -m pip download --quiet --no-deps --only-binary=:all: --dest .whl \
      --implementation cp --python-version "$version" \
      --platform "manylinux_2_17_$arch" --platform "manylinux2014_$arch" "xxhash>=3.4" \
      || echo "note: no xxhash wheel for CPython $version on $arch" >&2
  done
done
ls -l .whl/*.whl
echo "done: carry .whl/ to the GPU machine with the checkout and run: bash bench/gpu.sh"
