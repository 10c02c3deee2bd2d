#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (ASan + UBSan, library instrumented for coverage) in
# build-san/ (the configuration of scripts/test.sh's sanitizer stage, so after it nothing is rebuilt)
# and runs each for SECONDS (default 30). Exits non-zero if a target crashes, leaks or
# trips a sanitizer; the reproducer is left in build-san/fuzz-artifacts/<target>/.
#
#   tests/fuzz/run.sh [SECONDS]
#
# Environment: MOE_FUZZ_BUILD (build folder, default <root>/build-san), JOBS (parallel build
# jobs, default 2), FUZZ_JOBS (targets fuzzed at once, default 2). The targets link the whole library (tests/CMakeLists.txt).
# Reproduce a crash: build-san/tests/<target> build-san/fuzz-artifacts/<target>/crash-...
set -euo pipefail

secs="${1:-30}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build="${MOE_FUZZ_BUILD:-$root/build-san}"
targets=(fuzz_safetensors_header fuzz_config fuzz_ternary_dict fuzz_native_config fuzz_gguf)

CC=clang CXX=clang++ cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DMOE_FUZZ=ON -DMOE_SANITIZE=ON -DMOE_BUILD_TESTS=ON >/dev/null
cmake --build "$build" -j"${JOBS:-2}" --target "${targets[@]}"

# Two targets at a time (each libFuzzer process uses one core): the same time per target, about
# half the wall time. FUZZ_JOBS sets how many run at once.
fuzz_one() {
  local t=$1 corpus="$build/fuzz-corpus/$1" artifacts="$build/fuzz-artifacts/$1"
  mkdir -p "$corpus" "$artifacts"
  # New inputs go to the first folder (in the build tree); the committed seeds are only read.
  ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1}" "$build/tests/$t" "$corpus" "$root/tests/fuzz/seeds/$t" \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
    -artifact_prefix="$artifacts/" -print_final_stats=1 2>"$build/fuzz-$t.log"
}
report() {  # report TARGET EXIT_CODE
  local t=$1 artifacts="$build/fuzz-artifacts/$1"
  if [ "$2" = 0 ]; then
    echo "== $t for ${secs}s: ok"
    grep -E "^stat::number_of_executed_units|^stat::new_units_added|^stat::peak_rss_mb" "$build/fuzz-$t.log" || true
  else
    tail -n 60 "$build/fuzz-$t.log"
    echo "== $t: FAILED (log $build/fuzz-$t.log, reproducer in $artifacts/)"
    status=1
  fi
}

status=0
jobs_at_once="${FUZZ_JOBS:-2}"
for ((i = 0; i < ${#targets[@]}; i += jobs_at_once)); do
  pids=()
  batch=("${targets[@]:i:jobs_at_once}")
  for t in "${batch[@]}"; do
    fuzz_one "$t" &
    pids+=($!)
  done
  for k in "${!batch[@]}"; do
    rc=0
    wait "${pids[$k]}" || rc=$?
    report "${batch[$k]}" "$rc"
  done
done
exit "$status"
