#!/usr/bin/python3
"""Train the fixtures' byte-level BPE tokenizer (vocab 4096 = 256 bytes + merges + 1 special)
on data/text/brown_train.txt and write data/tokenizer/{tokenizer.json, tokenizer_config.json,
special_tokens_map.json}.

Usage: /usr/bin/python3 data/scripts/train_tokenizer.py [--text TXT --out DIR]
  defaults: --text data/text/brown_train.txt --out data/tokenizer; the validation fixture's
  tokenizer: --text data/text-validation/nlp_train.txt --out data/tokenizer-validation

Trainer: word-frequency table over the Qwen2 regex pre-tokens; pair counts kept incrementally
(pair -> count, pair -> set of words) with a lazy max-heap; at each step the most frequent pair
wins, ties broken by the smaller (left id, right id).  Base vocab: id b = byte b (as its GPT-2
unicode char); merged tokens get ids in creation order; <|endoftext|> is the last id (4095) and is
an added (special) token, not part of model.vocab.  Deterministic.
"""
import collections
import heapq
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bpe_tok import BYTE2UNI, EOT, QWEN2_PATTERN, Encoder, pretokenize  # noqa: E402

DATA = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB_SIZE = 4096


def train(text, vocab_size):
    t0 = time.time()
    wf = collections.Counter(pretokenize(text))
    words, freqs = [], []
    for w, c in sorted(wf.items()):
        words.append(list(w.encode("utf-8")))
        freqs.append(c)
    print(f"pre-tokens: {sum(freqs)} total, {len(words)} unique ({time.time()-t0:.1f}s)")
    id2str = [BYTE2UNI[b] for b in range(256)]
    str2id = {s: i for i, s in enumerate(id2str)}
    merges = []
    pair_count = collections.defaultdict(int)
    pair_where = collections.defaultdict(set)
    for wi, w in enumerate(words):
        f = freqs[wi]
        for a, b in zip(w, w[1:]):
            pair_count[(a, b)] += f
            pair_where[(a, b)].add(wi)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    target = vocab_size - 1  # last id reserved for <|endoftext|>
    while len(id2str) < target and heap:
        negc, pair = heapq.heappop(heap)
        c = pair_count.get(pair, 0)
        if c <= 0 or -negc != c:
            continue  # stale entry
        a, b = pair
        new_s = id2str[a] + id2str[b]
        nid = str2id.get(new_s)
        if nid is None:
            nid = len(id2str)
            id2str.append(new_s)
            str2id[new_s] = nid
        merges.append((id2str[a], id2str[b]))
        changed = set()
        for wi in sorted(pair_where.pop(pair)):
            w = words[wi]
            f = freqs[wi]
            # remove old pairs
            for p in zip(w, w[1:]):
                pair_count[p] -= f
                changed.add(p)
            nw = []
            i = 0
            while i < len(w):
                if i < len(w) - 1 and w[i] == a and w[i + 1] == b:
                    nw.append(nid)
                    i += 2
                else:
                    nw.append(w[i])
                    i += 1
            words[wi] = nw
            for p in zip(nw, nw[1:]):
                pair_count[p] += f
                pair_where[p].add(wi)
                changed.add(p)
        pair_count.pop(pair, None)
        for p in changed:
            c2 = pair_count.get(p, 0)
            if c2 > 0:
                heapq.heappush(heap, (-c2, p))
            else:
                pair_count.pop(p, None)
                pair_where.pop(p, None)
    print(f"merges: {len(merges)}, vocab (without specials): {len(id2str)} ({time.time()-t0:.1f}s)")
    return id2str, merges


def write(id2str, merges, outdir):
    vocab = {s: i for i, s in enumerate(id2str)}
    eot_id = len(id2str)
    assert eot_id == VOCAB_SIZE - 1
    tj = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{
            "id": eot_id, "content": EOT, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False, "special": True}],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
             "use_regex": False}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                           "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                    "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "vocab": vocab,
                  "merges": [f"{a} {b}" for a, b in merges]},
    }
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False, indent=2)
        f.write("\n")
    cfg = {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(eot_id): {
            "content": EOT, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}},
        "additional_special_tokens": [],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOT,
        "errors": "replace",
        "model_max_length": 4096,
        "pad_token": EOT,
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
    with open(os.path.join(outdir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=2)
        f.write("\n")
    stm = {"eos_token": {"content": EOT, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False},
           "pad_token": {"content": EOT, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False}}
    with open(os.path.join(outdir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(stm, f, ensure_ascii=False, indent=2)
        f.write("\n")


def main():
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", default=os.path.join(DATA, "text", "brown_train.txt"))
    ap.add_argument("--out", default=os.path.join(DATA, "tokenizer"))
    a = ap.parse_args()
    with open(a.text, encoding="utf-8") as f:
        text = f.read()
    id2str, merges = train(text, VOCAB_SIZE)
    outdir = a.out
    write(id2str, merges, outdir)
    enc = Encoder.from_tokenizer_json(os.path.join(outdir, "tokenizer.json"))
    t0 = time.time()
    sample = text[:200000]
    ids = enc.encode(sample)
    assert enc.decode(ids) == sample
    print(f"round-trip ok; {len(sample)/len(ids):.2f} chars/token on 200 KB ({time.time()-t0:.1f}s)")


if __name__ == "__main__":
    main()
