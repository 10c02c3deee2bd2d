"""Independent byte-level BPE encoder/decoder (Hugging Face `tokenizers` semantics) for the
moe-tool fixtures.  Offline use only.

Pipeline (what tokenizer.json describes):
  1. added/special tokens are matched first (exact, left to right, no normalisation); the text
     between them is processed by steps 2-4;
  2. normalizer: none;
  3. pre-tokenizer: Qwen2 regex split (behaviour Isolated), then GPT-2 bytes->unicode mapping of
     each piece's UTF-8 bytes;
  4. BPE: repeatedly merge the adjacent pair with the lowest merge rank (all non-overlapping
     occurrences left to right), then look the symbols up in the vocab.
Decoding: concatenate token strings, map unicode chars back to bytes, UTF-8 decode with
errors="replace" (special tokens decode to their content).
"""
import json

import regex

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRETOK_RE = regex.compile(QWEN2_PATTERN)
EOT = "<|endoftext|>"


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable unicode char table."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE2UNI = bytes_to_unicode()
UNI2BYTE = {v: k for k, v in BYTE2UNI.items()}


def pretokenize(text):
    return PRETOK_RE.findall(text)


def to_bytelevel(piece):
    return "".join(BYTE2UNI[b] for b in piece.encode("utf-8"))


class Encoder:
    def __init__(self, vocab, merges, added):
        """vocab: str->id; merges: list of (a, b); added: dict content->id (special tokens)."""
        self.vocab = vocab
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.added = dict(added)
        self.id_to_tok = {i: t for t, i in vocab.items()}
        for t, i in self.added.items():
            self.id_to_tok[i] = t
        self.cache = {}
        # longest first so that overlapping added tokens prefer the longest match
        alts = sorted(self.added, key=lambda s: (-len(s), s))
        self.added_re = regex.compile("|".join(regex.escape(a) for a in alts)) if alts else None

    @classmethod
    def from_tokenizer_json(cls, path):
        with open(path, encoding="utf-8") as f:
            tj = json.load(f)
        m = tj["model"]
        merges = [tuple(x.split(" ")) if isinstance(x, str) else tuple(x) for x in m["merges"]]
        added = {t["content"]: t["id"] for t in tj["added_tokens"]}
        return cls(m["vocab"], merges, added)

    def bpe(self, word):
        c = self.cache.get(word)
        if c is not None:
            return c
        syms = list(word)
        ranks = self.ranks
        while len(syms) > 1:
            best, best_rank = None, None
            for i in range(len(syms) - 1):
                r = ranks.get((syms[i], syms[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = (syms[i], syms[i + 1]), r
            if best is None:
                break
            a, b = best
            out = []
            i = 0
            while i < len(syms):
                if i < len(syms) - 1 and syms[i] == a and syms[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            syms = out
        ids = [self.vocab[s] for s in syms]
        self.cache[word] = ids
        return ids

    def encode_ordinary(self, text):
        ids = []
        for piece in pretokenize(text):
            ids.extend(self.bpe(to_bytelevel(piece)))
        return ids

    def encode(self, text):
        """Special tokens are recognised anywhere in the text (HF behaviour)."""
        if self.added_re is None:
            return self.encode_ordinary(text)
        ids = []
        pos = 0
        for m in self.added_re.finditer(text):
            if m.start() > pos:
                ids.extend(self.encode_ordinary(text[pos:m.start()]))
            ids.append(self.added[m.group(0)])
            pos = m.end()
        if pos < len(text):
            ids.extend(self.encode_ordinary(text[pos:]))
        return ids

    def tokens(self, ids):
        return [self.id_to_tok[i] for i in ids]

    def decode(self, ids):
        out = bytearray()
        for i in ids:
            t = self.id_to_tok[i]
            if t in self.added:
                out.extend(t.encode("utf-8"))
            else:
                out.extend(UNI2BYTE[ch] for ch in t)
        return out.decode("utf-8", errors="replace")
