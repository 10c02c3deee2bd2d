"""PyTorch reference forward for the moe-tool fixtures, written to follow Hugging Face
transformers' eager implementations (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM,
Qwen3ForCausalLM, MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM,
OlmoeForCausalLM).  Offline use only (fixtures and goldens); never used by the tool.

Conventions (docs/methods.md):
  * weights in HF orientation [out, in]; y = x @ W.T (+ b);
  * RMSNorm in fp32: x * rsqrt(mean(x^2) + eps) * w;
  * RoPE rotate-half, inv_freq = theta^(-2i/d), positions 0..T-1 of the window;
  * GQA by repeating KV heads; scores scaled by 1/sqrt(head_dim); causal mask;
  * pre-norm residual blocks; expert FFN down(silu(gate x) * up x);
  * routing: mixtral softmax(all) -> top-k -> renormalise; qwen2_moe / qwen3_moe / olmoe
    softmax -> top-k -> renormalise only if norm_topk_prob; qwen2_moe adds
    sigmoid(shared_expert_gate x) * shared_expert(x);
  * qwen3 / qwen3_moe: q_norm / k_norm over head_dim per head (after reshape, before RoPE);
    olmoe: q_norm / k_norm over the whole projection (before reshape), then optional
    clamp(+-clip_qkv) of q, k, v.
The forward is functional: forward(cfg, W, ids) with W a dict name -> tensor in HF names, so the
same code trains the fixture models (W = nn.Parameters) and computes goldens (W = bf16 weights
upcast to fp32).
"""
import json
import math
import os
import struct

import numpy as np
import torch
import torch.nn.functional as F

MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
DENSE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

# ----------------------------------------------------------------------------- safetensors

_ST_DTYPES = {"F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.int16, 2),
              "I64": (np.int64, 8), "I32": (np.int32, 4), "U8": (np.uint8, 1)}


def read_safetensors(path):
    """Returns (dict name -> torch tensor, metadata).  BF16 is returned as torch.bfloat16."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    base = 8 + n
    meta = header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        npdt, size = _ST_DTYPES[info["dtype"]]
        a, b = info["data_offsets"]
        shape = info["shape"]
        count = int(np.prod(shape)) if shape else 1
        assert b - a == count * size, name
        arr = np.frombuffer(raw, dtype=npdt, count=count, offset=base + a).reshape(shape).copy()
        t = torch.from_numpy(arr)
        if info["dtype"] == "BF16":
            t = t.view(torch.bfloat16)
        out[name] = t
    return out, meta


def _tensor_bytes(t):
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return "BF16", t.view(torch.int16).numpy().astype("<i2").tobytes()
    if t.dtype == torch.float32:
        return "F32", t.numpy().astype("<f4").tobytes()
    if t.dtype == torch.float16:
        return "F16", t.numpy().astype("<f2").tobytes()
    if t.dtype == torch.int64:
        return "I64", t.numpy().astype("<i8").tobytes()
    if t.dtype == torch.int32:
        return "I32", t.numpy().astype("<i4").tobytes()
    raise ValueError(t.dtype)


def write_safetensors(path, tensors, metadata=None):
    """tensors: dict name -> torch tensor (written in its dtype).  Tensors are laid out
    contiguously in sorted-name order; header padded with spaces to a multiple of 8."""
    header = {"__metadata__": metadata or {"format": "pt"}}
    blobs = []
    off = 0
    for name in sorted(tensors):
        dt, data = _tensor_bytes(tensors[name])
        header[name] = {"dtype": dt, "shape": list(tensors[name].shape),
                        "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def load_checkpoint(d, dtype=torch.float32):
    """Loads config.json and model.safetensors (or shards) from directory d; weights upcast to
    dtype (bf16 values are exact in fp32)."""
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    files = [os.path.join(d, "model.safetensors")]
    idx = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(idx):
        with open(idx) as f:
            files = sorted(set(os.path.join(d, v) for v in json.load(f)["weight_map"].values()))
    W = {}
    for p in files:
        t, _ = read_safetensors(p)
        W.update({k: v.to(dtype) for k, v in t.items()})
    return cfg, W


# ----------------------------------------------------------------------------- config helpers

def head_dim(cfg):
    hd = cfg.get("head_dim")
    return hd if hd else cfg["hidden_size"] // cfg["num_attention_heads"]


def n_experts(cfg):
    mt = cfg["model_type"]
    if mt == "mixtral":
        return cfg["num_local_experts"]
    if mt in ("qwen2_moe", "qwen3_moe", "olmoe"):
        return cfg["num_experts"]
    return 0


def is_moe_layer(cfg, l):
    mt = cfg["model_type"]
    if mt in ("mixtral", "olmoe"):
        return True
    if mt in ("qwen2_moe", "qwen3_moe"):
        return (l not in cfg.get("mlp_only_layers", []) and cfg["num_experts"] > 0
                and (l + 1) % cfg.get("decoder_sparse_step", 1) == 0)
    return False


def has_qkv_bias(cfg):
    mt = cfg["model_type"]
    if mt in ("qwen2", "qwen2_moe"):
        return True
    return bool(cfg.get("attention_bias", False))


def has_o_bias(cfg):
    # llama / qwen3 / qwen3_moe / olmoe: attention_bias applies to o_proj too; qwen2: never.
    mt = cfg["model_type"]
    if mt in ("qwen2", "qwen2_moe", "mixtral", "mistral"):
        return False
    return bool(cfg.get("attention_bias", False))


def qk_norm_kind(cfg):
    mt = cfg["model_type"]
    if mt in ("qwen3", "qwen3_moe"):
        return "head"
    if mt == "olmoe":
        return "full"
    return None


# ----------------------------------------------------------------------------- building blocks

def rms_norm(x, w, eps):
    xf = x.float()
    var = xf.pow(2).mean(-1, keepdim=True)
    return w * (xf * torch.rsqrt(var + eps)).to(x.dtype)


def linear(x, w, b=None):
    y = x @ w.t()
    if b is not None:
        y = y + b
    return y


def rope_cos_sin(T, d, theta, device=None):
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    t = torch.arange(T, dtype=torch.int64).float()
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope(x, cos, sin):
    # x [B, nH, T, d]; cos/sin [T, d]
    return x * cos + rotate_half(x) * sin


def attention(cfg, W, p, x, cos, sin, with_o_input=False):
    """Self-attention output [B, T, H]; with_o_input: (output, input of o_proj [B, T, nH*d])."""
    B, T, H = x.shape
    nH = cfg["num_attention_heads"]
    nKV = cfg.get("num_key_value_heads") or nH
    d = head_dim(cfg)
    eps = cfg["rms_norm_eps"]
    qkv_b = has_qkv_bias(cfg)
    q = linear(x, W[p + "q_proj.weight"], W[p + "q_proj.bias"] if qkv_b else None)
    k = linear(x, W[p + "k_proj.weight"], W[p + "k_proj.bias"] if qkv_b else None)
    v = linear(x, W[p + "v_proj.weight"], W[p + "v_proj.bias"] if qkv_b else None)
    kind = qk_norm_kind(cfg)
    if kind == "full":  # OLMoE
        q = rms_norm(q, W[p + "q_norm.weight"], eps)
        k = rms_norm(k, W[p + "k_norm.weight"], eps)
        clip = cfg.get("clip_qkv")
        if clip is not None:
            q = q.clamp(-clip, clip)
            k = k.clamp(-clip, clip)
            v = v.clamp(-clip, clip)
    q = q.view(B, T, nH, d)
    k = k.view(B, T, nKV, d)
    v = v.view(B, T, nKV, d)
    if kind == "head":  # Qwen3
        q = rms_norm(q, W[p + "q_norm.weight"], eps)
        k = rms_norm(k, W[p + "k_norm.weight"], eps)
    q = q.transpose(1, 2)
    k = k.transpose(1, 2)
    v = v.transpose(1, 2)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    rep = nH // nKV
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(2, 3)) * (1.0 / math.sqrt(d))
    i = torch.arange(T).view(T, 1)
    j = torch.arange(T).view(1, T)
    allowed = j <= i
    sw = cfg.get("sliding_window")
    if cfg["model_type"] == "mistral" and sw is not None:
        allowed = allowed & (j > i - sw)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    o = (probs @ v).transpose(1, 2).reshape(B, T, nH * d)
    out = linear(o, W[p + "o_proj.weight"], W[p + "o_proj.bias"] if has_o_bias(cfg) else None)
    return (out, o) if with_o_input else out


def glu_mlp(x, wg, wu, wd):
    return linear(F.silu(linear(x, wg)) * linear(x, wu), wd)


def moe_names(cfg, p):
    """Per-family tensor names of one MoE block: (router, expert(e)->(gate, up, down), shared)."""
    mt = cfg["model_type"]
    if mt == "mixtral":
        q = p + "block_sparse_moe."
        return (q + "gate.weight",
                lambda e: (f"{q}experts.{e}.w1.weight", f"{q}experts.{e}.w3.weight",
                           f"{q}experts.{e}.w2.weight"),
                None)
    q = p + "mlp."
    shared = None
    if mt == "qwen2_moe":
        shared = (q + "shared_expert.gate_proj.weight", q + "shared_expert.up_proj.weight",
                  q + "shared_expert.down_proj.weight", q + "shared_expert_gate.weight")
    return (q + "gate.weight",
            lambda e: (f"{q}experts.{e}.gate_proj.weight", f"{q}experts.{e}.up_proj.weight",
                       f"{q}experts.{e}.down_proj.weight"),
            shared)


def route(cfg, logits):
    """logits [N, E] -> (probs [N,E] softmax over all, topk ids [N,k], topk weights [N,k])."""
    k = cfg["num_experts_per_tok"]
    probs = torch.softmax(logits.float(), dim=-1)
    w, idx = torch.topk(probs, k, dim=-1)
    if cfg["model_type"] == "mixtral" or cfg.get("norm_topk_prob", False):
        w = w / w.sum(dim=-1, keepdim=True)
    return probs, idx, w


def moe_block(cfg, W, p, x):
    B, T, H = x.shape
    xf = x.reshape(-1, H)
    rname, ename, shared = moe_names(cfg, p)
    logits = linear(xf, W[rname])
    probs, idx, w = route(cfg, logits)
    out = torch.zeros_like(xf)
    E = n_experts(cfg)
    for e in range(E):
        tok, slot = torch.where(idx == e)
        if tok.numel() == 0:
            continue
        g, u, dn = ename(e)
        y = glu_mlp(xf[tok], W[g], W[u], W[dn]) * w[tok, slot].unsqueeze(-1).to(xf.dtype)
        out = out.index_add(0, tok, y)
    if shared is not None:
        g, u, dn, sg = shared
        out = out + torch.sigmoid(linear(xf, W[sg])) * glu_mlp(xf, W[g], W[u], W[dn])
    return out.view(B, T, H), {"logits": logits, "probs": probs, "topk_ids": idx,
                               "topk_weights": w}


def forward(cfg, W, ids, collect=False):
    """ids LongTensor [B, T] (one window per row, positions 0..T-1).  Returns logits [B, T, V]
    (fp32) and, if collect, a dict with per-layer router info and residual streams."""
    mt = cfg["model_type"]
    assert mt in MOE_FAMILIES + DENSE_FAMILIES, mt
    B, T = ids.shape
    eps = cfg["rms_norm_eps"]
    h = W["model.embed_tokens.weight"][ids]
    cos, sin = rope_cos_sin(T, head_dim(cfg), float(cfg.get("rope_theta", 10000.0)))
    info = {"router": {}, "hidden": [h]}
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        a = attention(cfg, W, p + "self_attn.", rms_norm(h, W[p + "input_layernorm.weight"], eps),
                      cos, sin)
        h = h + a
        x = rms_norm(h, W[p + "post_attention_layernorm.weight"], eps)
        if is_moe_layer(cfg, l):
            m, r = moe_block(cfg, W, p, x)
            info["router"][l] = r
        else:
            m = glu_mlp(x, W[p + "mlp.gate_proj.weight"], W[p + "mlp.up_proj.weight"],
                        W[p + "mlp.down_proj.weight"])
        h = h + m
        if collect:
            info["hidden"].append(h)
    hn = rms_norm(h, W["model.norm.weight"], eps)
    lm = W["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings", False) \
        else W["lm_head.weight"]
    logits = linear(hn, lm)
    if collect:
        info["final_norm"] = hn
    return logits, info


def load_balancing_loss(cfg, router_infos):
    """Switch/Mixtral load-balancing loss E * sum_e f_e * P_e per MoE layer (f_e = fraction of
    top-k assignments going to e, P_e = mean router probability), averaged over MoE layers."""
    E = n_experts(cfg)
    k = cfg["num_experts_per_tok"]
    tot = 0.0
    for r in router_infos.values():
        probs = r["probs"]
        mask = F.one_hot(r["topk_ids"], E).float()  # [N, k, E]
        f = mask.sum(1).mean(0) / k
        P = probs.mean(0)
        tot = tot + E * (f * P).sum()
    return tot / max(1, len(router_infos))


def nll_windows(cfg, W, tokens, ctx, n_windows=None, batch=8):
    """Non-overlapping windows of ctx tokens; scores every predictable position of each window
    (T-1 per window).  Returns (nll_sum (float64), count)."""
    nw = len(tokens) // ctx
    if n_windows is not None:
        nw = min(nw, n_windows)
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, nw, batch):
            rows = [tokens[(s + i) * ctx:(s + i + 1) * ctx] for i in range(min(batch, nw - s))]
            ids = torch.tensor(rows, dtype=torch.long)
            logits, _ = forward(cfg, W, ids)
            lp = torch.log_softmax(logits.double(), dim=-1)
            tgt = ids[:, 1:]
            nll = -lp[:, :-1].gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
            total += float(nll.sum())
            count += nll.numel()
    return total, count
