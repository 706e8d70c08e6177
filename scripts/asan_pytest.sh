#!/usr/bin/env bash
# Runs the CPU op tests against an AddressSanitizer + UBSan build of the extension.
# Uses the venv of scripts/dev (run `bash scripts/dev setup` first). CPU kernels only.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${EXPERTFLOW_VENV:-$root/.venv}/bin/python"
build="$root/build/asan"
PATH="$(dirname "$py"):$PATH" cmake -S "$root" -B "$build" -G Ninja -DEXPERTFLOW_CUDA=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DEXPERTFLOW_SANITIZE=address,undefined \
  -DPython_EXECUTABLE="$py" >/dev/null
PATH="$(dirname "$py"):$PATH" cmake --build "$build" >/dev/null
stage="$build/stage"
rm -rf "$stage" && mkdir -p "$stage"
cp -r "$root/python/expertflow" "$stage/"
cp "$build"/_C*.so "$build/_build_info.py" "$stage/expertflow/"
# torch.compile tests start a C++ compiler, which must not inherit the sanitizer runtime.
cd "$root"
preload="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
# An editable install's import hook would win over PYTHONPATH: refuse to test the wrong build.
LD_PRELOAD="$preload" ASAN_OPTIONS=detect_leaks=0 PYTHONPATH="$stage" "$py" -c \
  "import expertflow, sys; f = expertflow.__file__; print('testing', f); sys.exit(not f.startswith('$stage'))" \
  || { echo "expertflow is not imported from $stage (editable install in this venv?)"; exit 1; }
LD_PRELOAD="$preload" ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  PYTHONPATH="$stage" "$py" -m pytest tests/ops tests/runtime tests/test_build.py -q -p no:cacheprovider \
  -k "not compile and not cuda" \
  --override-ini="addopts=" -W ignore "$@"
