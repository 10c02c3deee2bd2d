#!/usr/bin/env bash
# Fails when a folder of lib/ includes a header of a folder above it in the layer order, or when a
# folder of lib/ is not in the order (a new folder must be given its place here and in
# docs/architecture.md). A folder may include its own headers and those of every folder below it.
#
# The layer order, bottom first:
#   core       errors, dtypes, tensors, encodings, progress, "did you mean"
#   quant      codecs, packing, GPTQ, mixed precision, GGUF block types (the formats below store them)
#   family     config.json access and the family table (names, layouts, routing per family): data
#   io         Env, safetensors, GGUF files, checkpoints, output folders
#   tokenizer  tokenizer.json
#   model      logical model view, outputs, accounting
#   runtime    the forward: attention, MoE blocks, routing
#   calib      calibration statistics, stats files, input Grams
#   eval       perplexity, KL against a reference
#   passes     the Pass interface, passes.def and the passes
#   pipeline   recipes, runner, sinks, reports
# (apps/ and tests/ sit above all of lib/.)
#
# Usage: scripts/check_layers.sh [REPO]   (default: the repository holding this script)
set -euo pipefail
repo=${1:-$(cd "$(dirname "$0")/.." && pwd)}
order=(core quant family io tokenizer model runtime calib eval passes pipeline)
declare -A rank
for i in "${!order[@]}"; do rank[${order[$i]}]=$i; done

bad=0
for dir in "$repo"/lib/*/; do
  name=$(basename "$dir")
  if [[ -z ${rank[$name]+x} ]]; then
    echo "lib/$name: not in the layer order of scripts/check_layers.sh"
    bad=1
  fi
done
for dir in "$repo"/lib/*/; do
  name=$(basename "$dir")
  [[ -n ${rank[$name]+x} ]] || continue
  while IFS=: read -r file line target; do
    [[ -n ${rank[$target]+x} ]] || continue  # not a lib/ folder (a system or third-party header)
    if (( rank[$target] > rank[$name] )); then
      echo "${file#"$repo"/}:$line: lib/$name includes $target/ (above $name in the layer order)"
      bad=1
    fi
  done < <(grep -rnoE '^[[:space:]]*#[[:space:]]*include[[:space:]]+"[a-z_0-9]+/' "$dir" |
             sed -E 's/^([^:]+):([0-9]+):.*"([a-z_0-9]+)\/$/\1:\2:\3/')
done
if (( bad )); then
  echo "check_layers: includes point up the layers (order: ${order[*]})"
  exit 1
fi
echo "check_layers: ok (order: ${order[*]})"
