#!/usr/bin/python3
"""Golden numbers for the moe-tool tests, computed with reference.py from the saved bf16
checkpoints (fp32 compute, bf16 weights upcast).  Deterministic: re-running reproduces the
files byte for byte (single-threaded torch, fixed inputs).

Usage: /usr/bin/python3 data/scripts/make_goldens.py [--only tokenizer|trained|synthetic]
Writes data/golden/tokenizer_bytelevel.json, data/golden/<model>.json for the trained models
(skipped if a model directory is missing) and data/golden/synthetic-<name>.json.  The validation
fixtures (validation-tiny, validation-256) are scored on their own held-out text with their own
tokenizer (data/text-validation/heldout.txt, data/tokenizer-validation).
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fixture_common as C  # noqa: E402
import reference as R  # noqa: E402
from bpe_tok import Encoder  # noqa: E402

GOLD = os.path.join(C.DATA, "golden")
TRAINED = ("mixtral-tiny", "qwen2moe-tiny", "llama-tiny", "validation-tiny", "validation-256")
# trained models on another corpus: name -> (held-out text, tokenizer dir), relative to data/
OTHER_CORPUS = {name: ("text-validation/heldout.txt", "tokenizer-validation")
                for name in ("validation-tiny", "validation-256")}
SYNTH = ("qwen3moe", "olmoe", "mistral", "qwen2", "qwen3", "qwen2moe-sparse")

TOKENIZER_TESTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café Ωμέγα日本語",
    "cafe\u0301 (decomposed e + U+0301: no normalizer, bytes kept as is)",
    "12345 3.14 2024-01-01 1,000,000",
    "a  b   c\t\td \t e",
    "    four leading spaces and trailing   ",
    "line1\n\n\nline2\n",
    "\r\nwindows\r\nline endings\r\n",
    "Wait... what?!? (yes) -- \"quoted\" [x]{y} @#$%^&* ...",
    "I'll don't WE'RE they've she'd it's I'M You'Ll",
    "🙂👍🏽",
    "mixed: English, русский, العربية, हिन्दी, 中文, 한국어, ελληνικά",
    "text<|endoftext|>more text",
    "<|endoftext|>",
    "<|endoftext|><|endoftext|>a <|endoftext|> b",
    "<|endoftext|  (not a special token) <|endoftext",
    "x\u00a0y non-breaking space",
    " ",
    "\n",
    "\t",
    "",
]


def r6(x):
    return [round(float(v), 6) for v in x]


def dump(obj, path):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {os.path.relpath(path, os.path.dirname(C.DATA))} ({os.path.getsize(path)} B)")


def tokenizer_goldens(enc):
    cases = []
    for s in TOKENIZER_TESTS:
        ids = enc.encode(s)
        dec = enc.decode(ids)
        assert dec == s, (s, dec)
        cases.append({"text": s, "ids": ids, "tokens": enc.tokens(ids), "decoded": dec})
    with open(os.path.join(C.DATA, "text", "heldout.txt"), encoding="utf-8") as f:
        held = f.read()
    para = "\n".join(held.split("\n")[:6])
    ids = enc.encode(para)
    cases.append({"text": para, "ids": ids, "tokens": enc.tokens(ids), "decoded": enc.decode(ids),
                  "source": "first 6 lines of data/text/heldout.txt"})
    dump({
        "tokenizer": "data/tokenizer/tokenizer.json",
        "conventions": ("ids from data/scripts/bpe_tok.py: added tokens (<|endoftext|> = 4095) "
                        "matched first, no normalizer, Qwen2 regex split, GPT-2 byte-to-unicode, "
                        "BPE by merge rank; no BOS/EOS added; decoded = ByteLevel decode with "
                        "special tokens kept"),
        "heldout_token_count": len(enc.encode(held)),
        "cases": cases,
    }, os.path.join(GOLD, "tokenizer_bytelevel.json"))


def routing_golden(cfg, info, ntok):
    out = {}
    for l, r in sorted(info["router"].items()):
        out[str(l)] = {
            "topk_ids": r["topk_ids"][:ntok].tolist(),
            "topk_weights": [r6(row) for row in r["topk_weights"][:ntok]],
            "router_logits": [r6(row) for row in r["logits"][:ntok]],
        }
    return out


def model_golden(name, mdir, tokens, ctx, n_logit_windows, positions, ppl_ctx, ppl_windows,
                 route_tokens=16, text="data/text/heldout.txt",
                 tokenizer="data/tokenizer/tokenizer.json"):
    cfg, W = R.load_checkpoint(mdir)
    rows = [tokens[i * ctx:(i + 1) * ctx] for i in range(n_logit_windows)]
    ids = torch.tensor(rows, dtype=torch.long)
    with torch.no_grad():
        logits, info = R.forward(cfg, W, ids, collect=True)
    lse = torch.logsumexp(logits.double(), dim=-1)
    g = {
        "model": name,
        "dir": os.path.relpath(mdir, os.path.dirname(C.DATA)),
        "model_type": cfg["model_type"],
        "compute": "reference.py: fp32, bf16 weights upcast to fp32",
        "tokenization": (f"{text} tokenized once with {tokenizer} "
                         "(no BOS); windows non-overlapping from token 0; positions 0..T-1 "
                         "within each window"),
        "logits": {
            "ctx": ctx,
            "n_windows": n_logit_windows,
            "tokens": rows,
            "positions": positions,
            "values": [[r6(logits[w, p]) for p in positions] for w in range(n_logit_windows)],
            "argmax_all_positions": logits.argmax(-1).tolist(),
            "logsumexp_all_positions": [r6(lse[w]) for w in range(n_logit_windows)],
        },
        "hidden_states": {
            "window": 0,
            "positions": [0, ctx - 1],
            "note": ("residual stream: index 0 = embedding output, index l+1 = after decoder "
                     "layer l; final_norm = after model.norm"),
            "residual": [[r6(h[0, p]) for p in (0, ctx - 1)] for h in info["hidden"]],
            "final_norm": [r6(info["final_norm"][0, p]) for p in (0, ctx - 1)],
        },
    }
    nll, cnt = R.nll_windows(cfg, W, tokens, ppl_ctx, n_windows=ppl_windows)
    g["perplexity"] = {
        "ctx": ppl_ctx, "n_windows": ppl_windows,
        "positions_scored": "all predictable positions (T-1 per window)",
        "nll_sum": round(nll, 6), "token_count": cnt,
        "ppl": round(float(torch.exp(torch.tensor(nll / cnt, dtype=torch.float64))), 6),
    }
    if info["router"]:
        g["routing"] = {
            "window": 0, "n_tokens": route_tokens,
            "note": ("per MoE layer: top-k expert ids (descending weight) and the routing "
                     "weights actually applied (after renormalisation when the family does it), "
                     "plus raw router logits, for the first n_tokens of logits window 0"),
            "layers": routing_golden(cfg, info, route_tokens),
        }
    return g


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=("tokenizer", "trained", "synthetic"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    os.makedirs(GOLD, exist_ok=True)
    enc = Encoder.from_tokenizer_json(os.path.join(C.TOK_DIR, "tokenizer.json"))
    if a.only in (None, "tokenizer"):
        tokenizer_goldens(enc)
    with open(os.path.join(C.DATA, "text", "heldout.txt"), encoding="utf-8") as f:
        tokens = enc.encode(f.read())
    if a.only in (None, "trained"):
        for name in TRAINED:
            mdir = os.path.join(C.DATA, "models", name)
            if not os.path.exists(os.path.join(mdir, "model.safetensors")):
                print(f"skip {name}: not trained yet")
                continue
            kw, toks = {}, tokens
            if name in OTHER_CORPUS:
                text_rel, tok_rel = OTHER_CORPUS[name]
                tok_json = os.path.join(C.DATA, tok_rel, "tokenizer.json")
                with open(os.path.join(C.DATA, text_rel), encoding="utf-8") as f:
                    toks = Encoder.from_tokenizer_json(tok_json).encode(f.read())
                kw = dict(text="data/" + text_rel, tokenizer=f"data/{tok_rel}/tokenizer.json")
            g = model_golden(name, mdir, toks, ctx=64, n_logit_windows=2,
                             positions=[0, 1, 31, 63], ppl_ctx=128, ppl_windows=8, **kw)
            dump(g, os.path.join(GOLD, f"{name}.json"))
    if a.only in (None, "synthetic"):
        for name in SYNTH:
            mdir = os.path.join(C.DATA, "models", "synthetic", name)
            g = model_golden(f"synthetic/{name}", mdir, tokens, ctx=32, n_logit_windows=1,
                             positions=[0, 1, 15, 31], ppl_ctx=32, ppl_windows=1)
            dump(g, os.path.join(GOLD, f"synthetic-{name}.json"))


if __name__ == "__main__":
    main()
