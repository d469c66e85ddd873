"""A text corpus every machine has: the running Python's standard-library source (its test suite included,
installed third-party packages left out), split by file into training, development and held-out text, so a model
can be trained here without downloads.

    python -m bench.stdlib_corpus --out corpus/   # corpus/{train,dev,val}.txt, corpus/corpus.json

Files are taken in sorted path order; of every `--val-every` files one goes to `dev` (for choices such as the plan
search) and one to `val` (for the reported figures), so no figure comes from text that was trained or searched on.
`corpus.json` records the Python version, file counts, bytes and a hash: the corpus differs between
Python versions, so figures say which one they used.

`--source pydoc-topics` takes English prose instead: the language reference's text that every CPython ships for
`help()` (`pydoc_data.topics`, one text per topic), split by topic in sorted topic order the same way.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import sysconfig
from pathlib import Path

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
SEPARATOR = "\n\n\n"


def stdlib_files(root: Path) -> list[Path]:
    """The standard library's .py files under `root`, without installed third-party packages."""
    return [p for p in sorted(root.rglob("*.py")) if not SKIP_DIRS.intersection(p.relative_to(root).parts)]


def pydoc_topics() -> list[str]:
    """The language reference's topic texts (`pydoc_data.topics`), in sorted topic order."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def build(out: Path, val_every: int, root: Path | None = None, overwrite: bool = False,
          source: str = "stdlib") -> dict:
    names = ("train.txt", "dev.txt", "val.txt", "corpus.json")
    if not overwrite and any((out / n).exists() for n in names):
        raise SystemExit(f"error: {out} already holds a corpus (pass --overwrite to replace it)")
    if source == "pydoc-topics":
        texts = pydoc_topics()
    else:
        root = root or Path(sysconfig.get_paths()["stdlib"])
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files(root)]
    if len(texts) < 2 * val_every:
        raise SystemExit(f"error: {source}: only {len(texts)} texts, too few for a corpus")
    splits: dict[str, list[str]] = {"train": [], "dev": [], "val": []}
    for i, text in enumerate(texts):
        k = i % val_every
        split = "val" if k == val_every - 1 else "dev" if k == val_every // 2 - 1 else "train"
        splits[split].append(text)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"python": sys.version.split()[0], "root": source, "files": len(texts), "val_every": val_every}
    for split, texts in splits.items():
        body = SEPARATOR.join(texts)
        (out / f"{split}.txt").write_text(body, encoding="utf-8")
        meta[split] = {"files": len(texts), "bytes": len(body.encode()),
                       "sha256": hashlib.sha256(body.encode()).hexdigest()[:16]}
    (out / "corpus.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--val-every", type=int, default=20,
                   help="of every N files, one for dev and one for val (default 20: 5%% each)")
    p.add_argument("--source", choices=("stdlib", "pydoc-topics"), default="stdlib",
                   help="the standard library's source (default) or the language reference's topic texts")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    meta = build(args.out, args.val_every, overwrite=args.overwrite, source=args.source)
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
