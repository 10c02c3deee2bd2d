#!/usr/bin/env python3
"""A synthetic gpt-oss checkpoint with MXFP4 experts at a chosen size, for memory and throughput
measurements (docs/families.md, gpt_oss). Never committed at size.

The layout is the released checkpoints' (the fixture data/gpt-oss-tiny-mxfp4, larger):
config.json from that fixture with the shape keys replaced, bf16 attention (with biases and
sinks), norms, router (weight and bias) and expert biases, and per layer
mlp.experts.gate_up_proj_blocks U8 [E, 2I, H/32, 16] + _scales [E, 2I, H/32] and
mlp.experts.down_proj_blocks U8 [E, H, I/32, 16] + _scales [E, H, I/32]: random codes, scales in
[118, 125] (values up to 6 * 2^-2). Tokenizer files copied from the fixture (vocabulary 4096).

  make_gpt_oss_mxfp4_synthetic.py OUT [--hidden 1024] [--width 1024] [--experts 32] [--layers 8]
"""
import argparse
import json
import os
import shutil
import struct

import numpy as np

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gpt-oss-tiny-mxfp4")


def bf16(rng, shape, std):
    x = (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)
    return (x.view(np.uint32) >> 16).astype(np.uint16)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--layers", type=int, default=8)
    a = ap.parse_args()
    H, I, E, L = a.hidden, a.width, a.experts, a.layers
    assert H % 32 == 0 and I % 32 == 0
    cfg = json.load(open(os.path.join(FIXTURE, "config.json")))
    hd, nh, nkv = 64, max(1, H // 64), max(1, H // 128)
    cfg.update(hidden_size=H, intermediate_size=I, num_local_experts=E, num_hidden_layers=L, head_dim=hd,
               num_attention_heads=nh, num_key_value_heads=nkv,
               layer_types=["sliding_attention" if l % 2 == 0 else "full_attention" for l in range(L)])
    rng = np.random.default_rng(0)
    tensors = {}  # name -> (dtype, shape, bytes)

    def put(name, dtype, arr):
        tensors[name] = (dtype, list(arr.shape), arr.tobytes())

    put("model.embed_tokens.weight", "BF16", bf16(rng, (cfg["vocab_size"], H), 0.02))
    put("model.norm.weight", "BF16", np.full((H,), 0x3F80, np.uint16))  # 1.0
    for l in range(L):
        p = f"model.layers.{l}."
        for n in ("input_layernorm", "post_attention_layernorm"):
            put(p + n + ".weight", "BF16", np.full((H,), 0x3F80, np.uint16))  # 1.0
        for n, o, i in (("q_proj", nh * hd, H), ("k_proj", nkv * hd, H), ("v_proj", nkv * hd, H), ("o_proj", H, nh * hd)):
            put(p + f"self_attn.{n}.weight", "BF16", bf16(rng, (o, i), 0.02))
            put(p + f"self_attn.{n}.bias", "BF16", bf16(rng, (o,), 0.01))
        put(p + "self_attn.sinks", "BF16", bf16(rng, (nh,), 0.1))
        put(p + "mlp.router.weight", "BF16", bf16(rng, (E, H), 0.02))
        put(p + "mlp.router.bias", "BF16", bf16(rng, (E,), 0.01))
        put(p + "mlp.experts.gate_up_proj_bias", "BF16", bf16(rng, (E, 2 * I), 0.01))
        put(p + "mlp.experts.down_proj_bias", "BF16", bf16(rng, (E, H), 0.01))
        for n, r, c in (("gate_up_proj", 2 * I, H), ("down_proj", H, I)):
            put(p + f"mlp.experts.{n}_blocks", "U8", rng.integers(0, 256, (E, r, c // 32, 16), dtype=np.uint8))
            put(p + f"mlp.experts.{n}_scales", "U8", rng.integers(118, 126, (E, r, c // 32), dtype=np.uint8))
    os.makedirs(a.out, exist_ok=True)
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, (dt, shape, b) in tensors.items():
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(b)]}
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(os.path.join(a.out, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for _, (_, _, b) in tensors.items():
            f.write(b)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for n in os.listdir(FIXTURE):
        if n.startswith("tokenizer") or n in ("special_tokens_map.json", "generation_config.json"):
            shutil.copy(os.path.join(FIXTURE, n), a.out)
    print(json.dumps({"out": a.out, "bytes": 8 + len(h) + off, "hidden": H, "width": I, "experts": E, "layers": L}))


if __name__ == "__main__":
    main()
