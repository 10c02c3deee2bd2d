#!/usr/bin/env bash
# Set-up (scripts/setup.sh: the Release -O2 build of moe-tool and the tests in build/, with clang
# and Ninja when build/ is new), then the Release tests the sanitizer stage does not run (below,
# release_select); then one clang build with AddressSanitizer + UndefinedBehaviorSanitizer
# (build-san/: tests at -O0, the library at -O1) that runs the test labels of the parsers, the
# CLI, the passes and the pipeline (the quality tests skip themselves there; the runtime
# label's kernels run under it through the CLI's eval, calibrate and passes), and runs the libFuzzer targets (the same build: the library carries
# libFuzzer's coverage hooks) for FUZZ_SECONDS each (default 5, a smoke run over the committed seeds and past them; tests/fuzz/run.sh runs longer; 0 skips fuzzing). The benchmarks
# are not built here (about 2.5 min of the 2 cores); `cmake --build build` builds them. The Release tests run while the sanitizer build compiles (both stages use the two
# cores, and each has idle stretches the other fills). Prints each phase's time at the end.
#
# Environment: MOE_SAN_LINES (default OFF: the sanitizer build without line tables, a tenth less
# compile time; a failure's stack names the functions; ON for line numbers), STAGES (default
# "release sanitizers": which stages run; fuzzing belongs to the
# sanitizers stage), SAN_EXCLUDE (ctest -E regex of test suites the sanitizer stage leaves out;
# default none), FUZZ_SECONDS. CTest runs one test per GoogleTest suite (tests/discover_suites.cmake).
set -euo pipefail
cd "$(dirname "$0")/.."

phases=()
phase_start=$SECONDS
phase() {  # phase NAME: closes the running phase under NAME
  phases+=("$(printf '%-44s %5d s' "$1" $((SECONDS - phase_start)))")
  phase_start=$SECONDS
}
finish() {
  echo "== phase times"
  printf '  %s\n' "${phases[@]}"
}

test_targets=$(cd tests && for d in */; do d=${d%/}; case $d in fuzz|corpus|support) ;; *) ls "$d"/*.cpp >/dev/null 2>&1 && printf 'test_%s ' "$d";; esac; done)
# The labels the sanitizer stage runs (one per tests/ folder).
san_labels='core|io|model|cli|tokenizer|passes|quant|calib|pipeline'
san_test_targets=""
for t in $test_targets; do
  [[ ${t#test_} =~ ^($san_labels)$ ]] && san_test_targets+="$t "
done
stages=" ${STAGES:-release sanitizers} "
# With both stages, every test runs once: a suite of a sanitizer label under ASan+UBSan, and in the
# Release stage only when it must: the labels the sanitizer stage leaves out (runtime, mpi,
# layers), and the suites of the files that skip or shorten tests under the sanitizers
# (MOE_SKIP_UNDER_SANITIZERS, under_sanitizers(): the quality and end-to-end tests). A Release
# target none of whose suites run there is not built. STAGES=release runs every test in Release.
release_targets=$test_targets
release_select=()
if [[ $stages == *" release "* && $stages == *" sanitizers "* ]]; then
  release_targets=""
  suites=()
  for t in $test_targets; do
    d=${t#test_}
    if [[ " $san_test_targets " != *" $t "* ]]; then
      release_targets+="$t "
      suites+=("^$d\\..*")
      continue
    fi
    marked=$(grep -l -E 'MOE_SKIP_UNDER_SANITIZERS|under_sanitizers\(\)' tests/"$d"/*.cpp || true)
    [ -n "$marked" ] || continue
    release_targets+="$t "
    for s in $(sed -n -E 's/^[[:space:]]*TEST(_F|_P)?\([[:space:]]*([A-Za-z0-9_]+).*/\2/p' $marked | sort -u); do
      suites+=("^$d\\.$s\$" "^$d\\.[A-Za-z0-9_]+/$s\$")  # parameterized: PREFIX/Suite
    done
  done
  # CTest's regular expressions take few groups: one anchored alternative per suite, no group.
  release_select=(-R "^layers\\..*|$(IFS='|'; echo "${suites[*]}")")
fi
release_pid=""
release_log=build/ctest-release.log
# clang for both stages: it compiles this code in about two thirds of gcc's time (the Release build
# about 250 s instead of 350 on two cores), and the sanitizer and fuzz builds need it. build/ keeps
# the compiler it was configured with (the README's first command configures it with the default
# one); only a new build/ is configured with clang.
if ! command -v clang++ >/dev/null 2>&1; then
  echo "installing: clang" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq clang >/dev/null
fi
# One BLAS thread per test: CTest runs two tests at a time on the two cores (and the Release tests
# run beside the sanitizer build); OpenBLAS threads that wait by spinning for a core another process
# holds made some tests several times slower. The tests of the thread pool set their own counts.
export OPENBLAS_NUM_THREADS=1

if [[ $stages == *" release "* ]]; then
  echo "== build (Release -O2: moe-tool and the tests) [${SECONDS}s]"
  release_cc=()
  [ -f build/CMakeCache.txt ] || release_cc=(CC=clang CXX=clang++)
  env "${release_cc[@]}" BUILD_TARGETS="moe-tool $release_targets" scripts/setup.sh
  phase "build, Release"

  echo "== tests (Release -O2) [${SECONDS}s]"
  release_start=$SECONDS
  if [[ $stages == *" sanitizers "* ]]; then
    # In the background, beside the sanitizer build; its output is printed when it ends.
    ( ctest --test-dir build --output-on-failure -j2 --timeout 1200 "${release_select[@]}" >"$release_log" 2>&1; echo $? >"$release_log.rc" ) &
    release_pid=$!
  else
    ctest --test-dir build --output-on-failure -j2 --timeout 1200 "${release_select[@]}"
    phase "tests, Release"
    finish
    echo "== all passed [${SECONDS}s]"
    exit 0
  fi
fi

wait_release() {  # prints the Release tests' output; exits if they failed
  [ -n "$release_pid" ] || return 0
  wait "$release_pid" || true
  release_pid=""
  echo "== tests (Release -O2), run beside the sanitizer build: $(cat "$release_log.rc" 2>/dev/null || echo '?') [${SECONDS}s]"
  grep -v -E '^ +Start +[0-9]+:|Test +#[0-9]+: .* Passed' "$release_log" || true
  phases+=("$(printf '%-44s %5d s' "tests, Release (beside the sanitizer build)" $((SECONDS - release_start)))")
  if [ "$(cat "$release_log.rc" 2>/dev/null)" != "0" ]; then
    finish
    echo "Release tests failed" >&2
    exit 1
  fi
}
trap '[ -n "$release_pid" ] && kill "$release_pid" 2>/dev/null || true' EXIT

echo "== sanitizer build (clang, ASan+UBSan; tests -O0, library -O1; with the fuzz targets) [${SECONDS}s]"
san_build_start=$SECONDS
fuzz_targets=$(sed -n 's/^targets=(\(.*\))$/\1/p' tests/fuzz/run.sh)
# The sanitizer configuration builds without MPI (CMakeLists.txt), so it has no test_mpi. The
# runtime label (the forward's kernels, one family at a time) is left to the Release stage: its
# code runs under the sanitizers through every CLI test that evaluates, calibrates or runs a pass,
# and building and running it here cost about a tenth of the stage.
if ! CC=clang CXX=clang++ BUILD_DIR=build-san \
  EXTRA_CMAKE="-DMOE_SANITIZE=ON -DMOE_FUZZ=ON -DMOE_BUILD_BENCH=OFF -DMOE_SAN_LINES=${MOE_SAN_LINES:-OFF} -DCMAKE_BUILD_TYPE=RelWithDebInfo" \
  BUILD_TARGETS="moe-tool $san_test_targets $fuzz_targets" scripts/setup.sh; then
  wait_release
  exit 1
fi
phases+=("$(printf '%-44s %5d s' "build, sanitizers (+ fuzz targets)" $((SECONDS - san_build_start)))")
wait_release
phase_start=$SECONDS

# The tests that assert numeric quality on the trained fixtures, and the run of every shipped recipe
# end to end, skip themselves under the sanitizers (MOE_SKIP_UNDER_SANITIZERS, tests/support/run.h):
# they run in the Release stage. SAN_EXCLUDE (a ctest -E regex of suites) leaves out more.
echo "== parsing and decoding test labels under ASan+UBSan [${SECONDS}s]"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir build-san --output-on-failure -j2 --timeout 1800 \
  -L "^($san_labels)\$" ${SAN_EXCLUDE:+-E "$SAN_EXCLUDE"}
phase "tests, sanitizers"

if [ "${FUZZ_SECONDS:-5}" != "0" ]; then
  echo "== fuzzing (${FUZZ_SECONDS:-5}s per target) [${SECONDS}s]"
  MOE_FUZZ_BUILD="$PWD/build-san" tests/fuzz/run.sh "${FUZZ_SECONDS:-5}"
  phase "fuzzing"
fi

finish
echo "== all passed [${SECONDS}s]"
