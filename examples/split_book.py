"""Split a Project Gutenberg plain-text book into two halves: the second domain of
``benchmark_calibration_mix.py`` (first half calibrates, second half evaluates).

The README's calibration table uses Grimm's fairy tales (Project Gutenberg eBook #2591, translated by Edgar Taylor
and Marian Edwardes; public domain). The book is not shipped with hf_sparse: download the plain text yourself
(https://www.gutenberg.org/ebooks/2591, "Plain Text UTF-8"), or take the copy measured here, ``pg2591.txt`` in the
public repository github.com/AllenDowney/CompStats (549,746 bytes, sha256
``4d909d18d528fbf393a06ecc05487006d6983f69d55a16138e4bc7642213eb90``; Gutenberg's current file has a different
licence header, so its sha256 differs, but the halves below come from the text between the markers only).

How it is split, so anyone gets the same halves from the same file:

1. decode as UTF-8 (a byte-order mark is dropped), turn ``\\r\\n`` into ``\\n``;
2. keep the lines strictly between the ``*** START OF`` and ``*** END OF`` marker lines (Gutenberg's licence and
   header are not part of the book), strip blank lines at both ends;
3. cut at the first paragraph break (a blank line, ``\\n\\n``) at or after half of the characters; each half is
   stripped and ends with one newline.

    python examples/split_book.py pg2591.txt --output-dir data/
    # -> data/pg2591-first-half.txt, data/pg2591-second-half.txt (and their sha256)
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

START, END = "*** START OF", "*** END OF"


def book_body(raw: bytes) -> str:
    """The text between a Project Gutenberg file's START and END marker lines, with ``\\n`` line ends.

    >>> book_body(b"licence\\r\\n*** START OF X ***\\r\\n\\r\\nOnce upon a time.\\r\\n*** END OF X ***\\r\\nmore")
    'Once upon a time.'
    """
    lines = raw.decode("utf-8-sig").replace("\r\n", "\n").split("\n")
    starts = [i for i, line in enumerate(lines) if line.startswith(START)]
    ends = [i for i, line in enumerate(lines) if line.startswith(END)]
    if len(starts) != 1 or len(ends) != 1 or ends[0] <= starts[0]:
        raise ValueError(f"expected one {START!r} line before one {END!r} line (a Project Gutenberg plain-text file), "
                         f"found {len(starts)} and {len(ends)}")
    return "\n".join(lines[starts[0] + 1:ends[0]]).strip("\n")


def split_halves(body: str) -> tuple[str, str]:
    """``body`` cut at the first paragraph break at or after its middle.

    >>> split_halves("aa\\n\\nbb\\n\\ncc")
    ('aa\\n\\nbb\\n', 'cc\\n')
    """
    cut = body.find("\n\n", len(body) // 2)
    if cut < 0:
        raise ValueError("no paragraph break (blank line) after the middle of the text: cannot split it in halves")
    return body[:cut].strip() + "\n", body[cut:].strip() + "\n"


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("book", type=Path, help="a Project Gutenberg plain-text file, e.g. pg2591.txt")
    parser.add_argument("--output-dir", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    raw = args.book.read_bytes()
    halves = split_halves(book_body(raw))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    print(f"{args.book}: {len(raw)} bytes, sha256 {hashlib.sha256(raw).hexdigest()}")
    for name, text in zip(("first-half", "second-half"), halves):
        path = args.output_dir / f"{args.book.stem}-{name}.txt"
        path.write_text(text, encoding="utf-8")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        print(f"{path}: {len(text)} characters, sha256 {digest}")
        paths.append(path)
    return paths


if __name__ == "__main__":
    main()
