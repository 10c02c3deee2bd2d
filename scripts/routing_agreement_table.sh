#!/usr/bin/env bash
# Routing agreement by method on one fixture: calibrates once, runs each one-pass command, and
# prints a markdown row per method with `eval --against` (the input) over 8 windows of 128 tokens
# of the held-out text: mean KL, top-1 agreement, routing agreement and mean overlap
# (docs/commands/eval.md). Outputs go to /tmp/ra-<fixture>/ (removed first).
#
#   scripts/routing_agreement_table.sh data/models/mixtral-tiny data/text/calib.txt data/text/heldout.txt
set -euo pipefail
M=$1; CAL=$2; HO=$3
OUT=/tmp/ra-$(basename "$M")
T=${MOE_TOOL:-build/moe-tool}
rm -rf "$OUT"; mkdir -p "$OUT"
$T -q calibrate "$M" --text "$CAL" -o "$OUT/stats.json" >/dev/null
echo "| method | KL (nats/token) | top-1 agreement | routing agreement | mean overlap |"
echo "|---|---|---|---|---|"
run() {
  local name=$1; shift
  if ! $T -q "$@" >/dev/null 2>"$OUT/$name.err"; then echo "| $name | failed: $(head -1 "$OUT/$name.err") | | | |"; return; fi
  $T -q eval "$OUT/$name" --against "$M" --text "$HO" --ctx 128 --max-windows 8 --json >"$OUT/$name.json"
  python3 -c "import json; j=json.load(open('$OUT/$name.json')); r=j['routing_agreement']; \
print('| $name | %.4f | %.3f | %.4f | %.4f |' % (j['kl_mean'], j['top1_agreement'], r.get('agreement', float('nan')), r.get('overlap', float('nan'))))"
}
S=(--stats "$OUT/stats.json" --text "$CAL")
run rtn-int4 quantize "$M" "$OUT/rtn-int4" --method rtn --codec int4 --group 128
run gptq-int4 quantize "$M" "$OUT/gptq-int4" --method gptq --codec int4 --group 128 "${S[@]}"
run gptq-int3 quantize "$M" "$OUT/gptq-int3" --method gptq --codec int3 --group 128 "${S[@]}"
run gptq-int2 quantize "$M" "$OUT/gptq-int2" --method gptq --codec int2 --group 128 "${S[@]}"
run ternary quantize "$M" "$OUT/ternary" --method rtn --codec ternary
run reap-6 prune "$M" "$OUT/reap-6" --method reap --keep 6 "${S[@]}"
run freq-6 prune "$M" "$OUT/freq-6" --method frequency --keep 6 "${S[@]}"
run hcsmoe-6 merge "$M" "$OUT/hcsmoe-6" --method hcsmoe --experts 6 "${S[@]}"
