#!/usr/bin/python3
"""Build the SentencePiece-style BPE tokenizer fixture and its golden ids.

Usage: /usr/bin/python3 data/scripts/make_sp_tokenizer.py
(Debian's python: it has python3-sentencepiece and python3-regex; HF `tokenizers` is not needed.)

Writes
  data/tokenizer-sp/tokenizer.model        the trained SentencePiece model
  data/tokenizer-sp/tokenizer.json         its Hugging Face conversion (as transformers'
                                           LlamaConverter, legacy=False, would write it)
  data/tokenizer-sp/tokenizer_config.json  add_bos_token true, add_eos_token false
  data/golden/tokenizer_sentencepiece.json test strings with ids from sentencepiece's encoder

Training: SentencePiece BPE, vocab 1000, byte_fallback, on data/text/calib.txt, with
normalization_rule_name=identity, add_dummy_prefix=True, remove_extra_whitespaces=False so that
sentencepiece's normaliser does nothing but " " -> "▁" and the dummy "▁" prefix (nmt_nfkc would
collapse runs of spaces, which HF's Metaspace does not). character_coverage stays at the default
0.9995, so the rarest characters of calib.txt (e.g. "Z", "&") are left out of the vocabulary and
exercise byte fallback even in ASCII text. One training thread: the model is deterministic.

Conversion (transformers convert_slow_tokenizer.py, LlamaConverter + SentencePieceExtractor):
  vocab   = {piece: id} for every piece (<unk>, <s>, </s>, <0x00>..<0xFF>, learned pieces);
  merges  = for each piece, every split into two pieces that are both in the vocab, the splits of
            one piece ordered by (id of left, id of right), then all merges ordered by the merged
            piece's score, highest first (stable), written as [left, right] pairs;
  model   = BPE, unk_token "<unk>", fuse_unk true, byte_fallback true;
  pre_tokenizer = Metaspace(replacement "▁", prepend_scheme "first", split false);
  normalizer = null; decoder = Sequence[Replace("▁" -> " "), ByteFallback, Fuse, Strip(" ", 1, 0)];
  post_processor = TemplateProcessing "<s> $A"; added tokens <unk>, <s>, </s> (special).

Golden ids. "sp_ids" is sentencepiece's own sp.encode(text). "ids" is what the HF tokenizer.json
produces (without BOS); the two agree except in two documented places:
  * text starting with " ": sentencepiece always adds the dummy prefix ("▁" + "▁hello" for
    " hello"); HF's Metaspace with prepend_scheme "first" only prepends "▁" when the text does not
    already start with one, so " hello" becomes "▁hello". Hence ids(text) = sp.encode(text[1:])
    for such texts (and the decoded text loses that first space: Strip removes it); " " alone
    is the single piece "▁" for HF and nothing for sentencepiece.
  * "<s>", "</s>", "<unk>" inside the text are special tokens for HF (added tokens are matched
    before normalisation) but plain characters for sentencepiece.
"decoded" is HF's decoder applied to "ids" (computed here step by step); it equals the text except
for leading-space texts (first space lost) and texts containing a literal "▁" (decodes as " ").
"""
import json
import os
import sys

import sentencepiece as spm

DATA = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(DATA, "tokenizer-sp")
GOLDEN = os.path.join(DATA, "golden", "tokenizer_sentencepiece.json")
CALIB = os.path.join(DATA, "text", "calib.txt")
HELDOUT = os.path.join(DATA, "text", "heldout.txt")
VOCAB_SIZE = 1000
SPACE = "\u2581"  # ▁

TEST_STRINGS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "The jury said it did find that many of Georgia's registration and election laws",
    "a",
    "",
    " ",
    "  ",
    " one leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "multiple   internal    spaces  here",
    "line one\nline two\n\nline four\n",
    "tabs\tand\r\nCRLF\r\n",
    "digits 0123456789 and 3.14159, 1,000,000 (1961)",
    "punctuation!?;: -- \"quotes\" 'single' (parens) [brackets] {braces} <angle> @#$%^&*_+=|~`",
    "Unicode letters: caf\u00e9 na\u00efve \u00c6r\u00f8sk\u00f8bing Stra\u00dfe",
    "decomposed: cafe\u0301",
    "Greek: \u039a\u03b1\u03bb\u03b7\u03bc\u03ad\u03c1\u03b1 \u03ba\u03cc\u03c3\u03bc\u03b5; "
    "Cyrillic: \u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440",
    "CJK: \u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \u4e2d\u6587 \ud55c\uad6d\uc5b4",
    "emoji: \U0001F642\U0001F680 \U0001F44D\U0001F3FD family "
    "\U0001F468\u200d\U0001F469\u200d\U0001F467",
    "rare ASCII: Zebra XYZ & Q*Z",
    "non-breaking\u00a0space and ideographic\u3000space",
    "literal " + SPACE + " metaspace char",
    "<s> and </s> are plain text to sentencepiece",
    "UPPER lower MiXeD CaSe WoRdS",
]


def train():
    """Trains into data/tokenizer-sp/tokenizer.model. Paths are given relative to data/ because
    the trainer records them in the model file (keeps the file identical across checkouts)."""
    if not os.path.exists(CALIB):
        sys.exit(f"missing {CALIB}")
    cwd = os.getcwd()
    os.chdir(DATA)
    try:
        spm.SentencePieceTrainer.train(
            input="text/calib.txt", model_prefix="tokenizer-sp/tokenizer", model_type="bpe",
            vocab_size=VOCAB_SIZE, byte_fallback=True, normalization_rule_name="identity",
            add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=False, unk_id=0,
            bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
        os.remove("tokenizer-sp/tokenizer.vocab")
    finally:
        os.chdir(cwd)


def extract(sp):
    """transformers' SentencePieceExtractor.extract(vocab_scores) for a BPE model."""
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(n)}
    merges = []
    for piece, score in scores.items():
        local = []
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                local.append((left, right, score))
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda x: x[2], reverse=True)
    return vocab, [[a, b] for a, b, _ in merges]


def added(i, content):
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def tokenizer_json(sp):
    vocab, merges = extract(sp)
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [added(0, "<unk>"), added(1, "<s>"), added(2, "</s>")],
        "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": "first",
                          "split": False},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>",
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def tokenizer_config():
    tok = lambda s: {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {"0": tok("<unk>"), "1": tok("<s>"), "2": tok("</s>")},
        "bos_token": tok("<s>"),
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": 4096,
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizerFast",
    }


def hf_decode(sp, ids):
    """HF decoder Sequence[Replace(▁ -> " "), ByteFallback, Fuse, Strip(" ", 1, 0)]."""
    toks = [sp.id_to_piece(i).replace(SPACE, " ") for i in ids]
    out, pending = [], bytearray()

    def flush():
        if pending:
            try:
                out.append(pending.decode("utf-8"))
            except UnicodeDecodeError:
                out.extend("\ufffd" for _ in pending)
            pending.clear()

    for t in toks:
        if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            pending.append(int(t[3:5], 16))
        else:
            flush()
            out.append(t)
    flush()
    s = "".join(out)
    return s[1:] if s.startswith(" ") else s


def hf_piece_ids(sp, piece, at_origin):
    """HF encoding of one text piece between special tokens, from sentencepiece's encoder.
    HF Metaspace (prepend_scheme "first"): " " -> "▁", then "▁" is prepended only if the piece
    is at the start of the text and does not already start with "▁". sentencepiece always
    prepends its dummy "▁", so a piece starting with " " is sp.encode(piece[1:])."""
    if piece.startswith(" "):
        rest = piece[1:]
        return sp.encode(rest) if rest else [sp.piece_to_id(SPACE)]
    assert at_origin or not piece, "no sentencepiece equivalent for %r" % piece
    return sp.encode(piece)


def hf_ids(sp, text):
    """HF ids (no BOS): <s>, </s>, <unk> in the text are special tokens for HF (matched before
    anything else), while sentencepiece encodes them as plain characters."""
    specials = {"<unk>": 0, "<s>": 1, "</s>": 2}
    ids, start, pos = [], 0, 0
    while pos < len(text):
        hit = next((t for t in sorted(specials, key=len, reverse=True)
                    if text.startswith(t, pos)), None)
        if hit is None:
            pos += 1
            continue
        ids += hf_piece_ids(sp, text[start:pos], start == 0)
        ids.append(specials[hit])
        pos += len(hit)
        start = pos
    ids += hf_piece_ids(sp, text[start:], start == 0)
    return ids


def main():
    os.makedirs(OUT_DIR, exist_ok=True)
    train()
    sp = spm.SentencePieceProcessor(model_file=os.path.join(OUT_DIR, "tokenizer.model"))
    assert sp.get_piece_size() == VOCAB_SIZE
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]

    tj = tokenizer_json(sp)
    with open(os.path.join(OUT_DIR, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False, indent=2)
        f.write("\n")
    with open(os.path.join(OUT_DIR, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(), f, ensure_ascii=False, indent=2)
        f.write("\n")

    with open(HELDOUT, encoding="utf-8") as f:
        heldout = f.read()
    texts = TEST_STRINGS + [heldout[:6000]]
    cases = []
    for text in texts:
        sp_ids = sp.encode(text)
        ids = hf_ids(sp, text)
        decoded = hf_decode(sp, ids)
        if not text.startswith(" ") and not any(t in text for t in ("<s>", "</s>", "<unk>")):
            assert ids == sp_ids
            # sentencepiece's own decoder agrees with the HF decoder chain.
            assert sp.decode(sp_ids) == decoded, (text, sp.decode(sp_ids), decoded)
            if SPACE not in text:
                assert decoded == text, (text, decoded)
        cases.append({
            "text": text,
            "ids": ids,
            "sp_ids": sp_ids,
            "pieces": [sp.id_to_piece(i) for i in ids],
            "decoded": decoded,
        })
    heldout_ids = sp.encode(heldout)
    byte_pieces = sum(1 for c in cases for i in c["ids"] if sp.is_byte(i))
    golden = {
        "tokenizer": "data/tokenizer-sp/tokenizer.json",
        "generator": "data/scripts/make_sp_tokenizer.py (sentencepiece %s)" % spm.__version__,
        "conventions": (
            "ids: the HF tokenizer.json encoding without BOS (encode(text, add_special=false)); "
            "sp_ids: sentencepiece sp.encode(text). They are equal except for texts starting "
            "with ' ', where sentencepiece's dummy prefix adds a second '\u2581' and HF's "
            "Metaspace prepend_scheme 'first' does not (ids = sp.encode(text[1:])), and texts "
            "containing <s> / </s> / <unk>, which HF matches as special tokens. decoded: "
            "HF decoder Sequence[Replace, ByteFallback, Fuse, Strip] applied to ids. With "
            "add_special=true the ids are preceded by <s> = 1 (tokenizer_config add_bos_token)."),
        "bos_id": 1,
        "eos_id": 2,
        "vocab_size": VOCAB_SIZE,
        "heldout_token_count": len(heldout_ids),
        "cases": cases,
    }
    with open(GOLDEN, "w", encoding="utf-8") as f:
        json.dump(golden, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"vocab {VOCAB_SIZE}, merges {len(tj['model']['merges'])}, {len(cases)} cases "
          f"({byte_pieces} byte-fallback pieces), heldout {len(heldout_ids)} tokens")


if __name__ == "__main__":
    main()
