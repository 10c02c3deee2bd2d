#!/usr/bin/env bash
# Mixed precision with the budget per layer against one budget over the whole model (quantize
# --avg-bits B --budget-scope layer|model; docs/commands/quantize.md) at the same average bits,
# on the three fixtures (mixtral-tiny and qwen2moe-tiny on data/text, validation-tiny, the fixture
# no default was chosen on, on data/text-validation). GPTQ, widths ternary,int2,int3,int4,int8,
# calibration 64 windows of 128 tokens, `eval --against` the input on the held-out windows of 128
# (every one: EVAL_WINDOWS, default 1000, caps them).
# Prints one JSON object per run: fixture, budget, scope, the experts' stored bits per parameter,
# mean KL, top-1 agreement, perplexity before/after, the run's seconds (and the planning sweep's),
# and the model plan's objective, status and gap. Outputs go to /tmp/budget-scope/ (removed first).
#
#   scripts/budget_scope_table.sh            # BUDGETS="2.5 3" by default
set -euo pipefail
T=${MOE_TOOL:-build/moe-tool}
BUDGETS=${BUDGETS:-"2.5 3"}
SCOPES=${SCOPES:-"layer model"}
OUT=${OUT:-/tmp/budget-scope}
rm -rf "$OUT"; mkdir -p "$OUT"
fixtures=("data/models/mixtral-tiny data/text" "data/models/qwen2moe-tiny data/text" "data/models/validation-tiny data/text-validation")
for f in "${fixtures[@]}"; do
  read -r M TXT <<<"$f"
  for b in $BUDGETS; do
    for scope in $SCOPES; do
      o="$OUT/$(basename "$M")-$b-$scope"
      t0=$(date +%s.%N)
      if ! $T -q quantize "$M" "$o" --method gptq --avg-bits "$b" --budget-scope "$scope" --text "$TXT/calib.txt" \
          --ctx 128 --windows 64 >/dev/null 2>"$o.err"; then
        python3 -c 'import json,sys; print(json.dumps({"fixture": sys.argv[1], "budget": float(sys.argv[2]), "scope": sys.argv[3], "error": open(sys.argv[4]).readline().strip()}))' \
          "$(basename "$M")" "$b" "$scope" "$o.err"
        continue
      fi
      t1=$(date +%s.%N)
      $T -q eval "$o" --against "$M" --text "$TXT/heldout.txt" --ctx 128 --max-windows "${EVAL_WINDOWS:-1000}" --json >"$o.json"
      python3 - "$o" "$(basename "$M")" "$b" "$scope" "$t0" "$t1" <<'PY'
import json, sys
o, fixture, b, scope, t0, t1 = sys.argv[1:]
j = json.load(open(o + ".json"))
rep = json.load(open(o + "/moe_tool_report.json"))
row = {"fixture": fixture, "budget": float(b), "scope": scope,
       "expert_bits_per_param": rep["expert_bits_per_param"]["after"],
       "kl_mean": j["kl_mean"], "top1_agreement": j["top1_agreement"],
       "ppl_input": j.get("reference", {}).get("perplexity", j.get("ppl_reference")), "ppl": j.get("perplexity"),
       "seconds": round(float(t1) - float(t0), 2)}
if scope == "model":
    p = rep["plans"][0]
    row.update({"plan_seconds": round(p["seconds"], 2), "objective": p["objective"], "status": p["status"], "gap": p["gap"]})
else:
    row["objective"] = sum(l["passes"][0]["mixed_precision"]["objective"] for l in rep["layers"] if "passes" in l)
print(json.dumps(row))
PY
    done
  done
done
