#!/usr/bin/env python3
"""Tiny AWQ and FP8 (compressed-tensors) mixtral checkpoints and their decoded goldens (NumPy only).

    make_packed_inputs.py [REPO]      (default: the repository holding this script)

Writes data/packed-inputs/{awq-tiny,fp8-tiny}/ (config.json + model.safetensors) and
data/golden/packed-inputs/{awq-tiny,fp8-tiny}/model.safetensors: every quantized Linear's weight
[out, in] as F32, decoded here from the stored tensors by the formats' published rules (not by
moe-tool). tests/cli/packed_input_test.cpp checks that `moe-tool convert --dtype f32` of each
fixture equals its golden exactly. Deterministic (seeded); rerunning rewrites identical files.

Model: mixtral, hidden 32, 4 heads / 2 kv heads of dim 8, 4 experts of width 64, top-2, 2 layers,
vocab 64; dense tensors bf16 (random, |x| < 0.5).

AWQ GEMM, as read from casper-hansen/AutoAWQ (awq/modules/linear/gemm.py WQLinear_GEMM.from_linear,
awq/utils/packing_utils.py AWQ_ORDER, AWQ_REVERSE_ORDER, unpack_awq, reverse_awq_order,
dequantize_gemm): experts quantized here to asymmetric int4 groups of 16 inputs,
  qweight I32 [in, out/8]: word [i, c] holds output 8c + AWQ_ORDER[k] in bits [4k, 4k+4)
  qzeros  I32 [in/16, out/8]: zero points, the same order
  scales  F16 [in/16, out]
  W[o, i] = scales[i // 16, o] * (q - z)   (decoded here in f32: exact; dequantize_gemm's f16
                                            arithmetic would round the product)
  config: {"quant_method": "awq", "bits": 4, "group_size": 16, "zero_point": true, "version": "gemm"}

compressed-tensors float-quantized FP8 (vllm-project/compressed-tensors, QuantizationArgs
type "float", num_bits 8; the weight stays F8_E4M3 under `.weight`, `.weight_scale` beside it):
  group_0: the experts, strategy "channel": weight_scale F32 [out, 1], dynamic FP8 activations
  group_1: the attention projections, strategy "tensor": weight_scale BF16 [1] and a static
           input_scale F32 [1]
  ignore: lm_head and the routers.  W = e4m3(code) * scale (E4M3 as float8_e4m3fn: bias 7, no
  infinities, 0x7F / 0xFF NaN, never drawn here).
"""
import json
import os
import struct
import sys

import numpy as np

H, HEADS, KV, HD, E, I, L, V = 32, 4, 2, 8, 4, 64, 2, 64
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]
GROUP = 16


def bf16(x):
    """f32 values rounded to bf16 (nearest even), returned as (uint16 bits, f32 values)."""
    b = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    return b, (b.astype(np.uint32) << 16).view(np.float32)


def write_safetensors(path, tensors):
    """tensors: list of (name, dtype string, shape, bytes)."""
    header, off, blobs = {}, 0, []
    for name, dt, shape, data in tensors:
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(data)]}
        off += len(data)
        blobs.append(data)
    h = json.dumps(header, separators=(",", ":"))
    h += " " * (-len(h) % 8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h.encode() + b"".join(blobs))


def config(q):
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": H,
            "intermediate_size": I, "num_hidden_layers": L, "num_attention_heads": HEADS,
            "num_key_value_heads": KV, "head_dim": HD, "num_local_experts": E, "num_experts_per_tok": 2,
            "vocab_size": V, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
            "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "bfloat16",
            "bos_token_id": 1, "eos_token_id": 2, "quantization_config": q}


def linears():
    """(module, out, in, kind) of every Linear, kind 'attn' / 'expert' / 'router'."""
    out = []
    for l in range(L):
        p = f"model.layers.{l}."
        for name, o, i in (("q_proj", HEADS * HD, H), ("k_proj", KV * HD, H), ("v_proj", KV * HD, H),
                           ("o_proj", H, HEADS * HD)):
            out.append((p + "self_attn." + name, o, i, "attn"))
        out.append((p + "block_sparse_moe.gate", E, H, "router"))
        for e in range(E):
            for name, o, i in (("w1", I, H), ("w2", H, I), ("w3", I, H)):
                out.append((p + f"block_sparse_moe.experts.{e}.{name}", o, i, "expert"))
    return out


def dense(rng, name, shape, tensors):
    b, _ = bf16(rng.uniform(-0.5, 0.5, shape).astype(np.float32))
    tensors.append((name, "BF16", shape, b.tobytes()))


def norms_and_globals(rng, tensors):
    dense(rng, "model.embed_tokens.weight", (V, H), tensors)
    for l in range(L):
        for n in ("input_layernorm", "post_attention_layernorm"):
            b, _ = bf16(1.0 + rng.uniform(-0.1, 0.1, (H,)).astype(np.float32))
            tensors.append((f"model.layers.{l}.{n}.weight", "BF16", (H,), b.tobytes()))
    b, _ = bf16(1.0 + rng.uniform(-0.1, 0.1, (H,)).astype(np.float32))
    tensors.append(("model.norm.weight", "BF16", (H,), b.tobytes()))
    dense(rng, "lm_head.weight", (V, H), tensors)


# --- AWQ ---------------------------------------------------------------------------------------

def awq_quantize(w):
    """Asymmetric int4 groups of GROUP inputs: codes [out, in], zeros and f16 scales [out, ng]."""
    o, i = w.shape
    g = w.reshape(o, i // GROUP, GROUP)
    lo, hi = np.minimum(g.min(-1), 0), np.maximum(g.max(-1), 0)
    scale = ((hi - lo) / 15).astype(np.float16)
    scale[scale == 0] = np.float16(1)
    zero = np.clip(np.round(-lo / scale.astype(np.float32)), 0, 15).astype(np.int64)
    q = np.clip(np.round(g / scale.astype(np.float32)[..., None]) + zero[..., None], 0, 15).astype(np.int64)
    return q.reshape(o, i), zero, scale


def awq_pack(v):
    """v [rows, cols] (cols a multiple of 8) -> int32 [rows, cols/8] in AWQ_ORDER."""
    rows, cols = v.shape
    w = np.zeros((rows, cols // 8), np.uint32)
    for c in range(cols // 8):
        for k in range(8):
            w[:, c] |= v[:, 8 * c + AWQ_ORDER[k]].astype(np.uint32) << np.uint32(4 * k)
    return w


def awq_decode(qweight, qzeros, scales):
    """dequantize_gemm's steps (unpack columnwise, AWQ_REVERSE_ORDER, (q - z) * s) in f32: [out, in]."""
    def unpack(x):
        u = np.stack([(x >> np.uint32(4 * k)) & np.uint32(15) for k in range(8)], axis=-1)  # raw order
        u = u.reshape(x.shape[0], -1).astype(np.int64)
        rev = np.arange(u.shape[1]).reshape(-1, 8)[:, AWQ_REVERSE_ORDER].reshape(-1)
        return u[:, rev]
    iw, iz = unpack(qweight), unpack(qzeros)  # [in, out], [ng, out]
    group = iw.shape[0] // iz.shape[0]
    s = np.repeat(scales.astype(np.float32), group, axis=0)
    z = np.repeat(iz, group, axis=0)
    return ((iw - z).astype(np.float32) * s).T.copy()


def make_awq(root, rng):
    tensors, golden = [], []
    norms_and_globals(rng, tensors)
    for mod, o, i, kind in linears():
        w = rng.uniform(-0.5, 0.5, (o, i)).astype(np.float32)
        if kind != "expert":
            dense(rng, mod + ".weight", (o, i), tensors)
            continue
        q, z, s = awq_quantize(w)
        qweight, qzeros, scales = awq_pack(q.T), awq_pack(z.T), s.T.copy()
        tensors += [(mod + ".qweight", "I32", qweight.shape, qweight.tobytes()),
                    (mod + ".qzeros", "I32", qzeros.shape, qzeros.tobytes()),
                    (mod + ".scales", "F16", scales.shape, scales.tobytes())]
        d = awq_decode(qweight, qzeros, scales)
        # The same values straight from the codes (a check of the packing and its reverse).
        ref = (q - np.repeat(z, GROUP, axis=1)).astype(np.float32) * np.repeat(s.astype(np.float32), GROUP, axis=1)
        assert np.array_equal(d, ref), mod
        golden.append((mod + ".weight", "F32", d.shape, d.astype("<f4").tobytes()))
    q = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm",
         "modules_to_not_convert": None}
    return tensors, golden, q


# --- FP8 ---------------------------------------------------------------------------------------

def e4m3(codes):
    """float8_e4m3fn bytes -> f32 (no NaN drawn)."""
    c = codes.astype(np.int64)
    sign = np.where(c & 0x80, -1.0, 1.0)
    exp, man = (c >> 3) & 15, c & 7
    val = np.where(exp == 0, man / 8.0 * 2.0 ** -6, (1 + man / 8.0) * 2.0 ** (exp - 7))
    return (sign * val).astype(np.float32)


def fp8_codes(rng, shape):
    c = rng.integers(0, 0x7F, shape)  # 0x00 .. 0x7E: never NaN
    return (c | (rng.integers(0, 2, shape) << 7)).astype(np.uint8)


def make_fp8(root, rng):
    tensors, golden = [], []
    norms_and_globals(rng, tensors)
    for mod, o, i, kind in linears():
        if kind == "router":
            dense(rng, mod + ".weight", (o, i), tensors)
            continue
        codes = fp8_codes(rng, (o, i))
        tensors.append((mod + ".weight", "F8_E4M3", (o, i), codes.tobytes()))
        if kind == "expert":
            scale = rng.uniform(1e-4, 2e-3, (o, 1)).astype(np.float32)
            tensors.append((mod + ".weight_scale", "F32", (o, 1), scale.tobytes()))
        else:
            b, scale = bf16(rng.uniform(1e-4, 2e-3, (1,)).astype(np.float32))
            tensors.append((mod + ".weight_scale", "BF16", (1,), b.tobytes()))
            tensors.append((mod + ".input_scale", "F32", (1,), np.array([0.01], np.float32).tobytes()))
        d = e4m3(codes) * scale.reshape(-1, 1) if kind == "expert" else e4m3(codes) * scale[0]
        golden.append((mod + ".weight", "F32", d.shape, d.astype("<f4").tobytes()))
    fp8 = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "group_size": None,
           "block_structure": None, "actorder": None, "observer": "minmax", "observer_kwargs": {}}
    q = {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
         "global_compression_ratio": None, "kv_cache_scheme": None,
         "ignore": ["lm_head"] + [f"model.layers.{l}.block_sparse_moe.gate" for l in range(L)],
         "config_groups": {
             "group_0": {"targets": ["re:.*block_sparse_moe\\.experts\\..*"], "output_activations": None,
                         "weights": dict(fp8, strategy="channel"),
                         "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True,
                                               "strategy": "token"}},
             "group_1": {"targets": ["re:.*self_attn\\..*_proj$"], "output_activations": None,
                         "weights": dict(fp8, strategy="tensor"),
                         "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                                               "strategy": "tensor"}}}}
    return tensors, golden, q


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for name, make, seed in (("awq-tiny", make_awq, 7), ("fp8-tiny", make_fp8, 8)):
        rng = np.random.default_rng(seed)
        tensors, golden, q = make(root, rng)
        fixture = os.path.join(root, "data/packed-inputs", name)
        write_safetensors(os.path.join(fixture, "model.safetensors"), tensors)
        with open(os.path.join(fixture, "config.json"), "w") as f:
            json.dump(config(q), f, indent=2)
            f.write("\n")
        write_safetensors(os.path.join(root, "data/golden/packed-inputs", name, "model.safetensors"), golden)
        print(name, len(golden), "decoded weights")


if __name__ == "__main__":
    main()
