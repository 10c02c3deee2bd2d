#!/usr/bin/env python3
"""Independent check of `moe-tool export --format compressed-tensors|gptq|awq` (NumPy only).

    check_compressed.py NATIVE EXPORT
    check_compressed.py --synthetic-mixtral OUT LAYERS   (a random bf16 mixtral for the timings)
    check_compressed.py --fp8-prune INPUT PRUNED         (a prune of a compressed-tensors FP8 input)

--fp8-prune: INPUT is a compressed-tensors float-quantized checkpoint, PRUNED its prune written
without --format (compressed-tensors float-quantized again). Every FP8 Linear of PRUNED is decoded
(E4M3 code times weight_scale, broadcast per tensor / per row / per block as the config group says)
and must equal, exactly, the decoded INPUT module it came from (the expert index mapped through
moe_tool_report.json's layers[].origin, which composes every pass: one input expert each); its
weight_scale and input_scale must be the
input's, dtype and shape included. Prints one JSON object and exits 1 on any difference.
  E4M3 (OCP 8-bit floating point, the format compressed-tensors' float-quantized stores):
    sign bit 7, exponent bits 6..3 with bias 7, mantissa bits 2..0; exponent 0 is subnormal
    (m / 8 * 2**-6); S.1111.111 is NaN, there is no infinity.

NATIVE: the moe-tool checkpoint that was exported (intN codes, docs/FORMAT.md); EXPORT: the
exported folder. Decodes every packed Linear of EXPORT as the formats' published sources do and
compares it with NATIVE's intN weight decoded here from docs/FORMAT.md (exact: the same f32
products), and every other tensor byte for byte. Prints one JSON object (modules, sum and sum of
squares of every decoded value, bytes of the folder) and exits 1 on any difference.

Layouts, as read from
  compressed-tensors (vllm-project/compressed-tensors, commit 179cba93):
    compressors/quantized_compressors/pack_quantized.py (pack_to_int32 / unpack_from_int32):
    unsigned = signed + 2**(bits-1); 32//bits values per int32, value k in bits [k*bits, ...);
    weight_packed packed along the input dim, weight_zero_point along the output dim;
    W = (q - zero_point) * weight_scale per group.
  GPTQ v1 (AutoGPTQ/AutoGPTQ, auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py, QuantLinear.forward):
    qweight [in/pf, out] packed along the input dim, qzeros [groups, out/pf] holding zero - 1,
    scales [groups, out] fp16, g_idx [in]; W[o, i] = scales[g, o] * (q - (qzero + 1)), g = g_idx[i].
  AWQ GEMM (casper-hansen/AutoAWQ, awq/utils/packing_utils.py at commit 7ee28736: unpack_awq,
  reverse_awq_order, dequantize_gemm; awq/modules/linear/gemm.py WQLinear_GEMM at d9dc8e56):
    qweight [in, out/8] int32, qzeros [groups, out/8] int32, scales [groups, out] fp16, 4 bits;
    unpack_awq shifts every word right by 0, 4, ..., 28 (columnwise: word c gives unpacked columns
    8c .. 8c+7), reverse_awq_order reorders each run of 8 columns by AWQ_REVERSE_ORDER
    (0, 4, 1, 5, 2, 6, 3, 7), both masked to 4 bits; W[o, i] = scales[i // G, o] * (q - z), the
    zero point as stored (decoded here in f32; dequantize_gemm multiplies in fp16).
"""
import json
import os
import struct
import sys

import numpy as np

DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8,
          "U16": np.uint16, "BF16": np.uint16, "F8_E4M3": np.uint8}


def tensors(folder):
    """name -> (dtype string, shape, raw bytes) over every safetensors file of the folder."""
    out = {}
    for fn in sorted(os.listdir(folder)):
        if not fn.endswith(".safetensors"):
            continue
        with open(os.path.join(folder, fn), "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
            data = f.read()
        for name, info in header.items():
            if name != "__metadata__":
                b, e = info["data_offsets"]
                out[name] = (info["dtype"], info["shape"], data[b:e])
    return out


def array(t):
    dt, shape, raw = t
    return np.frombuffer(raw, DTYPES[dt]).reshape(shape)


def unpack_int32(words, bits, n, axis):
    """pack_to_int32's inverse: unsigned values, `n` of them along `axis` (0 or 1)."""
    pf = 32 // bits
    w = words.astype(np.uint32)
    parts = [(w >> np.uint32(bits * k)) & np.uint32((1 << bits) - 1) for k in range(pf)]
    stacked = np.stack(parts, axis=axis + 1)  # value k of word j -> index j*pf + k
    shape = list(w.shape)
    shape[axis] *= pf
    return stacked.reshape(shape).take(np.arange(n), axis=axis).astype(np.int64)


def decode_ct(t, mod, bits):
    out_f, in_f = (int(x) for x in array(t[mod + ".weight_shape"]))
    off = 1 << (bits - 1)
    q = unpack_int32(array(t[mod + ".weight_packed"]), bits, in_f, 1) - off
    scale = array(t[mod + ".weight_scale"]).astype(np.float32)
    groups = scale.shape[1]
    z = np.zeros((out_f, groups), np.int64)
    if mod + ".weight_zero_point" in t:
        z = unpack_int32(array(t[mod + ".weight_zero_point"]), bits, out_f, 0) - off
    g = np.arange(in_f) // (in_f // groups)
    return (q - z[:, g]).astype(np.float32) * scale[:, g]


def decode_gptq(t, mod, bits):
    scales = array(t[mod + ".scales"]).astype(np.float32)  # [groups, out]
    g_idx = array(t[mod + ".g_idx"]).astype(np.int64)
    out_f, in_f = scales.shape[1], g_idx.shape[0]
    if g_idx.min() < 0 or g_idx.max() >= scales.shape[0]:
        raise SystemExit(f"{mod}.g_idx: out of range")
    q = unpack_int32(array(t[mod + ".qweight"]), bits, in_f, 0)  # [in, out]
    z = unpack_int32(array(t[mod + ".qzeros"]), bits, out_f, 1) + 1  # [groups, out]
    return ((q - z[g_idx, :]).astype(np.float32) * scales[g_idx, :]).T


AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def decode_awq(t, mod, bits):
    assert bits == 4, "AWQ GEMM packs 4 bits"
    qweight, qzeros = array(t[mod + ".qweight"]), array(t[mod + ".qzeros"])
    scales = array(t[mod + ".scales"])
    assert scales.dtype == np.float16

    def unpack(x):  # unpack_awq: columnwise, shifts 0, 4, ..., 28
        shifts = np.arange(0, 32, bits, dtype=np.uint32)
        u = (x.astype(np.uint32)[:, :, None] >> shifts[None, None, :]).reshape(x.shape[0], -1)
        return u

    iw, iz = unpack(qweight), unpack(qzeros)
    order = np.arange(iz.shape[-1]).reshape(-1, 32 // bits)[:, AWQ_REVERSE_ORDER].reshape(-1)  # reverse_awq_order
    iw, iz = iw[:, order] & np.uint32(15), iz[:, order] & np.uint32(15)
    group = iw.shape[0] // iz.shape[0]
    s = np.repeat(scales.astype(np.float32), group, axis=0)
    z = np.repeat(iz.astype(np.int64), group, axis=0)
    return ((iw.astype(np.int64) - z).astype(np.float32) * s).T  # [out, in]


def decode_native(t, entry):
    """An intN weight of docs/FORMAT.md: LSB-first bit stream codes, f16 scales, u8 zeros."""
    bits, group, cols, sym = entry["bits"], entry["group"], entry["cols"], entry["symmetric"]
    codes = array(t[entry["parts"]["codes"]])
    b = np.unpackbits(codes, axis=1, bitorder="little")[:, : cols * bits]
    q = (b.reshape(codes.shape[0], cols, bits).astype(np.int64) << np.arange(bits)).sum(axis=2)
    scales = array(t[entry["parts"]["scales"]]).astype(np.float32)
    zeros = np.full(scales.shape, 1 << (bits - 1), np.int64) if sym else array(t[entry["parts"]["zeros"]]).astype(np.int64)
    g = np.arange(cols) // (cols if group == 0 else group)
    return (q - zeros[:, g]).astype(np.float32) * scales[:, g]


def synthetic_mixtral(out, layers):
    """Random bf16 mixtral: hidden 1024, 8 experts of width 2816 (top-2), vocab 4096, `layers` layers."""
    H, I, E, V = 1024, 2816, 8, 4096
    cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": H, "intermediate_size": I,
           "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 8, "num_local_experts": E,
           "num_experts_per_tok": 2, "vocab_size": V, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
           "rope_theta": 1e6, "sliding_window": None, "hidden_act": "silu", "tie_word_embeddings": False,
           "torch_dtype": "bfloat16"}
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for l in range(layers):
        p = f"model.layers.{l}."
        shapes.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                       p + "block_sparse_moe.gate.weight": (E, H)})
        for n in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{n}_proj.weight"] = (H, H)
        for e in range(E):
            for w, shape in (("w1", (I, H)), ("w2", (H, I)), ("w3", (I, H))):
                shapes[p + f"block_sparse_moe.experts.{e}.{w}.weight"] = shape
    rng = np.random.default_rng(0)
    header, blobs, off = {}, [], 0
    for name, shape in shapes.items():
        x = (rng.standard_normal(shape, np.float32) * 0.02).astype(np.float32)
        raw = (x.view(np.uint32) >> 16).astype(np.uint16).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    os.makedirs(out)
    with open(os.path.join(out, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for b in blobs:
            f.write(b)
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=2)


def e4m3_table():
    t = np.zeros(256, np.float32)
    for c in range(256):
        sign = -1.0 if c & 0x80 else 1.0
        e, m = (c >> 3) & 0xF, c & 0x7
        if e == 0xF and m == 0x7:
            t[c] = np.nan
        elif e == 0:
            t[c] = sign * (m / 8.0) * 2.0 ** -6
        else:
            t[c] = sign * (1.0 + m / 8.0) * 2.0 ** (e - 7)
    return t


def scale_f32(t):
    dt, shape, raw = t
    if dt == "BF16":
        return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return array(t).astype(np.float32)


def decode_fp8(t, mod, table):
    codes = array(t[mod + ".weight"])
    w = table[codes]
    s = scale_f32(t[mod + ".weight_scale"])
    out, inp = w.shape
    if s.size == 1:
        return w * s.reshape(())
    if s.size == out:
        return w * s.reshape(out, 1)
    br, bc = -(-out // s.shape[0]), -(-inp // s.shape[1])  # block strategy: [ceil(out/br), ceil(in/bc)]
    return w * np.repeat(np.repeat(s, br, axis=0), bc, axis=1)[:out, :inp]


def check_fp8_prune(in_dir, out_dir):
    import re
    it, ot = tensors(in_dir), tensors(out_dir)
    qc = json.load(open(os.path.join(out_dir, "config.json")))["quantization_config"]
    qin = json.load(open(os.path.join(in_dir, "config.json")))["quantization_config"]
    bad = []
    if qc.get("quant_method") != "compressed-tensors" or qc.get("format") != "float-quantized":
        bad.append("config: not compressed-tensors float-quantized")
        print(json.dumps({"mismatches": bad}))
        return 1
    for k in ("format", "quantization_status", "kv_cache_scheme"):
        if qc.get(k) != qin.get(k):
            bad.append("config: " + k + " differs from the input's")
    kept = {}
    for layer in json.load(open(os.path.join(out_dir, "moe_tool_report.json")))["layers"]:
        if layer.get("origin") is None:
            continue
        ids = []
        for e, sources in enumerate(layer["origin"]):
            if len(sources) != 1:
                bad.append("layer %d expert %d: made of %d input experts (not a prune)" % (layer["layer"], e, len(sources)))
            ids.append(int(sources[0][0]))
        kept[layer["layer"]] = ids
    table = e4m3_table()
    modules = sorted(n[: -len(".weight")] for n, t in ot.items() if n.endswith(".weight") and t[0] == "F8_E4M3")
    total = 0.0
    for mod in modules:
        m = re.match(r"^(.*\.layers\.(\d+)\..*\.experts\.)(\d+)(\..+)$", mod)
        src = mod
        if m and int(m.group(2)) in kept:
            src = m.group(1) + str(kept[int(m.group(2))][int(m.group(3))]) + m.group(4)
        w, ref = decode_fp8(ot, mod, table), decode_fp8(it, src, table)
        if w.shape != ref.shape or not np.array_equal(w, ref, equal_nan=True):
            bad.append(mod + " (decoded: differs from the input's " + src + ")")
        for part in (".weight_scale", ".input_scale"):
            if (src + part in it) != (mod + part in ot) or (src + part in it and it[src + part] != ot[mod + part]):
                bad.append(mod + part + " (not the input's " + src + part + " as stored)")
        total += float(w.astype(np.float64).sum())
    if not modules:
        bad.append("no F8_E4M3 weight in " + out_dir)
    print(json.dumps({"fp8_modules": len(modules), "kept_experts": sum(len(v) for v in kept.values()), "sum": total, "mismatches": bad}))
    return 1 if bad else 0


def main():
    for d in sys.argv[2:] if sys.argv[1:2] == ["--fp8-prune"] else sys.argv[1:] if len(sys.argv) == 3 else []:
        if not os.path.isdir(d):
            print(json.dumps({"error": d + ": not a folder"}))
            return 2
    if len(sys.argv) == 4 and sys.argv[1] == "--fp8-prune":
        return check_fp8_prune(sys.argv[2], sys.argv[3])
    if len(sys.argv) == 4 and sys.argv[1] == "--synthetic-mixtral":
        synthetic_mixtral(sys.argv[2], int(sys.argv[3]))
        return 0
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    native_dir, export_dir = sys.argv[1], sys.argv[2]
    nt, et = tensors(native_dir), tensors(export_dir)
    ncfg = json.load(open(os.path.join(native_dir, "config.json")))
    qc = json.load(open(os.path.join(export_dir, "config.json")))["quantization_config"]
    weights = ncfg["quantization_config"]["weights"]
    method = qc["quant_method"]
    if method == "gptq":
        bits, key = qc["bits"], ".qweight"
        assert qc["checkpoint_format"] == "gptq" and qc["desc_act"] is False
    elif method == "awq":
        bits, key = qc["bits"], ".qweight"
        assert qc["version"] == "gemm" and qc["zero_point"] is True and qc["group_size"] > 0
        skip = qc.get("modules_to_not_convert") or []
    else:
        assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
        bits, key = qc["config_groups"]["group_0"]["weights"]["num_bits"], ".weight_packed"
    modules = sorted(n[: -len(key)] for n in et if n.endswith(key))
    bad, total, total_sq, parts = [], 0.0, 0.0, set()
    for mod in modules:
        w = {"gptq": decode_gptq, "awq": decode_awq}.get(method, decode_ct)(et, mod, bits)
        if method == "awq" and any(d in mod for d in skip):  # the loaders match substrings
            bad.append(mod + " (quantized, but matched by modules_to_not_convert)")
        ref = decode_native(nt, weights[mod + ".weight"])
        if w.shape != ref.shape or not np.array_equal(w, ref):
            bad.append(mod)
        w64 = w.astype(np.float64).ravel()
        total += float(w64.sum())
        total_sq += float((w64 * w64).sum())
        parts.update(n for n in et if n.startswith(mod + "."))
    if set(modules) != {n[: -len(".weight")] for n, e in weights.items() if e["encoding"] == "intN"}:
        bad.append("the packed modules are not the native intN weights")
    for n in et:
        if n not in parts and (n not in nt or et[n] != nt[n]):
            bad.append(n + " (dense: differs from the native tensor)")
    size = sum(os.path.getsize(os.path.join(export_dir, f)) for f in os.listdir(export_dir) if f != ".moe-tool-output.json")
    print(json.dumps({"modules": len(modules), "sum": total, "sum_sq": total_sq, "bytes": size, "mismatches": bad}))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
