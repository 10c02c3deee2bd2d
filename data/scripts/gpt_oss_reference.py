#!/usr/bin/python3
"""Independent NumPy reference of the gpt_oss (gpt-oss-20b / 120b) forward, written from
transformers' modeling_gpt_oss.py and configuration_gpt_oss.py, and modeling_rope_utils.py
(_compute_yarn_parameters, with `truncate`):
  GptOssRMSNorm; GptOssAttention (q/k/v/o biases iff attention_bias, GQA via repeat_kv, scaling
  head_dim**-0.5, sliding_window on the layers whose layer_types entry is sliding_attention: key j
  seen from query i iff i - j < sliding_window) with eager_attention_forward's sinks (one more
  logit per head, unscaled, concatenated to each row of scores, softmax, then dropped);
  _apply_rotary_emb (rotate-half: first/second halves of each head); GptOssRotaryEmbedding with
  yarn (cos and sin times attention_factor); GptOssTopKRouter (logits = x W^T + b, top-k of the
  logits, softmax over the k); GptOssExperts (gate_up = x @ gate_up_proj[e] + gate_up_proj_bias[e]
  with gate = gate_up[..., ::2], up = gate_up[..., 1::2]; gate.clamp(max=limit),
  up.clamp(-limit, limit), glu = gate * sigmoid(gate * alpha), out = ((up + 1) * glu) @
  down_proj[e] + down_proj_bias[e]); GptOssDecoderLayer (pre-norm residual blocks).
NumPy only (torch is not needed). The safetensors writer, bf16 storage, weight drawers and the
fixture / golden writers are imported from deepseek_reference.py.

Builds data/gpt-oss-tiny: 2 decoder layers (layer_types sliding_attention, full_attention),
sliding_window 8 (smaller than the golden window T = 24), hidden 64, 4 heads of head_dim 24 (read,
not hidden/heads), 2 key/value heads, attention_bias, yarn rope_scaling (factor 4 =
max_position_embeddings 256 / original_max_position_embeddings 64, truncate false), 8 experts of
width 16 in the fused layout, top-4, swiglu_limit 7.0 (the gate/up weights are drawn large enough
that the clamps act on part of the values; the script prints which fraction). Goldens in float64 on
the stored (bf16-rounded) weights:
  data/golden/gpt_oss.json             the fixture as stored
  data/golden/gpt_oss-all-full.json    the same weights with every layer full_attention
  data/golden/gpt_oss-mxfp4.json       data/gpt-oss-tiny-mxfp4: the same config with expert width 32,
                                       tied embeddings and the experts as MXFP4 blocks and scales
                                       (random codes), decoded as transformers' integrations/mxfp4.py
                                       convert_moe_packed_tensors does
each: the token sequence, the logits of one window [T, V/16] (ids 0, 16, 32, ...; 8 significant
digits), each position's argmax, and per MoE layer the chosen experts per token (sorted) and their
routing weights in that order.

Usage: /usr/bin/python3 data/scripts/gpt_oss_reference.py [--sensitivity]
  --sensitivity also prints how far the logits move when one feature is computed another way.
"""
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deepseek_reference import (EOT_ID, T, drawers, get_mscale, rms_norm, store, write_fixture,  # noqa: E402
                                write_golden)

NAME = "gpt-oss-tiny"
SEED = 5005


def config():
    return {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
        "attention_bias": True, "attention_dropout": 0.0,
        "bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": EOT_ID,
        "head_dim": 24, "hidden_act": "silu", "hidden_size": 64, "intermediate_size": 16,
        "initializer_range": 0.02, "max_position_embeddings": 256,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
        "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8,
        "num_local_experts": 8, "num_experts_per_tok": 4, "experts_per_token": 4,
        "swiglu_limit": 7.0, "router_aux_loss_coef": 0.9, "output_router_logits": False,
        "rms_norm_eps": 1e-5, "rope_theta": 150000.0,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "truncate": False, "original_max_position_embeddings": 64},
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 4096,
    }


def attention_weights(mat, norm, p, H, nH, nKV, hd, std_qkv, std_o):
    """The two layer norms and q/k/v/o projections with biases of layer prefix p, in this order
    (granitemoe_reference.py draws its attention the same way)."""
    norm(p + "input_layernorm.weight", H)
    norm(p + "post_attention_layernorm.weight", H)
    for name, rows in (("q_proj", nH * hd), ("k_proj", nKV * hd), ("v_proj", nKV * hd)):
        mat(p + f"self_attn.{name}.weight", (rows, H), std_qkv)
        mat(p + f"self_attn.{name}.bias", (rows,), 0.1)
    mat(p + "self_attn.o_proj.weight", (H, nH * hd), std_o)
    mat(p + "self_attn.o_proj.bias", (H,), std_o)


def make_weights(c):
    rng = np.random.default_rng(SEED)
    H, V, hd = c["hidden_size"], c["vocab_size"], c["head_dim"]
    nH, nKV = c["num_attention_heads"], c["num_key_value_heads"]
    E, I = c["num_local_experts"], c["intermediate_size"]
    W = {}  # name -> (float32 array, dtype)
    mat, norm = drawers(rng, W)
    mat("model.embed_tokens.weight", (V, H), 0.5)
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        attention_weights(mat, norm, p, H, nH, nKV, hd, 0.2, 0.1)
        mat(p + "self_attn.sinks", (nH,), 1.0)
        mat(p + "mlp.router.weight", (E, H), 0.3)
        mat(p + "mlp.router.bias", (E,), 0.3)
        # [E, in, out] as GptOssExperts stores them; std 0.6: |gate| and |up| above 7 for some tokens
        mat(p + "mlp.experts.gate_up_proj", (E, H, 2 * I), 0.6)
        mat(p + "mlp.experts.gate_up_proj_bias", (E, 2 * I), 0.5)
        mat(p + "mlp.experts.down_proj", (E, I, H), 0.05)
        mat(p + "mlp.experts.down_proj_bias", (E, H), 0.1)
    norm("model.norm.weight", H)
    mat("lm_head.weight", (V, H), 0.1)
    return store(W)


# ----------------------------------------------------------------------------- the forward

def yarn_inv_freq(c):
    """_compute_yarn_parameters: inv_freq [head_dim/2] and attention_factor."""
    rs, base, dim = c["rope_scaling"], c["rope_theta"], c["head_dim"]
    factor = rs["factor"]
    orig = rs.get("original_max_position_embeddings") or c["max_position_embeddings"]
    if rs.get("original_max_position_embeddings"):
        factor = c["max_position_embeddings"] / orig
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        attention_factor = get_mscale(factor)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
    truncate = rs.get("truncate", True)

    def correction_dim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_factor) + (1.0 / pos_freqs) * extrapolation_factor
    return inv_freq, attention_factor


def rotary(x, cos, sin):
    """_apply_rotary_emb on x [heads, s, d]: cos/sin [s, d/2] on the two halves."""
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    return np.concatenate((a * cos - b * sin, b * cos + a * sin), axis=-1)


def attention(c, W, p, x, layer):
    s, hd = x.shape[0], c["head_dim"]
    nH, nKV = c["num_attention_heads"], c["num_key_value_heads"]

    def proj(name, heads):
        y = x @ W[p + f"self_attn.{name}.weight"].T
        if c["attention_bias"]:
            y = y + W[p + f"self_attn.{name}.bias"]
        return y.reshape(s, heads, hd).transpose(1, 0, 2)  # [heads, s, hd]

    q, k, v = proj("q_proj", nH), proj("k_proj", nKV), proj("v_proj", nKV)
    inv_freq, af = yarn_inv_freq(c)
    freqs = np.arange(s, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(freqs) * af, np.sin(freqs) * af
    q, k = rotary(q, cos, sin), rotary(k, cos, sin)
    rep = nH // nKV
    k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)  # repeat_kv
    scores = q @ k.transpose(0, 2, 1) * hd ** -0.5
    i, j = np.arange(s)[:, None], np.arange(s)[None, :]
    visible = j <= i
    if c["layer_types"][layer] == "sliding_attention" and c.get("sliding_window"):
        visible &= i - j < c["sliding_window"]
    scores = np.where(visible, scores, -np.inf)
    sinks = np.broadcast_to(W[p + "self_attn.sinks"][:, None, None], (nH, s, 1))
    combined = np.concatenate((scores, sinks), axis=-1)
    combined = combined - combined.max(-1, keepdims=True)
    probs = np.exp(combined)
    probs = probs / probs.sum(-1, keepdims=True)
    out = (probs[..., :-1] @ v).transpose(1, 0, 2).reshape(s, nH * hd)
    y = out @ W[p + "self_attn.o_proj.weight"].T
    if c["attention_bias"]:
        y = y + W[p + "self_attn.o_proj.bias"]
    return y


CLAMP = {"gate": 0, "up": 0, "values": 0}  # how many values the clamps changed (printed)


def experts_and_router(c, W, p, x):
    E, k = c["num_local_experts"], c["num_experts_per_tok"]
    alpha, limit = c.get("swiglu_alpha", 1.702), c.get("swiglu_limit", 7.0)
    logits = x @ W[p + "mlp.router.weight"].T + W[p + "mlp.router.bias"]
    ids, wts, margin = [], [], np.inf
    for t in range(x.shape[0]):
        top = np.argsort(-logits[t], kind="stable")
        margin = min(margin, logits[t, top[k - 1]] - logits[t, top[k]])
        sel = np.sort(top[:k])
        z = logits[t, sel] - logits[t, sel].max()
        ids.append(sel)
        wts.append(np.exp(z) / np.exp(z).sum())
    ids, wts = np.array(ids), np.array(wts)
    out = np.zeros_like(x)
    for e in range(E):
        rows, slot = np.nonzero(ids == e)
        if not rows.size:
            continue
        gate_up = x[rows] @ W[p + "mlp.experts.gate_up_proj"][e] + W[p + "mlp.experts.gate_up_proj_bias"][e]
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        CLAMP["gate"] += int((gate > limit).sum())
        CLAMP["up"] += int((np.abs(up) > limit).sum())
        CLAMP["values"] += gate.size
        gate = np.minimum(gate, limit)
        up = np.clip(up, -limit, limit)
        glu = gate * (1.0 / (1.0 + np.exp(-gate * alpha)))
        y = ((up + 1) * glu) @ W[p + "mlp.experts.down_proj"][e] + W[p + "mlp.experts.down_proj_bias"][e]
        out[rows] += y * wts[rows, slot][:, None]
    return out, ids, wts, margin


def forward(c, W, tokens):
    x = W["model.embed_tokens.weight"][tokens]
    eps = c["rms_norm_eps"]
    layers, margin = [], np.inf
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        x = x + attention(c, W, p, rms_norm(x, W[p + "input_layernorm.weight"], eps), l)
        y, ids, wts, m = experts_and_router(c, W, p, rms_norm(x, W[p + "post_attention_layernorm.weight"], eps))
        x = x + y
        margin = min(margin, m)
        layers.append({"layer": l, "topk_ids": ids.tolist(), "topk_weights": wts.tolist()})
    logits = rms_norm(x, W["model.norm.weight"], eps) @ W["lm_head.weight"].T
    return logits, layers, margin


VARIANTS = (("gpt_oss-all-full", {"layer_types": ["full_attention", "full_attention"]}),)


def sensitivity(c, W, tokens):
    base = forward(c, W, tokens)[0]
    print(f"tolerance 1e-4 x max |logit| = {1e-4 * np.abs(base).max():.2g}")
    for what, patch in (("no sliding window", {"layer_types": ["full_attention"] * 2}),
                        ("no clamp (limit 1e9)", {"swiglu_limit": 1e9}),
                        ("no yarn", {"rope_scaling": dict(c["rope_scaling"], factor=1.0, original_max_position_embeddings=None)}),
                        ("yarn truncate true", {"rope_scaling": dict(c["rope_scaling"], truncate=True)})):
        print(f"{what}: {np.abs(forward(dict(c, **patch), W, tokens)[0] - base).max():.3g}")
    for what, drop in (("no sinks", "self_attn.sinks"), ("no down_proj_bias", "mlp.experts.down_proj_bias"),
                       ("no router bias", "mlp.router.bias")):
        W2 = {n: (np.zeros_like(a) if n.endswith(drop) else a) for n, a in W.items()}
        if drop == "self_attn.sinks":
            W2 = {n: (np.full_like(a, -1e30) if n.endswith(drop) else a) for n, a in W.items()}
        print(f"{what}: {np.abs(forward(c, W2, tokens)[0] - base).max():.3g}")


# ----------------------------------------------------------------------------- MXFP4 experts

FP4_VALUES = np.array([+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
MXFP4_NAME = "gpt-oss-tiny-mxfp4"


def mxfp4_decode(blocks, scales):
    """transformers' integrations/mxfp4.py convert_moe_packed_tensors: blocks [E, R, G, 16] uint8
    (two e2m1 codes per byte, low nibble first), scales [E, R, G] uint8 (e8m0: 2^(s - 127)) ->
    [E, G*32, R] (the transpose(1, 2) at its end)."""
    E, R, G, B = blocks.shape
    out = np.empty((E, R, G, 2 * B))
    out[..., 0::2] = FP4_VALUES[blocks & 0x0F]
    out[..., 1::2] = FP4_VALUES[blocks >> 4]
    out = out * np.ldexp(1.0, scales.astype(np.int64) - 127)[..., None]
    return out.reshape(E, R, G * 2 * B).transpose(0, 2, 1)


def mxfp4_fixture():
    """data/gpt-oss-tiny-mxfp4: the released checkpoints' encoding (quantization_config
    quant_method mxfp4): per layer mlp.experts.{gate_up,down}_proj_{blocks,scales} (uint8) instead
    of gate_up_proj / down_proj, random codes and scales; tied embeddings and no lm_head (keeps it
    small). Its golden runs the forward on the decoded experts."""
    c = dict(config(), tie_word_embeddings=True, intermediate_size=32,
             quantization_config={"quant_method": "mxfp4", "modules_to_not_convert": [
                 "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})
    stored, W = make_weights(c)
    rng = np.random.default_rng(SEED + 7)
    E, H, I = c["num_local_experts"], c["hidden_size"], c["intermediate_size"]
    del stored["lm_head.weight"], W["lm_head.weight"]
    W["lm_head.weight"] = W["model.embed_tokens.weight"]
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}.mlp.experts."
        for proj, rows, cols in (("gate_up_proj", 2 * I, H), ("down_proj", H, I)):
            blocks = rng.integers(0, 256, (E, rows, cols // 32, 16), dtype=np.uint8)
            scales = rng.integers(123, 127, (E, rows, cols // 32), dtype=np.uint8)
            del stored[p + proj]
            stored[p + proj + "_blocks"] = ("U8", blocks)
            stored[p + proj + "_scales"] = ("U8", scales)
            W[p + proj] = mxfp4_decode(blocks, scales)
    return c, stored, W


def main():
    c = config()
    stored, W = make_weights(c)
    out = write_fixture(NAME, c, stored)
    tokens = np.random.default_rng(SEED + 1).integers(0, c["vocab_size"], T)
    script = "data/scripts/gpt_oss_reference.py"
    write_golden(NAME, "gpt_oss", c, W, tokens, {}, forward, script)
    print(f"clamped: gate {CLAMP['gate']} and up {CLAMP['up']} of {CLAMP['values']} values")
    for name, patch in VARIANTS:
        write_golden(NAME, name, dict(c, **patch), W, tokens, patch, forward, script)
    print(f"{NAME}: {os.path.getsize(os.path.join(out, 'model.safetensors'))} bytes")
    cm, stored_m, W_m = mxfp4_fixture()
    out_m = write_fixture(MXFP4_NAME, cm, stored_m)
    write_golden(MXFP4_NAME, "gpt_oss-mxfp4", cm, W_m, tokens, {}, forward, script)
    print(f"{MXFP4_NAME}: {os.path.getsize(os.path.join(out_m, 'model.safetensors'))} bytes")
    if "--sensitivity" in sys.argv:
        sensitivity(c, W, tokens)


if __name__ == "__main__":
    main()
