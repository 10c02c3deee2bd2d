#!/usr/bin/env bash
# The main job: set-up (scripts/setup.sh), then compress the bundled MoE fixture with
# recipes/demo.json and print the before/after summary (experts, parameters, bytes, perplexity, KL).
# Builds only the moe-tool binary (scripts/test.sh builds the tests and benchmarks).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_TARGETS=${BUILD_TARGETS:-moe-tool} scripts/setup.sh
out=${DEMO_OUT:-build/demo-out}
exec build/moe-tool run recipes/demo.json --set "output.path=$PWD/$out" --set output.force=true "$@"
