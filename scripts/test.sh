#!/usr/bin/env bash
# Set-up (scripts/setup.sh), then every test through CTest; then the parser, CLI and passes tests again
# under AddressSanitizer + UndefinedBehaviorSanitizer; then a short libFuzzer run of each fuzz
# target. FUZZ_SECONDS (default 20) sets the fuzzing time per target; 0 skips fuzzing.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
echo "== tests (Release -O2) [${SECONDS}s]"
ctest --test-dir build --output-on-failure -j2 --timeout 600

# The CLI tests include the non-finite cases (tests/cli/robust_test.cpp: a model with a NaN weight
# through calibrate, eval and every merge method), so those paths run under the sanitizers too;
# the passes tests (clustering, assignment and ranking guards on NaN/Inf inputs; about 25 s under
# ASan) run there as well.
echo "== parser and CLI tests under ASan+UBSan [${SECONDS}s]"
BUILD_DIR=build-asan EXTRA_CMAKE="-DMOE_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo" \
  BUILD_TARGETS="moe-tool test_core test_io test_model test_cli test_tokenizer test_passes" scripts/setup.sh
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir build-asan --output-on-failure -j2 --timeout 900 -L '^(core|io|model|cli|tokenizer|passes)$'

if [ "${FUZZ_SECONDS:-20}" != "0" ] && [ -x tests/fuzz/run.sh ]; then
  echo "== fuzzing (${FUZZ_SECONDS:-20}s per target) [${SECONDS}s]"
  tests/fuzz/run.sh "${FUZZ_SECONDS:-20}"
fi
echo "== all passed [${SECONDS}s]"
