#!/usr/bin/env bash
# GPTQ within the ggml block grids against round-to-nearest in the same grids (docs/gguf.md, "GPTQ
# within the ggml block grids"): one line per GGUF file with its size, and the perplexity, KL to
# the source and top-1 agreement of `moe-tool eval` over all windows of data/text/heldout.txt
# (ctx 128). Every 2-D tensor not named below is our q8_0. Calibration: 64 windows of 128 tokens of
# data/text/calib.txt. Rows: mixtral-tiny's expert down projections (its only 256-wide rows) in
# q4_k, q3_k, q2_k; qwen2moe-tiny's shared-expert down projection in q4_k, q2_k; the routed experts
# of mixtral-tiny and validation-tiny in q4_0, q4_1, q5_0. Each row three ways: GPTQ with
# --act-order (the default for the K-quants), GPTQ with --act-order=false (the default for the
# blocks of 32), and RTN.
# Outputs go to /tmp/ggml-gptq/ (removed first).
#
#   scripts/ggml_gptq_table.sh
set -euo pipefail
cd "$(dirname "$0")/.."
T=${MOE_TOOL:-build/moe-tool}
OUT=/tmp/ggml-gptq
rm -rf "$OUT"; mkdir -p "$OUT"
row() {  # row MODEL NAME QUANTIZE-ARGS...
  local m=$1 name=$2; shift 2
  for meth in gptq-act-order gptq-no-act-order rtn; do
    local o=$OUT/$(basename "$m")-$name-$meth.gguf
    local flags=(--method "${meth%%-*}")
    [ "$meth" = gptq-act-order ] && flags+=(--act-order)
    [ "$meth" = gptq-no-act-order ] && flags+=(--act-order=false)
    $T -q quantize "$m" "$o" "${flags[@]}" "$@" --text data/text/calib.txt --ctx 128 --windows 64 \
      --format gguf --gguf-type q8_0 >/dev/null
    $T -q eval "$o" --text data/text/heldout.txt --ctx 128 --against "$m" --json |
      python3 -c "import json,os,sys; d=json.load(sys.stdin); print('%s %s %s: %d B, perplexity %.3f, KL %.6f, top-1 %.2f%%' % (sys.argv[1], sys.argv[2], sys.argv[3], os.path.getsize(sys.argv[4]), d['perplexity'], d['kl_mean'], 100 * d['top1_agreement']))" \
        "$(basename "$m")" "$name" "$meth" "$o"
  done
}
for t in q4_k q3_k q2_k; do
  row data/models/mixtral-tiny "down-$t" --experts keep --tensor-type "experts\.[0-9]+\.w2=$t"
done
for t in q4_k q2_k; do
  row data/models/qwen2moe-tiny "shared-down-$t" --experts keep --shared keep --tensor-type "shared_expert\.down_proj=$t"
done
for m in data/models/mixtral-tiny data/models/validation-tiny; do
  for t in q4_0 q4_1 q5_0; do
    row "$m" "experts-$t" --codec $t --experts codec
  done
done
