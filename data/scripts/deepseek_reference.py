#!/usr/bin/python3
"""Independent NumPy reference of the DeepSeek-V2 / DeepSeek-V3 forward, written from
transformers' modeling_deepseek_v3.py (DeepseekV3Attention, DeepseekV3TopkRouter, DeepseekV3MoE,
DeepseekV3RotaryEmbedding with apply_rotary_pos_emb_interleave), modeling_deepseek_v2.py
(DeepseekV2Attention with its complex apply_rotary_emb, DeepseekV2Moe.route_tokens_to_experts)
and modeling_rope_utils.py (_compute_yarn_parameters). NumPy only (torch is not needed).

Builds two tiny random checkpoints with the real config keys and tensor names and writes them,
with goldens computed in float64 on the stored (bf16-rounded) weights:

  data/deepseek-v3-tiny/   deepseek_v3: q_lora_rank 32 (q_a_proj -> q_a_layernorm -> q_b_proj),
                           yarn rope_scaling (factor 4, mscale 0.9, mscale_all_dim 0.8), sigmoid
                           routing with e_score_correction_bias, n_group 4 / topk_group 2,
                           norm_topk_prob, routed_scaling_factor 2.5, rope_interleave (default).
  data/deepseek-v2-tiny/   deepseek_v2: q_lora_rank null (q_proj), default RoPE, softmax routing
                           group_limited_greedy (n_group 4 / topk_group 2), routed_scaling_factor 1.5.
  Both: 3 layers, first_k_dense_replace 1 (layer 0 dense), 8 routed experts, top-3, 1 shared
  expert, hidden 64, 4 heads, kv_lora_rank 32, qk_nope 16, qk_rope 16, v_head_dim 16.
  data/golden/deepseek-v3-tiny.json, data/golden/deepseek-v2-tiny.json: the token sequence, the
  logits of one window [T, V/16] (ids 0, 16, 32, ...; 8 significant digits), each position's argmax, and per MoE layer the chosen experts per token (sorted: torch.topk
  with sorted=False gives no order) and their routing weights in that order.

Usage: /usr/bin/python3 data/scripts/deepseek_reference.py
"""
import json
import math
import os
import shutil
import struct

import numpy as np

DATA = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK_DIR = os.path.join(DATA, "tokenizer")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
EOT_ID = 4095
T = 24  # window length of the golden
LOGIT_STEP = 16  # the golden keeps the logits of ids 0, 16, 32, ... (and every position's argmax)


# ----------------------------------------------------------------------------- configs

def config(v3):
    c = {
        "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v3" if v3 else "deepseek_v2",
        "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": EOT_ID, "eos_token_id": EOT_ID,
        "hidden_act": "silu", "hidden_size": 64, "intermediate_size": 96,
        "initializer_range": 0.02, "max_position_embeddings": 256,
        "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 3,
        "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "n_routed_experts": 8, "n_shared_experts": 1, "moe_intermediate_size": 32,
        "num_experts_per_tok": 3, "n_group": 4, "topk_group": 2,
        "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 4096,
    }
    if v3:
        c.update({"q_lora_rank": 32, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
                  "norm_topk_prob": True, "routed_scaling_factor": 2.5,
                  "num_nextn_predict_layers": 0,
                  "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                   "beta_fast": 32, "beta_slow": 1, "mscale": 0.9, "mscale_all_dim": 0.8}})
    else:
        c.update({"q_lora_rank": None, "topk_method": "group_limited_greedy", "scoring_func": "softmax",
                  "norm_topk_prob": False, "routed_scaling_factor": 1.5, "rope_scaling": None})
    return c


# ----------------------------------------------------------------------------- weights

def bf16_round(x):
    """float32 -> bf16 bits (round to nearest even) and the value they hold."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = ((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    return r, (r.astype(np.uint32) << np.uint32(16)).view(np.float32)


def drawers(rng, W):
    """mat(name, shape, std): a normal matrix; norm(name, n): a norm weight near 1; both drawn
    from rng into W as BF16."""
    def mat(name, shape, std):
        W[name] = (std * rng.standard_normal(shape), "BF16")

    def norm(name, n):
        W[name] = (1.0 + 0.1 * rng.standard_normal(n), "BF16")

    return mat, norm


def make_weights(c, seed):
    rng = np.random.default_rng(seed)
    H, nH, V = c["hidden_size"], c["num_attention_heads"], c["vocab_size"]
    dn, dr, dv, r = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    Id = c["intermediate_size"]
    W = {}  # name -> (float32 array, dtype)
    mat, norm = drawers(rng, W)

    mat("model.embed_tokens.weight", (V, H), 0.5)
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        norm(p + "input_layernorm.weight", H)
        norm(p + "post_attention_layernorm.weight", H)
        if c["q_lora_rank"] is None:
            mat(p + "self_attn.q_proj.weight", (nH * (dn + dr), H), 0.2)
        else:
            mat(p + "self_attn.q_a_proj.weight", (c["q_lora_rank"], H), 0.2)
            norm(p + "self_attn.q_a_layernorm.weight", c["q_lora_rank"])
            mat(p + "self_attn.q_b_proj.weight", (nH * (dn + dr), c["q_lora_rank"]), 0.2)
        mat(p + "self_attn.kv_a_proj_with_mqa.weight", (r + dr, H), 0.2)
        norm(p + "self_attn.kv_a_layernorm.weight", r)
        mat(p + "self_attn.kv_b_proj.weight", (nH * (dn + dv), r), 0.2)
        mat(p + "self_attn.o_proj.weight", (H, nH * dv), 0.1)
        if l < c["first_k_dense_replace"]:
            mlp_weights(mat, p + "mlp.", H, Id)
            continue
        moe_block_weights(c, W, rng, mat, p, c["model_type"] == "deepseek_v3")
    norm("model.norm.weight", H)
    mat("lm_head.weight", (V, H), 0.1)
    return store(W)


def moe_block_weights(c, W, rng, mat, p, bias):
    """Layer prefix p's MoE block: router, (bias: e_score_correction_bias F32), routed experts,
    shared experts; `mat(name, shape, std)` draws a BF16 matrix from rng into W."""
    H, E, I = c["hidden_size"], c["n_routed_experts"], c["moe_intermediate_size"]
    mat(p + "mlp.gate.weight", (E, H), 0.3)
    if bias:
        # small, so that choice scores stay positive (masked groups score 0.0 in transformers)
        W[p + "mlp.gate.e_score_correction_bias"] = (0.05 * rng.standard_normal(E), "F32")
    experts_weights(mat, p, H, E, I, I * c["n_shared_experts"])


def mlp_weights(mat, p, H, I):
    """An MLP under prefix p: gate_proj and up_proj [I, H], down_proj [H, I], std 0.1, drawn in this order."""
    mat(p + "gate_proj.weight", (I, H), 0.1)
    mat(p + "up_proj.weight", (I, H), 0.1)
    mat(p + "down_proj.weight", (H, I), 0.1)


def experts_weights(mat, p, H, E, I, S):
    """Layer prefix p's routed experts mlp.experts.{e}. (E of width I), then the shared experts
    mlp.shared_experts. of width S (mlp_weights each)."""
    for e in range(E):
        mlp_weights(mat, p + f"mlp.experts.{e}.", H, I)
    mlp_weights(mat, p + "mlp.shared_experts.", H, S)


def store(W):
    """{name: (float array, "BF16" | "F32")} -> (stored {name: (dtype, array)}, values {name:
    float64 of what is stored})."""
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


def write_safetensors(path, stored):
    header, blobs, off = {}, [], 0
    for name in stored:
        dt, a = stored[name]
        b = a.tobytes()
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


# ----------------------------------------------------------------------------- the forward

def rms_norm(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def silu(x):
    return x / (1.0 + np.exp(-x))


def mlp(W, p, x):
    return (silu(x @ W[p + "gate_proj.weight"].T) * (x @ W[p + "up_proj.weight"].T)) @ W[p + "down_proj.weight"].T


def get_mscale(scale, mscale=1.0):
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_parameters(c):
    """inv_freq [dim/2] and attention_factor (modeling_rope_utils: default and yarn)."""
    base, dim = c["rope_theta"], c["qk_rope_head_dim"]  # DeepseekV3Config.head_dim = qk_rope_head_dim
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    rs = c.get("rope_scaling")
    if rs is None:
        return 1.0 / pos_freqs, 1.0
    assert rs.get("rope_type", rs.get("type")) == "yarn"
    factor = rs["factor"]
    if "original_max_position_embeddings" in rs:
        orig = rs["original_max_position_embeddings"]
        factor = c["max_position_embeddings"] / orig
    else:
        orig = c["max_position_embeddings"]
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = math.floor(correction_dim(beta_fast)), math.ceil(correction_dim(beta_slow))
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_factor) + (1.0 / pos_freqs) * extrapolation_factor
    return inv_freq, attention_factor


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate((-x[..., h:], x[..., :h]), axis=-1)


def rope_v3_interleave(x, cos, sin):
    """apply_rotary_pos_emb_interleave on x [..., s, d]: (d/2, 2) -> (2, d/2) then rotate-half."""
    *lead, s, d = x.shape
    x = x.reshape(*lead, s, d // 2, 2).swapaxes(-1, -2).reshape(*lead, s, d)
    return x * cos + rotate_half(x) * sin


def rope_v2_complex(x, freqs_cis):
    """apply_rotary_emb: pairs as complex numbers times freqs_cis [s, d/2]."""
    *lead, s, d = x.shape
    xc = x.reshape(*lead, s, d // 2, 2)
    z = (xc[..., 0] + 1j * xc[..., 1]) * freqs_cis
    return np.stack((z.real, z.imag), axis=-1).reshape(*lead, s, d)


def attention(c, W, p, x):
    s = x.shape[0]
    nH, dn, dr, dv, r = (c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"],
                         c["kv_lora_rank"])
    dqk = dn + dr
    if c["q_lora_rank"] is None:
        q = x @ W[p + "self_attn.q_proj.weight"].T
    else:
        qa = x @ W[p + "self_attn.q_a_proj.weight"].T
        q = rms_norm(qa, W[p + "self_attn.q_a_layernorm.weight"], 1e-6) @ W[p + "self_attn.q_b_proj.weight"].T
    q = q.reshape(s, nH, dqk).transpose(1, 0, 2)  # [nH, s, dqk]
    q_pass, q_rot = q[..., :dn], q[..., dn:]
    ckv = x @ W[p + "self_attn.kv_a_proj_with_mqa.weight"].T
    k_pass, k_rot = ckv[:, :r], ckv[:, r:]
    kv = rms_norm(k_pass, W[p + "self_attn.kv_a_layernorm.weight"], 1e-6) @ W[p + "self_attn.kv_b_proj.weight"].T
    kv = kv.reshape(s, nH, dn + dv).transpose(1, 0, 2)
    k_pass, value = kv[..., :dn], kv[..., dn:]
    k_rot = k_rot.reshape(1, s, dr)

    inv_freq, af = rope_parameters(c)
    freqs = np.arange(s, dtype=np.float64)[:, None] * inv_freq[None, :]  # [s, dr/2]
    if c["model_type"] == "deepseek_v3":
        emb = np.concatenate((freqs, freqs), axis=-1)
        cos, sin = np.cos(emb) * af, np.sin(emb) * af
        if c.get("rope_interleave", True):
            q_rot, k_rot = rope_v3_interleave(q_rot, cos, sin), rope_v3_interleave(k_rot, cos, sin)
        else:  # apply_rotary_pos_emb
            q_rot, k_rot = q_rot * cos + rotate_half(q_rot) * sin, k_rot * cos + rotate_half(k_rot) * sin
    else:
        freqs_cis = np.exp(1j * freqs) * af
        q_rot, k_rot = rope_v2_complex(q_rot, freqs_cis), rope_v2_complex(k_rot, freqs_cis)
    k_rot = np.broadcast_to(k_rot, (nH, s, dr))
    query = np.concatenate((q_pass, q_rot), axis=-1)
    key = np.concatenate((k_pass, k_rot), axis=-1)

    scaling = dqk ** -0.5
    rs = c.get("rope_scaling")
    if c["model_type"] == "deepseek_v3" and rs is not None:  # DeepseekV3Attention.__init__
        mscale_all_dim = rs.get("mscale_all_dim", 0)
        if mscale_all_dim:
            m = get_mscale(rs["factor"], mscale_all_dim)
            scaling = scaling * m * m
    scores = query @ key.transpose(0, 2, 1) * scaling
    scores = scores + np.triu(np.full((s, s), -np.inf), 1)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    probs = scores / scores.sum(-1, keepdims=True)
    out = (probs @ value).transpose(1, 0, 2).reshape(s, nH * dv)
    return out @ W[p + "self_attn.o_proj.weight"].T


def topk_set(scores, k):
    idx = np.argsort(-scores, kind="stable")[:k]
    return idx


def route_v3(c, W, p, x):
    """DeepseekV3TopkRouter.forward: ids [s, k] (sorted), weights in that order, choice margin."""
    E, G, kg, k = c["n_routed_experts"], c["n_group"], c["topk_group"], c["num_experts_per_tok"]
    scores = 1.0 / (1.0 + np.exp(-(x @ W[p + "mlp.gate.weight"].T)))
    choice = scores + W[p + "mlp.gate.e_score_correction_bias"][None, :]
    ids, wts, margin = [], [], np.inf
    for t in range(x.shape[0]):
        g = choice[t].reshape(G, E // G)
        gs = np.sort(g, axis=-1)[:, ::-1][:, :2].sum(-1)
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


def route_v2(c, W, p, x):
    """DeepseekV2Moe.route_tokens_to_experts (greedy / group_limited_greedy)."""
    E, G, kg, k = c["n_routed_experts"], c["n_group"], c["topk_group"], c["num_experts_per_tok"]
    logits = x @ W[p + "mlp.gate.weight"].T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ids, wts, margin = [], [], np.inf
    for t in range(x.shape[0]):
        sc = probs[t]
        if c["topk_method"] == "group_limited_greedy":
            gs = sc.reshape(G, E // G).max(-1)
            order = np.argsort(-gs, kind="stable")
            margin = min(margin, gs[order[kg - 1]] - gs[order[kg]])
            mask = np.zeros(G, bool)
            mask[order[:kg]] = True
            sc = np.where(np.repeat(mask, E // G), sc, 0.0)
        top = np.argsort(-sc, kind="stable")
        margin = min(margin, sc[top[k - 1]] - sc[top[k]])
        sel = np.sort(top[:k])
        ids.append(sel)
        wts.append(sc[sel] * c["routed_scaling_factor"])
    return np.array(ids), np.array(wts), margin


def moe(c, W, p, x, route):
    ids, wts, margin = route(c, W, p + "", x)
    out = np.zeros_like(x)
    for e in range(c["n_routed_experts"]):
        rows, slot = np.nonzero(ids == e)
        if rows.size:
            out[rows] += mlp(W, p + f"mlp.experts.{e}.", x[rows]) * wts[rows, slot][:, None]
    return out + mlp(W, p + "mlp.shared_experts.", x), ids, wts, margin


def forward(c, W, tokens, attn=None, route=None, hidden=False):
    """The decoder: `attn` (default: MLA) and `route` (default: the model_type's) per layer;
    layers below first_k_dense_replace dense. Logits, each MoE layer's choices, the routing margin
    (and, with `hidden`, the last hidden states after the final norm, what lm_head reads, and before it)."""
    x = W["model.embed_tokens.weight"][tokens]
    eps = c["rms_norm_eps"]
    attn = attn or attention
    route = route or (route_v3 if c["model_type"] == "deepseek_v3" else route_v2)
    layers, margin = [], np.inf
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        x = x + attn(c, W, p, rms_norm(x, W[p + "input_layernorm.weight"], eps))
        h = rms_norm(x, W[p + "post_attention_layernorm.weight"], eps)
        if l < c["first_k_dense_replace"]:
            x = x + mlp(W, p + "mlp.", h)
        else:
            y, ids, wts, m = moe(c, W, p, h, route)
            x = x + y
            margin = min(margin, m)
            layers.append({"layer": l, "topk_ids": ids.tolist(), "topk_weights": wts.tolist()})
    xn = rms_norm(x, W["model.norm.weight"], eps)
    logits = xn @ W["lm_head.weight"].T
    return (logits, layers, margin, xn, x) if hidden else (logits, layers, margin)


# Goldens of the same weights under another config (the C++ test applies config_patch to a copy):
# v2's greedy top-k, v3's rotate-half RoPE (rope_interleave false).
VARIANTS = (("deepseek-v3-tiny", "deepseek-v3-tiny-rotate-half", {"rope_interleave": False}),
            ("deepseek-v2-tiny", "deepseek-v2-tiny-greedy", {"topk_method": "greedy"}))


def main():
    for name, v3, seed in (("deepseek-v3-tiny", True, 3003), ("deepseek-v2-tiny", False, 2002)):
        c = config(v3)
        stored, W = make_weights(c, seed)
        out = write_fixture(name, c, stored)
        tokens = np.random.default_rng(seed + 1).integers(0, c["vocab_size"], T)
        write_golden(name, name, c, W, tokens, {})
        for base, variant, patch in VARIANTS:
            if base == name:
                write_golden(name, variant, dict(c, **patch), W, tokens, patch)
        size = os.path.getsize(os.path.join(out, "model.safetensors"))
        print(f"{name}: {size} bytes")


def write_fixture(name, c, stored):
    """data/<name>/: the weights, config.json, generation_config.json and the tokenizer files."""
    out = os.path.join(DATA, name)
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
    return out


def write_golden(model, name, c, W, tokens, patch, run=None, script="data/scripts/deepseek_reference.py"):
    """data/golden/<name>.json: the forward `run` (default: this file's) of `model`'s weights W
    under config c (c = the fixture's config with `patch` applied)."""
    logits, layers, margin = (run or forward)(c, W, tokens)
    # float32 in moe-tool vs float64 here: a choice closer than this could flip.
    assert margin > 1e-4, f"{name}: routing margin {margin} too small, change the seed"

    def r8(a):
        return [[float("%.8g" % v) for v in row] for row in a]

    for L in layers:
        L["topk_weights"] = r8(L["topk_weights"])
    golden = {"model": f"data/{model}", "config_patch": patch, "script": script,
              "tokens": tokens.tolist(), "T": T, "min_routing_margin": margin,
              "logits_abs_max": float(np.abs(logits).max()),
              "logit_ids_step": LOGIT_STEP, "logits": r8(logits[:, ::LOGIT_STEP]),
              "argmax": logits.argmax(-1).tolist(), "moe_layers": layers}
    with open(os.path.join(DATA, "golden", name + ".json"), "w") as f:
        json.dump(golden, f)
        f.write("\n")
    print(f"{name}: logits |max| {np.abs(logits).max():.4f}, routing margin {margin:.2e}")


if __name__ == "__main__":
    main()
