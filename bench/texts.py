"""Make English prose texts of a chosen size from HTML documentation on this machine, for training runs on texts other
than Tiny Shakespeare (small and large):

    python bench/texts.py --html ~/.rustup/toolchains/*/share/doc/rust/html --out bench/results/prose-100k.txt --size 100k
    python bench/texts.py --html ~/.rustup/toolchains/*/share/doc/rust/html --out bench/results/prose-10m.txt --size 10m

Keeps the text of paragraphs (<p>) only, each once, in file order, so what comes out is prose, not code listings or navigation.
Not a test: what it makes depends on the documentation installed.
"""

from __future__ import annotations

import argparse
import html.parser
import re
import sys
from pathlib import Path

UNITS = {"k": 1000, "m": 1000**2}


class Paragraphs(html.parser.HTMLParser):
    """Collects the text of every <p> element, whitespace collapsed."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.depth = 0
        self.current: list[str] = []
        self.paragraphs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "p":
            self.depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "p" and self.depth:
            self.depth -= 1
            if not self.depth:
                text = re.sub(r"\s+", " ", "".join(self.current)).strip()
                if len(text) > 40:  # a sentence or more, not a label
                    self.paragraphs.append(text)
                self.current = []

    def handle_data(self, data: str) -> None:
        if self.depth:
            self.current.append(data)


def size(text: str) -> int:
    """'100k' -> 100000 characters."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([km]?)", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"--size must look like 100k or 10m, got {text!r}")
    return int(float(m[1]) * UNITS.get(m[2], 1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--html", required=True, type=Path, help="a folder of HTML documentation (searched recursively)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--size", required=True, type=size, help="characters to write: 100k, 10m, ...")
    args = p.parse_args()
    books = sorted(args.html.rglob("print.html"))  # a whole book on one page: its chapter pages would repeat it
    files = books + sorted(f for f in args.html.rglob("*.html") if not any(b.parent in f.parents for b in books))
    if not files:
        print(f"error: no HTML files under {args.html}; pass a documentation folder.", file=sys.stderr)
        return 2
    out, seen, total = [], set(), 0
    for f in files:
        parser = Paragraphs()
        parser.feed(f.read_text(encoding="utf-8", errors="replace"))
        for para in parser.paragraphs:
            if para in seen:  # API pages repeat the same sentences: each paragraph once, so validation is unseen text
                continue
            seen.add(para)
            out.append(para)
            total += len(para) + 2
        if total >= args.size:
            break
    text = "\n\n".join(out)[: args.size]
    if len(text) < args.size:
        print(f"warning: only {len(text):,} characters of prose under {args.html}", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}: {len(text):,} characters from {len(files)} candidate files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
