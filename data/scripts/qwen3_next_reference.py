#!/usr/bin/python3
"""Independent NumPy reference of the qwen3_next (Qwen3NextForCausalLM, Qwen3-Next-80B-A3B) forward,
written from transformers' modeling_qwen3_next.py and configuration_qwen3_next.py:
  layer_types (absent: full_attention_interval, default 4: layer i is "full_attention" iff
    (i + 1) % interval == 0, else "linear_attention");
  Qwen3NextRMSNorm (input_layernorm, post_attention_layernorm, model.norm, q_norm, k_norm):
    x / sqrt(mean(x^2) + eps) * (1 + weight) (zero-centred weight);
  Qwen3NextAttention ("full_attention"): q_proj [heads * head_dim * 2, H] viewed [s, heads, 2 * head_dim]
    and chunked into query and gate per head; q_norm / k_norm per head; partial rotary
    (partial_rotary_factor, default 0.25: rotate_half on the first int(head_dim * factor) elements,
    inv_freq = theta^(-2i/rotary_dim)); GQA; scale head_dim^-0.5; causal; the attention output
    times sigmoid(gate), then o_proj;
  Qwen3NextGatedDeltaNet ("linear_attention"): in_proj_qkvz and in_proj_ba,
    fix_query_key_value_ordering (per key head: [q (dk), k (dk), v (r*dv), z (r*dv)] and
    [b (r), a (r)], r = num_v_heads / num_k_heads), the causal depthwise conv1d (padding
    kernel - 1, the first s outputs) + SiLU over [q | k | v], beta = sigmoid(b),
    g = -exp(A_log) * softplus(a + dt_bias), q and k repeat_interleave'd to the value heads,
    l2-normalised (eps 1e-6), q times dk^-0.5, torch_recurrent_gated_delta_rule (state from 0),
    Qwen3NextRMSNormGated per value head: rms(o) * weight * silu(z) (weight not zero-centred),
    out_proj;
  Qwen3NextSparseMoeBlock: softmax over the router logits, top-k, renormalised iff norm_topk_prob;
    experts silu(gate) * up -> down; shared_expert (width shared_expert_intermediate_size) times
    sigmoid(shared_expert_gate x); Qwen3NextMLP on mlp_only_layers / decoder_sparse_step layers.
NumPy only, float64 on the stored bf16 weights. The safetensors writer, bf16 storage, drawers and
the fixture / golden writers are imported from deepseek_reference.py.

Builds data/qwen3_next-tiny: 4 layers (linear, linear, linear, full by full_attention_interval 4,
as the released config gives it), hidden 64; full attention 4 heads of head_dim 16 over 2 key/value
heads, partial_rotary_factor 0.25 (rotary width 4); Gated DeltaNet 2 key heads of 8, 4 value heads of
8, conv kernel 4; 8 experts of width 16, top-2, norm_topk_prob, shared expert of width 32 with its
sigmoid gate; untied lm_head. Goldens:
  data/golden/qwen3_next.json              the fixture as stored
  data/golden/qwen3_next-layer-types.json  layer_types given explicitly (the same kinds) instead of
                                           full_attention_interval
  data/golden/qwen3_next-no-norm-topk.json norm_topk_prob false
Usage: /usr/bin/python3 data/scripts/qwen3_next_reference.py [--sensitivity]
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deepseek_reference import (EOT_ID, T, drawers, rotate_half, silu, store,  # noqa: E402
                                write_fixture, write_golden)
from granitemoe_reference import merge_patch  # noqa: E402

NAME = "qwen3_next-tiny"
SEED = 3131


def config():
    # The keys of Qwen3-Next-80B-A3B-Instruct's config.json, sizes made tiny.
    return {
        "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next",
        "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": EOT_ID, "eos_token_id": EOT_ID,
        "decoder_sparse_step": 1, "full_attention_interval": 4, "head_dim": 16,
        "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 48,
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 8, "linear_num_key_heads": 2,
        "linear_num_value_heads": 4, "linear_value_head_dim": 8,
        "max_position_embeddings": 4096, "mlp_only_layers": [], "moe_intermediate_size": 16,
        "norm_topk_prob": True, "num_attention_heads": 4, "num_experts": 8, "num_experts_per_tok": 2,
        "num_hidden_layers": 4, "num_key_value_heads": 2, "output_router_logits": False,
        "partial_rotary_factor": 0.25, "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 10000000,
        "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 32, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 4096,
    }


def layer_types(c):
    if c.get("layer_types") is not None:
        return c["layer_types"]
    n = c.get("full_attention_interval", 4)
    return ["linear_attention" if (i + 1) % n else "full_attention" for i in range(c["num_hidden_layers"])]


def is_moe(c, l):
    return l not in c.get("mlp_only_layers", []) and c["num_experts"] > 0 and (l + 1) % c.get("decoder_sparse_step", 1) == 0


def make_weights(c):
    rng = np.random.default_rng(SEED)
    H, V = c["hidden_size"], c["vocab_size"]
    nH, nKV, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    nk, nv, dk, dv = (c["linear_num_key_heads"], c["linear_num_value_heads"], c["linear_key_head_dim"],
                      c["linear_value_head_dim"])
    E, I, Is = c["num_experts"], c["moe_intermediate_size"], c["shared_expert_intermediate_size"]
    W = {}
    mat, norm = drawers(rng, W)

    def zc_norm(name, n):  # zero-centred weight: (1 + w) near 1
        W[name] = (0.1 * rng.standard_normal(n), "BF16")

    mat("model.embed_tokens.weight", (V, H), 0.5)
    for l, kind in enumerate(layer_types(c)):
        p = f"model.layers.{l}."
        zc_norm(p + "input_layernorm.weight", H)
        zc_norm(p + "post_attention_layernorm.weight", H)
        if kind == "linear_attention":
            a = p + "linear_attn."
            # Each key head's q rows and q conv taps are its k rows and taps plus noise: q·k stays
            # well away from 0, so Sᵀq is not the near-cancellation that the gated norm (scale-free)
            # would blow up into float32 rounding noise (random q and k made the f32 forward differ
            # from float64 by 6e-3 on the logits).
            qkvz = 0.3 * rng.standard_normal((nk, 2 * dk + 2 * (nv // nk) * dv, H))
            qkvz[:, :dk] = qkvz[:, dk:2 * dk] + 0.1 * rng.standard_normal((nk, dk, H))
            W[a + "in_proj_qkvz.weight"] = (qkvz.reshape(-1, H), "BF16")
            mat(a + "in_proj_ba.weight", (2 * nv, H), 0.1)
            conv = 0.5 * rng.standard_normal((2 * nk * dk + nv * dv, 1, c["linear_conv_kernel_dim"]))
            conv[:nk * dk] = conv[nk * dk:2 * nk * dk] + 0.1 * rng.standard_normal((nk * dk, 1, c["linear_conv_kernel_dim"]))
            W[a + "conv1d.weight"] = (conv, "BF16")
            W[a + "dt_bias"] = (1.0 + 0.3 * rng.standard_normal(nv), "BF16")
            W[a + "A_log"] = (np.log(rng.uniform(0.5, 4.0, nv)), "BF16")
            norm(a + "norm.weight", dv)
            mat(a + "out_proj.weight", (H, nv * dv), 0.3)
        else:
            s = p + "self_attn."
            mat(s + "q_proj.weight", (nH * hd * 2, H), 0.3)
            mat(s + "k_proj.weight", (nKV * hd, H), 0.3)
            mat(s + "v_proj.weight", (nKV * hd, H), 0.3)
            mat(s + "o_proj.weight", (H, nH * hd), 0.3)
            zc_norm(s + "q_norm.weight", hd)
            zc_norm(s + "k_norm.weight", hd)
        if is_moe(c, l):
            m = p + "mlp."
            mat(m + "gate.weight", (E, H), 0.3)
            for e in range(E):
                mat(m + f"experts.{e}.gate_proj.weight", (I, H), 0.3)
                mat(m + f"experts.{e}.up_proj.weight", (I, H), 0.3)
                mat(m + f"experts.{e}.down_proj.weight", (H, I), 0.3)
            mat(m + "shared_expert.gate_proj.weight", (Is, H), 0.3)
            mat(m + "shared_expert.up_proj.weight", (Is, H), 0.3)
            mat(m + "shared_expert.down_proj.weight", (H, Is), 0.3)
            mat(m + "shared_expert_gate.weight", (1, H), 0.3)
        else:
            Id = c["intermediate_size"]
            mat(p + "mlp.gate_proj.weight", (Id, H), 0.3)
            mat(p + "mlp.up_proj.weight", (Id, H), 0.3)
            mat(p + "mlp.down_proj.weight", (H, Id), 0.3)
    zc_norm("model.norm.weight", H)
    mat("lm_head.weight", (V, H), 0.3)
    return store(W)


# ----------------------------------------------------------------------------- the forward

def zc_rms_norm(x, w, eps):
    """Qwen3NextRMSNorm: x / sqrt(mean(x^2) + eps) * (1 + weight)."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1.0 + w)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softplus(x):
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))


def l2norm(x, eps=1e-6):
    return x / np.sqrt((x * x).sum(-1, keepdims=True) + eps)


def full_attention(c, W, p, x):
    s, _ = x.shape
    nH, nKV, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    eps = c.get("rms_norm_eps", 1e-6)
    qg = (x @ W[p + "self_attn.q_proj.weight"].T).reshape(s, nH, 2 * hd)
    q, gate = qg[..., :hd], qg[..., hd:]  # torch.chunk(..., 2, dim=-1)
    gate = gate.reshape(s, nH * hd)
    if c.get("_gate_halves"):  # sensitivity: query and gate as the two halves of the whole projection
        full = x @ W[p + "self_attn.q_proj.weight"].T
        q, gate = full[:, :nH * hd].reshape(s, nH, hd), full[:, nH * hd:]
    q = zc_rms_norm(q, W[p + "self_attn.q_norm.weight"], eps).transpose(1, 0, 2)  # [nH, s, hd]
    k = zc_rms_norm((x @ W[p + "self_attn.k_proj.weight"].T).reshape(s, nKV, hd), W[p + "self_attn.k_norm.weight"],
                    eps).transpose(1, 0, 2)
    v = (x @ W[p + "self_attn.v_proj.weight"].T).reshape(s, nKV, hd).transpose(1, 0, 2)
    rd = int(hd * c.get("partial_rotary_factor", 0.25))
    inv_freq = 1.0 / c.get("rope_theta", 10000.0) ** (np.arange(0, rd, 2, dtype=np.float64) / rd)
    freqs = np.arange(s, dtype=np.float64)[:, None] * inv_freq[None, :]
    emb = np.concatenate((freqs, freqs), axis=-1)
    cos, sin = np.cos(emb), np.sin(emb)

    def rope(t):
        r, rest = t[..., :rd], t[..., rd:]
        return np.concatenate((r * cos + rotate_half(r) * sin, rest), axis=-1)

    q, k = rope(q), rope(k)
    rep = nH // nKV
    k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
    scores = q @ k.transpose(0, 2, 1) * hd ** -0.5
    i, j = np.arange(s)[:, None], np.arange(s)[None, :]
    scores = np.where(j <= i, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs = probs / probs.sum(-1, keepdims=True)
    out = (probs @ v).transpose(1, 0, 2).reshape(s, nH * hd)
    if not c.get("_no_gate"):
        out = out * sigmoid(gate)
    return out @ W[p + "self_attn.o_proj.weight"].T


def recurrent_gated_delta_rule(q, k, v, g, beta):
    """torch_recurrent_gated_delta_rule on [s, heads, d] inputs (q already l2-normalised and scaled)."""
    s, nh, dk = k.shape
    dv = v.shape[-1]
    S = np.zeros((nh, dk, dv))
    out = np.zeros((s, nh, dv))
    for t in range(s):
        S = S * np.exp(g[t])[:, None, None]
        kv_mem = (S * k[t][:, :, None]).sum(-2)
        delta = (v[t] - kv_mem) * beta[t][:, None]
        S = S + k[t][:, :, None] * delta[:, None, :]
        out[t] = (S * q[t][:, :, None]).sum(-2)
    return out


def chunk_gated_delta_rule(q, k, v, g, beta, chunk=8):
    """torch_chunk_gated_delta_rule (the form transformers runs on a prompt) on the same inputs, for
    the sensitivity check that both forms agree."""
    s, nh, dk = k.shape
    dv = v.shape[-1]
    pad = (chunk - s % chunk) % chunk
    q, k, v = [np.concatenate([a, np.zeros((pad,) + a.shape[1:])]).transpose(1, 0, 2) for a in (q, k, v)]
    beta, g = [np.concatenate([a, np.zeros((pad, nh))]).T for a in (beta, g)]
    n = (s + pad) // chunk
    vb, kb = v * beta[..., None], k * beta[..., None]
    q, k, v, kb, vb = [a.reshape(nh, n, chunk, -1) for a in (q, k, v, kb, vb)]
    g = g.reshape(nh, n, chunk).cumsum(-1)
    upper = np.triu(np.ones((chunk, chunk), bool))
    decay = np.tril(np.exp(np.tril(g[..., :, None] - g[..., None, :])))
    attn = np.where(upper, 0.0, -(kb @ k.transpose(0, 1, 3, 2)) * decay)
    for i in range(1, chunk):
        row, sub = attn[..., i, :i].copy(), attn[..., :i, :i].copy()
        attn[..., i, :i] = row + (row[..., None] * sub).sum(-2)
    attn = attn + np.eye(chunk)
    value = attn @ vb
    kcum = attn @ (kb * np.exp(g)[..., None])
    S = np.zeros((nh, dk, dv))
    out = np.zeros_like(value)
    strict = np.triu(np.ones((chunk, chunk), bool), 1)
    for i in range(n):
        qi, ki, vi = q[:, i], k[:, i], value[:, i]
        a = np.where(strict, 0.0, qi @ ki.transpose(0, 2, 1) * decay[:, i])
        vnew = vi - kcum[:, i] @ S
        out[:, i] = (qi * np.exp(g[:, i])[..., None]) @ S + a @ vnew
        S = S * np.exp(g[:, i, -1])[:, None, None] + (ki * np.exp(g[:, i, -1:] - g[:, i])[..., None]).transpose(0, 2, 1) @ vnew
    return out.reshape(nh, -1, dv)[:, :s].transpose(1, 0, 2)


def gated_delta_net(c, W, p, x):
    s, _ = x.shape
    nk, nv, dk, dv = (c["linear_num_key_heads"], c["linear_num_value_heads"], c["linear_key_head_dim"],
                      c["linear_value_head_dim"])
    r, ck = nv // nk, c["linear_conv_kernel_dim"]
    a_ = p + "linear_attn."
    qkvz = (x @ W[a_ + "in_proj_qkvz.weight"].T).reshape(s, nk, 2 * dk + 2 * r * dv)
    ba = (x @ W[a_ + "in_proj_ba.weight"].T).reshape(s, nk, 2 * r)
    q, k, v, z = np.split(qkvz, [dk, 2 * dk, 2 * dk + r * dv], axis=2)
    b, a = ba[..., :r].reshape(s, nv), ba[..., r:].reshape(s, nv)
    v, z = v.reshape(s, nv, dv), z.reshape(s, nv, dv)
    mixed = np.concatenate([q.reshape(s, -1), k.reshape(s, -1), v.reshape(s, -1)], axis=1)  # [s, C]
    w = W[a_ + "conv1d.weight"][:, 0, :]  # [C, ck]
    xp = np.concatenate([np.zeros((ck - 1, mixed.shape[1])), mixed])
    conv = np.stack([(xp[t:t + ck] * w.T).sum(0) for t in range(s)])  # F.conv1d(padding=ck-1)[..., :s]
    mixed = silu(conv)
    K = nk * dk
    q = mixed[:, :K].reshape(s, nk, dk)
    k = mixed[:, K:2 * K].reshape(s, nk, dk)
    v = mixed[:, 2 * K:].reshape(s, nv, dv)
    beta = sigmoid(b)
    g = -np.exp(W[a_ + "A_log"]) * softplus(a + W[a_ + "dt_bias"])
    if c.get("_tile_heads"):  # sensitivity: repeat instead of repeat_interleave
        q, k = np.tile(q, (1, r, 1)), np.tile(k, (1, r, 1))
    else:
        q, k = np.repeat(q, r, axis=1), np.repeat(k, r, axis=1)
    q, k = l2norm(q) * dk ** -0.5, l2norm(k)
    o = (chunk_gated_delta_rule if c.get("_chunked") else recurrent_gated_delta_rule)(q, k, v, g, beta)
    eps = c.get("rms_norm_eps", 1e-6)
    o = o / np.sqrt(np.mean(o * o, axis=-1, keepdims=True) + eps) * W[a_ + "norm.weight"] * silu(z)
    return o.reshape(s, nv * dv) @ W[a_ + "out_proj.weight"].T


def mlp(W, p, x):
    return (silu(x @ W[p + "gate_proj.weight"].T) * (x @ W[p + "up_proj.weight"].T)) @ W[p + "down_proj.weight"].T


def moe(c, W, p, x):
    k = c["num_experts_per_tok"]
    logits = x @ W[p + "mlp.gate.weight"].T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = probs / probs.sum(-1, keepdims=True)
    ids, wts, margin = [], [], np.inf
    for t in range(x.shape[0]):
        top = np.argsort(-logits[t], kind="stable")
        margin = min(margin, logits[t, top[k - 1]] - logits[t, top[k]])
        sel = np.sort(top[:k])
        w = probs[t, sel]
        if c.get("norm_topk_prob", True):
            w = w / w.sum()
        ids.append(sel)
        wts.append(w)
    ids, wts = np.array(ids), np.array(wts)
    out = np.zeros_like(x)
    for e in range(c["num_experts"]):
        rows, slot = np.nonzero(ids == e)
        if rows.size:
            out[rows] += mlp(W, p + f"mlp.experts.{e}.", x[rows]) * wts[rows, slot][:, None]
    out += sigmoid(x @ W[p + "mlp.shared_expert_gate.weight"].T) * mlp(W, p + "mlp.shared_expert.", x)
    return out, ids, wts, margin


def forward(c, W, tokens):
    eps = c.get("rms_norm_eps", 1e-6)
    norm = (lambda x, w, e: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + e) * w) if c.get("_plain_norm") else zc_rms_norm
    x = W["model.embed_tokens.weight"][tokens]
    layers, margin = [], np.inf
    for l, kind in enumerate(layer_types(c)):
        p = f"model.layers.{l}."
        h = norm(x, W[p + "input_layernorm.weight"], eps)
        x = x + (gated_delta_net(c, W, p, h) if kind == "linear_attention" else full_attention(c, W, p, h))
        h = norm(x, W[p + "post_attention_layernorm.weight"], eps)
        if is_moe(c, l):
            y, ids, wts, m = moe(c, W, p, h)
            margin = min(margin, m)
            layers.append({"layer": l, "topk_ids": ids.tolist(), "topk_weights": wts.tolist()})
        else:
            y = mlp(W, p + "mlp.", h)
        x = x + y
    logits = norm(x, W["model.norm.weight"], eps) @ W["lm_head.weight"].T
    return logits, layers, margin


VARIANTS = (
    ("qwen3_next-layer-types", {"full_attention_interval": None,
                                "layer_types": ["linear_attention", "linear_attention", "linear_attention",
                                                "full_attention"]}),
    ("qwen3_next-no-norm-topk", {"norm_topk_prob": False}),
)


def sensitivity(c, W, tokens):
    base = forward(c, W, tokens)[0]
    print(f"tolerance 1e-4 x max |logit| = {1e-4 * np.abs(base).max():.2g}")
    chunked = np.abs(forward(dict(c, _chunked=True), W, tokens)[0] - base).max()
    print(f"chunked gated delta rule (chunk 8) vs recurrent: {chunked:.3g}")
    assert chunked < 1e-9, "the chunked and recurrent forms disagree"
    for what, flag in (("plain RMSNorm (weight, not 1 + weight)", "_plain_norm"),
                       ("no output gate on full attention", "_no_gate"),
                       ("query/gate as halves of the whole q_proj", "_gate_halves"),
                       ("key heads tiled instead of repeat_interleave'd", "_tile_heads")):
        print(f"{what}: {np.abs(forward(dict(c, **{flag: True}), W, tokens)[0] - base).max():.3g}")


def main():
    from granitemoe_reference import write_all
    c = config()
    stored, W = make_weights(c)
    tokens = write_all(NAME, "qwen3_next", c, stored, W, SEED + 1, VARIANTS, forward,
                       "data/scripts/qwen3_next_reference.py")
    if "--sensitivity" in sys.argv:
        sensitivity(c, W, tokens)


if __name__ == "__main__":
    main()
