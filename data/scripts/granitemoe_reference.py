#!/usr/bin/python3
"""Independent NumPy reference of the granitemoe (GraniteMoeForCausalLM) forward, written from
transformers' modeling_granitemoe.py and configuration_granitemoe.py:
  GraniteMoeModel: inputs_embeds = embed_tokens(input_ids) * embedding_multiplier;
  GraniteMoeDecoderLayer: h = h + self_attn(input_layernorm(h)) * residual_multiplier, then
    h = h + block_sparse_moe(post_attention_layernorm(h)) * residual_multiplier;
  GraniteMoeAttention: q/k/v/o projections with biases iff attention_bias, head_dim =
    hidden_size // num_attention_heads (no head_dim key), GQA via repeat_kv, RoPE
    (GraniteMoeRotaryEmbedding, default rope: inv_freq = theta^(-2i/d), apply_rotary_pos_emb with
    rotate_half), softmax scale `scaling = attention_multiplier` (not head_dim**-0.5), causal;
  GraniteMoeMoE / GraniteMoeTopKGating: logits = x W_router^T (router.layer, no bias), top-k of
    the logits, softmax over the k; GraniteMoeParallelExperts input_linear [E, 2I, H] ->
    chunk(2, dim=-1): silu(first half) * second half; output_linear [E, H, I];
  GraniteMoeForCausalLM: logits = lm_head(norm(h)) / logits_scaling (lm_head tied to the raw
    embedding when tie_word_embeddings; the embedding multiplier is applied to the lookup only).
  Defaults of configuration_granitemoe.py for absent keys: every multiplier 1.0, rms_norm_eps 1e-6,
  rope_theta 10000, attention_bias false, tie_word_embeddings false.
NumPy only (torch is not needed). The safetensors writer, bf16 storage, weight drawers, RMSNorm /
SiLU / rotate_half and the fixture / golden writers are imported from deepseek_reference.py, the
attention weights' drawer from gpt_oss_reference.py.

Builds data/granitemoe-tiny: 2 decoder layers, hidden 64, 4 heads of head_dim 16 over 2
key/value heads, attention_bias (q/k/v/o biases), 8 experts of width 16 in the fused layout,
top-3, tied embeddings, and every multiplier != 1 (embedding_multiplier 6, attention_multiplier
0.09, residual_multiplier 0.35, logits_scaling 2.5) so each one moves the logits. Goldens in
float64 on the stored (bf16-rounded) weights:
  data/golden/granitemoe.json                  the fixture as stored
  data/golden/granitemoe-default-multipliers.json  the same weights with the four multiplier keys
                                               removed from config.json (each then 1.0, the
                                               configuration's default)
each: the token sequence, the logits of one window [T, V/16] (ids 0, 16, 32, ...; 8 significant
digits), each position's argmax, and per MoE layer the chosen experts per token (sorted) and their
routing weights in that order.

Usage: /usr/bin/python3 data/scripts/granitemoe_reference.py [--sensitivity]
  --sensitivity also prints how far the logits move when one multiplier (or another feature) is
  computed another way.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deepseek_reference import (EOT_ID, T, drawers, rms_norm, rotate_half, silu, store,  # noqa: E402
                                write_fixture, write_golden)
from gpt_oss_reference import attention_weights  # noqa: E402

NAME = "granitemoe-tiny"
SEED = 2323
MULTIPLIERS = ("embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling")


def config():
    return {
        "architectures": ["GraniteMoeForCausalLM"], "model_type": "granitemoe",
        "attention_bias": True, "attention_dropout": 0.0,
        "bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": EOT_ID,
        "hidden_act": "silu", "hidden_size": 64, "intermediate_size": 16,
        "initializer_range": 0.02, "max_position_embeddings": 256,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
        "num_local_experts": 8, "num_experts_per_tok": 3,
        "embedding_multiplier": 6.0, "attention_multiplier": 0.09, "residual_multiplier": 0.35,
        "logits_scaling": 2.5,
        "output_router_logits": False, "router_aux_loss_coef": 0.001,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 4096,
    }


def make_weights(c):
    rng = np.random.default_rng(SEED)
    H, V = c["hidden_size"], c["vocab_size"]
    nH, nKV = c["num_attention_heads"], c["num_key_value_heads"]
    hd = H // nH
    E, I = c["num_local_experts"], c["intermediate_size"]
    W = {}  # name -> (float32 array, dtype)
    mat, norm = drawers(rng, W)
    mat("model.embed_tokens.weight", (V, H), 0.5)
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        attention_weights(mat, norm, p, H, nH, nKV, hd, 0.3, 0.3)
        mat(p + "block_sparse_moe.router.layer.weight", (E, H), 0.3)
        # GraniteMoeParallelExperts stores [num_experts, output_size, input_size].
        mat(p + "block_sparse_moe.input_linear.weight", (E, 2 * I, H), 0.3)
        mat(p + "block_sparse_moe.output_linear.weight", (E, H, I), 0.5)
    norm("model.norm.weight", H)
    return store(W)


# ----------------------------------------------------------------------------- the forward

def softmax_attention(q, k, v, scaling, visible):
    """q [nH, s, d] over k, v [nKV, s, d] (repeat_kv), scores times `scaling`, key j seen from
    query i iff visible[i, j]: the heads' outputs [s, nH * d]."""
    rep = q.shape[0] // k.shape[0]
    k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)  # repeat_kv
    scores = q @ k.transpose(0, 2, 1) * scaling
    scores = np.where(visible, scores, -np.inf)
    scores = scores - scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    probs = probs / probs.sum(-1, keepdims=True)
    return (probs @ v).transpose(1, 0, 2).reshape(q.shape[1], -1)


def attention(c, W, p, x, scaling, theta, window=None, rope=None):
    """GraniteMoeAttention (and PhimoeAttention, phimoe_reference.py): head_dim = hidden_size //
    num_attention_heads, q/k/v/o biases iff attention_bias, rotate-half RoPE with base `theta`,
    softmax scale `scaling`, causal; `window`: key j seen from query i iff i - j < window;
    `rope`: (inv_freq, mscale) of a scaled RoPE instead of the default one (cos and sin x mscale)."""
    s, H = x.shape
    nH, nKV = c["num_attention_heads"], c["num_key_value_heads"]
    hd = H // nH

    def proj(name, heads):
        y = x @ W[p + f"self_attn.{name}.weight"].T
        if c.get("attention_bias", False):
            y = y + W[p + f"self_attn.{name}.bias"]
        return y.reshape(s, heads, hd).transpose(1, 0, 2)  # [heads, s, hd]

    q, k, v = proj("q_proj", nH), proj("k_proj", nKV), proj("v_proj", nKV)
    inv_freq, mscale = rope if rope is not None else (1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd), 1.0)
    freqs = np.arange(s, dtype=np.float64)[:, None] * inv_freq[None, :]
    emb = np.concatenate((freqs, freqs), axis=-1)
    cos, sin = np.cos(emb) * mscale, np.sin(emb) * mscale
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    i, j = np.arange(s)[:, None], np.arange(s)[None, :]
    visible = j <= i
    if window:
        visible &= i - j < window
    y = softmax_attention(q, k, v, scaling, visible) @ W[p + "self_attn.o_proj.weight"].T
    if c.get("attention_bias", False):
        y = y + W[p + "self_attn.o_proj.bias"]
    return y


def moe(c, W, p, x):
    E, k = c["num_local_experts"], c["num_experts_per_tok"]
    logits = x @ W[p + "block_sparse_moe.router.layer.weight"].T
    ids, wts, margin = [], [], np.inf
    for t in range(x.shape[0]):
        if c.get("_softmax_then_topk"):  # sensitivity: mixtral's rule (softmax over all, no renorm)
            z = np.exp(logits[t] - logits[t].max())
            z = z / z.sum()
            top = np.argsort(-z, kind="stable")
            sel = np.sort(top[:k])
            ids.append(sel)
            wts.append(z[sel])
            continue
        top = np.argsort(-logits[t], kind="stable")
        margin = min(margin, logits[t, top[k - 1]] - logits[t, top[k]])
        sel = np.sort(top[:k])
        z = logits[t, sel] - logits[t, sel].max()
        ids.append(sel)
        wts.append(np.exp(z) / np.exp(z).sum())
    ids, wts = np.array(ids), np.array(wts)
    I = c["intermediate_size"]
    out = np.zeros_like(x)
    for e in range(E):
        rows, slot = np.nonzero(ids == e)
        if not rows.size:
            continue
        hidden = x[rows] @ W[p + "block_sparse_moe.input_linear.weight"][e].T  # [n, 2I]
        a, b = hidden[:, :I], hidden[:, I:]  # chunk(2, dim=-1)
        if c.get("_swap_halves"):  # sensitivity: the second half activated instead
            a, b = b, a
        y = (silu(a) * b) @ W[p + "block_sparse_moe.output_linear.weight"][e].T
        out[rows] += y * wts[rows, slot][:, None]
    return out, ids, wts, margin


def forward(c, W, tokens):
    eps = c.get("rms_norm_eps", 1e-6)
    rm = c.get("residual_multiplier", 1.0)
    x = W["model.embed_tokens.weight"][tokens] * c.get("embedding_multiplier", 1.0)
    layers, margin = [], np.inf
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        # GraniteMoeAttention.scaling = attention_multiplier (sensitivity: the usual head_dim**-0.5)
        scaling = (c["hidden_size"] // c["num_attention_heads"]) ** -0.5 if c.get("_scale_head_dim") else \
            c.get("attention_multiplier", 1.0)
        x = x + attention(c, W, p, rms_norm(x, W[p + "input_layernorm.weight"], eps), scaling,
                          c.get("rope_theta", 10000.0)) * rm
        y, ids, wts, m = moe(c, W, p, rms_norm(x, W[p + "post_attention_layernorm.weight"], eps))
        x = x + y * rm
        margin = min(margin, m)
        layers.append({"layer": l, "topk_ids": ids.tolist(), "topk_weights": wts.tolist()})
    head = W["model.embed_tokens.weight"] if c.get("tie_word_embeddings", False) else W["lm_head.weight"]
    if c.get("_scaled_head"):  # sensitivity: the tied head taken after the embedding multiplier
        head = head * c.get("embedding_multiplier", 1.0)
    logits = rms_norm(x, W["model.norm.weight"], eps) @ head.T / c.get("logits_scaling", 1.0)
    return logits, layers, margin


def merge_patch(c, patch):
    """c with a config patch applied as the C++ tests apply it to config.json (a JSON merge patch:
    a null removes the key)."""
    out = {k: v for k, v in c.items() if k not in patch or patch[k] is not None}
    out.update({k: v for k, v in patch.items() if v is not None})
    return out


def without(c, keys):
    return merge_patch(c, {k: None for k in keys})


def write_all(name, golden, c, stored, W, seed, variants, run, script):
    """The fixture data/<name>, its golden data/golden/<golden>.json on a window drawn with seed,
    and one golden per (name, config patch) variant; returns the window's tokens."""
    out = write_fixture(name, c, stored)
    tokens = np.random.default_rng(seed).integers(0, c["vocab_size"], T)
    write_golden(name, golden, c, W, tokens, {}, run, script)
    for vname, patch in variants:
        write_golden(name, vname, merge_patch(c, patch), W, tokens, patch, run, script)
    print(f"{name}: {os.path.getsize(os.path.join(out, 'model.safetensors'))} bytes")
    return tokens


VARIANTS = (("granitemoe-default-multipliers", {k: None for k in MULTIPLIERS}),)


def sensitivity(c, W, tokens):
    base = forward(c, W, tokens)[0]
    print(f"tolerance 1e-4 x max |logit| = {1e-4 * np.abs(base).max():.2g}")
    for key in MULTIPLIERS:
        print(f"{key} dropped (1.0): {np.abs(forward(without(c, [key]), W, tokens)[0] - base).max():.3g}")
    for what, flag in (("softmax scale head_dim^-0.5 instead of attention_multiplier", "_scale_head_dim"),
                       ("second half of input_linear activated", "_swap_halves"),
                       ("softmax over all logits then top-k (mixtral rule)", "_softmax_then_topk"),
                       ("tied lm_head times embedding_multiplier", "_scaled_head")):
        print(f"{what}: {np.abs(forward(dict(c, **{flag: True}), W, tokens)[0] - base).max():.3g}")
    W2 = {n: (np.zeros_like(a) if n.endswith(".bias") else a) for n, a in W.items()}
    print(f"no attention biases: {np.abs(forward(c, W2, tokens)[0] - base).max():.3g}")


def main():
    c = config()
    stored, W = make_weights(c)
    tokens = write_all(NAME, "granitemoe", c, stored, W, SEED + 1, VARIANTS, forward,
                       "data/scripts/granitemoe_reference.py")
    if "--sensitivity" in sys.argv:
        sensitivity(c, W, tokens)


if __name__ == "__main__":
    main()
