#!/usr/bin/env bash
# Expert-aware smoothing and router alignment (quantize --smooth, --align-router; docs/smoothing.md)
# against plain GPTQ at int4 and int3 on one fixture: a markdown row per variant with `eval
# --against` (the input) over 16 windows of 128 tokens of the held-out text: mean KL, top-1
# agreement, routing agreement and mean overlap (docs/commands/eval.md). Calibration: 64 windows
# of 128 tokens of the fixture's calibration text; int codecs in groups of 128. Outputs go to
# /tmp/smooth-<fixture>/ (removed first). ALPHAS (default "0.5") lists the smoothing strengths.
#
#   scripts/smoothing_table.sh data/models/mixtral-tiny data/text/calib.txt data/text/heldout.txt
#   scripts/smoothing_table.sh data/models/validation-tiny data/text-validation/calib.txt data/text-validation/heldout.txt
set -euo pipefail
M=$1; CAL=$2; HO=$3
OUT=/tmp/smooth-$(basename "$M")
T=${MOE_TOOL:-build/moe-tool}
ALPHAS=${ALPHAS:-0.5}
rm -rf "$OUT"; mkdir -p "$OUT"
echo "| codec | variant | KL (nats/token) | top-1 agreement | routing agreement | mean overlap | routers re-fitted |"
echo "|---|---|---|---|---|---|---|"
run() {
  local codec=$1 name=$2; shift 2
  local o="$OUT/$codec-$name"
  if ! $T -q quantize "$M" "$o" --method gptq --codec "$codec" --group 128 --text "$CAL" --ctx 128 --windows 64 "$@" \
      >/dev/null 2>"$o.err"; then
    echo "| $codec | $name | failed: $(head -1 "$o.err") | | | | |"; return
  fi
  $T -q eval "$o" --against "$M" --text "$HO" --ctx 128 --max-windows 16 --json >"$o.json"
  python3 - "$o" "$codec" "$name" <<'PY'
import json, sys
o, codec, name = sys.argv[1:]
j = json.load(open(o + ".json")); r = j["routing_agreement"]
rep = json.load(open(o + "/moe_tool_report.json"))
al = [l["passes"][0].get("align_router") for l in rep["layers"] if "passes" in l]
al = [a for a in al if a]
refit = "%d of %d" % (sum(a["accepted"] for a in al), len(al)) if al else "-"
print("| %s | %s | %.2e | %.4f | %.4f | %.4f | %s |" % (codec, name, j["kl_mean"], j["top1_agreement"],
      r.get("agreement", float("nan")), r.get("overlap", float("nan")), refit))
PY
}
for codec in int4 int3; do
  run $codec gptq
  for a in $ALPHAS; do run $codec "smooth-$a" --smooth --smooth-alpha "$a"; done
  run $codec align --align-router
  for a in $ALPHAS; do run $codec "smooth-$a+align" --smooth --smooth-alpha "$a" --align-router; done
done
