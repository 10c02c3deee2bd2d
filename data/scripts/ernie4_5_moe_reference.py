#!/usr/bin/python3
"""Independent NumPy reference of the ernie4_5_moe (Ernie4_5_MoeForCausalLM) forward, written from
transformers' modeling_ernie4_5_moe.py and configuration_ernie4_5_moe.py:
  Ernie4_5_MoeDecoderLayer: h = h + self_attn(input_layernorm(h)); h = h + mlp(post_attention_layernorm(h));
    mlp is Ernie4_5_MoeSparseMoeBlock iff (l + 1) % moe_layer_interval == 0 and
    moe_layer_start_index <= l <= moe_layer_end_index (-1: num_hidden_layers - 1), else the dense
    Ernie4_5_MoeMLP of width intermediate_size;
  Ernie4_5_MoeAttention: q/k/v/o projections (biases iff use_bias), head_dim = the head_dim key or
    hidden_size // num_attention_heads, GQA via repeat_kv, softmax scale head_dim**-0.5, causal;
    RoPE: inv_freq = theta^(-2i/d), emb = cat(freqs, freqs), then apply_rotary_pos_emb keeps
    cos[..., :d/2].repeat_interleave(2) and an interleaved rotate_half (x1 = x[0::2], x2 = x[1::2],
    stack(-x2, x1).flatten): pairs (2i, 2i+1) rotated by frequency i;
  Ernie4_5_MoeSparseMoeBlock: router_logits = x W_gate^T (f32), p = softmax(router_logits), the
    choice = top-k (moe_k) of p + e_score_correction_bias (Ernie4_5_MoeStatics, [1, E], squeezed),
    the weights = p of the chosen / clamp(sum, min=moe_norm_min); experts SwiGLU
    (gate_proj/up_proj/down_proj); shared experts (one MLP of width moe_intermediate_size x
    moe_num_shared_experts) added unweighted;
  Ernie4_5_MoeForCausalLM: logits = lm_head(norm(h)), lm_head tied to the embedding when
    tie_word_embeddings (default true).
  Defaults of configuration_ernie4_5_moe.py for absent keys: rope_theta 500000 (default_theta),
  rms_norm_eps 1e-5, moe_norm_min 1e-12, moe_layer_start_index 1, moe_layer_end_index -1,
  moe_layer_interval 1, moe_num_shared_experts 2, use_bias false, tie_word_embeddings true.
NumPy only (torch is not needed). The safetensors writer, bf16 storage, weight drawers, RMSNorm /
SiLU / MLP and the fixture / golden writers are imported from deepseek_reference.py and
granitemoe_reference.py.

Builds data/ernie4_5_moe-tiny: 3 decoder layers (layer 0 dense by moe_layer_start_index 1), hidden
64, 4 heads of head_dim 16 over 2 key/value heads, use_bias false, 8 experts of width 32, top-2,
1 shared expert, the correction bias [1, 8] (F32, large enough to change choices), the router
F32 (transformers keeps `gate` and `moe_statics` in float32), tied embeddings, rope_theta 10000.
Goldens in float64 on the stored (bf16-rounded) weights:
  data/golden/ernie4_5_moe.json                 the fixture as stored
  data/golden/ernie4_5_moe-norm-min.json        moe_norm_min 0.9 (the clamp acts: weights sum < 1)
  data/golden/ernie4_5_moe-default-theta.json   rope_theta removed (500000, the default)
each: the token sequence, the logits of one window [T, V/16] (ids 0, 16, 32, ...; 8 significant
digits), each position's argmax, and per MoE layer the chosen experts per token (sorted) and their
routing weights in that order.

Usage: /usr/bin/python3 data/scripts/ernie4_5_moe_reference.py [--sensitivity]
  --sensitivity also prints how far the logits move when a feature is computed another way.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deepseek_reference import EOT_ID, drawers, experts_weights, mlp, mlp_weights, rms_norm, store  # noqa: E402
from granitemoe_reference import merge_patch, write_all  # noqa: E402

NAME = "ernie4_5_moe-tiny"
SEED = 4546


def config():
    return {
        "architectures": ["Ernie4_5_MoeForCausalLM"], "model_type": "ernie4_5_moe",
        "bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": EOT_ID,
        "hidden_act": "silu", "hidden_size": 64, "intermediate_size": 96,
        "max_position_embeddings": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 3, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "use_bias": False,
        "moe_num_experts": 8, "moe_num_shared_experts": 1, "moe_intermediate_size": 32, "moe_k": 2,
        "moe_layer_start_index": 1, "moe_layer_end_index": -1, "moe_layer_interval": 1,
        "moe_norm_min": 1e-12, "router_aux_loss_coef": 0.001, "output_router_logits": False,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 4096,
    }


def moe_layer(c, l):
    end = c.get("moe_layer_end_index", -1)
    end = c["num_hidden_layers"] - 1 if end == -1 else end
    return (l + 1) % c.get("moe_layer_interval", 1) == 0 and c.get("moe_layer_start_index", 1) <= l <= end


def head_dim(c):
    return c.get("head_dim", c["hidden_size"] // c["num_attention_heads"])


def make_weights(c):
    rng = np.random.default_rng(SEED)
    H, V = c["hidden_size"], c["vocab_size"]
    nH, nKV, hd = c["num_attention_heads"], c["num_key_value_heads"], head_dim(c)
    E, I = c["moe_num_experts"], c["moe_intermediate_size"]
    W = {}  # name -> (float32 array, dtype)
    mat, norm = drawers(rng, W)
    mat("model.embed_tokens.weight", (V, H), 0.5)
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        norm(p + "input_layernorm.weight", H)
        norm(p + "post_attention_layernorm.weight", H)
        for name, rows in (("q_proj", nH * hd), ("k_proj", nKV * hd), ("v_proj", nKV * hd)):
            mat(p + f"self_attn.{name}.weight", (rows, H), 0.3)
        mat(p + "self_attn.o_proj.weight", (H, nH * hd), 0.2)
        if not moe_layer(c, l):
            mlp_weights(mat, p + "mlp.", H, c["intermediate_size"])
            continue
        W[p + "mlp.gate.weight"] = (0.3 * rng.standard_normal((E, H)), "F32")
        W[p + "mlp.moe_statics.e_score_correction_bias"] = (0.08 * rng.standard_normal((1, E)), "F32")
        experts_weights(mat, p, H, E, I, I * c["moe_num_shared_experts"])
    norm("model.norm.weight", H)
    return store(W)


# ----------------------------------------------------------------------------- the forward

def rotate_half_interleaved(x):
    """modeling_ernie4_5_moe.rotate_half: x1 = x[..., 0::2], x2 = x[..., 1::2],
    stack((-x2, x1), dim=-1).flatten(-2)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return np.stack((-x2, x1), axis=-1).reshape(x.shape)


def rotate_half_halves(x):
    """The llama rotate_half (for --sensitivity only)."""
    h = x.shape[-1] // 2
    return np.concatenate((-x[..., h:], x[..., :h]), axis=-1)


def attention(c, W, p, x):
    s, H = x.shape
    nH, nKV, hd = c["num_attention_heads"], c["num_key_value_heads"], head_dim(c)

    def proj(name, heads):
        return (x @ W[p + f"self_attn.{name}.weight"].T).reshape(s, heads, hd).transpose(1, 0, 2)

    q, k, v = proj("q_proj", nH), proj("k_proj", nKV), proj("v_proj", nKV)
    theta = c.get("rope_theta", 500000.0)
    inv_freq = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    freqs = np.arange(s, dtype=np.float64)[:, None] * inv_freq[None, :]
    emb = np.concatenate((freqs, freqs), axis=-1)  # Ernie4_5_MoeRotaryEmbedding
    cos, sin = np.cos(emb), np.sin(emb)
    if c.get("_rotate_half_halves"):  # sensitivity: llama's pairing
        q, k = q * cos + rotate_half_halves(q) * sin, k * cos + rotate_half_halves(k) * sin
    else:  # apply_rotary_pos_emb: the first half of cos/sin, each entry repeated twice
        cos = np.repeat(cos[..., : hd // 2], 2, axis=-1)
        sin = np.repeat(sin[..., : hd // 2], 2, axis=-1)
        q, k = q * cos + rotate_half_interleaved(q) * sin, k * cos + rotate_half_interleaved(k) * sin
    rep = nH // nKV
    k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)  # repeat_kv
    scores = q @ k.transpose(0, 2, 1) * hd ** -0.5
    i, j = np.arange(s)[:, None], np.arange(s)[None, :]
    scores = np.where(j <= i, scores, -np.inf)
    scores = scores - scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    probs = probs / probs.sum(-1, keepdims=True)
    out = (probs @ v).transpose(1, 0, 2).reshape(s, nH * hd)
    return out @ W[p + "self_attn.o_proj.weight"].T


def moe(c, W, p, x):
    E, k = c["moe_num_experts"], c["moe_k"]
    logits = x @ W[p + "mlp.gate.weight"].T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = probs / probs.sum(-1, keepdims=True)
    bias = W[p + "mlp.moe_statics.e_score_correction_bias"].reshape(-1)  # .squeeze()
    choice = probs if c.get("_no_bias") else probs + bias[None, :]
    ids, wts, margin = [], [], np.inf
    for t in range(x.shape[0]):
        top = np.argsort(-choice[t], kind="stable")
        margin = min(margin, choice[t, top[k - 1]] - choice[t, top[k]])
        sel = np.sort(top[:k])
        w = probs[t, sel]
        if c.get("_weights_with_bias"):  # sensitivity: the biased scores as weights
            w = choice[t, sel]
        w = w / max(w.sum(), c.get("moe_norm_min", 1e-12))
        ids.append(sel)
        wts.append(w)
    ids, wts = np.array(ids), np.array(wts)
    out = np.zeros_like(x)
    for e in range(E):
        rows, slot = np.nonzero(ids == e)
        if rows.size:
            out[rows] += mlp(W, p + f"mlp.experts.{e}.", x[rows]) * wts[rows, slot][:, None]
    if c.get("moe_num_shared_experts", 2) > 0:
        out = out + mlp(W, p + "mlp.shared_experts.", x)
    return out, ids, wts, margin


def forward(c, W, tokens):
    eps = c.get("rms_norm_eps", 1e-5)
    x = W["model.embed_tokens.weight"][tokens]
    layers, margin = [], np.inf
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        x = x + attention(c, W, p, rms_norm(x, W[p + "input_layernorm.weight"], eps))
        h = rms_norm(x, W[p + "post_attention_layernorm.weight"], eps)
        if not moe_layer(c, l):
            x = x + mlp(W, p + "mlp.", h)
            continue
        y, ids, wts, m = moe(c, W, p, h)
        x = x + y
        margin = min(margin, m)
        layers.append({"layer": l, "topk_ids": ids.tolist(), "topk_weights": wts.tolist()})
    head = W["model.embed_tokens.weight"] if c.get("tie_word_embeddings", True) else W["lm_head.weight"]
    return rms_norm(x, W["model.norm.weight"], eps) @ head.T, layers, margin


VARIANTS = (("ernie4_5_moe-norm-min", {"moe_norm_min": 0.9}),
            ("ernie4_5_moe-default-theta", {"rope_theta": None}))


def sensitivity(c, W, tokens):
    base, layers, _ = forward(c, W, tokens)
    print(f"tolerance 1e-4 x max |logit| = {1e-4 * np.abs(base).max():.2g}")
    for what, flag in (("rotate-half pairs (i, i + d/2) instead of (2i, 2i+1)", "_rotate_half_halves"),
                       ("no correction bias in the choice", "_no_bias"),
                       ("biased scores as weights", "_weights_with_bias")):
        logits, ls, _ = forward(dict(c, **{flag: True}), W, tokens)
        changed = sum(int(np.any(np.array(a["topk_ids"]) != np.array(b["topk_ids"]))) for a, b in zip(layers, ls))
        print(f"{what}: {np.abs(logits - base).max():.3g} (layers with other choices: {changed})")
    for name, patch in VARIANTS:
        print(f"{name}: {np.abs(forward(merge_patch(c, patch), W, tokens)[0] - base).max():.3g}")


def main():
    c = config()
    stored, W = make_weights(c)
    tokens = write_all(NAME, "ernie4_5_moe", c, stored, W, SEED + 1, VARIANTS, forward,
                       "data/scripts/ernie4_5_moe_reference.py")
    if "--sensitivity" in sys.argv:
        sensitivity(c, W, tokens)


if __name__ == "__main__":
    main()
