#!/usr/bin/env python3
"""Writes the fixture copies docs/gguf.md's llama.cpp checks were run on, under OUT (a new folder).

Each copy is a data/ fixture with its config.json or tokenizer.json changed, or its tensors
rearranged; no value is invented but the neutral ones named below (qwen2-dense's zero biases,
qwen3-dense's unit norm weights). Plain Python (no NumPy):

  phimoe-nowindow      data/phimoe-tiny without its sliding window (llama.cpp's phimoe attends fully)
  phimoe-longrope      the same with the tests' longrope (8 short / 8 long divisors, mscale 1.15,
                       original context 64: tests/support/ckpt_util.cpp phimoe_llamacpp_patch)
  deepseek-v2-qlora    data/deepseek-v3-tiny as deepseek_v2: softmax gating, greedy top-k,
                       norm_topk_prob false, routed_scaling_factor 1.5, no e_score_correction_bias
  deepseek-v2-qlora-norm   the same with norm_topk_prob true
  deepseek-v2-lite27   data/deepseek-v2-tiny (no q LoRA) grown to 27 layers (layer 0 dense, then
                       its MoE layers 1 and 2 alternating), greedy top-k: llama.cpp takes a
                       deepseek2 without q LoRA as "Lite" by its 27 layers
  kimi-k2              data/deepseek-v3-tiny with model_type kimi_k2
  gpt-oss-o200k        data/gpt-oss-tiny with o200k's Split regex and yarn truncate true
  deepseek-v3-pretok   data/deepseek-v3-tiny with DeepSeek-V3's three Split regexes
  mixtral-sp           data/models/mixtral-tiny with data/tokenizer-sp's SentencePiece-style tokenizer
  gpt-oss-bytelevel    gpt-oss-o200k with a ByteLevel pre_tokenizer using its own (GPT-2) regex
  llama-llama3         data/models/llama-tiny with a llama3 rope_scaling (factor 8, low_freq_factor
                       1, high_freq_factor 4, original context 64: frequencies 2-4 in the smoothed band)
  mistral-dense        data/models/llama-tiny as mistral (no sliding window)
  qwen2-dense          data/models/llama-tiny as qwen2 with q/k/v biases of zeros (the same model)
  qwen3-dense          data/models/llama-tiny as qwen3 with q/k norm weights of ones (the per-head
                       RMS norms of q and k added: a different model, the same on both sides)
  qwen3-dense-yarn     qwen3-dense with Qwen3's yarn form (factor 4 over an original context of 32,
                       max_position_embeddings 128)
  qwen2moe-yarn        data/models/qwen2moe-tiny with yarn (factor 4, original 1024, max 4096)
  mixtral-llama3       data/models/mixtral-tiny with llama-llama3's llama3 rope_scaling

Usage: scripts/make_gguf_check_copies.py OUT
"""
import json
import re
import shutil
import struct
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data"

O200K = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
         r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
         r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
DEEPSEEK_V3 = [r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
               "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|"
               "\\s*[\r\n]+|\\s+(?!\\S)|\\s+"]


def copy(fixture, out):
    shutil.copytree(DATA / fixture, out)
    return out


def patch_config(d, **kv):
    p = d / "config.json"
    c = json.loads(p.read_text())
    for k, v in kv.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    p.write_text(json.dumps(c, indent=2))


def set_splits(d, regexes):
    p = d / "tokenizer.json"
    j = json.loads(p.read_text(encoding="utf-8"))
    steps = j["pre_tokenizer"]["pretokenizers"]
    j["pre_tokenizer"]["pretokenizers"] = [
        {"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False} for r in regexes] + [steps[-1]]
    p.write_text(json.dumps(j, ensure_ascii=False), encoding="utf-8")


def rewrite_tensors(d, fn):
    """Rewrites d/model.safetensors with fn(dict name -> (dtype, shape, bytes)) -> list of (name, entry)."""
    p = d / "model.safetensors"
    b = p.read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n])
    meta = h.pop("__metadata__", None)
    data = b[8 + n:]
    tensors = {k: (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]]) for k, v in h.items()}
    out, blob = {}, bytearray()
    for name, (dtype, shape, raw) in fn(tensors):
        out[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(blob), len(blob) + len(raw)]}
        blob += raw
    if meta:
        out["__metadata__"] = meta
    hj = json.dumps(out).encode()
    hj += b" " * ((8 - len(hj) % 8) % 8)
    p.write_bytes(struct.pack("<Q", len(hj)) + hj + bytes(blob))


def grow_layers(tensors, layers):
    by_layer, rest = {}, []
    for k, t in tensors.items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)", k)
        if m:
            by_layer.setdefault(int(m.group(1)), {})[m.group(2)] = t
        else:
            rest.append((k, t))
    out = list(rest)
    for l in range(layers):
        src = 0 if l == 0 else (1 if l % 2 else 2)
        out += [(f"model.layers.{l}.{r}", t) for r, t in by_layer[src].items()]
    return out


def add_layer_tensors(d, roles):
    """Adds model.layers.L.<role> of bf16 `fill` (2 bytes) and `n` values to every layer: roles is a list of (role, n, fill)."""
    def fn(t):
        layers = sorted({int(m.group(1)) for k in t for m in [re.match(r"model\.layers\.(\d+)\.", k)] if m})
        return list(t.items()) + [(f"model.layers.{l}.{role}", ("BF16", [n], fill * n)) for l in layers for role, n, fill in roles]
    rewrite_tensors(d, fn)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = Path(sys.argv[1])
    if out.exists():
        sys.exit(f"{out}: exists")
    out.mkdir(parents=True)
    patch_config(copy("phimoe-tiny", out / "phimoe-nowindow"), sliding_window=None)
    d = copy("phimoe-tiny", out / "phimoe-longrope")
    patch_config(d, sliding_window=None, original_max_position_embeddings=64,
                 rope_scaling={"type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.5, 2.0, 3.0, 4.0, 5.0],
                               "long_factor": [1.0, 1.3, 1.7, 2.5, 4.0, 6.0, 8.0, 9.0], "short_mscale": 1.15,
                               "long_mscale": 1.15})
    for name, norm in (("deepseek-v2-qlora", False), ("deepseek-v2-qlora-norm", True)):
        d = copy("deepseek-v3-tiny", out / name)
        patch_config(d, architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", topk_method="greedy",
                     scoring_func="softmax", norm_topk_prob=norm, routed_scaling_factor=1.5, num_nextn_predict_layers=None)
        rewrite_tensors(d, lambda t: [(k, v) for k, v in t.items() if "e_score_correction_bias" not in k])
    d = copy("deepseek-v2-tiny", out / "deepseek-v2-lite27")
    patch_config(d, num_hidden_layers=27, topk_method="greedy")
    rewrite_tensors(d, lambda t: grow_layers(t, 27))
    patch_config(copy("deepseek-v3-tiny", out / "kimi-k2"), model_type="kimi_k2")
    d = copy("gpt-oss-tiny", out / "gpt-oss-o200k")
    set_splits(d, [O200K])
    c = json.loads((d / "config.json").read_text())
    c["rope_scaling"]["truncate"] = True
    (d / "config.json").write_text(json.dumps(c, indent=2))
    set_splits(copy("deepseek-v3-tiny", out / "deepseek-v3-pretok"), DEEPSEEK_V3)
    d = copy("gpt-oss-tiny", out / "gpt-oss-bytelevel")
    j = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    j["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    (d / "tokenizer.json").write_text(json.dumps(j, ensure_ascii=False), encoding="utf-8")
    c = json.loads((d / "config.json").read_text())
    c["rope_scaling"]["truncate"] = True
    (d / "config.json").write_text(json.dumps(c, indent=2))
    d = copy("models/mixtral-tiny", out / "mixtral-sp")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(DATA / "tokenizer-sp" / name, d / name)
    (d / "special_tokens_map.json").unlink(missing_ok=True)
    patch_config(copy("models/llama-tiny", out / "llama-llama3"),
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 64})
    patch_config(copy("models/llama-tiny", out / "mistral-dense"), architectures=["MistralForCausalLM"], model_type="mistral",
                 sliding_window=None)
    c = json.loads((DATA / "models/llama-tiny/config.json").read_text())
    hd, kv = c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    d = copy("models/llama-tiny", out / "qwen2-dense")
    patch_config(d, architectures=["Qwen2ForCausalLM"], model_type="qwen2", attention_bias=None, mlp_bias=None,
                 use_sliding_window=False, sliding_window=None)
    add_layer_tensors(d, [("self_attn.q_proj.bias", c["num_attention_heads"] * hd, b"\0\0"),
                          ("self_attn.k_proj.bias", kv, b"\0\0"), ("self_attn.v_proj.bias", kv, b"\0\0")])
    d = copy("models/llama-tiny", out / "qwen3-dense")
    patch_config(d, architectures=["Qwen3ForCausalLM"], model_type="qwen3", mlp_bias=None)
    add_layer_tensors(d, [("self_attn.q_norm.weight", hd, b"\x80\x3f"), ("self_attn.k_norm.weight", hd, b"\x80\x3f")])
    d = out / "qwen3-dense-yarn"
    shutil.copytree(out / "qwen3-dense", d)
    patch_config(d, max_position_embeddings=128,
                 rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})
    patch_config(copy("models/mixtral-tiny", out / "mixtral-llama3"),
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 64})
    patch_config(copy("models/qwen2moe-tiny", out / "qwen2moe-yarn"),
                 rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024})


if __name__ == "__main__":
    main()
