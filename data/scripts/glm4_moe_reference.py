#!/usr/bin/python3
"""Independent NumPy reference of the glm4_moe (GLM-4.5 / 4.6) forward, written from
transformers' modeling_glm4_moe.py and configuration_glm4_moe.py: Glm4MoeRotaryEmbedding
(compute_default_rope_parameters: dim = int(head_dim * partial_rotary_factor)),
apply_rotary_pos_emb (rotate-half on the first rotary_dim elements of each head, the rest passed
through), Glm4MoeAttention (q/k/v biases iff attention_bias, o_proj without one, per-head
q_norm/k_norm iff use_qk_norm, applied before RoPE, GQA via repeat_kv, scaling head_dim**-0.5),
Glm4MoeTopkRouter + Glm4MoeMoE.route_tokens_to_experts (sigmoid, e_score_correction_bias for the
choice only, group scores = sum of each group's top-2, topk_group groups kept, masked scores 0.0,
top-k, weights = the sigmoid scores, renormalised iff norm_topk_prob (+1e-20), x
routed_scaling_factor), shared experts (width moe_intermediate_size x n_shared_experts) added to
the routed output, Glm4MoeDecoderLayer (dense Glm4MoeMLP for layer_idx < first_k_dense_replace).
NumPy only (torch is not needed). The fixture and golden writers, bf16 storage and the RMSNorm /
SiLU-GLU helpers are imported from deepseek_reference.py, and so are its route_v3 and moe: transformers'
modular_glm4_moe.py builds Glm4MoeTopkRouter and the MoE block from DeepseekV3TopkRouter and
DeepseekV3MoE (the same rule over the same config keys and tensor names).

Builds data/glm4-moe-tiny: 3 decoder layers (layer 0 dense), hidden 64, 4 heads of head_dim 24
(so head_dim is read, not hidden/heads), 2 key/value heads, partial_rotary_factor 0.5 (rotary
width 12), attention_bias, use_qk_norm, 8 routed experts of width 16, top-3, n_group 4 /
topk_group 2, norm_topk_prob, routed_scaling_factor 1.5, 1 shared expert, and one
multi-token-prediction layer (model.layers.3: eh_proj, enorm, hnorm, shared_head.norm and a
full decoder layer with an MoE block), which Glm4MoeModel does not run; mtp() runs it as vLLM's
glm4_moe_mtp.py does for speculative decoding (see there).
Goldens in float64 on the stored (bf16-rounded) weights:
  data/golden/glm4_moe.json            the fixture as stored
  data/golden/glm4_moe-nogroup.json    the same weights with n_group 1 / topk_group 1
  data/golden/glm4_moe-full-rotary.json  the same weights with partial_rotary_factor 1.0
  data/golden/glm4_moe-no-qk-norm.json   the same weights with use_qk_norm false (norms unused)
each: the token sequence, the logits of one window [T, V/16] (ids 0, 16, 32, ...; 8 significant
digits), each position's argmax, and per MoE layer the chosen experts per token (sorted:
torch.topk with sorted=False gives no order) and their routing weights in that order.
  data/golden/glm4_moe-mtp.json        the multi-token-prediction layer on the same window (mtp()):
the MTP logits [T-1, V/16], their argmax, and the MTP layer's choices (layer 3) per position.

Usage: /usr/bin/python3 data/scripts/glm4_moe_reference.py [--sensitivity]
  --sensitivity also prints how far the logits move when one feature is computed another way.
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deepseek_reference import (DATA, EOT_ID, LOGIT_STEP, T, drawers, moe, moe_block_weights, rms_norm,  # noqa: E402
                                rotate_half, route_v3, store, write_fixture, write_golden)
from deepseek_reference import forward as ds_forward  # noqa: E402

NAME = "glm4-moe-tiny"
SEED = 4004


def config():
    return {
        "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe",
        "attention_bias": True, "attention_dropout": 0.0,
        "bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": EOT_ID,
        "head_dim": 24, "hidden_act": "silu", "hidden_size": 64, "intermediate_size": 64,
        "initializer_range": 0.02, "max_position_embeddings": 256,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3,
        "partial_rotary_factor": 0.5, "use_qk_norm": True,
        "first_k_dense_replace": 1, "n_routed_experts": 8, "n_shared_experts": 1,
        "moe_intermediate_size": 16, "num_experts_per_tok": 3, "n_group": 4, "topk_group": 2,
        "norm_topk_prob": True, "routed_scaling_factor": 1.5, "num_nextn_predict_layers": 1,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 4096,
    }


def make_weights(c):
    rng = np.random.default_rng(SEED)
    H, V, hd = c["hidden_size"], c["vocab_size"], c["head_dim"]
    nH, nKV = c["num_attention_heads"], c["num_key_value_heads"]
    Id = c["intermediate_size"]
    W = {}  # name -> (float32 array, dtype)
    mat, norm = drawers(rng, W)

    def moe_block(p):
        moe_block_weights(c, W, rng, mat, p, bias=True)

    def attention_weights(p):
        norm(p + "input_layernorm.weight", H)
        norm(p + "post_attention_layernorm.weight", H)
        mat(p + "self_attn.q_proj.weight", (nH * hd, H), 0.2)
        mat(p + "self_attn.k_proj.weight", (nKV * hd, H), 0.2)
        mat(p + "self_attn.v_proj.weight", (nKV * hd, H), 0.2)
        mat(p + "self_attn.q_proj.bias", (nH * hd,), 0.1)
        mat(p + "self_attn.k_proj.bias", (nKV * hd,), 0.1)
        mat(p + "self_attn.v_proj.bias", (nKV * hd,), 0.1)
        norm(p + "self_attn.q_norm.weight", hd)
        norm(p + "self_attn.k_norm.weight", hd)
        mat(p + "self_attn.o_proj.weight", (H, nH * hd), 0.1)

    mat("model.embed_tokens.weight", (V, H), 0.5)
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        attention_weights(p)
        if l < c["first_k_dense_replace"]:
            mat(p + "mlp.gate_proj.weight", (Id, H), 0.1)
            mat(p + "mlp.up_proj.weight", (Id, H), 0.1)
            mat(p + "mlp.down_proj.weight", (H, Id), 0.1)
        else:
            moe_block(p)
    # The multi-token-prediction layer as GLM-4.5 checkpoints store it after the decoder layers.
    p = f"model.layers.{c['num_hidden_layers']}."
    mat(p + "eh_proj.weight", (H, 2 * H), 0.1)
    norm(p + "enorm.weight", H)
    norm(p + "hnorm.weight", H)
    norm(p + "shared_head.norm.weight", H)
    attention_weights(p)
    moe_block(p)
    norm("model.norm.weight", H)
    mat("lm_head.weight", (V, H), 0.1)
    return store(W)


# ----------------------------------------------------------------------------- the forward

def rope_cos_sin(c, s):
    """Glm4MoeRotaryEmbedding: inv_freq over dim = int(head_dim * partial_rotary_factor)."""
    dim = int(c["head_dim"] * c.get("partial_rotary_factor", 0.5))
    inv_freq = 1.0 / (c["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    freqs = np.arange(s, dtype=np.float64)[:, None] * inv_freq[None, :]
    emb = np.concatenate((freqs, freqs), axis=-1)
    return np.cos(emb), np.sin(emb)


def apply_rotary_pos_emb(x, cos, sin):
    """x [heads, s, head_dim]: rotate-half on the first rotary_dim = cos.shape[-1] elements."""
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    return np.concatenate((x_rot * cos + rotate_half(x_rot) * sin, x_pass), axis=-1)


def attention(c, W, p, x):
    s, hd = x.shape[0], c["head_dim"]
    nH, nKV, eps = c["num_attention_heads"], c["num_key_value_heads"], c["rms_norm_eps"]

    def proj(name, heads):
        y = x @ W[p + f"self_attn.{name}.weight"].T
        if c["attention_bias"]:
            y = y + W[p + f"self_attn.{name}.bias"]
        return y.reshape(s, heads, hd)

    q, k, v = proj("q_proj", nH), proj("k_proj", nKV), proj("v_proj", nKV)
    if c["use_qk_norm"]:
        q = rms_norm(q, W[p + "self_attn.q_norm.weight"], eps)
        k = rms_norm(k, W[p + "self_attn.k_norm.weight"], eps)
    q, k, v = q.transpose(1, 0, 2), k.transpose(1, 0, 2), v.transpose(1, 0, 2)  # [heads, s, hd]
    cos, sin = rope_cos_sin(c, s)
    q, k = apply_rotary_pos_emb(q, cos, sin), apply_rotary_pos_emb(k, cos, sin)
    rep = nH // nKV
    k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)  # repeat_kv
    scores = q @ k.transpose(0, 2, 1) * hd ** -0.5
    scores = scores + np.triu(np.full((s, s), -np.inf), 1)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    probs = scores / scores.sum(-1, keepdims=True)
    out = (probs @ v).transpose(1, 0, 2).reshape(s, nH * hd)
    return out @ W[p + "self_attn.o_proj.weight"].T


def forward(c, W, tokens, hidden=False):
    """Glm4MoeModel + lm_head: the decoder layers (not the MTP layer, as Glm4MoeModel.forward runs
    num_hidden_layers only) with Glm4MoeAttention and the DeepSeek-V3 rule; Glm4MoeDecoderLayer
    has DeepseekV3DecoderLayer's structure, so deepseek_reference's layer loop runs them."""
    return ds_forward(c, W, tokens, attention, route_v3, hidden)


def mtp(c, W, tokens, variant=""):
    """The multi-token-prediction layer as vLLM runs it for speculative decoding, written from
    vllm/model_executor/models/glm4_moe_mtp.py (Glm4MoeMultiTokenPredictorLayer.forward,
    compute_logits) and vllm/v1/spec_decode/eagle.py (EagleProposer.propose, load_model):
    - the previous hidden states are the target model's output, Glm4MoeModel's last hidden states
      after the final norm (what lm_head reads);
    - the input ids are shifted by one (position i gets token t_{i+1}, at position i); the last
      position's token is the one the target model samples, unknown here, so the MTP sequence is
      the window's first T-1 positions (causal: the others do not see it);
    - the embeddings are the target model's embed_tokens (load_model shares them with an MTP draft),
      zeroed at position 0 (inputs_embeds[positions == 0] = 0);
    - eh_proj(cat([enorm(embeds), hnorm(hidden)])), then the decoder block (Glm4MoeDecoderLayer,
      its residual added: hidden_states = residual + hidden_states);
    - logits: shared_head.head(shared_head.norm(x)); this fixture stores no shared_head.head (it
      would pass 1.5 MB), the released checkpoints' equals lm_head, so lm_head is read when absent.
    Returns the MTP logits [T-1, V], the MTP layer's choices and routing margin. `variant` computes
    one feature another way (--sensitivity): "unnormed" hidden states before the final norm,
    "unmasked" position 0, "swapped" concatenation order, "unshifted" tokens."""
    eps = c["rms_norm_eps"]
    p = f"model.layers.{c['num_hidden_layers']}."
    normed, unnormed = forward(c, W, tokens, hidden=True)[3:]
    h = unnormed if variant == "unnormed" else normed
    emb = W["model.embed_tokens.weight"][tokens[1:] if variant != "unshifted" else tokens[:-1]].copy()
    if variant != "unmasked":
        emb[0] = 0.0
    e, hn = rms_norm(emb, W[p + "enorm.weight"], eps), rms_norm(h[:-1], W[p + "hnorm.weight"], eps)
    x = np.concatenate((e, hn) if variant != "swapped" else (hn, e), axis=-1)
    x = x @ W[p + "eh_proj.weight"].T
    x = x + attention(c, W, p, rms_norm(x, W[p + "input_layernorm.weight"], eps))
    y, ids, wts, margin = moe(c, W, p, rms_norm(x, W[p + "post_attention_layernorm.weight"], eps), route_v3)
    x = x + y
    head = W.get(p + "shared_head.head.weight", W["lm_head.weight"])
    logits = rms_norm(x, W[p + "shared_head.norm.weight"], eps) @ head.T
    return logits, [{"layer": c["num_hidden_layers"], "topk_ids": ids.tolist(), "topk_weights": wts.tolist()}], margin


def write_mtp_golden(c, W, tokens, script):
    """data/golden/glm4_moe-mtp.json (mtp() on the golden's window)."""
    logits, layers, margin = mtp(c, W, tokens)
    assert margin > 1e-4, f"glm4_moe-mtp: routing margin {margin} too small"

    def r8(a):
        return [[float("%.8g" % v) for v in row] for row in a]

    layers[0]["topk_weights"] = r8(layers[0]["topk_weights"])
    golden = {"model": f"data/{NAME}", "config_patch": {}, "script": script, "tokens": tokens.tolist(), "T": T,
              "mtp_positions": T - 1, "min_routing_margin": margin, "logits_abs_max": float(np.abs(logits).max()),
              "logit_ids_step": LOGIT_STEP, "logits": r8(logits[:, ::LOGIT_STEP]), "argmax": logits.argmax(-1).tolist(),
              "moe_layers": layers}
    with open(os.path.join(DATA, "golden", "glm4_moe-mtp.json"), "w") as f:
        json.dump(golden, f)
        f.write("\n")
    print(f"glm4_moe-mtp: logits |max| {np.abs(logits).max():.4f}, routing margin {margin:.2e}")


# Goldens of the same weights under another config (the C++ test applies config_patch to a copy).
# With use_qk_norm false transformers builds no q_norm/k_norm, so the stored ones go unused.
VARIANTS = (("glm4_moe-nogroup", {"n_group": 1, "topk_group": 1}),
            ("glm4_moe-full-rotary", {"partial_rotary_factor": 1.0}),
            ("glm4_moe-no-qk-norm", {"use_qk_norm": False}))


def sensitivity(c, W, tokens):
    """max |logit change| (in this reference) when one feature is computed another way, against
    the C++ test's tolerance: what the goldens can tell apart."""
    base = forward(c, W, tokens)[0]
    print(f"tolerance 1e-4 x max |logit| = {1e-4 * np.abs(base).max():.2g}")
    for what, patch in (("whole head rotated", {"partial_rotary_factor": 1.0}), ("no q/k norms", {"use_qk_norm": False}),
                        ("no q/k/v biases", {"attention_bias": False}), ("no groups", {"n_group": 1, "topk_group": 1}),
                        ("no renormalisation", {"norm_topk_prob": False})):
        print(f"{what}: {np.abs(forward(dict(c, **patch), W, tokens)[0] - base).max():.3g}")

    def interleaved(x, cos, sin):  # pairs (2i, 2i+1) instead of rotate-half (not glm4_moe's)
        rd = cos.shape[-1]
        *lead, s, d = x[..., :rd].shape
        xr = x[..., :rd].reshape(*lead, s, d // 2, 2).swapaxes(-1, -2).reshape(*lead, s, d)
        return np.concatenate((xr * cos + rotate_half(xr) * sin, x[..., rd:]), axis=-1)

    global apply_rotary_pos_emb
    kept, apply_rotary_pos_emb = apply_rotary_pos_emb, interleaved
    print(f"interleaved RoPE pairs: {np.abs(forward(c, W, tokens)[0] - base).max():.3g}")
    apply_rotary_pos_emb = kept
    base = mtp(c, W, tokens)[0]
    print(f"MTP: tolerance 1e-4 x max |logit| = {1e-4 * np.abs(base).max():.2g}")
    for what, variant in (("hidden states before the final norm", "unnormed"), ("position 0 not masked", "unmasked"),
                          ("[hnorm(h), enorm(e)] order", "swapped"), ("tokens not shifted", "unshifted")):
        print(f"MTP, {what}: {np.abs(mtp(c, W, tokens, variant)[0] - base).max():.3g}")


def main():
    c = config()
    stored, W = make_weights(c)
    out = write_fixture(NAME, c, stored)
    tokens = np.random.default_rng(SEED + 1).integers(0, c["vocab_size"], T)
    script = "data/scripts/glm4_moe_reference.py"
    write_golden(NAME, "glm4_moe", c, W, tokens, {}, forward, script)
    for name, patch in VARIANTS:
        write_golden(NAME, name, dict(c, **patch), W, tokens, patch, forward, script)
    write_mtp_golden(c, W, tokens, script)
    print(f"{NAME}: {os.path.getsize(os.path.join(out, 'model.safetensors'))} bytes")
    if "--sensitivity" in sys.argv:
        sensitivity(c, W, tokens)


if __name__ == "__main__":
    main()
