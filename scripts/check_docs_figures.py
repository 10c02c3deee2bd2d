#!/usr/bin/env python3
"""Check that no measured figure was lost when the README was split into README.md + docs/.

docs/figures.txt lists every number with a decimal point or a % sign that the README held before
the split (one per line). This script reports each listed figure that no longer appears in
README.md or any docs/**/*.md, and exits 1 if there is one.

  scripts/check_docs_figures.py            check docs/figures.txt against README.md + docs/
  scripts/check_docs_figures.py --extract FILE
                                           print the figures of FILE (how docs/figures.txt was made:
                                           git show <commit>:README.md > old.md; --extract old.md)
Python 3 standard library only.
"""
import pathlib
import re
import sys

# A figure: digits with a decimal point (1.15, 0.0062, 2.27) or followed by % (30.5%, 75%),
# thousands separators included (28,089.5); matched whole, never inside a longer number.
FIGURE = re.compile(r"(?<![\d.])\d+(?:,\d{3})*(?:\.\d+%?|%)")


def figures(text):
    return FIGURE.findall(text)


def main(argv):
    root = pathlib.Path(__file__).resolve().parent.parent
    if len(argv) == 3 and argv[1] == "--extract":
        seen = []
        for f in figures(pathlib.Path(argv[2]).read_text(encoding="utf-8")):
            if f not in seen:
                seen.append(f)
        print("\n".join(seen))
        return 0
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    listed = [l for l in (root / "docs" / "figures.txt").read_text(encoding="utf-8").splitlines() if l]
    docs = [root / "README.md"] + sorted((root / "docs").rglob("*.md"))
    present = set()
    for path in docs:
        present.update(figures(path.read_text(encoding="utf-8")))
    missing = [f for f in listed if f not in present]
    for f in missing:
        print(f"missing: {f}")
    print(f"{len(listed) - len(missing)} of {len(listed)} figures of the old README found in "
          f"README.md + {len(docs) - 1} docs/**/*.md files; {len(missing)} missing")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
