#!/usr/bin/python3
"""Independent NumPy reference of the phimoe (PhiMoEForCausalLM, Phi-3.5-MoE) forward, written
from transformers' modeling_phimoe.py and configuration_phimoe.py:
  PhimoeDecoderLayer: nn.LayerNorm (weight and bias, eps = rms_norm_eps) before attention and
    before the MoE block, plain residuals; PhimoeModel.norm a LayerNorm too;
  PhimoeAttention: q/k/v/o projections with biases iff attention_bias, head_dim = hidden_size //
    num_attention_heads, GQA via repeat_kv, RoPE (PhimoeRotaryEmbedding without rope_scaling:
    default inv_freq = theta^(-2i/d), rotate_half), softmax scale head_dim**-0.5, causal, and the
    sliding window of _prepare_4d_causal_attention_mask_with_cache_position when sliding_window is
    set (key j masked from query i iff j <= i - sliding_window);
  PhimoeSparseMoeBlock with sparsemixer(training=False): the first expert is the argmax of the
    router logits, its weight the softmax over the logits left after masking every logit s with
    (max - s) / max(|s|, max) > 2 * router_jitter_noise; the second is the argmax once the first
    is set to -inf, its weight the same softmax over what is left after masking against the second
    maximum; no renormalisation; PhimoeBlockSparseTop2MLP: w2(silu(w1 x) * w3 x);
  PhimoeForCausalLM: lm_head with a bias iff lm_head_bias.
  Defaults of configuration_phimoe.py for absent keys: rms_norm_eps 1e-5, rope_theta 1e6,
  sliding_window None, router_jitter_noise 0.01, attention_bias and lm_head_bias false.
NumPy only. The bf16 storage, weight drawers, RMSNorm (for --sensitivity) and SiLU are imported
from deepseek_reference.py, the attention weights' drawer from gpt_oss_reference.py, the attention
(the same module with another scale and a window) and the fixture / golden writing from
granitemoe_reference.py.

Builds data/phimoe-tiny: 2 decoder layers, hidden 64, 4 heads of head_dim 16 over 2 key/value
heads, attention_bias, lm_head_bias, sliding_window 8 (smaller than the golden window T = 24), 8
experts of width 16, top-2, router_jitter_noise 0.2 (so that the masked softmax keeps several
experts and the weights are not all 1; Phi-3.5-MoE's 0.01 is the variant below). Goldens in
float64 on the stored (bf16-rounded) weights:
  data/golden/phimoe.json             the fixture as stored
  data/golden/phimoe-jitter-0.01.json the same weights with router_jitter_noise 0.01 (Phi-3.5-MoE's)
  data/golden/phimoe-no-window.json   the same weights with sliding_window null
each: the token sequence, the logits of one window [T, V/16] (ids 0, 16, 32, ...), each position's
argmax, and per MoE layer the chosen experts per token (sorted) and their routing weights.

Usage: /usr/bin/python3 data/scripts/phimoe_reference.py [--sensitivity]
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deepseek_reference import EOT_ID, drawers, rms_norm, silu, store  # noqa: E402
from gpt_oss_reference import attention_weights  # noqa: E402
from granitemoe_reference import attention, write_all  # noqa: E402

NAME = "phimoe-tiny"
SEED = 3535


def config():
    return {
        "architectures": ["PhiMoEForCausalLM"], "model_type": "phimoe",
        "attention_bias": True, "attention_dropout": 0.0, "lm_head_bias": True,
        "bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": EOT_ID,
        "hidden_act": "silu", "hidden_size": 64, "intermediate_size": 16,
        "initializer_range": 0.02, "max_position_embeddings": 256,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
        "num_local_experts": 8, "num_experts_per_tok": 2,
        "router_jitter_noise": 0.2, "input_jitter_noise": 0.01,
        "output_router_logits": False, "router_aux_loss_coef": 0.0,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None, "sliding_window": 8,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 4096,
    }


def make_weights(c):
    rng = np.random.default_rng(SEED)
    H, V = c["hidden_size"], c["vocab_size"]
    nH, nKV = c["num_attention_heads"], c["num_key_value_heads"]
    E, I = c["num_local_experts"], c["intermediate_size"]
    W = {}  # name -> (float32 array, dtype)
    mat, norm = drawers(rng, W)
    mat("model.embed_tokens.weight", (V, H), 0.5)
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        attention_weights(mat, norm, p, H, nH, nKV, H // nH, 0.3, 0.2)
        mat(p + "input_layernorm.bias", (H,), 0.2)
        mat(p + "post_attention_layernorm.bias", (H,), 0.2)
        mat(p + "block_sparse_moe.gate.weight", (E, H), 0.4)
        for e in range(E):
            q = p + f"block_sparse_moe.experts.{e}."
            mat(q + "w1.weight", (I, H), 0.3)
            mat(q + "w2.weight", (H, I), 0.3)
            mat(q + "w3.weight", (I, H), 0.3)
    norm("model.norm.weight", H)
    mat("model.norm.bias", (H,), 0.2)
    mat("lm_head.weight", (V, H), 0.2)
    mat("lm_head.bias", (V,), 0.5)
    return store(W)


# ----------------------------------------------------------------------------- the forward

def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def sparsemixer(scores, eps):
    """sparsemixer(training=False) on one token's logits: ([first, second], [w1, w2], margin)
    where margin is how far the choices and the masks are from flipping."""
    def masked_softmax(s, ref, top):
        # mask_logits_threshold = ((max - scores) / scores.abs().clamp(min=max)) > 2 * jitter_eps
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = (top - ref) / np.maximum(np.abs(ref), top)
        masked = np.where(rel > 2 * eps, -np.inf, s)
        z = np.exp(masked - masked.max())
        finite = np.isfinite(rel) & np.isfinite(s)
        return z / z.sum(), np.min(np.abs(rel[finite] - 2 * eps))

    order = np.argsort(-scores, kind="stable")
    first = order[0]
    p1, m1 = masked_softmax(scores, scores, scores[first])
    rest = scores.copy()
    rest[first] = -np.inf
    second = order[1]
    p2, m2 = masked_softmax(rest, scores, scores[second])
    margin = min(scores[order[0]] - scores[order[1]], scores[order[1]] - scores[order[2]], m1, m2)
    return [first, second], [p1[first], p2[second]], margin


def moe(c, W, p, x):
    E = c["num_local_experts"]
    eps = c.get("router_jitter_noise", 0.01)
    logits = x @ W[p + "block_sparse_moe.gate.weight"].T
    ids, wts, margin = [], [], np.inf
    for t in range(x.shape[0]):
        sel, w, m = sparsemixer(logits[t], eps)
        if c.get("_renormalise"):  # sensitivity: the two weights divided by their sum
            w = [w[0] / (w[0] + w[1]), w[1] / (w[0] + w[1])]
        order = np.argsort(sel)
        ids.append(np.array(sel)[order])
        wts.append(np.array(w)[order])
        margin = min(margin, m)
    ids, wts = np.array(ids), np.array(wts)
    out = np.zeros_like(x)
    for e in range(E):
        rows, slot = np.nonzero(ids == e)
        if not rows.size:
            continue
        q = p + f"block_sparse_moe.experts.{e}."
        y = (silu(x[rows] @ W[q + "w1.weight"].T) * (x[rows] @ W[q + "w3.weight"].T)) @ W[q + "w2.weight"].T
        out[rows] += y * wts[rows, slot][:, None]
    return out, ids, wts, margin


def longrope(c, hd, seq_len):
    """PhimoeRotaryEmbedding with rope_scaling {"rope_type": "longrope", ...} (None without one):
    _compute_longrope_parameters(config, device, seq_len) of modeling_rope_utils.py (v5: the
    original context from rope_scaling's original_max_position_embeddings), inv_freq =
    1 / (ext_factors * theta ** (arange(0, d, 2) / d)) with ext_factors = long_factor when
    seq_len > original_max_position_embeddings else short_factor; cos and sin x long_mscale or
    short_mscale by the same comparison (PhimoeRotaryEmbedding.forward), else x the attention
    factor. seq_len is max(position_ids) + 1, the window length here."""
    rs = c.get("rope_scaling")
    if not rs:
        return None
    assert rs.get("rope_type", rs.get("type")) == "longrope"
    orig = rs.get("original_max_position_embeddings") or c.get("original_max_position_embeddings") \
        or c["max_position_embeddings"]
    long = seq_len > orig
    ext = np.array(rs["long_factor"] if long else rs["short_factor"], dtype=np.float64)
    inv_freq = 1.0 / (ext * c.get("rope_theta", 1e6) ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    mscale = rs.get("long_mscale" if long else "short_mscale")
    if mscale is None:
        mscale = rs.get("attention_factor")
    if mscale is None:
        factor = c["max_position_embeddings"] / orig
        mscale = 1.0 if factor <= 1 else np.sqrt(1 + np.log(factor) / np.log(orig))
    return inv_freq, mscale


def forward(c, W, tokens):
    eps = c.get("rms_norm_eps", 1e-5)

    def norm(x, prefix):
        if c.get("_rms_norm"):  # sensitivity: RMSNorm (no mean, no bias) instead of LayerNorm
            return rms_norm(x, W[prefix + ".weight"], eps)
        return layer_norm(x, W[prefix + ".weight"], W[prefix + ".bias"], eps)

    x = W["model.embed_tokens.weight"][tokens]
    hd = c["hidden_size"] // c["num_attention_heads"]
    layers, margin = [], np.inf
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        x = x + attention(c, W, p, norm(x, p + "input_layernorm"), hd ** -0.5, c.get("rope_theta", 1e6),
                          c.get("sliding_window"), longrope(c, hd, len(tokens)))
        y, ids, wts, m = moe(c, W, p, norm(x, p + "post_attention_layernorm"))
        x = x + y
        margin = min(margin, m)
        layers.append({"layer": l, "topk_ids": ids.tolist(), "topk_weights": wts.tolist()})
    logits = norm(x, "model.norm") @ W["lm_head.weight"].T
    if c.get("lm_head_bias", False):
        logits = logits + W["lm_head.bias"]
    return logits, layers, margin


# Phi-3.5-MoE's rope_scaling shape (longrope, short/long factors per frequency, short/long mscale,
# original context 4096) with factors drawn for head_dim 16; the second variant's original context
# (16) is shorter than the window (T = 24), so it takes the long factors and long_mscale.
LONGROPE = {"type": "longrope", "short_factor": [1.0, 1.05, 1.2, 1.5, 2.0, 3.1, 4.4, 6.0],
            "long_factor": [1.0, 1.3, 2.2, 4.5, 9.0, 17.0, 30.0, 48.0],
            "short_mscale": 1.243163121016122, "long_mscale": 1.2, "original_max_position_embeddings": 4096}
VARIANTS = (("phimoe-jitter-0.01", {"router_jitter_noise": 0.01}),
            ("phimoe-no-window", {"sliding_window": None}),
            ("phimoe-longrope", {"rope_scaling": LONGROPE}),
            ("phimoe-longrope-long", {"rope_scaling": dict(LONGROPE, original_max_position_embeddings=16)}))


def sensitivity(c, W, tokens):
    base = forward(c, W, tokens)[0]
    print(f"tolerance 1e-4 x max |logit| = {1e-4 * np.abs(base).max():.2g}")
    for what, patch in (("RMSNorm instead of LayerNorm", {"_rms_norm": True}),
                        ("no sliding window", {"sliding_window": None}),
                        ("router_jitter_noise 0.01 instead of 0.2", {"router_jitter_noise": 0.01}),
                        ("weights renormalised", {"_renormalise": True}),
                        ("no lm_head bias", {"lm_head_bias": False}),
                        ("no attention biases", {"attention_bias": False}),
                        ("longrope: short factors, short_mscale", {"rope_scaling": LONGROPE}),
                        ("longrope: long factors, long_mscale",
                         {"rope_scaling": dict(LONGROPE, original_max_position_embeddings=16)})):
        print(f"{what}: {np.abs(forward(dict(c, **patch), W, tokens)[0] - base).max():.3g}")


def main():
    c = config()
    stored, W = make_weights(c)
    tokens = write_all(NAME, "phimoe", c, stored, W, SEED + 1, VARIANTS, forward, "data/scripts/phimoe_reference.py")
    if "--sensitivity" in sys.argv:
        sensitivity(c, W, tokens)


if __name__ == "__main__":
    main()
