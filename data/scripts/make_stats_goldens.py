#!/usr/bin/python3
"""Golden routing statistics (docs/methods.md) for `moe-tool calibrate`, computed with the
PyTorch reference forward (reference.py).  Offline use only.

Usage:  /usr/bin/python3 data/scripts/make_stats_goldens.py [name ...]
        (names: keys of MODELS below; default: every model whose folder exists)
Writes data/golden/stats-<name>.json.

What is computed, per run (a run = ctx, windows, sample mode, seed, out_cos_tokens, out_stride):
  * tokens: data/text/calib.txt tokenized once with the model's tokenizer.json (bpe_tok.py, no
    BOS/EOS); non-overlapping windows of ctx tokens; `first` takes windows 0..n-1, `random`
    takes n windows from a seeded partial Fisher-Yates shuffle driven by splitmix64 (the rule
    documented in lib/calib/calibrate.h), sorted ascending.
  * the forward is reference.py's (fp32, bf16 weights upcast); its attention also returns the
    input of o_proj for the Gram matrix.
  * per MoE layer, from the post-attention-norm input x [N, H] of all windows (window-major):
      count       tokens whose top-k includes e
      prob_sum    sum of softmax(all logits)
      weight_sum  sum of the routing weight applied to e (reference.route)
      reap        mean over routed tokens of weight * ||expert_e(x)||_2
      out_absmax  max |expert_e(x)| over routed tokens
      out_mean    (sum over tokens routed to e of expert_e(x)
                   + S * sum over sampled tokens not routed to e of expert_e(x)) / N, where token
                   n (row n of x) is sampled when n % S == 0, S = the run's out_stride; S = 1 is
                   the mean over all tokens of every expert
      logit_sim   (cos + 1) / 2 of router-logit columns, diagonal 1
      out_cos     mean over the first out_cos_tokens sampled tokens of cos(expert_i(x),
                   expert_j(x)), diag 1
      coact       tokens whose top-k contains both i and j (diagonal: count)
    sums in float64 (the per-token values are fp32 as in the forward).
  * Gram matrices (float64, summarised: trace, sum of entries, Frobenius norm, first row):
    per expert gram_in (routed inputs) / gram_mid (input of its down projection); dense MLP
    layers mlp.gram_in / gram_mid; every layer attn.gram_qkv (input of q/k/v) / gram_o (input of
    o_proj).
  * super experts: out_absmax > 99.5th percentile (numpy linear interpolation) of all (layer,
    expert) values and > max / 10, layers < 0.75 * num_layers only.
"""
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bpe_tok  # noqa: E402
import reference as R  # noqa: E402

DATA = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = os.path.join(DATA, "text", "calib.txt")

MODELS = {
    "qwen3moe": "models/synthetic/qwen3moe",
    "olmoe": "models/synthetic/olmoe",
    "qwen2moe-sparse": "models/synthetic/qwen2moe-sparse",
    "mixtral-tiny": "models/mixtral-tiny",
    "qwen2moe-tiny": "models/qwen2moe-tiny",
}

# out_stride 3 with out_cos_tokens 40 (of the 54 sampled tokens) makes the second run cap out_cos
# inside the second batch of windows that golden_test.cpp uses.
RUNS = [
    {"ctx": 64, "windows": 4, "sample": "first", "seed": 0, "gram": True, "out_cos_tokens": 512,
     "out_stride": 1},
    {"ctx": 32, "windows": 5, "sample": "random", "seed": 7, "gram": False, "out_cos_tokens": 40,
     "out_stride": 3},
]

MASK64 = (1 << 64) - 1


def splitmix64(state):
    state = (state + 0x9E3779B97F4A7C15) & MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return state, z ^ (z >> 31)


def choose_windows(available, n, sample, seed):
    ids = list(range(available))
    if sample == "random":
        s = seed
        for i in range(n):
            s, r = splitmix64(s)
            j = i + r % (available - i)
            ids[i], ids[j] = ids[j], ids[i]
    return sorted(ids[:n])


def gram_summary(A):
    """A: [n, d] fp32 rows -> summary of G = A^T A in float64."""
    G = A.double().t() @ A.double()
    return {"trace": float(torch.trace(G)), "sum": float(G.sum()), "fro": float(torch.linalg.norm(G)),
            "row0": [float(v) for v in G[0, :8]]}


def moe_stats(cfg, W, p, x, out_cos_tokens, out_stride, gram):
    """x [N, H] fp32 -> dict of statistics of the MoE block at prefix p.  Row n of x is token n of
    the run's stream (windows concatenated in the chosen order); it is sampled when
    n % out_stride == 0."""
    N, H = x.shape
    rname, ename, _ = R.moe_names(cfg, p)
    logits = R.linear(x, W[rname])
    probs, idx, w = R.route(cfg, logits)
    E = R.n_experts(cfg)
    k = idx.shape[1]
    count = np.zeros(E)
    weight_sum = np.zeros(E)
    coact = np.zeros((E, E))
    idx_np = idx.numpy()
    w_np = w.double().numpy()
    for n in range(N):
        for s in range(k):
            e = idx_np[n, s]
            count[e] += 1
            weight_sum[e] += w_np[n, s]
            coact[e, e] += 1
            for s2 in range(s):
                e2 = idx_np[n, s2]
                coact[e, e2] += 1
                coact[e2, e] += 1
    prob_sum = probs.double().sum(0).numpy()
    Y = []  # every expert on every token, fp32 [N, H]
    Hmid = []
    for e in range(E):
        g, u, dn = ename(e)
        h = F.silu(R.linear(x, W[g])) * R.linear(x, W[u])
        Hmid.append(h)
        Y.append(R.linear(h, W[dn]))
    sampled = torch.arange(N) % out_stride == 0
    reap = np.zeros(E)
    absmax = np.zeros(E)
    out_mean = np.zeros((E, H))
    gram_in, gram_mid = [], []
    for e in range(E):
        tok, slot = torch.where(idx == e)
        ye = Y[e][tok]
        if tok.numel():
            norms = torch.linalg.norm(ye.double(), dim=1)
            reap[e] = float((w[tok, slot].double() * norms).sum()) / tok.numel()
            absmax[e] = float(ye.abs().max())
        # Routed tokens exact; the rest estimated from the sample with weight out_stride.
        routed = torch.zeros(N, dtype=torch.bool)
        routed[tok] = True
        wgt = torch.zeros(N, dtype=torch.float64)
        wgt[sampled & ~routed] = float(out_stride)
        wgt[routed] = 1.0
        out_mean[e] = ((wgt[:, None] * Y[e].double()).sum(0) / N).numpy()
        if gram:
            gram_in.append(gram_summary(x[tok]))
            gram_mid.append(gram_summary(Hmid[e][tok]))
    L = logits.double()
    G = L.t() @ L
    d = torch.sqrt(torch.diag(G))
    cosm = G / torch.outer(d, d)
    logit_sim = ((cosm + 1) / 2).numpy()
    np.fill_diagonal(logit_sim, 1.0)
    rows = torch.nonzero(sampled).flatten()[:out_cos_tokens]  # the first out_cos_tokens samples
    S = rows.numel()
    Ys = torch.stack([Y[e][rows] for e in range(E)], dim=1).double()  # [S, E, H]
    nrm = torch.linalg.norm(Ys, dim=2, keepdim=True)
    Yn = Ys / nrm.clamp_min(1e-300)
    out_cos = torch.einsum("seh,sfh->ef", Yn, Yn).numpy() / S
    np.fill_diagonal(out_cos, 1.0)
    st = {"tokens": N, "count": count.tolist(), "prob_sum": prob_sum.tolist(),
          "weight_sum": weight_sum.tolist(), "reap": reap.tolist(), "out_absmax": absmax.tolist(),
          "out_mean": out_mean.tolist(), "logit_sim": logit_sim.tolist(),
          "out_cos": out_cos.tolist(), "coact": coact.tolist()}
    if gram:
        st["gram_in"] = gram_in
        st["gram_mid"] = gram_mid
    return st


def run_stats(cfg, W, tokens, run):
    ctx = run["ctx"]
    available = len(tokens) // ctx
    ids = choose_windows(available, run["windows"], run["sample"], run["seed"])
    rows = [tokens[i * ctx:(i + 1) * ctx] for i in ids]
    ids_t = torch.tensor(rows, dtype=torch.long)
    B, T = ids_t.shape
    eps = cfg["rms_norm_eps"]
    h = W["model.embed_tokens.weight"][ids_t]
    cos, sin = R.rope_cos_sin(T, R.head_dim(cfg), float(cfg.get("rope_theta", 10000.0)))
    layers = {}
    grams = {}
    with torch.no_grad():
        for l in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{l}."
            xa = R.rms_norm(h, W[p + "input_layernorm.weight"], eps)
            a, o_in = R.attention(cfg, W, p + "self_attn.", xa, cos, sin, with_o_input=True)
            h = h + a
            x = R.rms_norm(h, W[p + "post_attention_layernorm.weight"], eps)
            H = x.shape[-1]
            g = {}
            if run["gram"]:
                g["attn.gram_qkv"] = gram_summary(xa.reshape(-1, H))
                g["attn.gram_o"] = gram_summary(o_in.reshape(B * T, -1))
            if R.is_moe_layer(cfg, l):
                layers[str(l)] = moe_stats(cfg, W, p, x.reshape(-1, H), run["out_cos_tokens"],
                                           run["out_stride"], run["gram"])
                m, _ = R.moe_block(cfg, W, p, x)
            else:
                xf = x.reshape(-1, H)
                hm = F.silu(R.linear(xf, W[p + "mlp.gate_proj.weight"])) * \
                    R.linear(xf, W[p + "mlp.up_proj.weight"])
                m = R.linear(hm, W[p + "mlp.down_proj.weight"]).view(B, T, H)
                if run["gram"]:
                    g["mlp.gram_in"] = gram_summary(xf)
                    g["mlp.gram_mid"] = gram_summary(hm)
            if g:
                grams[str(l)] = g
            h = h + m
    # Super experts.
    nl = cfg["num_hidden_layers"]
    allv = [v for st in layers.values() for v in st["out_absmax"]]
    p995 = float(np.percentile(np.array(allv), 99.5))
    gmax = max(allv)
    supers = []
    for l, st in layers.items():
        for e, v in enumerate(st["out_absmax"]):
            if int(l) < 0.75 * nl and v > p995 and v > gmax / 10:
                supers.append([int(l), e])
    out = dict(run)
    out.update({"windows_available": available, "window_ids": ids, "tokens": B * T,
                "window_heads": [r[:8] for r in rows], "layers": layers, "super_experts": supers})
    if run["gram"]:
        out["grams"] = grams
    return out


def main():
    names = sys.argv[1:] or [n for n, d in MODELS.items()
                             if os.path.exists(os.path.join(DATA, d, "model.safetensors"))
                             or os.path.exists(os.path.join(DATA, d, "model.safetensors.index.json"))]
    with open(TEXT, encoding="utf-8") as f:
        text = f.read()
    for name in names:
        d = os.path.join(DATA, MODELS[name])
        cfg, W = R.load_checkpoint(d)
        enc = bpe_tok.Encoder.from_tokenizer_json(os.path.join(d, "tokenizer.json"))
        tokens = enc.encode(text)
        runs = [run_stats(cfg, W, tokens, r) for r in RUNS]
        out = {"model": name, "dir": "data/" + MODELS[name], "model_type": cfg["model_type"],
               "text": "data/text/calib.txt", "text_tokens": len(tokens),
               "compute": "make_stats_goldens.py: reference.py forward, fp32 (bf16 weights upcast), "
                          "statistics summed in float64",
               "runs": runs}
        path = os.path.join(DATA, "golden", f"stats-{name}.json")
        with open(path, "w") as f:
            json.dump(out, f, separators=(",", ":"))
            f.write("\n")
        print(f"wrote {path}: {len(tokens)} tokens, "
              + ", ".join(f"{r['sample']} {r['windows']}x{r['ctx']} super {r['super_experts']}"
                          for r in runs))


if __name__ == "__main__":
    main()
