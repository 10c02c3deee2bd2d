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
NumPy only (torch is not needed). The safetensors writer, bf16 rounding and the RMSNorm / SiLU-GLU
helpers are imported from deepseek_reference.py.

Builds data/glm4-moe-tiny: 3 decoder layers (layer 0 dense), hidden 64, 4 heads of head_dim 24
(so head_dim is read, not hidden/heads), 2 key/value heads, partial_rotary_factor 0.5 (rotary
width 12), attention_bias, use_qk_norm, 8 routed experts of width 16, top-3, n_group 4 /
topk_group 2, norm_topk_prob, routed_scaling_factor 1.5, 1 shared expert, and one
multi-token-prediction layer (model.layers.3: eh_proj, enorm, hnorm, shared_head.norm and a
full decoder layer with an MoE block), which the forward does not run (as Glm4MoeModel does not).
Goldens in float64 on the stored (bf16-rounded) weights:
  data/golden/glm4_moe.json            the fixture as stored
  data/golden/glm4_moe-nogroup.json    the same weights with n_group 1 / topk_group 1
  data/golden/glm4_moe-full-rotary.json  the same weights with partial_rotary_factor 1.0
each: the token sequence, the logits of one window [T, V/16] (ids 0, 16, 32, ...; 8 significant
digits), each position's argmax, and per MoE layer the chosen experts per token (sorted:
torch.topk with sorted=False gives no order) and their routing weights in that order.

Usage: /usr/bin/python3 data/scripts/glm4_moe_reference.py
"""
import json
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deepseek_reference import (DATA, EOT_ID, LOGIT_STEP, TOK_DIR, TOKENIZER_FILES, T, bf16_round,  # noqa: E402
                                mlp, rms_norm, rotate_half, write_safetensors)

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
    E, I, Id = c["n_routed_experts"], c["moe_intermediate_size"], c["intermediate_size"]
    W = {}  # name -> (float32 array, dtype)

    def mat(name, shape, std):
        W[name] = (std * rng.standard_normal(shape), "BF16")

    def norm(name, n):
        W[name] = (1.0 + 0.1 * rng.standard_normal(n), "BF16")

    def moe_block(p):
        mat(p + "mlp.gate.weight", (E, H), 0.3)
        # small, so that choice scores stay positive (masked groups score 0.0 in transformers)
        W[p + "mlp.gate.e_score_correction_bias"] = (0.05 * rng.standard_normal(E), "F32")
        for e in range(E):
            q = p + f"mlp.experts.{e}."
            mat(q + "gate_proj.weight", (I, H), 0.1)
            mat(q + "up_proj.weight", (I, H), 0.1)
            mat(q + "down_proj.weight", (H, I), 0.1)
        S = I * c["n_shared_experts"]
        mat(p + "mlp.shared_experts.gate_proj.weight", (S, H), 0.1)
        mat(p + "mlp.shared_experts.up_proj.weight", (S, H), 0.1)
        mat(p + "mlp.shared_experts.down_proj.weight", (H, S), 0.1)

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
    stored, values = {}, {}
    for name, (a, dt) in W.items():
        a = a.astype(np.float32)
        if dt == "BF16":
            bits, v = bf16_round(a)
            stored[name] = ("BF16", bits)
            values[name] = v.astype(np.float64)
        else:
            stored[name] = ("F32", a)
            values[name] = a.astype(np.float64)
    return stored, values


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


def route(c, W, p, x):
    """Glm4MoeMoE.route_tokens_to_experts: ids [s, k] (sorted), weights in that order, and the
    smallest margin of a choice (group or expert) over the first one left out."""
    E, G, kg, k = c["n_routed_experts"], c["n_group"], c["topk_group"], c["num_experts_per_tok"]
    scores = 1.0 / (1.0 + np.exp(-(x @ W[p + "mlp.gate.weight"].T)))
    choice = scores + W[p + "mlp.gate.e_score_correction_bias"][None, :]
    ids, wts, margin = [], [], np.inf
    for t in range(x.shape[0]):
        gs = np.sort(choice[t].reshape(G, E // G), axis=-1)[:, ::-1][:, :2].sum(-1)
        order = np.argsort(-gs, kind="stable")
        if kg < G:
            margin = min(margin, gs[order[kg - 1]] - gs[order[kg]])
        mask = np.zeros(G, bool)
        mask[order[:kg]] = True
        masked = np.where(np.repeat(mask, E // G), choice[t], 0.0)
        top = np.argsort(-masked, kind="stable")
        margin = min(margin, masked[top[k - 1]] - masked[top[k]])
        assert masked[top[k - 1]] > 0, "a masked (0.0) expert would be chosen: change the seed"
        sel = np.sort(top[:k])
        w = scores[t, sel]
        if c["norm_topk_prob"]:
            w = w / (w.sum() + 1e-20)
        ids.append(sel)
        wts.append(w * c["routed_scaling_factor"])
    return np.array(ids), np.array(wts), margin


def moe(c, W, p, x):
    ids, wts, margin = route(c, W, p, x)
    out = np.zeros_like(x)
    for e in range(c["n_routed_experts"]):
        rows, slot = np.nonzero(ids == e)
        if rows.size:
            out[rows] += mlp(W, p + f"mlp.experts.{e}.", x[rows]) * wts[rows, slot][:, None]
    return out + mlp(W, p + "mlp.shared_experts.", x), ids, wts, margin


def forward(c, W, tokens):
    x = W["model.embed_tokens.weight"][tokens]
    eps = c["rms_norm_eps"]
    layers, margin = [], np.inf
    for l in range(c["num_hidden_layers"]):  # the MTP layer is not run (Glm4MoeModel.forward)
        p = f"model.layers.{l}."
        x = x + attention(c, W, p, rms_norm(x, W[p + "input_layernorm.weight"], eps))
        h = rms_norm(x, W[p + "post_attention_layernorm.weight"], eps)
        if l < c["first_k_dense_replace"]:
            x = x + mlp(W, p + "mlp.", h)
        else:
            y, ids, wts, m = moe(c, W, p, h)
            x = x + y
            margin = min(margin, m)
            layers.append({"layer": l, "topk_ids": ids.tolist(), "topk_weights": wts.tolist()})
    logits = rms_norm(x, W["model.norm.weight"], eps) @ W["lm_head.weight"].T
    return logits, layers, margin


# Goldens of the same weights under another config (the C++ test applies config_patch to a copy).
VARIANTS = (("glm4_moe-nogroup", {"n_group": 1, "topk_group": 1}),
            ("glm4_moe-full-rotary", {"partial_rotary_factor": 1.0}))


def write_golden(name, c, W, tokens, patch):
    logits, layers, margin = forward(c, W, tokens)
    # float32 in moe-tool vs float64 here: a choice closer than this could flip.
    assert margin > 1e-4, f"{name}: routing margin {margin} too small, change the seed"

    def r8(a):
        return [[float("%.8g" % v) for v in row] for row in a]

    for L in layers:
        L["topk_weights"] = r8(L["topk_weights"])
    golden = {"model": f"data/{NAME}", "config_patch": patch, "script": "data/scripts/glm4_moe_reference.py",
              "tokens": tokens.tolist(), "T": T, "min_routing_margin": margin,
              "logits_abs_max": float(np.abs(logits).max()),
              "logit_ids_step": LOGIT_STEP, "logits": r8(logits[:, ::LOGIT_STEP]),
              "argmax": logits.argmax(-1).tolist(), "moe_layers": layers}
    with open(os.path.join(DATA, "golden", name + ".json"), "w") as f:
        json.dump(golden, f)
        f.write("\n")
    print(f"{name}: logits |max| {np.abs(logits).max():.4f}, routing margin {margin:.2e}")


def main():
    c = config()
    stored, W = make_weights(c)
    out = os.path.join(DATA, NAME)
    os.makedirs(out, exist_ok=True)
    write_safetensors(os.path.join(out, "model.safetensors"), stored)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
        f.write("\n")
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": EOT_ID, "eos_token_id": EOT_ID}, f, indent=2)
        f.write("\n")
    for fn in TOKENIZER_FILES:
        shutil.copyfile(os.path.join(TOK_DIR, fn), os.path.join(out, fn))
    tokens = np.random.default_rng(SEED + 1).integers(0, c["vocab_size"], T)
    write_golden("glm4_moe", c, W, tokens, {})
    for name, patch in VARIANTS:
        write_golden(name, dict(c, **patch), W, tokens, patch)
    print(f"{NAME}: {os.path.getsize(os.path.join(out, 'model.safetensors'))} bytes")


if __name__ == "__main__":
    main()
