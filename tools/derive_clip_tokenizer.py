"""Derive the CLIP BPE tokenizer files shipped in configs/tokenizers/clip/.

transformers does not ship CLIP's 49,408-token vocabulary, and the hub is off
limits, so we rebuild `vocab.json` / `merges.txt` from the BPE merge list that
the `open-clip-torch` wheel carries (open_clip/bpe_simple_vocab_16e6.txt.gz).
The wheel is only downloaded and read as a zip: installing it would pull
torchvision.

Usage:  python tools/derive_clip_tokenizer.py [--wheel PATH] [--out DIR]
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "configs" / "tokenizers" / "clip"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
# CLIP keeps the first 49152 - 256 - 2 merges of the file (line 0 is a header).
N_MERGES = VOCAB_SIZE - 2 * 256 - 2


def byte_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP reversible byte -> printable unicode character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    # Order matters: printable bytes first, then the shifted ones (this is the
    # id order of the first 256 vocab entries).
    order = printable + [b for b in range(256) if b not in printable]
    return {b: table[b] for b in order}


def build(bpe_text: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = bpe_text.split("\n")[1 : N_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    assert len(merges) == N_MERGES and all(len(m) == 2 for m in merges)
    chars = list(byte_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    return vocab, merges


def fetch_wheel(dest: str) -> str:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "open-clip-torch", "-d", dest],
        check=True,
    )
    found = glob.glob(os.path.join(dest, "open_clip_torch-*.whl"))
    if not found:
        raise SystemExit("pip download did not produce an open_clip_torch wheel")
    return found[0]


def write(vocab: dict[str, int], merges: list[tuple[str, str]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # Same serialisation as the tokenizer files published with CLIP on the hub.
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    with open(out / "merges.txt", "w", encoding="utf-8", newline="\n") as fh:
        fh.write("#version: 0.2\n")
        fh.write("\n".join(" ".join(m) for m in merges))
        fh.write("\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheel", help="an already downloaded open_clip_torch wheel")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or fetch_wheel(tmp)
        with zipfile.ZipFile(wheel) as zf:
            bpe_text = gzip.decompress(zf.read(BPE_MEMBER)).decode("utf-8")
    vocab, merges = build(bpe_text)
    write(vocab, merges, args.out)
    print(f"wrote {len(vocab)} tokens, {len(merges)} merges to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
