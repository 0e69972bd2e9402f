#!/usr/bin/env bash
# The one command for a GPU machine: the GPU test suite, then the benchmarks' GPU scenarios
# (python -m bench --gpu: one results.json), then the demo.
#
# That machine reaches no package index, and the array layer only exists as an installed
# package (the folder backends/ installs as gpuvars_backends), so gpuvars comes from the
# wheel in .whl/, installed into a throwaway folder put first on PYTHONPATH; the image's
# own packages (numpy, safetensors, ml_dtypes, cupy, jax, pytest, hypothesis) serve the rest. Beforehand,
# on a machine with the index: `bash bench/gpu_prepare.sh` (the wheel, plus xxhash wheels
# in case the image lacks xxhash), and bring .whl/ along (it is gitignored). Everything
# runs from a folder outside the checkout, so the installed copy is the one under test.
set -uo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PIP_DISABLE_PIP_VERSION_CHECK=1
work="$(mktemp -d "${TMPDIR:-/tmp}/gpuvars-gpu.XXXXXX")"
trap 'rm -rf "$work"' EXIT
prepare="on a machine that reaches the package index run 'bash bench/gpu_prepare.sh' in this checkout, then bring .whl/ here with it"

# A wheel that matches these sources: the one in .whl/, else one built here (offline when
# this Python has setuptools >= 77; else through the index, which fails fast when unreachable).
wheel="$(ls -t .whl/gpuvars-*.whl 2>/dev/null | head -n 1)"
if [ -z "$wheel" ] || ! "$py" .ci/wheel.py check "$wheel"; then
  if [ -n "$wheel" ]; then echo "gpu.sh: $wheel does not match these sources; building another" >&2; fi
  if ! wheel="$(PIP_NO_INDEX=1 "$py" .ci/wheel.py build "$work/dist" 2>/dev/null)" \
     && ! wheel="$(PIP_TIMEOUT=15 PIP_RETRIES=0 "$py" .ci/wheel.py build "$work/dist")"; then
    echo "gpu.sh: no gpuvars wheel in .whl/ matches these sources and none can be built here: $prepare" >&2
    exit 2
  fi
fi
echo "gpu.sh: installing $wheel"

# Installed into a folder of our own, first on PYTHONPATH: the image's packages stay as they
# are and no venv is needed (a venv made from a venv would not see the image's packages).
site="$work/site"
if "$py" -m pip --version >/dev/null 2>&1; then
  "$py" -m pip install --quiet --no-deps --no-index --target "$site" "$wheel" || exit 2
else  # a pure-Python wheel is a zip of the installed files
  "$py" -m zipfile -e "$wheel" "$site" || exit 2
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
for module in numpy safetensors ml_dtypes xxhash pytest hypothesis; do
  if ! "$py" -c "import $module" 2>/dev/null; then
    echo "gpu.sh: $module is missing; installing it from .whl/"
    "$py" -m pip install --quiet --no-deps --no-index --find-links .whl --target "$site" "$module" \
      || { echo "gpu.sh: $module is not installed and .whl/ has no wheel of it for this Python: $prepare" >&2; exit 2; }
  fi
done

cd "$work"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
"$py" -c "import gpuvars, gpuvars_backends; print('gpuvars from', gpuvars.__file__); print('gpuvars_backends from', gpuvars_backends.__file__)"
"$py" -m gpuvars devices
rc=0
GPUVARS_TEST_INSTALLED=1 "$py" -m pytest -q -p no:cacheprovider -c "$root/pyproject.toml" --rootdir "$root" -m "gpu or multi_gpu" -rs "$root/tests" || rc=1
# the GPU scenarios through the one driver: results.json (and PNGs if matplotlib is there) land in
# $OUT/bench-results-gpu on the device machine (what comes back), else ./bench-results-gpu in the checkout
"$py" "$root/bench/__main__.py" --gpu --out "${OUT:-$root}/bench-results-gpu" || rc=1
"$py" -m gpuvars demo --steps 100 || rc=1
exit $rc
