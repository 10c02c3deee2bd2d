#!/usr/bin/python3
"""Train the small fixture models and save them in exact HF layout (bf16 safetensors +
config.json + generation_config.json + tokenizer files).  On data/text/brown_train.txt with
data/tokenizer:
  data/models/mixtral-tiny/   mixtral   4 layers, H 128, 4 heads / 2 KV, 8 experts top-2, I 256
  data/models/qwen2moe-tiny/  qwen2_moe 4 layers, H 128, 4/2 heads, 8 experts top-2, I_moe 128,
                              shared expert 256, qkv biases, norm_topk_prob false
  data/models/llama-tiny/     llama     4 layers, H 128, 4/2 heads, I 512
On data/text-validation/nlp_train.txt with data/tokenizer-validation (the validation fixture:
no default is ever chosen on it):
  data/models/validation-tiny/ qwen3_moe 4 layers, H 160, 4/2 heads of head_dim 48 (q/k RMSNorm
                              per head), 8 experts top-2, I_moe 192, no shared expert,
                              norm_topk_prob true, 250 steps
  data/models/validation-256/ qwen3_moe as validation-tiny with H 256, head_dim 64, I_moe 256
                              (rows that are whole 256-blocks: the K-quant and TQ measurements),
                              250 steps, seed 5; a second validation fixture, never tuned on
and write data/models/training/<name>.json (held-out perplexity vs unigram baseline, timings,
expert usage, loss curve).

Usage: /usr/bin/python3 data/scripts/train_fixtures.py [--only NAME] [--steps N]
torch runs single-threaded (reproducible, and robust on a shared machine); the three models were
trained as three parallel background processes:
  for m in mixtral-tiny qwen2moe-tiny llama-tiny; do
    OMP_NUM_THREADS=1 nohup /usr/bin/python3 data/scripts/train_fixtures.py --only $m \
      > /tmp/train-$m.log 2>&1 &
  done

Training: the forward is reference.forward (same code as the goldens) in fp32; AdamW
(betas 0.9/0.95, weight decay 0.1 on matrices), lr 3e-3, 30 warm-up steps then cosine to 10%,
grad-norm clip 1.0, batch 16 random windows of 128 tokens (seeded), Switch-style load-balancing
loss (reference.load_balancing_loss) with coefficient 0.01 for MoE models.  Init N(0, 0.02),
o_proj / down projections N(0, 0.02/sqrt(2L)), norms 1, biases 0.  Seeds fixed; torch uses
1 thread.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fixture_common as C  # noqa: E402
import reference as R  # noqa: E402
from bpe_tok import Encoder  # noqa: E402

CTX = 128
BATCH = 16
LR = 3e-3
WARMUP = 30
AUX_COEF = 0.01


def validation_config(*, hidden, head_dim, moe_intermediate):
    """The validation fixtures' Qwen3-MoE: 4 layers, 4/2 heads, 8 experts top-2, norm_topk_prob."""
    return C.make_config("qwen3_moe", hidden=hidden, layers=4, heads=4, kv_heads=2, head_dim=head_dim,
                         intermediate=512, eps=1e-6, theta=1e6, experts=8, topk=2,
                         moe_intermediate=moe_intermediate, norm_topk_prob=True,
                         decoder_sparse_step=1, mlp_only_layers=[], aux_coef=AUX_COEF)


MODELS = {
    "mixtral-tiny": dict(
        cfg=C.make_config("mixtral", hidden=128, layers=4, heads=4, kv_heads=2, intermediate=256,
                          experts=8, topk=2, aux_coef=AUX_COEF),
        steps=300, seed=1),
    "qwen2moe-tiny": dict(
        cfg=C.make_config("qwen2_moe", hidden=128, layers=4, heads=4, kv_heads=2,
                          intermediate=256, eps=1e-6, theta=1e6, experts=8, topk=2,
                          moe_intermediate=128, shared_intermediate=256, norm_topk_prob=False,
                          decoder_sparse_step=1, mlp_only_layers=[], aux_coef=AUX_COEF),
        steps=300, seed=2),
    "llama-tiny": dict(
        cfg=C.make_config("llama", hidden=128, layers=4, heads=4, kv_heads=2, intermediate=512),
        steps=600, seed=3),
    "validation-tiny": dict(cfg=validation_config(hidden=160, head_dim=48, moe_intermediate=192),
                            steps=250, seed=4, corpus="validation"),
    "validation-256": dict(cfg=validation_config(hidden=256, head_dim=64, moe_intermediate=256),
                           steps=250, seed=5, corpus="validation"),
}

# corpus name -> (training text, held-out text, tokenizer dir)
CORPORA = {
    "brown": (os.path.join(C.DATA, "text", "brown_train.txt"),
              os.path.join(C.DATA, "text", "heldout.txt"), C.TOK_DIR),
    "validation": (os.path.join(C.VAL_TEXT_DIR, "nlp_train.txt"),
                   os.path.join(C.VAL_TEXT_DIR, "heldout.txt"), C.VAL_TOK_DIR),
}


def init_weights(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    L = cfg["num_hidden_layers"]
    W = {}
    for name, (shape, kind) in C.param_shapes(cfg).items():
        if kind == "norm":
            t = torch.ones(shape)
        elif kind == "bias":
            t = torch.zeros(shape)
        elif kind in ("o", "down"):
            t = torch.randn(shape, generator=g) * (0.02 / math.sqrt(2 * L))
        else:
            t = torch.randn(shape, generator=g) * 0.02
        W[name] = torch.nn.Parameter(t)
    return W


def lr_at(step, steps):
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    p = (step - WARMUP) / max(1, steps - WARMUP)
    return LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def expert_usage(cfg, W, tokens, ctx=CTX, max_windows=64):
    """Per MoE layer: fraction of top-k assignments per expert over held-out windows."""
    nw = min(len(tokens) // ctx, max_windows)
    E = R.n_experts(cfg)
    counts = {}
    with torch.no_grad():
        for s in range(0, nw, 16):
            rows = [tokens[i * ctx:(i + 1) * ctx] for i in range(s, min(nw, s + 16))]
            _, info = R.forward(cfg, W, torch.tensor(rows))
            for l, r in info["router"].items():
                c = torch.bincount(r["topk_ids"].flatten(), minlength=E).double()
                counts[l] = counts.get(l, 0) + c
    return {str(l): [round(float(x), 4) for x in (c / c.sum())] for l, c in sorted(counts.items())}


def unigram_ppl(train_tokens, held_tokens, V, ctx=CTX):
    cnt = np.bincount(np.asarray(train_tokens), minlength=V).astype(np.float64)
    logp = np.log((cnt + 1.0) / (cnt.sum() + V))
    nw = len(held_tokens) // ctx
    arr = np.asarray(held_tokens[:nw * ctx]).reshape(nw, ctx)[:, 1:]  # same positions as model
    nll = -logp[arr].sum()
    return float(math.exp(nll / arr.size)), int(arr.size)


def train_one(name, spec, train_tokens, held_tokens, steps, tok_dir):
    cfg = spec["cfg"]
    torch.manual_seed(spec["seed"])
    W = init_weights(cfg, spec["seed"])
    decay = [p for n, p in W.items() if p.dim() == 2]
    no_decay = [p for n, p in W.items() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95), eps=1e-8)
    g = torch.Generator().manual_seed(100 + spec["seed"])
    data = torch.tensor(train_tokens, dtype=torch.long)
    n = len(data) - CTX - 1
    is_moe = cfg["model_type"] in R.MOE_FAMILIES
    t0 = time.time()
    log = []
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, steps)
        starts = torch.randint(0, n, (BATCH,), generator=g)
        batch = torch.stack([data[s:s + CTX + 1] for s in starts])
        x, y = batch[:, :-1], batch[:, 1:]
        logits, info = R.forward(cfg, W, x)
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                               y.reshape(-1))
        loss = ce
        aux = torch.tensor(0.0)
        if is_moe:
            aux = R.load_balancing_loss(cfg, info["router"])
            loss = ce + AUX_COEF * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(W.values()), 1.0)
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            el = time.time() - t0
            print(f"[{name}] step {step:4d} ce {ce.item():.4f} aux {aux.item():.4f} "
                  f"lr {lr_at(step, steps):.2e} {el:.0f}s", flush=True)
            log.append({"step": step, "ce": round(ce.item(), 4), "aux": round(aux.item(), 4)})
    train_time = time.time() - t0
    Wf = {k: v.detach().clone() for k, v in W.items()}
    outdir = os.path.join(C.DATA, "models", name)
    C.save_checkpoint(outdir, cfg, Wf, tok_dir=tok_dir)
    # evaluate the saved (bf16) checkpoint with the reference forward
    cfg2, Wb = R.load_checkpoint(outdir)
    nll, cnt = R.nll_windows(cfg2, Wb, held_tokens, CTX)
    ppl = math.exp(nll / cnt)
    nll32, cnt32 = R.nll_windows(cfg, Wf, held_tokens, CTX, n_windows=32)
    nll16, cnt16 = R.nll_windows(cfg2, Wb, held_tokens, CTX, n_windows=32)
    rep = {
        "model_type": cfg["model_type"],
        "params": int(sum(v.numel() for v in Wf.values())),
        "steps": steps, "batch": BATCH, "ctx": CTX,
        "train_tokens_seen": steps * BATCH * CTX,
        "train_time_s": round(train_time, 1),
        "heldout_ppl_ctx128_bf16": round(ppl, 3),
        "first32_windows_ppl_fp32_weights": round(math.exp(nll32 / cnt32), 3),
        "first32_windows_ppl_bf16_weights": round(math.exp(nll16 / cnt16), 3),
        "heldout_scored_tokens": cnt,
        "loss_log": log,
    }
    if is_moe:
        rep["expert_usage_heldout"] = expert_usage(cfg2, Wb, held_tokens)
    print(f"[{name}] done in {train_time:.0f}s: held-out ppl (bf16) {ppl:.2f}", flush=True)
    return rep


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only")
    ap.add_argument("--steps", type=int)
    a = ap.parse_args()
    torch.set_num_threads(1)
    os.makedirs(os.path.join(C.DATA, "models", "training"), exist_ok=True)
    for name, spec in MODELS.items():
        if a.only and name != a.only:
            continue
        train_path, held_path, tok_dir = CORPORA[spec.get("corpus", "brown")]
        enc = Encoder.from_tokenizer_json(os.path.join(tok_dir, "tokenizer.json"))
        t0 = time.time()
        with open(train_path, encoding="utf-8") as f:
            train_tokens = enc.encode(f.read())
        with open(held_path, encoding="utf-8") as f:
            held_tokens = enc.encode(f.read())
        print(f"train tokens {len(train_tokens)}, held-out tokens {len(held_tokens)} "
              f"({time.time()-t0:.1f}s)", flush=True)
        uni, ucnt = unigram_ppl(train_tokens, held_tokens, 4096)
        print(f"unigram baseline ppl (add-one) {uni:.2f} over {ucnt} tokens", flush=True)
        base = {}
        base["unigram_baseline"] = {
            "ppl": round(uni, 3), "scored_tokens": ucnt,
            "definition": ("unigram model of the training-token frequencies with add-one "
                           "smoothing over the 4096-token vocabulary, scored on the same "
                           "held-out positions as the models (ctx 128 windows, T-1 positions "
                           "each)")}
        base["train_tokens"] = len(train_tokens)
        base["heldout_tokens"] = len(held_tokens)
        if spec.get("corpus"):
            base["corpus"] = {"train": os.path.relpath(train_path, C.DATA),
                              "heldout": os.path.relpath(held_path, C.DATA),
                              "tokenizer": os.path.relpath(tok_dir, C.DATA)}
        steps = a.steps or spec["steps"]
        rep = dict(base, model=name,
                   **train_one(name, spec, train_tokens, held_tokens, steps, tok_dir))
        with open(os.path.join(C.DATA, "models", "training", name + ".json"), "w") as f:
            json.dump(rep, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
