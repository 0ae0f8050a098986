"""Regenerate ``benchmarks/data/1811-1818_austen_calibration.txt`` from Debian's ``r-cran-janeaustenr``.

    apt-get download r-cran-janeaustenr=1.0.0-1            # Debian bookworm, main, MIT; the novels are public domain
    python benchmarks/make_calib_corpus.py r-cran-janeaustenr_1.0.0-1_all.deb
    python benchmarks/make_calib_corpus.py r-cran-janeaustenr_1.0.0-1_all.deb --check   # compare with the shipped file

The package ships Jane Austen's six novels (Project Gutenberg transcriptions,
one string per printed line) as R lazy-load data:
``usr/lib/R/site-library/janeaustenr/data/Rdata.rdb`` indexed by ``Rdata.rdx``.
This script reads them without R: ``ar``/``tar`` from the standard library
unpack the .deb, and a minimal reader of R's XDR serialization (character
vectors, lists and attributes only) decodes the six objects.

The corpus is the opening chapters of the five novels other than *Pride and
Prejudice* (whose chapter 1 is in the evaluation corpus, ``lm_tasks/data``),
in order of first publication: *Sense and Sensibility* (1811), *Mansfield Park*
(1814), *Emma* (1815), *Northanger Abbey* and *Persuasion* (both Dec. 1817,
title pages 1818).  From each, whole chapters from chapter 1 on are taken
until the excerpt reaches ``--chars-per-novel`` characters.  Title pages,
prefaces, volume headings and the editors' end notes are left out.  The text
is normalized like ``lm_tasks/data``: hard-wrapped lines are joined into one
line per paragraph, paragraphs are separated by one blank line, runs of spaces
become one, and Gutenberg's ``_italic_`` underscores are dropped.  Each chapter
keeps its heading (``CHAPTER I``) as a paragraph of its own; each novel begins
with a line giving its title.  Words, spelling and punctuation (including
``--`` dashes) are as in the package.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import re
import struct
import sys
import tarfile
import zlib
from pathlib import Path

OUT = Path(__file__).resolve().parent / "data" / "1811-1818_austen_calibration.txt"
DATA_DIR = "usr/lib/R/site-library/janeaustenr/data/"
NOVELS = (  # (object name in the package, title line written to the corpus)
    ("sensesensibility", "Sense and Sensibility (1811)"),
    ("mansfieldpark", "Mansfield Park (1814)"),
    ("emma", "Emma (1815)"),
    ("northangerabbey", "Northanger Abbey (1817)"),
    ("persuasion", "Persuasion (1817)"),
)
CHAPTER = re.compile(r"^\s*CHAPTER\s+[IVXLC\d]+\.?\s*$", re.IGNORECASE)
VOLUME = re.compile(r"^\s*VOLUME\s+[IVXLC\d]+\.?\s*$", re.IGNORECASE)
END = re.compile(r"^\s*(THE END|FINIS)\s*$", re.IGNORECASE)


# --- a minimal reader of R's serialization format (XDR, versions 2 and 3) ---------------------------
class _RReader:
    def __init__(self, buf: bytes):
        self.b, self.p, self.refs = buf, 0, []

    def int(self) -> int:
        (v,) = struct.unpack(">i", self.b[self.p : self.p + 4])
        self.p += 4
        return v

    def read(self):
        if self.b[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.p = 2
        version = self.int()
        self.int(), self.int()  # writer and minimal reader versions
        if version == 3:
            n = self.int()  # native encoding name
            self.p += n
        return self.item()

    def item(self):
        flags = self.int()
        t, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if t == 254:  # NILVALUE
            return None
        if t == 255:  # REFSXP
            return self.refs[(flags >> 8) - 1]
        if t in (241, 242, 247, 251, 252, 253):  # base env, empty env, base namespace, missing, unbound, global env
            return None
        if t == 1:  # SYMSXP
            sym = ("sym", self.item())
            self.refs.append(sym)
            return sym
        if t == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            raw = self.b[self.p : self.p + n]
            self.p += n
            return raw.decode("latin-1" if flags & (1 << 14) and not flags & (1 << 15) else "utf-8")
        if t == 2:  # LISTSXP (pairlist): attributes, tag, car, cdr
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            car, cdr = self.item(), self.item()
            return [(tag[1] if tag else None, car)] + (cdr or [])
        if t in (10, 13):  # logical, integer
            n = self.int()
            value = list(struct.unpack(f">{n}i", self.b[self.p : self.p + 4 * n]))
            self.p += 4 * n
        elif t == 14:  # double
            n = self.int()
            value = list(struct.unpack(f">{n}d", self.b[self.p : self.p + 8 * n]))
            self.p += 8 * n
        elif t in (16, 19):  # character vector, list
            value = [self.item() for _ in range(self.int())]
        else:
            raise ValueError(f"R type {t} not supported at byte {self.p}")
        if has_attr:
            attrs = dict(self.item())
            if "names" in attrs:
                return dict(zip(attrs["names"], value))
        return value


def read_novels(deb: Path) -> dict[str, list[str]]:
    """``{object name: lines}`` of the package's lazy-load data."""
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise SystemExit(f"{deb} is not a .deb (ar archive)")
    p, members = 8, {}
    while p < len(blob):
        name, size = blob[p : p + 16].decode().strip().rstrip("/"), int(blob[p + 48 : p + 58])
        members[name] = blob[p + 60 : p + 60 + size]
        p += 60 + size + (size & 1)
    data_name = next(n for n in members if n.startswith("data.tar"))
    with tarfile.open(fileobj=io.BytesIO(members[data_name])) as tar:
        files = {m.name.lstrip("./"): tar.extractfile(m).read() for m in tar.getmembers() if m.isfile() and DATA_DIR in m.name}
    index = _RReader(gzip.decompress(files[DATA_DIR + "Rdata.rdx"])).read()
    rdb = files[DATA_DIR + "Rdata.rdb"]
    out = {}
    for name, (offset, length) in index["variables"].items():
        chunk = rdb[int(offset) : int(offset) + int(length)]
        (n,) = struct.unpack(">i", chunk[:4])
        raw = zlib.decompress(chunk[4:])
        assert len(raw) == n, name
        out[name] = [s or "" for s in _RReader(raw).read()]
    return out


def paragraphs(lines: list[str]) -> list[str]:
    paras, cur = [], []
    for line in lines + [""]:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            paras.append(re.sub(r" {2,}", " ", " ".join(cur)).replace("_", ""))
            cur = []
    return paras


def excerpt(lines: list[str], chars: int) -> list[str]:
    """Whole chapters from chapter 1 on, until at least ``chars`` characters; headings kept as paragraphs."""
    starts = [i for i, line in enumerate(lines) if CHAPTER.match(line)]
    out: list[str] = []
    for k, s in enumerate(starts):
        e = starts[k + 1] if k + 1 < len(starts) else len(lines)
        body = [line for line in lines[s + 1 : e] if not VOLUME.match(line)]
        end = next((j for j, line in enumerate(body) if END.match(line)), None)
        out += [lines[s].strip()] + paragraphs(body[:end] if end is not None else body)
        if sum(len(x) + 2 for x in out) >= chars:
            break
    return out


def build(deb: Path, chars_per_novel: int) -> str:
    novels = read_novels(deb)
    parts = []
    for name, title in NOVELS:
        parts.append("\n\n".join([title] + excerpt(novels[name], chars_per_novel)))
    return "\n\n".join(parts) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("deb", type=Path, help="r-cran-janeaustenr_1.0.0-1_all.deb (apt-get download r-cran-janeaustenr=1.0.0-1)")
    ap.add_argument("--chars-per-novel", type=int, default=70_000)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--check", action="store_true", help="only compare with --out")
    args = ap.parse_args()
    text = build(args.deb, args.chars_per_novel)
    digest = hashlib.sha256(text.encode()).hexdigest()
    if args.check:
        same = args.out.is_file() and args.out.read_text(encoding="utf-8") == text
        print(f"{'identical to' if same else 'DIFFERS from'} {args.out} (sha256 {digest})")
        sys.exit(0 if same else 1)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}: {len(text.encode())} bytes, {len(text.split())} words, sha256 {digest}")


if __name__ == "__main__":
    main()
