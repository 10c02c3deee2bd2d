#!/usr/bin/env bash
# Cross-layer expert sharing (moe-tool share; docs/xlayer.md) against REAP pruning and HC-SMoE
# merging to the same stored expert parameters, at 25% and 50% fewer expert parameters, on one
# fixture: a markdown row per variant with the stored expert parameters (elements of the routed
# experts' tensors in the files, a pooled one once), the perplexity of the held-out text and
# `eval --against` (the input) KL and top-1 agreement over 16 windows of 128 tokens.
# Calibration: 64 windows of 128 tokens of the fixture's calibration text. share R pools
# round(R x experts) experts; prune/merge keep E x (1 - R) experts per layer: the same stored
# expert parameters. Outputs go to
# /tmp/xlayer-<fixture>/ (removed first).
#
#   scripts/xlayer_table.sh data/models/mixtral-tiny data/text/calib.txt data/text/heldout.txt
#   scripts/xlayer_table.sh data/models/validation-tiny data/text-validation/calib.txt data/text-validation/heldout.txt
set -euo pipefail
M=$1; CAL=$2; HO=$3
OUT=/tmp/xlayer-$(basename "$M")
T=${MOE_TOOL:-build/moe-tool}
rm -rf "$OUT"; mkdir -p "$OUT"
$T -q calibrate "$M" --text "$CAL" --ctx 128 --windows 64 -o "$OUT/stats.safetensors" >/dev/null
E=$(python3 -c "import json,sys; c=json.load(open(sys.argv[1])); print(c.get('num_local_experts') or c['num_experts'])" "$M/config.json")
echo "| fewer expert params | method | stored expert params | perplexity | KL (nats/token) | top-1 agreement |"
echo "|---|---|---|---|---|---|"
row() {
  local share=$1 name=$2 o=$3
  $T -q eval "$o" --text "$HO" --ctx 128 --max-windows 16 --json >"$o.ppl.json"
  $T -q eval "$o" --against "$M" --text "$HO" --ctx 128 --max-windows 16 --json >"$o.kl.json"
  python3 - "$o" "$share" "$name" <<'PY'
import json, sys
o, share, name = sys.argv[1:]
p = json.load(open(o + ".ppl.json")); k = json.load(open(o + ".kl.json"))
import glob, struct
stored = 0  # elements of the stored tensors of routed experts (a pooled part once), from the files
for f in glob.glob(o + "/*.safetensors"):
    with open(f, "rb") as fh:
        h = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
    for n, i in h.items():
        if n != "__metadata__" and ".experts." in n:
            c = 1
            for d in i["shape"]: c *= d
            stored += c
print("| %s | %s | %s | %.3f | %.4f | %.4f |" % (share, name, stored, p["perplexity"], k["kl_mean"], k["top1_agreement"]))
PY
}
$T -q share "$M" "$OUT/share-0" --stats "$OUT/stats.safetensors" --share 0 >/dev/null
row 0 "input (share 0)" "$OUT/share-0"
for R in 0.25 0.5; do
  K=$(python3 -c "print(round($E * (1 - $R)))")
  $T -q share "$M" "$OUT/share-$R" --stats "$OUT/stats.safetensors" --share "$R" >/dev/null
  row "$R" "share (cross-layer pool)" "$OUT/share-$R"
  $T -q prune "$M" "$OUT/reap-$R" --method reap --keep "$K" --stats "$OUT/stats.safetensors" >/dev/null
  row "$R" "prune reap (keep $K)" "$OUT/reap-$R"
  $T -q merge "$M" "$OUT/hcsmoe-$R" --method hcsmoe --experts "$K" --stats "$OUT/stats.safetensors" >/dev/null
  row "$R" "merge hcsmoe ($K experts)" "$OUT/hcsmoe-$R"
done
