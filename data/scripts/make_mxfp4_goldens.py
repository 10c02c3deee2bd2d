#!/usr/bin/python3
"""Goldens for moe-tool's MXFP4 decoder (the Python standard library only, offline; no code of
moe-tool or of llama.cpp).
Seeded random blocks in the layout of ggml-common.h's block_mxfp4:

  block_mxfp4 {u8 e; u8 qs[16]}   32 values

Value j of a block is fp4(qs[j] & 15) * 2^(e - 127) for j < 16 and fp4(qs[j - 16] >> 4) * 2^(e - 127)
above, fp4 the OCP MX E2M1 code (bit 3 the sign; magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6) and e the
E8M0 exponent (0 gives 2^-127, a subnormal float32; 255, the E8M0 NaN, is left out here and tested
apart). Every value is exact in float32.

  /usr/bin/python3 data/scripts/make_mxfp4_goldens.py > data/golden/mxfp4_blocks.json

Output: {"mxfp4": {"blocks": HEX, "values": [float32 bits as u32]}}.
"""
import json
import random
import struct
import sys

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def fp4(code):
    mag = E2M1[code & 7]
    return -mag if code & 8 else mag


def f32_bits(x):
    b = struct.pack("<f", x)
    assert struct.unpack("<f", b)[0] == x  # exact in float32
    return struct.unpack("<I", b)[0]


def main():
    rng = random.Random(20261207)
    n = 24
    e = [rng.randrange(110, 140) for _ in range(n)]
    e[0], e[1], e[2], e[3] = 0, 1, 200, 127  # subnormal, 2^-126, large, 1.0
    qs = [[rng.randrange(256) for _ in range(16)] for _ in range(n)]
    qs[4] = [17 * k for k in range(16)]  # every code, low and high
    raw = b""
    vals = []
    for b in range(n):
        raw += bytes([e[b]] + qs[b])
        scale = 2.0 ** (e[b] - 127)
        vals += [fp4(q & 15) * scale for q in qs[b]] + [fp4(q >> 4) * scale for q in qs[b]]
    out = {"mxfp4": {"blocks": raw.hex(), "values": [f32_bits(v) for v in vals]}}
    json.dump(out, sys.stdout, separators=(",", ":"))
    print()


if __name__ == "__main__":
    main()
