#!/usr/bin/python3
"""Goldens for moe-tool's IQ4_NL / IQ4_XS decoders (NumPy only, offline; no code of moe-tool or of
llama.cpp). Seeded random blocks in the layouts of ggml-common.h's block structs:

  block_iq4_nl {f16 d; u8 qs[16]}                                   32 values
  block_iq4_xs {f16 d; u16 scales_h; u8 scales_l[4]; u8 qs[128]}  256 values in 8 sub-blocks of 32

with the non-linear grid kvalues_iq4nl. Value j of a 32-value group is grid[qs[j] & 15] for j < 16 and
grid[qs[j - 16] >> 4] above; IQ4_XS sub-block i has the 6-bit scale ls = nibble i of scales_l (low
nibble first) | (bits 2i, 2i+1 of scales_h) << 4, and its values are (d * (ls - 32)) * grid[q], every
product rounded to float32 as llama.cpp's dequantize_row_iq4_xs computes them.

  /usr/bin/python3 data/scripts/make_iq4_goldens.py > data/golden/iq4_blocks.json

Output: {"iq4_nl": {"blocks": HEX, "values": [float32 bits as u32]}, "iq4_xs": {...}}.
"""
import json

import numpy as np

GRID = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)


def f16_scales(rng, n):
    d = rng.normal(0.0, 0.02, n).astype(np.float16)
    d[0], d[1] = np.float16(0.0), np.float16(-0.5)  # a zero scale, a negative one
    return d


def group32(qs, dl):  # qs [16] u8, dl float32 -> 32 float32
    lo = GRID[qs & 15]
    hi = GRID[qs >> 4]
    return np.concatenate([np.float32(dl) * lo, np.float32(dl) * hi]).astype(np.float32)


def iq4_nl(rng, nblocks):
    d = f16_scales(rng, nblocks)
    qs = rng.integers(0, 256, (nblocks, 16), dtype=np.uint8)
    qs[0] = np.arange(16, dtype=np.uint8) * 17  # every code, low and high
    raw = b"".join(d[b].tobytes() + qs[b].tobytes() for b in range(nblocks))
    vals = np.concatenate([group32(qs[b], np.float32(d[b])) for b in range(nblocks)])
    return raw, vals


def iq4_xs(rng, nblocks):
    d = f16_scales(rng, nblocks)
    scales_h = rng.integers(0, 1 << 16, nblocks, dtype=np.uint16)
    scales_l = rng.integers(0, 256, (nblocks, 4), dtype=np.uint8)
    scales_h[2], scales_l[2] = 0, 0                        # every ls = 0: dl = -32 d
    scales_h[3], scales_l[3] = 0xFFFF, 0xFF                # every ls = 63: dl = 31 d
    qs = rng.integers(0, 256, (nblocks, 128), dtype=np.uint8)
    raw = b""
    vals = []
    for b in range(nblocks):
        raw += d[b].tobytes() + scales_h[b].tobytes() + scales_l[b].tobytes() + qs[b].tobytes()
        for i in range(8):
            ls = int((scales_l[b, i // 2] >> (4 * (i % 2))) & 15) | ((int(scales_h[b]) >> (2 * i)) & 3) << 4
            dl = np.float32(np.float32(d[b]) * np.float32(ls - 32))
            vals.append(group32(qs[b, 16 * i:16 * i + 16], dl))
    return raw, np.concatenate(vals)


def main():
    rng = np.random.default_rng(20261207)
    out = {}
    for name, fn, n in (("iq4_nl", iq4_nl, 24), ("iq4_xs", iq4_xs, 6)):
        raw, vals = fn(rng, n)
        assert len(raw) == n * (18 if name == "iq4_nl" else 136)
        out[name] = {"blocks": raw.hex(), "values": [int(v) for v in vals.astype(np.float32).view(np.uint32)]}
    json.dump(out, __import__("sys").stdout, separators=(",", ":"))
    print()


if __name__ == "__main__":
    main()
