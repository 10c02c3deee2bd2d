#!/usr/bin/env python3
"""Checks docs/FORMAT.md's Python decoder against moe-tool itself (offline; needs NumPy only).

    check_native_format.py NATIVE_DIR DENSE_F32_DIR

NATIVE_DIR: a checkpoint written by `moe-tool factorize` (native format); DENSE_F32_DIR: the same
checkpoint after `moe-tool convert NATIVE_DIR DENSE_F32_DIR --materialize --dtype f32`. Every
weight decoded here must equal the dense one to f32 rounding of the factor product.
"""
import json, os, struct, sys
import numpy as np

# ---- the decoder of docs/FORMAT.md (NumPy only) ----
def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        raw = data[b:e]
        dt = info["dtype"]
        if dt == "F32":
            a = np.frombuffer(raw, np.float32)
        elif dt in ("BF16", "F16"):
            u = np.frombuffer(raw, np.uint16)
            a = (u.astype(np.uint32) << 16).view(np.float32) if dt == "BF16" else u.view(np.float16).astype(np.float32)
        elif dt == "F8_E4M3":
            u = np.frombuffer(raw, np.uint8).astype(np.int32)
            s, ex, m = (u >> 7) & 1, (u >> 3) & 15, u & 7
            a = np.where(ex == 0, m / 8.0 * 2.0 ** -6, (1 + m / 8.0) * 2.0 ** (ex - 7.0)) * np.where(s, -1.0, 1.0)
            a = np.where((ex == 15) & (m == 7), np.nan, a).astype(np.float32)
        else:
            a = np.frombuffer(raw, {"I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8, "U16": np.uint16, "U32": np.uint32}[dt])
        out[name] = a.reshape(info["shape"])
    return out

def _unpack_bits(codes, bits, cols):
    """intN codes: an LSB-first bit stream per row -> integers [rows, cols]."""
    b = np.unpackbits(codes, axis=1, bitorder="little")[:, : cols * bits]
    return (b.reshape(codes.shape[0], cols, bits).astype(np.int32) << np.arange(bits)).sum(axis=2)

def _unpack_trits(codes, cols):
    """ternary codes: five base-3 digits per byte, lowest first -> trits [rows, cols]."""
    b = codes.astype(np.int32)
    return np.stack([(b // 3 ** i) % 3 for i in range(5)], axis=2).reshape(b.shape[0], -1)[:, :cols]

def _dict_words(entries):
    """ternary-dict dictionary (the list of expanded nodes) -> each codeword's trits."""
    words = []
    for e in entries.astype(np.int64):
        prefix = [] if e == 0 else words[e - 1]
        words.extend(prefix + [s % 3, s // 3] for s in range(9))
    return words

def _delta_ternary(e, stream, base, scale):
    """delta-ternary: base + scale * sign at the Rice-coded kept positions (docs/FORMAT.md)."""
    bits = np.unpackbits(stream, bitorder="little")
    k, w, i, pos = e["rice_k"], base.astype(np.float32).copy().reshape(-1), 0, -1
    for _ in range(e["nnz"]):
        q = 0
        while bits[i]:
            q, i = q + 1, i + 1
        i += 1
        g = (q << k) | sum(int(bits[i + b]) << b for b in range(k))
        i += k
        pos += g + 1
        w[pos] += np.float32(-scale if bits[i] else scale)
        i += 1
    return w.reshape(base.shape)

def _per_column(v, group, cols):
    """[rows, ngroups] -> [rows, cols]: each group's value over its columns (group 0 = row)."""
    return np.repeat(v, cols if group == 0 else group, axis=1)[:, :cols]

def load_native(folder):
    """Dense f32 weights of a native moe-tool checkpoint by their stock names, and novices."""
    cfg = json.load(open(os.path.join(folder, "config.json")))
    idx = os.path.join(folder, "model.safetensors.index.json")
    files = sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx) else ["model.safetensors"]
    t = {}
    for f in files:
        t.update(read_safetensors(os.path.join(folder, f)))
    q = cfg.get("quantization_config", {})
    enc = q.get("weights", {}) if q.get("quant_method") == "moe_tool" else {}
    parts = {p for e in enc.values() for p in e["parts"].values()}
    out = {k: v.astype(np.float32) for k, v in t.items() if k not in parts}
    words = {}  # ternary-dict: decoded dictionaries by part name (one per checkpoint or per layer)
    novices = {}  # novice experts: the constant output [H] by the expert's down projection name
    for name, e in enc.items():
        if e["encoding"] == "novice":
            novices[name] = t[e["parts"]["value"]].astype(np.float32)
            continue
        r = {role: t[n] for role, n in e["parts"].items()}  # as stored (intN, ternary codes: uint8)
        p = {role: v.astype(np.float32) for role, v in r.items()}
        if e["encoding"] == "lowrank":
            out[name] = p["a"] @ p["b"] + (p["base"] if "base" in p else 0)
        elif e["encoding"] == "pooled":
            out[name] = p["weight"]
        elif e["encoding"] == "delta-ternary":
            out[name] = _delta_ternary(e, r["stream"], p["base"], np.float32(p["scale"][0]))
        elif e["encoding"] == "fp8-block":
            br, bc = e["block"]
            c = p["codes"]
            s = np.repeat(np.repeat(p["scale_inv"], br, 0), bc, 1)[: c.shape[0], : c.shape[1]]
            out[name] = c * s
        elif e["encoding"] == "intN":
            bits, g, cols = e["bits"], e["group"], e["cols"]
            q = _unpack_bits(r["codes"], bits, cols)
            z = 2 ** (bits - 1) if e["symmetric"] else _per_column(r["zeros"].astype(np.int32), g, cols)
            out[name] = _per_column(p["scales"], g, cols) * (q - z).astype(np.float32)
        elif e["encoding"] == "ternary":
            g, cols, s = e["group"], e["cols"], p["scales"]
            lo, hi = (-s, s) if e["symmetric"] else (s[..., 0], s[..., 1])
            tr = _unpack_trits(r["codes"], cols)
            out[name] = np.where(tr == 2, _per_column(hi, g, cols), np.where(tr == 1, _per_column(lo, g, cols), 0)).astype(np.float32)
        elif e["encoding"] == "ternary-dict":
            cols, dn = e["cols"], e["parts"]["dictionary"]
            w = words[dn] = words[dn] if dn in words else _dict_words(r["dictionary"])
            codes, lv = r["codes"].astype(np.int64), p["levels"]
            off = np.concatenate([[0], np.cumsum(r["counts"].astype(np.int64))])
            tr = np.array([[x for c in codes[off[i]:off[i + 1]] for x in w[c]][:cols] for i in range(len(off) - 1)],
                         np.int64).reshape(len(off) - 1, cols)
            out[name] = np.where(tr == 2, lv[:, 1:2], np.where(tr == 1, lv[:, 0:1], 0)).astype(np.float32)
        elif e["encoding"].startswith("gguf-"):
            # rows of GGUF blocks: check_gguf.py's decoder, written from ggml-common.h
            from check_gguf import decode as gguf_decode
            cols = e["cols"]
            out[name] = np.stack([gguf_decode(e["type"], np.ascontiguousarray(row), cols) for row in r["blocks"]]).astype(np.float32)
        else:
            raise ValueError(f"{name}: unknown encoding {e['encoding']}")
    return out, novices
# ---- end of the decoder ----

def main():
    native, dense = sys.argv[1], sys.argv[2]
    (a, novices), (b, _) = load_native(native), load_native(dense)
    assert not novices, "novice experts have no dense form (docs/FORMAT.md): nothing to compare"
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))[:5]
    worst = 0.0
    for k in a:
        scale = max(1e-30, float(np.abs(b[k]).max()))
        worst = max(worst, float(np.abs(a[k] - b[k]).max()) / scale)
    print(json.dumps({"tensors": len(a), "max_relative_difference": worst}))
    assert worst < 1e-5, worst

if __name__ == "__main__":
    main()
