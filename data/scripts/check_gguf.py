#!/usr/bin/python3
"""Independent check of moe-tool's GGUF export (NumPy only, offline).

Parses a GGUF v3 file from the published layout (gguf docs: header, typed metadata, tensor infos,
aligned data section) and decodes every block type moe-tool writes from the block structs of
ggml-common.h (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, TQ1_0, TQ2_0, Q2_K..Q6_K, with the bit order of
the dequantize_row_q*_K functions), without any code of the tool or of llama.cpp. Then compares each tensor with the source checkpoint's safetensors (stacked experts,
q/k rows permuted for arch llama as convert_hf_to_gguf.py does; a dense model's MLPs), checks every block is within one
quantization step of its source (half a step for the ternary types; for the K-quants one step d * |sc| of
each sub-block), and prints per tensor: type, max abs error, and checksums of the
decoded values in float64: sum, sum of squares, and sum_w = sum of y[i] * (i % 97 + 1) (order-sensitive:
catches rows or blocks in the wrong place, e.g. a missing q/k permutation).

  check_gguf.py MODEL_DIR FILE.gguf                 # check, print a summary, exit 1 on a failure
  check_gguf.py --golden MODEL_DIR:TYPE:FILE.gguf ...  # the same for several files, goldens JSON on stdout

data/golden/gguf.json was made with (from the repository root, after building moe-tool):
  M="mixtral-tiny qwen2moe-tiny validation-tiny llama-tiny"; T="f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1"; mkdir -p /tmp/gg
  for m in $M; do for t in $T; do
    build/moe-tool -q export data/models/$m /tmp/gg/$m-$t.gguf --type $t --force; done; done
  D="tq1_0 tq2_0 q2_k q3_k q4_k q5_k q6_k"
  for t in $D; do build/moe-tool -q export data/models/mixtral-tiny /tmp/gg/mixtral-tiny-${t}_down.gguf \
    --type q8_0 --tensor-type ffn_down_exps=$t --force; done
  build/moe-tool -q export data/models/qwen2moe-tiny /tmp/gg/qwen2moe-tiny-q4_k_shexp.gguf \
    --type q8_0 --tensor-type ffn_down_shexp=q4_k --force
  /usr/bin/python3 data/scripts/check_gguf.py --golden \
    $(for m in $M; do for t in $T; do echo data/models/$m:$t:/tmp/gg/$m-$t.gguf; done; done) \
    $(for t in $D; do echo data/models/mixtral-tiny:${t}_down:/tmp/gg/mixtral-tiny-${t}_down.gguf; done) \
    data/models/qwen2moe-tiny:q4_k_shexp:/tmp/gg/qwen2moe-tiny-q4_k_shexp.gguf \
    > data/golden/gguf.json
"""
import json
import struct
import sys

import numpy as np

# ---- GGUF container ----

VALUE_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
# ggml type id -> (name, values per block, bytes per block)
GGML_TYPES = {0: ("f32", 1, 4), 1: ("f16", 1, 2), 30: ("bf16", 1, 2), 8: ("q8_0", 32, 34), 2: ("q4_0", 32, 18),
              3: ("q4_1", 32, 20), 6: ("q5_0", 32, 22), 7: ("q5_1", 32, 24), 34: ("tq1_0", 256, 54),
              35: ("tq2_0", 256, 66), 10: ("q2_k", 256, 84), 11: ("q3_k", 256, 110), 12: ("q4_k", 256, 144),
              13: ("q5_k", 256, 176), 14: ("q6_k", 256, 210)}
BLOCK_BYTES = {t[0]: t[2] for t in GGML_TYPES.values()}


class Reader:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt):
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def string(self):
        n = self.take("<Q")
        assert self.pos + n <= len(self.buf), "string past the end"
        s = self.buf[self.pos:self.pos + n].decode("utf-8")
        self.pos += n
        return s

    def value(self, t):
        if t == STRING:
            return self.string()
        if t == ARRAY:
            et, n = self.take("<I"), self.take("<Q")
            return [self.value(et) for _ in range(n)]
        return self.take(VALUE_FORMATS[t])


def read_gguf(path):
    buf = open(path, "rb").read()
    r = Reader(buf)
    assert buf[:4] == b"GGUF", "magic"
    r.pos = 4
    assert r.take("<I") == 3, "version"
    n_tensors, n_kv = r.take("<Q"), r.take("<Q")
    kv = {}
    for _ in range(n_kv):
        k = r.string()
        assert k not in kv, "duplicate key " + k
        kv[k] = r.value(r.take("<I"))
    align = kv.get("general.alignment", 32)
    infos = []
    for _ in range(n_tensors):
        name = r.string()
        nd = r.take("<I")
        assert 1 <= nd <= 4
        ne = [r.take("<Q") for _ in range(nd)]
        infos.append((name, ne, r.take("<I"), r.take("<Q")))
    data = (r.pos + align - 1) // align * align
    tensors = {}
    for name, ne, t, off in infos:
        assert name not in tensors, "duplicate tensor " + name
        assert off % align == 0, name + ": misaligned"
        tname, bs, ts = GGML_TYPES[t]
        assert ne[0] % bs == 0
        n = int(np.prod(ne))
        nbytes = n // bs * ts
        assert data + off + nbytes <= len(buf), name + ": data past the end"
        raw = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=data + off)
        tensors[name] = (tname, ne, raw)
    return kv, tensors


# ---- block decoders (ggml-common.h layouts) ----

def f16(u8pairs):
    return u8pairs.copy().view("<f2").astype(np.float32)


def nibbles(qs):  # qs [blocks, 16] -> codes [blocks, 32]: element j low nibble of qs[j], j+16 high
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int32)


def high_bits(qh):  # qh [blocks, 4] little-endian u32 -> bit j of element j, as 16 or 0
    u = qh.copy().view("<u4").reshape(-1, 1)
    return (((u >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.int32)


def trits(q, n):  # trit n (weight 3^(4-n)) of bytes q holding ceil(sum t_k 3^(4-k) * 256 / 243)
    return ((((q.astype(np.uint32) * 3 ** n) & 0xFF) * 3) >> 8).astype(np.int32)


def decode(tname, raw, n):
    if tname == "f32":
        return raw.copy().view("<f4")
    if tname == "f16":
        return raw.copy().view("<f2").astype(np.float32)
    if tname == "bf16":
        return (raw.copy().view("<u2").astype(np.uint32) << 16).view(np.float32)
    if tname in K_QUANTS:
        step, offset, q = k_parts(tname, raw)
        return (step * q.astype(np.float32) - offset).reshape(-1)
    b = raw.reshape(-1, BLOCK_BYTES[tname])
    d = block_scale(tname, raw).reshape(-1, 1)
    if tname == "q8_0":
        return (d * b[:, 2:].view(np.int8).astype(np.float32)).reshape(-1)
    if tname == "q4_0":
        return (d * (nibbles(b[:, 2:]) - 8)).reshape(-1)
    if tname == "q4_1":
        return (d * nibbles(b[:, 4:]) + f16(b[:, 2:4]).reshape(-1, 1)).reshape(-1)
    if tname == "q5_0":
        return (d * ((nibbles(b[:, 6:]) | high_bits(b[:, 2:6])) - 16)).reshape(-1)
    if tname == "q5_1":
        return (d * (nibbles(b[:, 8:]) | high_bits(b[:, 4:8])) + f16(b[:, 2:4]).reshape(-1, 1)).reshape(-1)
    if tname == "tq2_0":  # qs[64]: element 128h + 32l + m in bits 2l of qs[32h + m]
        qs = b[:, :64].reshape(-1, 2, 1, 32).astype(np.int32)
        t = (qs >> (2 * np.arange(4).reshape(1, 1, 4, 1))) & 3
        return (d * (t.reshape(-1, 256) - 1)).reshape(-1)
    if tname == "tq1_0":  # qs[0:32] trit n -> 32n + m; qs[32:48] -> 160 + 16n + m; qh[48:52] -> 240 + 4n + j
        parts = [np.concatenate([trits(b[:, 0:32], k) for k in range(5)], axis=1),
                 np.concatenate([trits(b[:, 32:48], k) for k in range(5)], axis=1),
                 np.concatenate([trits(b[:, 48:52], k) for k in range(4)], axis=1)]
        return (d * (np.concatenate(parts, axis=1) - 1)).reshape(-1)
    raise ValueError(tname)


K_QUANTS = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")


def plane2(qs):  # qs [blocks, 64] -> [blocks, 256]: element 128h + 32k + l in bits 2k of qs[32h + l]
    v = qs.reshape(-1, 2, 1, 32).astype(np.int32) >> (2 * np.arange(4).reshape(1, 1, 4, 1))
    return (v & 3).reshape(-1, 256)


def scale_min_k4(sb):  # scales[12] of q4_K / q5_K -> six-bit (sc, m) [blocks, 8] (get_scale_min_k4)
    sb = sb.astype(np.int32)
    sc = np.concatenate([sb[:, 0:4] & 63, (sb[:, 8:12] & 0xF) | ((sb[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([sb[:, 4:8] & 63, (sb[:, 8:12] >> 4) | ((sb[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


def k_parts(tname, raw):
    """A K-quant row as float32 step [values] (d * sc of each value's sub-block), float32 offset
    (dmin * m, or 0) and integer codes q, so that x = step * q - offset in float32, the order
    dequantize_row_q*_K computes."""
    b = raw.reshape(-1, BLOCK_BYTES[tname])
    zero = np.zeros((b.shape[0], 16), np.float32)
    if tname == "q6_k":  # ql[128] qh[64] i8 scales[16] d
        ql = b[:, 0:128].reshape(-1, 2, 2, 32).astype(np.int32)  # [h][k % 2][l]
        low = np.stack([ql & 0xF, ql >> 4], axis=2)  # [h][k / 2][k % 2][l]
        q = (low.reshape(-1, 256) | (plane2(b[:, 128:192]) << 4)) - 32
        sc, d, m = b[:, 192:208].view(np.int8).astype(np.float32), f16(b[:, 208:210]), zero
    elif tname == "q3_k":  # hmask[32] qs[64] scales[12] d
        hbit = (b[:, 0:32].reshape(-1, 1, 32).astype(np.int32) >> np.arange(8).reshape(1, 8, 1)) & 1  # [4h + k][l]
        q = plane2(b[:, 32:96]) + (hbit.reshape(-1, 256) << 2) - 4
        sb = b[:, 96:108].astype(np.int32)
        low = np.concatenate([sb[:, 0:8] & 0xF, sb[:, 0:8] >> 4], axis=1)
        high = (sb[:, 8:12].reshape(-1, 1, 4) >> (2 * np.arange(4).reshape(1, 4, 1))) & 3  # [j / 4][j % 4]
        sc, d, m = (low | (high.reshape(-1, 16) << 4)).astype(np.float32) - 32, f16(b[:, 108:110]), zero
    elif tname == "q2_k":  # scales[16] qs[64] d dmin
        sc, m = (b[:, 0:16] & 0xF).astype(np.float32), (b[:, 0:16] >> 4).astype(np.float32)
        q, d = plane2(b[:, 16:80]), f16(b[:, 80:82])
    else:  # q4_k / q5_k: d dmin scales[12] (qh[32]) qs[128]
        sc, m = (v.astype(np.float32) for v in scale_min_k4(b[:, 4:16]))
        qs = b[:, 48:176] if tname == "q5_k" else b[:, 16:144]
        qs = qs.reshape(-1, 4, 1, 32).astype(np.int32)  # [c][l]
        q = ((qs >> np.array([0, 4]).reshape(1, 1, 2, 1)) & 0xF).reshape(-1, 256)  # [c][h][l]
        if tname == "q5_k":
            q = q | ((((b[:, 16:48].reshape(-1, 1, 32).astype(np.int32) >> np.arange(8).reshape(1, 8, 1)) & 1) << 4)
                     .reshape(-1, 256))
        d = f16(b[:, 0:2])
    per = 256 // sc.shape[1]
    step = np.repeat(d.reshape(-1, 1) * sc, per, axis=1)  # float32 products, as decode
    if tname in ("q6_k", "q3_k"):
        offset = np.zeros_like(step)
    else:
        dmin = f16(b[:, 82:84]) if tname == "q2_k" else f16(b[:, 2:4])
        offset = np.repeat(dmin.reshape(-1, 1) * m, per, axis=1)
    return step, offset, q


def block_scale(tname, raw):
    """Per block f16 scale d: at the start of the 32-blocks, at the end of the ternary ones."""
    b = raw.reshape(-1, BLOCK_BYTES[tname])
    return f16(b[:, -2:] if tname.startswith("tq") else b[:, 0:2])


def block_bound(tname, raw):
    """Largest error nearest rounding onto a block's grid may leave: one step d for the 32-blocks
    (the symmetric grids clamp their positive end), d / 2 for the ternary {-d, 0, d}."""
    if tname in K_QUANTS:  # one step d * |sc| of each value's sub-block, as a per-value bound
        return np.abs(k_parts(tname, raw)[0]).astype(np.float64).reshape(-1)
    d = np.abs(block_scale(tname, raw)).astype(np.float64)
    return d / 2 if tname.startswith("tq") else d


# ---- source checkpoint ----

def read_safetensors(path):
    buf = open(path, "rb").read()
    n = struct.unpack_from("<Q", buf, 0)[0]
    header = json.loads(buf[8:8 + n])
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        a, b = h["data_offsets"]
        raw = np.frombuffer(buf, dtype=np.uint8, count=b - a, offset=8 + n + a)
        if h["dtype"] == "BF16":
            v = (raw.copy().view("<u2").astype(np.uint32) << 16).view(np.float32)
        elif h["dtype"] == "F32":
            v = raw.copy().view("<f4")
        elif h["dtype"] == "F16":
            v = raw.copy().view("<f2").astype(np.float32)
        else:
            raise ValueError(name + ": " + h["dtype"])
        out[name] = v.reshape(h["shape"])
    return out


ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe",
        "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
DENSE = ("llama", "qwen2", "qwen3")  # every layer an MLP: ffn_{gate,up,down}, no expert keys
EXPERTS = {"mixtral": ("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{e}.w1.weight",
                       "block_sparse_moe.experts.{e}.w3.weight", "block_sparse_moe.experts.{e}.w2.weight")}
QWEN_EXPERTS = ("mlp.gate.weight", "mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight",
                "mlp.experts.{e}.down_proj.weight")
ATTN = {"attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
        "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
        "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
        "attn_v.bias": "self_attn.v_proj.bias", "attn_q_norm.weight": "self_attn.q_norm.weight",
        "attn_k_norm.weight": "self_attn.k_norm.weight", "attn_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
        "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
        "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
        "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
        "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight"}


def permute(w, heads):  # as convert_hf_to_gguf.py's LlamaModel.permute
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def source_tensor(cfg, st, gname):
    mt = cfg["model_type"]
    glob = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}
    if gname in glob:
        return st[glob[gname]]
    _, l, rest = gname.split(".", 2)
    pre = "model.layers." + l + "."
    router, gate, up, down = EXPERTS.get(mt, QWEN_EXPERTS)
    n_exp = cfg.get("num_local_experts", cfg.get("num_experts"))
    stacked = {"ffn_gate_exps.weight": gate, "ffn_up_exps.weight": up, "ffn_down_exps.weight": down}
    if rest == "ffn_gate_inp.weight":
        return st[pre + router]
    if rest in stacked:
        return np.stack([st[pre + stacked[rest].format(e=e)] for e in range(n_exp)])
    w = st[pre + ATTN[rest]]
    if ARCH[mt] == "llama" and rest == "attn_q.weight":
        w = permute(w, cfg["num_attention_heads"])
    if ARCH[mt] == "llama" and rest == "attn_k.weight":
        w = permute(w, cfg["num_key_value_heads"])
    return w


def check(model_dir, path):
    cfg = json.load(open(model_dir + "/config.json"))
    st = read_safetensors(model_dir + "/model.safetensors")
    kv, tensors = read_gguf(path)
    failures = []
    if kv["general.architecture"] != ARCH[cfg["model_type"]]:
        failures.append("general.architecture " + kv["general.architecture"])
    arch = kv["general.architecture"]
    dense = cfg["model_type"] in DENSE
    for key, want in (("block_count", cfg["num_hidden_layers"]), ("embedding_length", cfg["hidden_size"]),
                      ("attention.head_count", cfg["num_attention_heads"]),
                      ("attention.head_count_kv", cfg["num_key_value_heads"]),
                      ("feed_forward_length", cfg["intermediate_size"]) if dense else
                      ("expert_used_count", cfg["num_experts_per_tok"])):
        if kv.get(arch + "." + key) != want:
            failures.append("%s.%s = %s, config %s" % (arch, key, kv.get(arch + "." + key), want))
    if dense and arch + ".expert_count" in kv:
        failures.append(arch + ".expert_count in a dense model's file")
    if len(kv["tokenizer.ggml.tokens"]) != tensors["token_embd.weight"][1][1]:
        failures.append("tokenizer.ggml.tokens: %d tokens" % len(kv["tokenizer.ggml.tokens"]))
    stats = {}
    for name, (tname, ne, raw) in tensors.items():
        n = int(np.prod(ne))
        y = decode(tname, raw, n).astype(np.float64)
        src = source_tensor(cfg, st, name).astype(np.float64).reshape(-1)
        if src.size != n:
            failures.append("%s: %d values, source %d" % (name, n, src.size))
            continue
        err = np.abs(y - src)
        if tname in ("f32",) and err.max() != 0:
            failures.append(name + ": f32 differs from the source")
        if tname not in ("f32", "f16", "bf16"):
            bound = block_bound(tname, raw).reshape(-1)
            per_block = err.reshape(bound.size, -1).max(axis=1)
            worst = per_block - bound * (1 + 1e-3) - 1e-7
            if (worst > 0).any():
                b = int(np.argmax(worst))
                failures.append("%s: block %d error %.6g beyond its bound %.6g" % (name, b, per_block[b], bound[b]))
        stats[name] = {"type": tname, "ne": ne, "max_abs_err": float(err.max()),
                       "sum": float(y.sum()), "sum_sq": float((y * y).sum()),
                       "sum_w": float((y * (np.arange(n) % 97 + 1)).sum())}
    return kv, stats, failures


GOLDEN_TENSORS = ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.1.ffn_down_exps.weight",
                  "blk.0.ffn_gate_inp.weight", "output_norm.weight", "output.weight", "blk.1.ffn_down.weight"]


def main(argv):
    if argv and argv[0] == "--golden":
        out, bad = {}, False
        for spec in argv[1:]:
            model_dir, t, path = spec.split(":", 2)
            _, stats, failures = check(model_dir, path)
            for f in failures:
                print(path + ": " + f, file=sys.stderr)
            bad = bad or bool(failures)
            key = model_dir.rstrip("/").split("/")[-1]
            # Plus layer 1's K-quant tensors outside that list (the shared expert's down projection).
            names = GOLDEN_TENSORS + [n for n in sorted(stats) if n.startswith("blk.1.") and n not in GOLDEN_TENSORS
                                      and stats[n]["type"] in K_QUANTS]
            out.setdefault(key, {})[t] = {n: stats[n] for n in names if n in stats}
        print(json.dumps(out, indent=1, sort_keys=True))
        return 1 if bad else 0
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    kv, stats, failures = check(argv[0], argv[1])
    by_type = {}
    for s in stats.values():
        by_type.setdefault(s["type"], []).append(s["max_abs_err"])
    print("%s: %s, %d tensors, %d metadata keys" % (argv[1], kv["general.architecture"], len(stats), len(kv)))
    for t, errs in sorted(by_type.items()):
        print("  %-5s %3d tensors, max abs error vs source %.6g" % (t, len(errs), max(errs)))
    for f in failures:
        print("FAIL " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
