#!/usr/bin/env python3
"""Writes the committed seed inputs of tests/fuzz/seeds/fuzz_safetensors_header/ (standard library
only) and the broken config.json seeds of tests/fuzz/seeds/fuzz_config/. The valid config seeds
(valid-<family>.json) are the configs tests/support/synth.cpp writes (make_synth(family).config,
dumped once with dump(2)): the checkpoints fuzz_config loads at startup.

    python3 tests/fuzz/make_seeds.py
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
ST = os.path.join(HERE, "seeds", "fuzz_safetensors_header")
CF = os.path.join(HERE, "seeds", "fuzz_config")
TD = os.path.join(HERE, "seeds", "fuzz_ternary_dict")
NC = os.path.join(HERE, "seeds", "fuzz_native_config")


def st(header, data=b"", pad=True, length=None):
    h = header.encode() if isinstance(header, str) else header
    if pad:
        h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h) if length is None else length) + h + data


def entry(dtype, shape, b, e):
    return {"dtype": dtype, "shape": shape, "data_offsets": [b, e]}


def dumps(o):
    return json.dumps(o, separators=(",", ":"))


def main():
    os.makedirs(ST, exist_ok=True)
    os.makedirs(CF, exist_ok=True)
    seeds = {
        "valid-empty": st("{}"),
        "valid-metadata": st(dumps({"__metadata__": {"format": "pt"}})),
        "valid-one": st(dumps({"__metadata__": {"format": "pt"}, "w": entry("F32", [2, 2], 0, 16)}), bytes(range(16))),
        "valid-dtypes": st(dumps({
            "a": entry("BF16", [3], 0, 6), "b": entry("F16", [1, 1], 6, 8), "c": entry("F8_E4M3", [2], 8, 10),
            "d": entry("F8_E5M2", [2], 10, 12), "e": entry("I64", [], 12, 20), "f": entry("BOOL", [0, 3], 20, 20),
            "g": entry("F64", [1], 20, 28), "h": entry("I32", [1], 28, 32), "i": entry("I16", [1], 32, 34),
            "j": entry("I8", [1], 34, 35), "k": entry("U8", [1], 35, 36)}), bytes(36)),
        "valid-unordered": st(dumps({"z": entry("U8", [2], 2, 4), "a": entry("U8", [2], 0, 2)}), b"abcd"),
        "bad-duplicate": st('{"w":%s,"w":%s}' % (dumps(entry("U8", [1], 0, 1)), dumps(entry("U8", [1], 1, 2))), b"xy"),
        "bad-hole": st(dumps({"a": entry("U8", [1], 0, 1), "b": entry("U8", [1], 2, 3)}), b"xyz"),
        "bad-overlap": st(dumps({"a": entry("U8", [2], 0, 2), "b": entry("U8", [1], 1, 2)}), b"xy"),
        "bad-size": st(dumps({"a": entry("F32", [2], 0, 4)}), b"abcd"),
        "bad-metadata": st(dumps({"__metadata__": {"format": 1}})),
        "bad-array": st("[]"),
        "bad-length": st("{}", length=1 << 40),
        "bad-short": b"\x02\x00\x00",
        "bad-shape": st(dumps({"a": entry("F32", [-1], 0, 4)}), b"abcd"),
        "bad-overflow": st(dumps({"a": entry("F32", [4611686018427387904], 0, 0)})),
    }
    for name, data in seeds.items():
        with open(os.path.join(ST, name), "wb") as f:
            f.write(data)
    broken = {
        "bad-not-json": b'{"model_type": "mixtral",',
        "bad-array": b"[1, 2, 3]",
        "bad-unknown-family": b'{"model_type": "made_up_moe", "architectures": ["MadeUpMoeForCausalLM"]}',
        "bad-empty-object": b"{}",
        "bad-types": b'{"model_type": "mixtral", "num_hidden_layers": "2", "hidden_size": 32.5}',
        "bad-huge": b'{"model_type": "mixtral", "num_hidden_layers": 1, "hidden_size": 4611686018427387904, '
                    b'"num_attention_heads": 2, "head_dim": 4611686018427387904, "vocab_size": 64, '
                    b'"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 16}',
    }
    for name, data in broken.items():
        with open(os.path.join(CF, name), "wb") as f:
            f.write(data)
    # fuzz_ternary_dict: rows, cols, K, n, counts type (0 U8, 1 U16, 2 U32, 3 I32), then the
    # dictionary, the rows' code counts, codes and f16 levels.
    td = {
        # one row of two trits coded by one codeword (symbol 4: lo, lo) of the root's 9
        "valid-one-row": struct.pack("<BBHHB", 1, 2, 1, 1, 0) + struct.pack("<H", 0) + struct.pack("<B", 1)
        + struct.pack("<H", 4) + struct.pack("<ee", -1.0, 1.0),
        # two rows of five trits, the root and codeword 0 (symbol 0 = two zeros) expanded; u16 counts
        "valid-two-rows": struct.pack("<BBHHB", 2, 5, 2, 5, 1) + struct.pack("<HH", 0, 1) + struct.pack("<HH", 2, 3)
        + struct.pack("<HHHHH", 9, 2, 1, 3, 0) + struct.pack("<eeee", -0.5, 0.25, -2.0, 3.0),
        "valid-u32-counts": struct.pack("<BBHHB", 1, 2, 1, 1, 2) + struct.pack("<H", 0) + struct.pack("<I", 1)
        + struct.pack("<H", 4) + struct.pack("<ee", -1.0, 1.0),
        "bad-beyond-dictionary": struct.pack("<BBHHB", 1, 2, 1, 1, 0) + struct.pack("<H", 0) + struct.pack("<B", 1)
        + struct.pack("<H", 9) + struct.pack("<ee", -1.0, 1.0),
        "bad-signed-counts": struct.pack("<BBHHB", 1, 2, 1, 1, 3) + struct.pack("<H", 0) + struct.pack("<i", 1)
        + struct.pack("<H", 4) + struct.pack("<ee", -1.0, 1.0),
        "bad-counts-past-stream": struct.pack("<BBHHB", 1, 2, 1, 1, 0) + struct.pack("<H", 0) + struct.pack("<B", 2)
        + struct.pack("<H", 4) + struct.pack("<ee", -1.0, 1.0),
    }
    os.makedirs(TD, exist_ok=True)
    for name, data in td.items():
        with open(os.path.join(TD, name), "wb") as f:
            f.write(data)
    # fuzz_native_config: the quantization_config value of the fixture checkpoint (w1 of layer 0,
    # expert 0: lr_a [16, 4], lr_b [4, 32]; w3: the same plus lr_base [16, 32]).
    w1 = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    w3 = "model.layers.0.block_sparse_moe.experts.0.w3.weight"

    def lr(w, rank=4, base=False, encoding="lowrank"):
        parts = {"a": w + ".lr_a", "b": w + ".lr_b"}
        if base:
            parts["base"] = w + ".lr_base"
        return {"encoding": encoding, "rank": rank, "parts": parts}

    def qc(weights, version=1):
        return {"quant_method": "moe_tool", "format_version": version, "weights": weights}

    valid = {w1: lr(w1), w3: lr(w3, base=True)}
    nc = {
        "valid": qc(valid),
        "bad-unknown-encoding": qc({w1: lr(w1, encoding="lowrnk"), w3: lr(w3, base=True)}),
        "bad-rank-above-min": qc({w1: lr(w1, rank=17), w3: lr(w3, base=True)}),
        "bad-rank-disagrees": qc({w1: lr(w1, rank=3), w3: lr(w3, base=True)}),
        "bad-missing-part": qc({w1: {"encoding": "lowrank", "rank": 4, "parts": {"a": w1 + ".lr_a"}}, w3: lr(w3, base=True)}),
        "bad-wrong-part": qc({w1: {"encoding": "lowrank", "rank": 4, "parts": {"a": w1 + ".lr_a", "b": w3 + ".lr_base"}},
                              w3: lr(w3, base=True)}),
        "bad-version": qc(valid, version=2),
        "bad-not-a-weight": qc(dict(valid, **{"model.layers.9.block_sparse_moe.experts.0.w1.weight": lr(w1)})),
        "bad-w3-not-listed": qc({w1: lr(w1)}),
        "bad-fp8": qc({w1: {"encoding": "fp8-block", "block": [128, 128], "parts": {"codes": w1, "scale": w1 + "_scale_inv"}},
                       w3: lr(w3, base=True)}),
        # ragged per-layer expert counts and the keep-map (prune --no-uniform), novices (prune --novices)
        "ragged-counts": dict(qc(valid), experts_per_layer=[4, 3], keep_map=[[0, 1, 2, 3], [0, 2, 3]]),
        "bad-ragged-length": dict(qc(valid), experts_per_layer=[4]),
        "bad-ragged-type": dict(qc(valid), experts_per_layer=["4", -1]),
        "novice-missing-part": qc(dict(valid, **{"model.layers.1.block_sparse_moe.experts.1.w2.weight": {
            "encoding": "novice", "parts": {"value": "model.layers.1.block_sparse_moe.experts.1.w2.weight.novice"}}})),
        "bad-novice-extra-part": qc(dict(valid, **{"model.layers.1.block_sparse_moe.experts.1.w2.weight": {
            "encoding": "novice", "parts": {"value": w1 + ".lr_a", "other": w1 + ".lr_b"}}})),
        # rows of ggml blocks (quantize --codec q8_0): the blocks part must be U8 [rows, row bytes]
        "bad-gguf-blocks-dtype": qc({w1: {"encoding": "gguf-q8_0", "type": "q8_0", "cols": 32, "parts": {"blocks": w1 + ".lr_a"}},
                                     w3: lr(w3, base=True)}),
        "bad-gguf-blocks-cols": qc({w1: {"encoding": "gguf-q4_k", "type": "q4_k", "cols": 33, "parts": {"blocks": w1 + ".lr_a"}},
                                    w3: lr(w3, base=True)}),
    }
    os.makedirs(NC, exist_ok=True)
    for name, obj in nc.items():
        with open(os.path.join(NC, name), "wb") as f:
            f.write(json.dumps(obj, separators=(",", ":")).encode())
    with open(os.path.join(NC, "bad-not-json"), "wb") as f:
        f.write(b'{"quant_method": "moe_tool", "weights": {')


if __name__ == "__main__":
    main()
