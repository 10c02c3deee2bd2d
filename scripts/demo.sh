#!/usr/bin/env bash
# The main job: set-up (scripts/setup.sh), then compress the bundled MoE fixture with
# recipes/demo.json and print the before/after summary (experts, parameters, bytes, perplexity, KL).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
out=${DEMO_OUT:-build/demo-out}
exec build/moe-tool run recipes/demo.json --set "output.path=$PWD/$out" --set output.force=true "$@"
