"""Runs the PyTorch reference forward (reference.py, written after transformers' eager code) on
upcycled checkpoints and their dense sources, and prints the max |logit difference| per pair:
the copy-upcycled model must equal the dense one in the reference as in moe-tool's forward.
  /usr/bin/python3 data/scripts/check_upcycle_reference.py DENSE UPCYCLED [DENSE UPCYCLED ...]
"""
import sys

import torch

import reference as R


def logits(d, ids):
    cfg, W = R.load_checkpoint(d)
    out = R.forward(cfg, W, ids)
    return out[0] if isinstance(out, tuple) else out


def main(args):
    torch.manual_seed(0)
    worst = 0.0
    for dense, up in zip(args[0::2], args[1::2]):
        cfg, _ = R.load_checkpoint(dense)
        ids = torch.tensor([[(i * 37 + 11) % cfg["vocab_size"] for i in range(64)]])
        a, b = logits(dense, ids), logits(up, ids)
        d = (a - b).abs().max().item()
        worst = max(worst, d)
        print(f"{up}: max |logit diff| vs {dense} = {d:.3g} (max |logit| {a.abs().max().item():.3g})")
    return worst


if __name__ == "__main__":
    main(sys.argv[1:])
