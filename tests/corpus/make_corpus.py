#!/usr/bin/env python3
"""Generates the bad-input corpus: tests/corpus/<case>/ folders and tests/corpus/cases.json.

Usage:  python3 tests/corpus/make_corpus.py        (standard library only; deterministic)

Every case is a checkpoint folder a user could really have (config.json + safetensors, or the
sharded layout with model.safetensors.index.json) with exactly ONE defect, built from a tiny valid
Mixtral checkpoint (hidden 8, 2 heads / 1 kv head, 1 layer, 2 experts top-1, expert width 4,
vocab 16, bf16). The untouched base is written as valid-single/ and valid-sharded/ so the corpus
test can check that the defect, not the base, is what the tool rejects.

cases.json lists, per case: the command (`inspect` the folder, or `convert` it to an output whose
situation is given by "output"), the expected exit status (2) and the substrings the single stderr
line must contain (naming the file, tensor or key, and the problem). tests/cli/corpus_test.cpp runs
them all through the built binary on a temporary copy of each folder.

The script deletes and rewrites every sub-folder of tests/corpus/ (they are all generated).
Folders that must hold a directory where a file belongs carry a .keep file so git keeps them.
"""
import json
import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

H, HEADS, KV, HD, V, L, E, TOPK, I = 8, 2, 1, 4, 16, 1, 2, 1, 4

CONFIG = {
    "architectures": ["MixtralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": H,
    "initializer_range": 0.02,
    "intermediate_size": I,
    "max_position_embeddings": 64,
    "model_type": "mixtral",
    "num_attention_heads": HEADS,
    "num_experts_per_tok": TOPK,
    "num_hidden_layers": L,
    "num_key_value_heads": KV,
    "num_local_experts": E,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.0",
    "use_cache": True,
    "vocab_size": V,
}

SUPPORTED = ("llama, mistral, qwen2, qwen3, mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, "
             "deepseek_v3, phimoe, granitemoe")


def tensor_layout():
    """(name, shape) in model order."""
    t = [("model.embed_tokens.weight", [V, H])]
    for l in range(L):
        p = f"model.layers.{l}."
        t += [
            (p + "self_attn.q_proj.weight", [HEADS * HD, H]),
            (p + "self_attn.k_proj.weight", [KV * HD, H]),
            (p + "self_attn.v_proj.weight", [KV * HD, H]),
            (p + "self_attn.o_proj.weight", [H, HEADS * HD]),
            (p + "input_layernorm.weight", [H]),
            (p + "post_attention_layernorm.weight", [H]),
            (p + "block_sparse_moe.gate.weight", [E, H]),
        ]
        for e in range(E):
            q = p + f"block_sparse_moe.experts.{e}."
            t += [(q + "w1.weight", [I, H]), (q + "w2.weight", [H, I]), (q + "w3.weight", [I, H])]
    t += [("model.norm.weight", [H]), ("lm_head.weight", [V, H])]
    return t


class Rng:
    """Deterministic 64-bit LCG (Knuth's MMIX constants)."""

    def __init__(self, seed):
        self.s = seed & 0xFFFFFFFFFFFFFFFF

    def next(self):
        self.s = (self.s * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
        return self.s >> 33


def bf16_values(n, rng, norm=False):
    out = bytearray()
    for _ in range(n):
        r = rng.next()
        if norm:
            code = (127 << 7) | (r & 0x7F)  # [1, 2)
        else:
            code = ((r >> 20) & 1) << 15 | (118 + (r >> 8) % 8) << 7 | (r & 0x7F)
        out += struct.pack("<H", code)
    return bytes(out)


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def base_tensors():
    """[(name, dtype, shape, bytes)]"""
    rng = Rng(20240611)
    return [(n, "BF16", s, bf16_values(numel(s), rng, norm="norm" in n)) for n, s in tensor_layout()]


def header_obj(tensors, metadata=None):
    h = {}
    if metadata is None:
        metadata = {"format": "pt"}
    if metadata != {}:
        h["__metadata__"] = metadata
    off = 0
    for name, dtype, shape, data in tensors:
        h[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(data)]}
        off += len(data)
    return h


def dumps(obj):
    return json.dumps(obj, separators=(",", ":"))


def st_file(header_text, data, pad=True, length=None):
    hb = header_text.encode()
    if pad:
        hb += b" " * ((8 - len(hb) % 8) % 8)
    n = len(hb) if length is None else length
    return struct.pack("<Q", n) + hb + data


def st_bytes(tensors, metadata=None):
    return st_file(dumps(header_obj(tensors, metadata)), b"".join(t[3] for t in tensors))


def config_text(cfg=None):
    return json.dumps(CONFIG if cfg is None else cfg, indent=2) + "\n"


def single(tensors=None, cfg=None):
    """Files of a valid single-file checkpoint."""
    return {"config.json": config_text(cfg).encode(), "model.safetensors": st_bytes(tensors or base_tensors())}


SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


def sharded(index_edit=None, shard_edit=None):
    """Files of a valid two-shard checkpoint; index_edit(index) / shard_edit(parts) may break it."""
    ts = base_tensors()
    parts = {SHARD1: ts[:8], SHARD2: ts[8:]}
    if shard_edit:
        shard_edit(parts)
    index = {"metadata": {"total_size": sum(len(t[3]) for t in ts)},
             "weight_map": {t[0]: s for s, p in sorted(parts.items()) for t in p}}
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    if index_edit:
        index_edit(index)
    files = {"config.json": config_text().encode(), INDEX: (json.dumps(index, indent=2) + "\n").encode()}
    for s, p in parts.items():
        files[s] = st_bytes(p)
    return files


NW = "model.layers.0.block_sparse_moe.experts.0.w1.weight"  # the low-rank weight of native()


def native(rank=2, a_shape=None, b_shape=None, encoding="lowrank", drop_part=None):
    """Files of a native moe-tool checkpoint (docs/FORMAT.md): NW stored as lowrank factors
    NW.lr_a [I, rank], NW.lr_b [rank, H] (shapes overridable), named in quantization_config."""
    rng = Rng(20251130)
    a_shape = a_shape or [I, rank]
    b_shape = b_shape or [rank, H]
    parts = [(NW + ".lr_a", "BF16", a_shape, bf16_values(numel(a_shape), rng)),
             (NW + ".lr_b", "BF16", b_shape, bf16_values(numel(b_shape), rng))]
    ts = []
    for t in base_tensors():
        if t[0] == NW:
            ts += [p for p in parts if p[0] != drop_part]
        else:
            ts.append(t)
    cfg = dict(CONFIG)
    cfg["quantization_config"] = {"quant_method": "moe_tool", "format_version": 1, "weights": {
        NW: {"encoding": encoding, "rank": rank, "parts": {"a": NW + ".lr_a", "b": NW + ".lr_b"}}}}
    return single(ts, cfg)


PM = NW[:-len(".weight")]  # the module packed by packed()


def packed(fmt="gptq", g_idx=None, qzeros_shape=None, packed_cols=None, qcfg=None, drop=None, nan_scale=False, drop_key=None):
    """Files of a checkpoint quantized by another tool (io/packed_input.h): PM stored as GPTQ
    int8 (qweight [H/4, I], qzeros [2, I/4], scales F16 [2, I], g_idx [H], groups of 4) or as
    compressed-tensors pack-quantized int8 symmetric groups of 4 (weight_packed [I, H/4],
    weight_scale [I, 2], weight_shape [I, H]); every other weight dense. `drop`: the part of PM
    with this suffix is not stored; `nan_scale`: the first scale is an f16 NaN; `drop_key`: a
    quantization_config key removed."""
    words = lambda n: b"".join(struct.pack("<I", 0x80808080) for _ in range(n))
    one = struct.pack("<H", 0x3C00)  # f16 1.0
    if fmt == "gptq":
        qz = qzeros_shape or [2, I // 4]
        g = g_idx if g_idx is not None else [i // 4 for i in range(H)]
        parts = [(PM + ".qweight", "I32", [H // 4, I], words(H // 4 * I)),
                 (PM + ".qzeros", "I32", qz, b"".join(struct.pack("<I", 0x7F7F7F7F) for _ in range(numel(qz)))),
                 (PM + ".scales", "F16", [2, I], one * (2 * I)),
                 (PM + ".g_idx", "I32", [H], b"".join(struct.pack("<i", x) for x in g))]
        q = {"quant_method": "gptq", "bits": 8, "group_size": 4, "desc_act": False, "sym": True,
             "checkpoint_format": "gptq"}
    else:
        pc = packed_cols or H // 4
        parts = [(PM + ".weight_packed", "I32", [I, pc], words(I * pc)),
                 (PM + ".weight_scale", "F16", [I, 2], one * (2 * I)),
                 (PM + ".weight_shape", "I64", [2], struct.pack("<qq", I, H))]
        q = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
             "ignore": ["lm_head"], "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                 "num_bits": 8, "type": "int", "symmetric": True, "strategy": "group", "group_size": 4}}}}
    q.update(qcfg or {})
    if drop_key:
        del q[drop_key]
    if drop:
        parts = [p for p in parts if not p[0].endswith(drop)]
    if nan_scale:
        parts = [(n, dt, sh, struct.pack("<H", 0x7E00) + d[2:]) if n.endswith((".scales", ".weight_scale")) else (n, dt, sh, d)
                 for n, dt, sh, d in parts]
    ts = []
    for t in base_tensors():
        ts += parts if t[0] == NW else [t]
    cfg = dict(CONFIG)
    cfg["quantization_config"] = q
    return single(ts, cfg)


CASES = []


def case(name, files, description, expect, command="inspect", output=None):
    CASES.append({"name": name, "files": files, "description": description, "command": command,
                  "output": output, "expect": expect})


def with_header_text(text, data=None, pad=True, length=None):
    """config.json + a model.safetensors whose header is `text` over the base data."""
    if data is None:
        data = b"".join(t[3] for t in base_tensors())
    return {"config.json": config_text().encode(), "model.safetensors": st_file(text, data, pad, length)}


def edited_header(edit):
    """Base header as a dict, edited in place by edit(h), serialized."""
    h = header_obj(base_tensors())
    edit(h)
    return with_header_text(dumps(h))


def build_cases():
    ts = base_tensors()
    data = b"".join(t[3] for t in ts)
    data_len = len(data)
    norm = "model.norm.weight"
    lm = "lm_head.weight"
    h0 = header_obj(ts)
    norm_off = h0[norm]["data_offsets"]
    lm_off = h0[lm]["data_offsets"]

    # ---------------------------------------------------------------- safetensors rules
    case("st-file-shorter-than-8-bytes",
         {"config.json": config_text().encode(), "model.safetensors": b"\x10\x00\x00\x00\x00"},
         "model.safetensors is 5 bytes: not even the header length fits",
         ["model.safetensors: file is 5 bytes, shorter than the 8-byte header length"])

    text = dumps(h0)
    real = len(text) + (8 - len(text) % 8) % 8
    total = 8 + real + data_len
    case("st-header-length-past-eof", with_header_text(text, length=total),
         "the header length field is the whole file size",
         ["model.safetensors: header length %d runs past the end of the file (%d bytes)" % (total, total)])

    case("st-header-over-100mb", with_header_text(text, length=100_000_001),
         "the header length field claims 100 MB + 1 byte",
         ["model.safetensors: header length 100000001 exceeds the 100 MB limit"])

    case("st-header-not-json", with_header_text(text[:-1] + ",}"),
         "the header JSON has a trailing comma",
         ["model.safetensors: header is not valid JSON"])

    arr = dumps([h0])
    case("st-header-json-array", with_header_text(arr),
         "the header is a JSON array holding the object",
         ["model.safetensors: header does not start with '{'"])

    case("st-header-leading-space", with_header_text(" " + text),
         "the header starts with a space before '{'",
         ["model.safetensors: header does not start with '{'"])

    def drop_field(field):
        def f(h):
            del h[norm][field]
        return f

    case("st-entry-missing-dtype", edited_header(drop_field("dtype")), "model.norm.weight has no dtype",
         ['model.safetensors: tensor model.norm.weight: missing "dtype"'])
    case("st-entry-missing-shape", edited_header(drop_field("shape")), "model.norm.weight has no shape",
         ['model.safetensors: tensor model.norm.weight: missing "shape"'])
    case("st-entry-missing-data-offsets", edited_header(drop_field("data_offsets")),
         "model.norm.weight has no data_offsets",
         ['model.safetensors: tensor model.norm.weight: missing "data_offsets"'])

    def set_field(name, field, value):
        def f(h):
            h[name][field] = value
        return f

    case("st-unknown-dtype", edited_header(set_field(norm, "dtype", "F4")), "dtype F4 does not exist",
         ["model.safetensors: tensor model.norm.weight: unknown dtype 'F4'"])
    case("st-negative-shape", edited_header(set_field(norm, "shape", [-8])), "shape [-8]",
         ["model.safetensors: tensor model.norm.weight:", "not a non-negative integer: -8"])
    case("st-non-integer-shape", edited_header(set_field(norm, "shape", [8.5])), "shape [8.5]",
         ["model.safetensors: tensor model.norm.weight:", "not a non-negative integer: 8.5"])
    case("st-offsets-reversed", edited_header(set_field(norm, "data_offsets", [norm_off[1], norm_off[0]])),
         "data_offsets [end, begin]",
         ["model.safetensors: tensor model.norm.weight: data_offsets end %d before begin %d" % (norm_off[0], norm_off[1])])
    case("st-size-mismatch", edited_header(set_field(norm, "shape", [7])),
         "shape [7] of BF16 is 14 bytes but its offsets span 16",
         ["model.safetensors: tensor model.norm.weight: data_offsets span 16 bytes but shape [7] of BF16 needs 14"])

    # A hole: lm_head.weight starts 2 bytes after model.norm.weight ends (2 unused bytes).
    def hole(h):
        b, e = h[lm]["data_offsets"]
        h[lm]["data_offsets"] = [b + 2, e + 2]
    hh = header_obj(ts)
    hole(hh)
    case("st-hole", with_header_text(dumps(hh), data[:lm_off[0]] + b"\x00\x00" + data[lm_off[0]:]),
         "two unused bytes between model.norm.weight and lm_head.weight",
         ["model.safetensors: tensor lm_head.weight: data_offsets begin %d leaves a hole (expected %d)" % (lm_off[0] + 2, lm_off[0])])

    ho = header_obj(ts)
    ho[lm]["data_offsets"] = [lm_off[0] - 2, lm_off[1] - 2]
    case("st-overlap", with_header_text(dumps(ho), data[:-2]),
         "lm_head.weight starts 2 bytes inside model.norm.weight",
         ["model.safetensors: tensor lm_head.weight: data_offsets begin %d overlaps the previous tensor (expected %d)" % (lm_off[0] - 2, lm_off[0])])

    case("st-last-end-short-of-data", with_header_text(text, data + b"\x00" * 16),
         "16 bytes of data after the last tensor",
         ["model.safetensors: data section is %d bytes but the tensors cover %d" % (data_len + 16, data_len)])

    case("st-truncated-data", with_header_text(text, data[:-100]),
         "the file was cut 100 bytes short (an interrupted download)",
         ["model.safetensors: tensor lm_head.weight: data_offsets end %d past the data section (%d)" % (data_len, data_len - 100)],
         command="convert", output="fresh")

    # A NUL byte ends the JSON for some parsers, hiding what follows (here a bogus entry).
    nul = text[:-1] + '}\x00,"x":{}}'
    case("st-header-nul-byte", with_header_text(nul), "a NUL byte inside the header JSON",
         ["model.safetensors: header is not valid JSON: it contains a NUL byte"])

    # Duplicate names: same tensor twice in the header text.
    entry = dumps(h0[norm])
    dup = text[:-1] + ',"%s":%s}' % (norm, entry)
    case("st-duplicate-name", with_header_text(dup), "model.norm.weight appears twice in the header",
         ["model.safetensors: duplicate tensor name 'model.norm.weight'"])

    hm = header_obj(ts, metadata={"format": "pt", "total_parameters": 1234})
    case("st-metadata-non-string", with_header_text(dumps(hm)), "__metadata__ holds a number",
         ["model.safetensors: __metadata__.total_parameters is not a string"])

    # A shape whose byte size overflows 64 bits ([2^62] of F32 = 2^64 bytes, i.e. 0 after wrapping).
    hv = header_obj(ts)
    hv["model.rotary.overflow"] = {"dtype": "F32", "shape": [4611686018427387904], "data_offsets": [data_len, data_len]}
    case("st-shape-size-overflows", with_header_text(dumps(hv)),
         "an extra tensor of shape [2^62] F32 with empty offsets (2^64 bytes wraps to 0)",
         ["model.safetensors: tensor model.rotary.overflow:"], command="convert", output="fresh")

    # ---------------------------------------------------------------- sharded
    # Three shards, the third one absent (a partial download).
    three = ["model-%05d-of-00003.safetensors" % i for i in (1, 2, 3)]
    parts3 = {three[0]: ts[:8], three[1]: ts[8:-1], three[2]: ts[-1:]}
    ix3 = {"metadata": {"total_size": data_len},
           "weight_map": dict(sorted({t[0]: s for s, p in parts3.items() for t in p}.items()))}
    f3 = {"config.json": config_text().encode(), INDEX: (json.dumps(ix3, indent=2) + "\n").encode(),
          three[0]: st_bytes(parts3[three[0]]), three[1]: st_bytes(parts3[three[1]])}
    case("idx-missing-shard", f3, "the index names a third shard that is not there (partial download)",
         ["model-00003-of-00003.safetensors: no such file, but model.safetensors.index.json maps",
          "incomplete download?"], command="convert", output="fresh")

    case("idx-tensor-absent-from-shard",
         sharded(index_edit=lambda ix: ix["weight_map"].__setitem__("model.layers.0.self_attn.q_norm.weight", SHARD1)),
         "the index lists a tensor that its shard does not hold",
         ["model.safetensors.index.json: weight_map.model.layers.0.self_attn.q_norm.weight: tensor not found in " + SHARD1])

    case("idx-shard-tensor-missing-from-index", sharded(index_edit=lambda ix: ix["weight_map"].pop(lm)),
         "a shard holds lm_head.weight but the index does not list it",
         [SHARD2 + ": tensor lm_head.weight is missing from model.safetensors.index.json"])

    case("idx-weight-map-not-object", sharded(index_edit=lambda ix: ix.__setitem__("weight_map", sorted(ix["weight_map"]))),
         "weight_map is a list of names",
         ["model.safetensors.index.json: weight_map: missing or not an object"])

    case("idx-wrong-shard", sharded(index_edit=lambda ix: ix["weight_map"].__setitem__(lm, SHARD1)),
         "the index says lm_head.weight is in shard 1; it is in shard 2",
         ["model.safetensors.index.json: weight_map.lm_head.weight: says " + SHARD1 + " but the tensor is in " + SHARD2],
         command="convert", output="fresh")

    bad = sharded()
    bad[INDEX] = bad[INDEX][:-20]
    case("idx-not-json", bad, "the index file is cut short",
         ["model.safetensors.index.json: not valid JSON"])

    b2 = sharded()
    b2[SHARD2] = b2[SHARD2][:6]
    case("idx-shard-truncated", b2, "shard 2 is 6 bytes long",
         [SHARD2 + ": file is 6 bytes, shorter than the 8-byte header length"], command="convert", output="fresh")

    # ---------------------------------------------------------------- config.json
    f = single()
    f["config.json"] = config_text()[:-30].encode()
    case("cfg-not-json", f, "config.json is cut short", ["config.json: not valid JSON"])

    f = single()
    f["config.json"] = (json.dumps([CONFIG], indent=2) + "\n").encode()
    case("cfg-top-level-array", f, "config.json is a list holding the config",
         ["config.json: top level is not a JSON object"])

    def cfg_edit(edit):
        c = json.loads(json.dumps(CONFIG))
        edit(c)
        return single(cfg=c)

    case("cfg-missing-num-hidden-layers", cfg_edit(lambda c: c.pop("num_hidden_layers")),
         "num_hidden_layers removed", ["config.json: num_hidden_layers: missing (required)"])

    case("cfg-unknown-model-type",
         cfg_edit(lambda c: (c.__setitem__("model_type", "mixtral_v9"), c.__setitem__("architectures", ["MixtralV9ForCausalLM"]))),
         "model_type is a family moe-tool does not know",
         ["config.json: model_type: unknown family 'mixtral_v9'", "MixtralV9ForCausalLM", "supported: " + SUPPORTED])

    case("cfg-missing-model-type", cfg_edit(lambda c: c.pop("model_type")), "model_type removed",
         ["config.json: model_type: missing", "supported: " + SUPPORTED])

    case("cfg-hidden-size-disagrees", cfg_edit(lambda c: c.__setitem__("hidden_size", 16)),
         "config says hidden 16, tensors are hidden 8",
         ["model.safetensors: tensor model.embed_tokens.weight: shape [16, 8] but config (vocab_size, hidden_size) implies [16, 16]"])

    case("cfg-expert-width-disagrees", cfg_edit(lambda c: c.__setitem__("intermediate_size", 6)),
         "config says expert width 6, tensors are width 4",
         ["model.safetensors: tensor model.layers.0.block_sparse_moe.experts.0.w1.weight: shape [4, 8] but config (hidden_size=8, expert 0 width 6) implies [6, 8]"])

    case("cfg-experts-count-larger", cfg_edit(lambda c: c.__setitem__("num_local_experts", 3)),
         "config says 3 experts, the checkpoint has 2",
         ["model.safetensors: tensor model.layers.0.block_sparse_moe.gate.weight: shape [2, 8] but config (num_local_experts=3, hidden_size) implies [3, 8]"])

    case("cfg-topk-exceeds-experts", cfg_edit(lambda c: c.__setitem__("num_experts_per_tok", 3)),
         "3 experts per token out of 2", ["config.json: num_experts_per_tok: 3 exceeds num_local_experts 2"])

    case("cfg-expert-count-not-integer", cfg_edit(lambda c: c.__setitem__("num_local_experts", "2")),
         "num_local_experts is a string", ['config.json: num_local_experts: expected a positive integer, found "2"'])

    case("cfg-dtype-not-string", cfg_edit(lambda c: c.__setitem__("dtype", 16)),
         "dtype (transformers >= 4.56 spelling of torch_dtype) is a number",
         ["config.json: dtype: expected a string, found 16"])

    case("cfg-value-overflows", cfg_edit(lambda c: c.__setitem__("head_dim", 4611686018427387904)),
         "head_dim 2^62 (num_attention_heads x head_dim would overflow 64 bits)",
         ["config.json: head_dim: expected at most 2147483647, found 4611686018427387904"])

    # Extra expert tensors (expert 2 of a 2-expert config).
    rng = Rng(7)
    extra = [(f"model.layers.0.block_sparse_moe.experts.2.{w}.weight", "BF16", s, bf16_values(numel(s), rng))
             for w, s in (("w1", [I, H]), ("w2", [H, I]), ("w3", [I, H]))]
    case("tensors-extra-expert", single(tensors=ts + extra),
         "the weights hold a third expert the config does not declare",
         ["model.safetensors: tensor model.layers.0.block_sparse_moe.experts.2.w1.weight: not expected for mixtral with this config.json (num_local_experts=2)"])

    # A per-layer tensor the family table does not describe that is not a rotary-embedding buffer
    # (rotary_emb.* buffers are passed through; anything else is refused).
    case("tensors-layer-unknown-buffer",
         single(tensors=ts + [("model.layers.0.self_attn.masked_bias", "BF16", [H], bf16_values(H, Rng(11)))]),
         "a per-layer tensor mixtral does not have (not a rotary_emb buffer)",
         ["model.safetensors: tensor model.layers.0.self_attn.masked_bias: not expected for mixtral with this config.json"])

    case("tensors-missing-expert",
         single(tensors=[t for t in ts if t[0] != "model.layers.0.block_sparse_moe.experts.1.w3.weight"]),
         "expert 1 of layer 0 has no w3",
         ["tensor model.layers.0.block_sparse_moe.experts.1.w3.weight: missing (expert 1)"], command="convert", output="fresh")

    case("tensors-missing-lm-head", single(tensors=[t for t in ts if t[0] != lm]),
         "lm_head.weight is absent but tie_word_embeddings is false",
         ["tensor lm_head.weight: missing (required by mixtral)"])

    case("tensors-layer-past-config",
         single(tensors=ts + [("model.layers.1.input_layernorm.weight", "BF16", [H], bf16_values(H, Rng(9), True))]),
         "a tensor of layer 1 in a 1-layer model",
         ["model.safetensors: tensor model.layers.1.input_layernorm.weight: layer 1 but num_hidden_layers is 1"])

    # ---------------------------------------------------------------- files
    case("missing-config", {"model.safetensors": st_bytes(ts)}, "no config.json",
         ["config.json: no such file"])
    case("missing-weights", {"config.json": config_text().encode()}, "no safetensors at all",
         ["no model.safetensors or model.safetensors.index.json"])
    case("config-is-a-folder", {"config.json/.keep": b"", "model.safetensors": st_bytes(ts)},
         "config.json is a folder", ["config.json: is a directory"])
    case("weights-is-a-folder", {"config.json": config_text().encode(), "model.safetensors/.keep": b""},
         "model.safetensors is a folder", ["model.safetensors: not a regular file"], command="convert", output="fresh")

    # ---------------------------------------------------------------- native checkpoints (docs/FORMAT.md)
    case("native-missing-factor", native(drop_part=NW + ".lr_b"),
         "quantization_config names " + NW + ".lr_b, which no shard holds",
         ["tensor " + NW + ".lr_b: missing (part \"b\" of " + NW + ", config.json quantization_config)"])
    case("native-factor-wrong-shape", native(b_shape=[2, 7]),
         NW + ".lr_b is [2, 7]; the weight has 8 input channels",
         ["model.safetensors", "tensor " + NW + ": shape [4, 7]", "implies [4, 8]"])
    case("native-unknown-encoding", native(encoding="lowrnk"), "encoding \"lowrnk\" does not exist",
         ["config.json: quantization_config.weights[\"" + NW + "\"].encoding: unknown encoding \"lowrnk\""])
    case("native-rank-above-min-dim", native(rank=5), "rank 5 on a [4, 8] weight (factors [4, 5] and [5, 8])",
         ["model.safetensors: weight " + NW + ": rank 5 exceeds min(out, in) = 4"])

    # ---------------------------------------------------------------- checkpoints of other tools (io/packed_input.h)
    case("packed-gptq-gidx-out-of-range", packed(g_idx=[0, 0, 0, 0, 1, 1, 1, 5]),
         "GPTQ g_idx names group 5 of 2",
         ["model.safetensors: weight " + NW + " (gptq): g_idx: value 5 at input 7 is outside [0, 2)"])
    case("packed-gptq-qzeros-wrong-shape", packed(qzeros_shape=[3, 1]), "qzeros [3, 1] for 2 groups of 4 outputs",
         ["model.safetensors: weight " + NW + " (gptq): qzeros: shape [3, 1], expected [2, 1]"])
    case("packed-gptq-unknown-checkpoint-format", packed(qcfg={"checkpoint_format": "marlin"}),
         "checkpoint_format marlin (a kernel layout, not read)",
         ["config.json: quantization_config.checkpoint_format: \"marlin\" is not read"])
    case("packed-gptq-qweight-missing", packed(drop=".qweight"), "the packed codes deleted, scales and zeros kept",
         ["model.safetensors: tensor " + PM + ".qweight: missing (" + PM + ".qzeros is stored"])
    case("packed-gptq-nan-scale", packed(nan_scale=True), "scales[0, 0] is an f16 NaN",
         ["model.safetensors: tensor " + PM + ".scales: non-finite value at index 0"])
    case("packed-gptq-bits-missing", packed(drop_key="bits"), "a GPTQ quantization_config without bits",
         ["config.json: quantization_config.bits: missing"])
    case("packed-ct-weight-packed-missing", packed(fmt="ct", drop=".weight_packed"), "the packed codes deleted",
         ["model.safetensors: tensor " + PM + ".weight_packed: missing (" + PM + ".weight_scale is stored"])
    case("packed-ct-packed-disagrees-with-shape", packed(fmt="ct", packed_cols=3),
         "weight_packed holds 12 int8 values a row; weight_shape says 8",
         ["model.safetensors: tensor " + PM + ".weight_packed: shape [4, 3] does not hold 8 inputs"])
    case("packed-ct-unknown-format", packed(fmt="ct", qcfg={"format": "marlin-24"}),
         "compressed-tensors format marlin-24 (sparse kernels' layout, not read)",
         ["config.json: quantization_config.format: \"marlin-24\""])

    # ---------------------------------------------------------------- output paths (valid input)
    case("out-parent-is-a-file", single(), "the output's parent is a file (missing parent folders are made)",
         ["parent folder", "cannot be made", "is not a folder"], command="convert", output="parent-file")
    case("out-is-a-file", single(), "the output path is an existing file",
         ["output exists and is not a folder"], command="convert", output="file")
    case("out-not-empty", single(), "the output folder exists with files in it (no --force)",
         ["output folder exists and is not empty (use --force to replace it)"], command="convert", output="nonempty")
    case("out-is-input", single(), "the output is the input folder",
         ["output is the input"], command="convert", output="input")
    case("out-inside-input", single(), "the output is a folder inside the input",
         ["output is inside the input"], command="convert", output="inside-input")


def write_files(root, files):
    for rel, data in sorted(files.items()):
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def main():
    for entry in sorted(os.listdir(HERE)):
        p = os.path.join(HERE, entry)
        if os.path.isdir(p) and not entry.startswith("."):
            shutil.rmtree(p)
    write_files(os.path.join(HERE, "valid-single"), single())
    write_files(os.path.join(HERE, "valid-sharded"), sharded())
    write_files(os.path.join(HERE, "valid-native"), native())
    build_cases()
    names = [c["name"] for c in CASES]
    assert len(names) == len(set(names)), "duplicate case names"
    listing = []
    for c in CASES:
        write_files(os.path.join(HERE, c["name"]), c["files"])
        item = {"name": c["name"], "description": c["description"], "command": c["command"]}
        if c["output"]:
            item["output"] = c["output"]
        item["exit"] = 2
        item["stderr"] = c["expect"]
        listing.append(item)
    with open(os.path.join(HERE, "cases.json"), "w") as f:
        json.dump({"generator": "tests/corpus/make_corpus.py", "valid": ["valid-single", "valid-sharded", "valid-native"],
                   "cases": listing}, f, indent=2)
        f.write("\n")
    print("%d cases" % len(CASES))


if __name__ == "__main__":
    main()
