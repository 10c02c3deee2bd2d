#!/usr/bin/python3
"""Independent NumPy reference of the llama4_text (Llama4ForCausalLM) forward, written from
transformers' modeling_llama4.py, configuration_llama4.py and modeling_rope_utils.py:
  Llama4TextConfig.__post_init__: no_rope_layers (1: RoPE) null or empty -> a NoPE layer every
    no_rope_layer_interval (4); moe_layers null -> range(interleave_moe_layer_step - 1, L, step);
    layer_types null -> chunked_attention on RoPE layers, full_attention on NoPE layers;
  Llama4TextDecoderLayer: h = h + self_attn(input_layernorm(h)); h = h + feed_forward(
    post_attention_layernorm(h)), feed_forward = Llama4TextMoe on the moe_layers, else
    Llama4TextMLP of width intermediate_size_mlp (feed_forward.{gate,up,down}_proj);
  Llama4TextAttention: q/k/v/o (biases iff attention_bias), GQA via repeat_kv, on RoPE layers
    apply_rotary_emb (view_as_complex on adjacent pairs times freqs_cis), then (use_qk_norm, RoPE
    layers only) Llama4TextL2Norm x * rsqrt(mean(x^2) + rms_norm_eps) per head, no weight; on NoPE
    layers with attn_temperature_tuning q *= log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1;
    softmax scale head_dim^-0.5; the mask of the layer's type: causal, and for chunked_attention
    key j seen from query i iff j // attention_chunk_size == i // attention_chunk_size;
  Llama4Router: logits = x W_router^T, top-k of the logits, scores = sigmoid(top-k logits), 0 for the
    others; Llama4TextMoe: routed_in = x * score (the score multiplies the expert's INPUT),
    Llama4TextExperts gate_up_proj [E, H, 2I] ([in, out]; chunk(2, -1): gate first, up second),
    (up * silu(gate)) @ down_proj [E, I, H], summed over the experts unweighted, plus the
    shared_expert (Llama4TextMLP of width intermediate_size);
  llama3 RoPE scaling (_compute_llama3_parameters); attention_scaling 1.
NumPy only. The safetensors writer, bf16 storage, weight drawers, RMSNorm / SiLU / MLP and the
fixture / golden writers are imported from deepseek_reference.py, merge_patch and the GQA softmax
attention from granitemoe_reference.py.

Builds data/llama4-tiny: 4 decoder layers (interleave_moe_layer_step 2: layers 1 and 3 MoE, 0 and 2
dense of width 32), no_rope_layers [1, 1, 1, 0] (layer 3 NoPE), hidden 64, 4 heads of head_dim 16
over 2 key/value heads, 8 experts of width 16, top-1, a shared expert, attention_chunk_size 8 (the
24-token window spans 3 chunks), floor_scale 4 and attn_scale 0.2 (the temperature acts), llama3
rope scaling as Llama-4-Scout's (factor 16, low/high 1, original 8192), rope_theta 500000. Goldens
in float64 on the stored (bf16-rounded) weights:
  data/golden/llama4.json                   the fixture as stored
  data/golden/llama4-no-qk-norm-no-tuning.json  use_qk_norm and attn_temperature_tuning false
  data/golden/llama4-full-attention.json    layer_types all full_attention (no chunking)
each: the token sequence, the logits of one window [T, V/16], each position's argmax, and per MoE
layer the chosen expert per token and its router score sigmoid(logit).

Usage: /usr/bin/python3 data/scripts/llama4_reference.py [--sensitivity]
"""
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deepseek_reference import T, drawers, mlp, rms_norm, silu, store  # noqa: E402
from granitemoe_reference import merge_patch, softmax_attention, write_all  # noqa: E402

NAME = "llama4-tiny"
SEED = 4404


def config():
    return {
        "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text",
        "attention_bias": False, "attention_chunk_size": 8, "attention_dropout": 0.0,
        "attn_scale": 0.2, "attn_temperature_tuning": True, "floor_scale": 4,
        "bos_token_id": 4095, "eos_token_id": 4095, "pad_token_id": 4095,
        "head_dim": 16, "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02,
        "interleave_moe_layer_step": 2, "intermediate_size": 16, "intermediate_size_mlp": 32,
        "max_position_embeddings": 256, "moe_layers": None, "no_rope_layers": [1, 1, 1, 0],
        "num_attention_heads": 4, "num_experts_per_tok": 1, "num_hidden_layers": 4,
        "num_key_value_heads": 2, "num_local_experts": 8, "output_router_logits": False,
        "rms_norm_eps": 1e-5,
        "rope_scaling": {"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "use_qk_norm": True, "vocab_size": 4096,
    }


def post_init(c):
    """The derived lists of Llama4TextConfig.__post_init__."""
    L = c["num_hidden_layers"]
    rope = c.get("no_rope_layers") or [int((l + 1) % c.get("no_rope_layer_interval", 4) != 0) for l in range(L)]
    moe_layers = c.get("moe_layers")
    if moe_layers is None:
        step = c.get("interleave_moe_layer_step", 1)
        moe_layers = list(range(step - 1, L, step))
    types = c.get("layer_types") or ["chunked_attention" if r else "full_attention" for r in rope]
    return rope, moe_layers, types


def make_weights(c):
    rng = np.random.default_rng(SEED)
    H, V, hd = c["hidden_size"], c["vocab_size"], c["head_dim"]
    nH, nKV = c["num_attention_heads"], c["num_key_value_heads"]
    E, I, Im = c["num_local_experts"], c["intermediate_size"], c["intermediate_size_mlp"]
    _, moe_layers, _ = post_init(c)
    W = {}
    mat, norm = drawers(rng, W)
    mat("model.embed_tokens.weight", (V, H), 0.5)
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        norm(p + "input_layernorm.weight", H)
        norm(p + "post_attention_layernorm.weight", H)
        for name, rows in (("q_proj", nH * hd), ("k_proj", nKV * hd), ("v_proj", nKV * hd)):
            mat(p + f"self_attn.{name}.weight", (rows, H), 0.3)
        mat(p + "self_attn.o_proj.weight", (H, nH * hd), 0.2)
        f = p + "feed_forward."
        if l in moe_layers:
            mat(f + "router.weight", (E, H), 0.4)
            mat(f + "experts.gate_up_proj", (E, H, 2 * I), 0.3)  # [in, out]
            mat(f + "experts.down_proj", (E, I, H), 0.4)
            for name, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                mat(f + f"shared_expert.{name}.weight", shape, 0.3)
        else:
            for name, shape in (("gate_proj", (Im, H)), ("up_proj", (Im, H)), ("down_proj", (H, Im))):
                mat(f + f"{name}.weight", shape, 0.3)
    norm("model.norm.weight", H)
    mat("lm_head.weight", (V, H), 0.3)
    return store(W)


# ----------------------------------------------------------------------------- the forward

def inv_freq(c):
    """Llama4TextRotaryEmbedding: default or llama3 (_compute_llama3_parameters) frequencies."""
    d = c["head_dim"]
    f = 1.0 / c.get("rope_theta", 500000.0) ** (np.arange(0, d, 2, dtype=np.float64) / d)
    rs = c.get("rope_scaling")
    if not rs or rs.get("rope_type", rs.get("type")) == "default":
        return f
    assert rs["rope_type"] == "llama3"
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    low_wl, high_wl = old / low, old / high
    wl = 2 * math.pi / f
    out = np.where(wl > low_wl, f / factor, f)
    with np.errstate(divide="ignore", invalid="ignore"):
        smooth = (old / wl - low) / (high - low)
        smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wl < high_wl) & ~(wl > low_wl)
    return np.where(medium, smoothed, out)


def rope_pairs(x, ang):
    """apply_rotary_emb: x [heads, s, d] viewed as d/2 complex numbers (2i, 2i+1) times e^{i ang}."""
    if ROTATE_HALF[0]:  # sensitivity: the llama rotate-half pairs instead
        h = x.shape[-1] // 2
        c, s = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
        return x * c + np.concatenate([-x[..., h:], x[..., :h]], -1) * s
    z = x[..., 0::2] + 1j * x[..., 1::2]
    z = z * np.exp(1j * ang)[None]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


ROTATE_HALF = [False]


def attention(c, W, p, x, use_rope, chunked):
    s, H = x.shape
    nH, nKV, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    eps = c.get("rms_norm_eps", 1e-5)

    def proj(name, heads):
        y = x @ W[p + f"self_attn.{name}.weight"].T
        if c.get("attention_bias", False):
            y = y + W[p + f"self_attn.{name}.bias"]
        return y.reshape(s, heads, hd).transpose(1, 0, 2)

    q, k, v = proj("q_proj", nH), proj("k_proj", nKV), proj("v_proj", nKV)
    pos = np.arange(s, dtype=np.float64)
    if use_rope:
        ang = pos[:, None] * inv_freq(c)[None, :]
        q, k = rope_pairs(q, ang), rope_pairs(k, ang)
        if c.get("use_qk_norm", True):
            q = q / np.sqrt(np.mean(q * q, -1, keepdims=True) + eps)
            k = k / np.sqrt(np.mean(k * k, -1, keepdims=True) + eps)
    elif c.get("attn_temperature_tuning", True):
        scale = np.log1p(np.floor((pos + 1.0) / c.get("floor_scale", 8192))) * c.get("attn_scale", 0.1) + 1.0
        q = q * scale[None, :, None]
    i, j = np.arange(s)[:, None], np.arange(s)[None, :]
    visible = j <= i
    if chunked:
        C = c.get("attention_chunk_size", 8192)
        visible &= (j // C) == (i // C)
    y = softmax_attention(q, k, v, hd ** -0.5, visible) @ W[p + "self_attn.o_proj.weight"].T
    if c.get("attention_bias", False):
        y = y + W[p + "self_attn.o_proj.bias"]
    return y


def moe(c, W, p, x):
    E, k, I = c["num_local_experts"], c["num_experts_per_tok"], c["intermediate_size"]
    f = p + "feed_forward."
    logits = x @ W[f + "router.weight"].T
    scores = np.zeros_like(logits)
    ids, wts, margin = [], [], np.inf
    for t in range(x.shape[0]):
        top = np.argsort(-logits[t], kind="stable")
        margin = min(margin, logits[t, top[k - 1]] - logits[t, top[k]])
        sel = np.sort(top[:k])
        s = 1.0 / (1.0 + np.exp(-logits[t, sel]))
        if c.get("_softmax"):  # sensitivity: a softmax over the k instead of the sigmoid
            s = np.exp(logits[t, sel] - logits[t, sel].max())
            s = s / s.sum()
        scores[t, sel] = s
        ids.append(sel)
        wts.append(s)
    out = mlp(W, f + "shared_expert.", x)
    for e in range(E):
        if c.get("_score_on_output"):  # sensitivity: the score on the expert's output instead
            gu = x @ W[f + "experts.gate_up_proj"][e]
            out += scores[:, e:e + 1] * ((gu[:, I:] * silu(gu[:, :I])) @ W[f + "experts.down_proj"][e])
            continue
        routed_in = x * scores[:, e:e + 1]  # every token; 0 where e is not chosen
        gu = routed_in @ W[f + "experts.gate_up_proj"][e]  # [s, 2I]
        gate, up = gu[:, :I], gu[:, I:]
        out += (up * silu(gate)) @ W[f + "experts.down_proj"][e]
    return out, np.array(ids), np.array(wts), margin


def forward(c, W, tokens):
    eps = c.get("rms_norm_eps", 1e-5)
    rope, moe_layers, types = post_init(c)
    x = W["model.embed_tokens.weight"][tokens]
    layers, margin = [], np.inf
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        x = x + attention(c, W, p, rms_norm(x, W[p + "input_layernorm.weight"], eps), bool(rope[l]),
                          types[l] == "chunked_attention" and not c.get("_no_chunks"))
        h = rms_norm(x, W[p + "post_attention_layernorm.weight"], eps)
        if l in moe_layers:
            y, ids, wts, m = moe(c, W, p, h)
            margin = min(margin, m)
            layers.append({"layer": l, "topk_ids": ids.tolist(), "topk_weights": wts.tolist()})
        else:
            y = mlp(W, p + "feed_forward.", h)
        x = x + y
    head = W["model.embed_tokens.weight"] if c.get("tie_word_embeddings", False) else W["lm_head.weight"]
    return rms_norm(x, W["model.norm.weight"], eps) @ head.T, layers, margin


VARIANTS = (("llama4-no-qk-norm-no-tuning", {"use_qk_norm": False, "attn_temperature_tuning": False}),
            ("llama4-full-attention", {"layer_types": ["full_attention"] * 4}))


def sensitivity(c, W, tokens):
    base = forward(c, W, tokens)[0]
    print(f"tolerance 1e-4 x max |logit| = {1e-4 * np.abs(base).max():.2g}")
    for what, patch in (("no chunking", {"_no_chunks": True}), ("no q/k L2 norm", {"use_qk_norm": False}),
                        ("no temperature tuning", {"attn_temperature_tuning": False}),
                        ("no NoPE layer (RoPE everywhere)", {"no_rope_layers": [1, 1, 1, 1]}),
                        ("score on the expert output", {"_score_on_output": True}),
                        ("softmax over the k instead of sigmoid", {"_softmax": True}),
                        ("no llama3 scaling", {"rope_scaling": None})):
        print(f"{what}: {np.abs(forward(merge_patch(c, patch) if None in patch.values() else dict(c, **patch), W, tokens)[0] - base).max():.3g}")
    ROTATE_HALF[0] = True
    print(f"rotate-half RoPE instead of pairs: {np.abs(forward(c, W, tokens)[0] - base).max():.3g}")
    ROTATE_HALF[0] = False


def main():
    c = config()
    stored, W = make_weights(c)
    tokens = write_all(NAME, "llama4", c, stored, W, SEED + 1, VARIANTS, forward, "data/scripts/llama4_reference.py")
    if "--sensitivity" in sys.argv:
        sensitivity(c, W, tokens)


if __name__ == "__main__":
    main()
