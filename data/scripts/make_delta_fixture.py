#!/usr/bin/python3
"""The delta fixture (docs/delta.md): an MoE whose experts share a parent and differ from it by a
small trained delta, as after copy-upcycling and training (Sparse Upcycling, BTX/BAM-style).

  1. `moe-tool upcycle data/models/llama-tiny OUT.upcycled --to mixtral --experts 8 --top-k 2
     --method copy` (every expert a copy of llama-tiny's MLP, a random router, std 0.02);
  2. a short fine-tune on data/text/calib.txt with the reference forward (reference.py, fp32):
     only the routers and the experts train (attention, norms, embeddings and lm_head frozen),
     AdamW lr 3e-4 (10 warm-up steps, then constant), betas 0.9/0.95, no weight decay, grad-norm
     clip 1.0, batch 4 random windows of 128 tokens, Switch load-balancing loss 0.01, STEPS steps
     (default 120), seeds fixed, torch on one thread;
  3. saved in bf16 as OUT (config and tokenizer of the upcycled model), with OUT/delta_fixture.json:
     the loss curve, held-out perplexity (first 32 windows of data/text/heldout.txt, ctx 128) of
     the parent, the upcycled model and the result, and per layer the mean relative delta
     |W_e - W_parent| / |W_parent| (Frobenius) and |W_e - mean_e W_e| / |W_e| of the experts.

Usage: /usr/bin/python3 data/scripts/make_delta_fixture.py MOE_TOOL OUT [--steps N]
(about 4 minutes on one core). The result is about 15 MB, so it is not committed: the figures of
docs/delta.md come from running this (scripts/delta_table.sh does).
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fixture_common as C  # noqa: E402
import reference as R  # noqa: E402
from bpe_tok import Encoder  # noqa: E402

CTX = 128
BATCH = 4
LR = 3e-4
WARMUP = 10
AUX_COEF = 0.01
SEED = 7


def rel(a, b):
    return float((a - b).norm() / b.norm())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("moe_tool")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=120)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    parent_dir = os.path.join(C.DATA, "models", "llama-tiny")
    up = a.out.rstrip("/") + ".upcycled"
    subprocess.run([a.moe_tool, "upcycle", parent_dir, up, "--to", "mixtral", "--experts", "8", "--top-k", "2",
                    "--method", "copy", "--seed", str(SEED), "--force"], check=True, stdout=subprocess.DEVNULL)
    enc = Encoder.from_tokenizer_json(os.path.join(C.TOK_DIR, "tokenizer.json"))
    train = C.load_tokens(os.path.join(C.DATA, "text", "calib.txt"), enc)
    held = C.load_tokens(os.path.join(C.DATA, "text", "heldout.txt"), enc)
    pcfg, PW = R.load_checkpoint(parent_dir)
    cfg, W0 = R.load_checkpoint(up)
    W = {k: torch.nn.Parameter(v.clone()) for k, v in W0.items()}
    trainable = [p for n, p in W.items() if ".block_sparse_moe." in n]
    for n, p in W.items():
        p.requires_grad_(".block_sparse_moe." in n)
    opt = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    g = torch.Generator().manual_seed(SEED)
    data = torch.tensor(train, dtype=torch.long)
    n = len(data) - CTX - 1
    log, t0 = [], time.time()
    for step in range(a.steps):
        for grp in opt.param_groups:
            grp["lr"] = LR * min(1.0, (step + 1) / WARMUP)
        starts = torch.randint(0, n, (BATCH,), generator=g)
        batch = torch.stack([data[s:s + CTX + 1] for s in starts])
        logits, info = R.forward(cfg, W, batch[:, :-1])
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        aux = R.load_balancing_loss(cfg, info["router"])
        opt.zero_grad(set_to_none=True)
        (ce + AUX_COEF * aux).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if step % 20 == 0 or step == a.steps - 1:
            print(f"step {step:4d} ce {ce.item():.4f} aux {aux.item():.4f} {time.time() - t0:.0f}s", flush=True)
            log.append({"step": step, "ce": round(ce.item(), 4), "aux": round(aux.item(), 4)})
    Wf = {k: v.detach().clone() for k, v in W.items()}
    os.makedirs(a.out, exist_ok=True)
    for fn in os.listdir(up):
        if not fn.endswith(".safetensors") and fn != "model.safetensors.index.json" and not fn.startswith("moe_tool_"):
            shutil.copyfile(os.path.join(up, fn), os.path.join(a.out, fn))
    R.write_safetensors(os.path.join(a.out, "model.safetensors"), {k: v.to(torch.bfloat16) for k, v in Wf.items()})
    _, Wb = R.load_checkpoint(a.out)
    ppl = {}
    for name, (c, w) in {"parent": (pcfg, PW), "upcycled": (cfg, W0), "fine_tuned": (cfg, Wb)}.items():
        with torch.no_grad():
            nll, cnt = R.nll_windows(c, w, held, CTX, n_windows=32)
        ppl[name] = round(math.exp(nll / cnt), 3)
    deltas = {}
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        _, ename, _ = R.moe_names(cfg, p)
        parent = [PW[p + "mlp." + m + "_proj.weight"] for m in ("gate", "up", "down")]
        to_parent, to_mean = [], []
        for t in range(3):
            ws = [Wb[ename(e)[t]] for e in range(8)]
            mean = torch.stack(ws).mean(0)
            to_parent += [rel(w, parent[t]) for w in ws]
            to_mean += [rel(w, mean) * float(mean.norm() / w.norm()) for w in ws]
        deltas[str(l)] = {"to_parent": round(sum(to_parent) / len(to_parent), 4),
                          "to_mean": round(sum(to_mean) / len(to_mean), 4)}
    rep = {"parent": "data/models/llama-tiny", "upcycle": "copy, 8 experts, top-2, random router",
           "steps": a.steps, "batch": BATCH, "ctx": CTX, "lr": LR, "trainable": "routers and experts",
           "train_time_s": round(time.time() - t0, 1), "heldout_ppl_first32_ctx128": ppl,
           "mean_relative_expert_delta": deltas, "loss_log": log}
    with open(os.path.join(a.out, "delta_fixture.json"), "w") as f:
        json.dump(rep, f, indent=1)
        f.write("\n")
    shutil.rmtree(up)
    print(json.dumps({k: rep[k] for k in ("train_time_s", "heldout_ppl_first32_ctx128", "mean_relative_expert_delta")}))


if __name__ == "__main__":
    main()
