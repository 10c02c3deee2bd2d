#!/usr/bin/python3
"""Tiny random-weight checkpoints (exact HF layout, bf16) for the families the trained fixtures
do not cover: data/models/synthetic/<name>/.

Usage: /usr/bin/python3 data/scripts/make_synthetic.py      (then make_goldens.py)

Weights (seeded, torch.Generator): every matrix N(0, 0.02) except q_proj/k_proj N(0, 0.15) and
router / shared_expert_gate N(0, 0.1) (with 0.02 everywhere attention would be uniform and routing
nearly uniform, so RoPE/GQA/routing bugs would hardly show in the logits); RMSNorm weights
(incl. q_norm/k_norm) 1 + N(0, 0.1); biases N(0, 0.1).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fixture_common as C  # noqa: E402

STD = {"embed": 0.02, "qk": 0.15, "v": 0.02, "o": 0.02, "up": 0.02, "down": 0.02,
       "lm_head": 0.02, "router": 0.1, "shared_gate": 0.1, "bias": 0.1}

SYNTHETIC = {
    # name: config
    "qwen3moe": C.make_config("qwen3_moe", hidden=64, layers=3, heads=4, kv_heads=2,
                              head_dim=32, intermediate=128, eps=1e-6, theta=1e6,
                              experts=4, topk=2, moe_intermediate=64, norm_topk_prob=True),
    "olmoe": C.make_config("olmoe", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=64,
                           experts=4, topk=2, norm_topk_prob=False, clip_qkv=2.0),
    "mistral": C.make_config("mistral", hidden=64, layers=2, heads=4, kv_heads=2,
                             intermediate=128, theta=1e6),
    "qwen2": C.make_config("qwen2", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                           eps=1e-6, theta=1e6, tie=True),
    "qwen3": C.make_config("qwen3", hidden=64, layers=2, heads=4, kv_heads=2, head_dim=32,
                           intermediate=128, eps=1e-6, theta=1e6, tie=True),
    "qwen2moe-sparse": C.make_config("qwen2_moe", hidden=64, layers=4, heads=4, kv_heads=2,
                                     intermediate=128, eps=1e-6, theta=1e6, experts=4, topk=2,
                                     moe_intermediate=64, shared_intermediate=128,
                                     norm_topk_prob=True, decoder_sparse_step=2,
                                     mlp_only_layers=[0]),
}


def random_weights(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    W = {}
    for name, (shape, kind) in C.param_shapes(cfg).items():
        if kind == "norm":
            W[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            W[name] = STD[kind] * torch.randn(shape, generator=g)
    return W


def main():
    root = os.path.join(C.DATA, "models", "synthetic")
    for i, (name, cfg) in enumerate(SYNTHETIC.items()):
        W = random_weights(cfg, seed=1000 + i)
        C.save_checkpoint(os.path.join(root, name), cfg, W)
        n = sum(t.numel() for t in W.values())
        print(f"{name:16s} {cfg['model_type']:10s} {n} params")


if __name__ == "__main__":
    main()
