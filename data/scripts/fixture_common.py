"""Shared helpers of the fixture scripts: HF config.json builders per family, the list of tensor
names/shapes a family's checkpoint must contain, and a bf16 HF-layout checkpoint writer."""
import json
import os
import shutil

import torch

import reference as R

DATA = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK_DIR = os.path.join(DATA, "tokenizer")
# the validation fixture (validation-tiny) has its own corpus and tokenizer
VAL_TOK_DIR = os.path.join(DATA, "tokenizer-validation")
VAL_TEXT_DIR = os.path.join(DATA, "text-validation")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
EOT_ID = 4095

ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
        "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
        "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}


def make_config(model_type, *, hidden, layers, heads, kv_heads, intermediate, vocab=4096,
                head_dim=None, eps=1e-5, theta=10000.0, tie=False, max_pos=4096, **moe):
    """HF config.json for one family; moe keys: experts, topk, moe_intermediate,
    shared_intermediate, norm_topk_prob, decoder_sparse_step, mlp_only_layers, clip_qkv,
    aux_coef."""
    hd = head_dim or hidden // heads
    c = {
        "architectures": [ARCH[model_type]],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_pos,
        "initializer_range": 0.02,
        "rms_norm_eps": eps,
        "use_cache": True,
        "tie_word_embeddings": tie,
        "rope_theta": theta,
        "rope_scaling": None,
        "attention_dropout": 0.0,
        "bos_token_id": EOT_ID,
        "eos_token_id": EOT_ID,
        "torch_dtype": "bfloat16",
    }
    if model_type == "llama":
        c.update(attention_bias=False, mlp_bias=False, head_dim=hd, pretraining_tp=1)
    elif model_type == "mistral":
        c.update(head_dim=hd, sliding_window=None)
    elif model_type == "qwen2":
        c.update(use_sliding_window=False, sliding_window=None, max_window_layers=layers)
    elif model_type == "qwen3":
        c.update(head_dim=hd, attention_bias=False, use_sliding_window=False,
                 sliding_window=None, max_window_layers=layers)
    elif model_type == "mixtral":
        c.update(head_dim=hd, num_local_experts=moe["experts"],
                 num_experts_per_tok=moe["topk"], output_router_logits=False,
                 router_aux_loss_coef=moe.get("aux_coef", 0.01), router_jitter_noise=0.0,
                 sliding_window=None)
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        c.update(num_experts=moe["experts"], num_experts_per_tok=moe["topk"],
                 moe_intermediate_size=moe["moe_intermediate"],
                 norm_topk_prob=moe.get("norm_topk_prob", False),
                 decoder_sparse_step=moe.get("decoder_sparse_step", 1),
                 mlp_only_layers=list(moe.get("mlp_only_layers", [])),
                 output_router_logits=False, router_aux_loss_coef=moe.get("aux_coef", 0.001),
                 use_sliding_window=False, sliding_window=None, max_window_layers=layers)
        if model_type == "qwen2_moe":
            c.update(shared_expert_intermediate_size=moe["shared_intermediate"])
        else:
            c.update(head_dim=hd, attention_bias=False)
    elif model_type == "olmoe":
        assert hd == hidden // heads, "OLMoE derives head_dim = hidden_size / heads"
        c.update(num_experts=moe["experts"], num_experts_per_tok=moe["topk"],
                 norm_topk_prob=moe.get("norm_topk_prob", False),
                 clip_qkv=moe.get("clip_qkv"), attention_bias=False, output_router_logits=False,
                 router_aux_loss_coef=moe.get("aux_coef", 0.01), pad_token_id=EOT_ID)
    else:
        raise ValueError(model_type)
    return dict(sorted(c.items()))


def param_shapes(cfg):
    """Ordered dict name -> (shape, kind); kind in {embed, norm, qk, v, o, bias, router,
    shared_gate, up (gate/up), down, lm_head}."""
    H = cfg["hidden_size"]
    nH = cfg["num_attention_heads"]
    nKV = cfg["num_key_value_heads"]
    d = R.head_dim(cfg)
    V = cfg["vocab_size"]
    out = {"model.embed_tokens.weight": ([V, H], "embed")}
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        out[p + "input_layernorm.weight"] = ([H], "norm")
        out[p + "post_attention_layernorm.weight"] = ([H], "norm")
        a = p + "self_attn."
        out[a + "q_proj.weight"] = ([nH * d, H], "qk")
        out[a + "k_proj.weight"] = ([nKV * d, H], "qk")
        out[a + "v_proj.weight"] = ([nKV * d, H], "v")
        out[a + "o_proj.weight"] = ([H, nH * d], "o")
        if R.has_qkv_bias(cfg):
            out[a + "q_proj.bias"] = ([nH * d], "bias")
            out[a + "k_proj.bias"] = ([nKV * d], "bias")
            out[a + "v_proj.bias"] = ([nKV * d], "bias")
        if R.has_o_bias(cfg):
            out[a + "o_proj.bias"] = ([H], "bias")
        kind = R.qk_norm_kind(cfg)
        if kind == "head":
            out[a + "q_norm.weight"] = ([d], "norm")
            out[a + "k_norm.weight"] = ([d], "norm")
        elif kind == "full":
            out[a + "q_norm.weight"] = ([nH * d], "norm")
            out[a + "k_norm.weight"] = ([nKV * d], "norm")
        if R.is_moe_layer(cfg, l):
            E = R.n_experts(cfg)
            I = cfg["moe_intermediate_size"] if cfg["model_type"] in ("qwen2_moe", "qwen3_moe") \
                else cfg["intermediate_size"]
            rname, ename, shared = R.moe_names(cfg, p)
            out[rname] = ([E, H], "router")
            for e in range(E):
                g, u, dn = ename(e)
                out[g] = ([I, H], "up")
                out[u] = ([I, H], "up")
                out[dn] = ([H, I], "down")
            if shared is not None:
                Is = cfg["shared_expert_intermediate_size"]
                g, u, dn, sg = shared
                out[g] = ([Is, H], "up")
                out[u] = ([Is, H], "up")
                out[dn] = ([H, Is], "down")
                out[sg] = ([1, H], "shared_gate")
        else:
            I = cfg["intermediate_size"]
            out[p + "mlp.gate_proj.weight"] = ([I, H], "up")
            out[p + "mlp.up_proj.weight"] = ([I, H], "up")
            out[p + "mlp.down_proj.weight"] = ([H, I], "down")
    out["model.norm.weight"] = ([H], "norm")
    if not cfg.get("tie_word_embeddings", False):
        out["lm_head.weight"] = ([V, H], "lm_head")
    return out


def save_checkpoint(outdir, cfg, W, extra_files=None, tok_dir=TOK_DIR):
    """Writes config.json, generation_config.json, model.safetensors (bf16, round-to-nearest-
    even via torch), tokenizer files (copied from tok_dir).  W: dict name -> fp32 tensor; must
    match param_shapes."""
    shapes = param_shapes(cfg)
    assert set(W) == set(shapes), (set(W) ^ set(shapes))
    for n, (s, _) in shapes.items():
        assert list(W[n].shape) == s, (n, W[n].shape, s)
    os.makedirs(outdir, exist_ok=True)
    R.write_safetensors(os.path.join(outdir, "model.safetensors"),
                        {n: W[n].detach().float().to(torch.bfloat16) for n in W})
    with open(os.path.join(outdir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    gen = {"_from_model_config": True, "bos_token_id": EOT_ID, "eos_token_id": EOT_ID}
    with open(os.path.join(outdir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
        f.write("\n")
    for fn in TOKENIZER_FILES:
        shutil.copyfile(os.path.join(tok_dir, fn), os.path.join(outdir, fn))
    for fn, content in (extra_files or {}).items():
        with open(os.path.join(outdir, fn), "w") as f:
            f.write(content)


def load_tokens(path, enc):
    with open(path, encoding="utf-8") as f:
        return enc.encode(f.read())
