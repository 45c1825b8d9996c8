"""Run the code of a Markdown page as a reader would: every fenced ``python`` and ``bash`` block, in order, from a
fresh copy of the repository (tests/test_readme.py and tests/test_docs.py use it).

Conventions for pages (README.md and docs/**/*.md):

- Blocks of one page run in order and share state, like a notebook: python blocks run in one interpreter with one
  namespace, bash blocks in ``bash -euo pipefail`` from the repository root, so a later block may use a folder or a
  variable an earlier one made.
- In bash, ``hf-sparse`` runs as ``python -m hf_sparse`` (the copy's code); ``pip install`` lines are skipped (the
  environment is installed already), and so are ``python -m pytest`` lines (the suite is what runs this).
- ``<!-- docs-test: skip (reason) -->`` on the line right before a fence skips that block; the reason is required
  (a block that needs ``../shared``, the SmolLM2 package, a GPU or the network).
- Other fences (``text``, ``json``, ``yaml``, none) are never run.

Also runnable as ``python tests/docs_snippets.py PAGE.md`` from a repository copy (that is how the tests call it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

RUNNABLE = ("python", "bash")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<language>[\w+-]*)\s*$")
SKIP = re.compile(r"^\s*<!--\s*docs-test:\s*skip\s*\((?P<reason>[^)]*\S[^)]*)\)\s*-->\s*$")
SKIP_ANY = re.compile(r"<!--\s*docs-test")
HF_SPARSE = re.compile(r"(?<![\w./\[-])hf-sparse(?=\s|$)")
#: folders never copied into the fresh repository copy (build products, caches, virtual environments)
IGNORED = shutil.ignore_patterns(".git", ".ci-venv", ".venv", "site", "__pycache__", ".pytest_cache", "*.egg-info",
                                 "build", "dist", "out*", "pruned-demo")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: str
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    skip_reason: str | None

    @property
    def runnable(self) -> bool:
        return self.language in RUNNABLE and self.skip_reason is None

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def read_blocks(path: Path, name: str | None = None) -> list[Block]:
    """Every fenced block of ``path`` with its language and skip marker; raises ``ValueError`` for a malformed skip
    marker (no reason, or not right before a fence) or an unclosed fence."""
    name = name or str(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        line = lines[i]
        if SKIP_ANY.search(line) and not SKIP.match(line):
            raise ValueError(f"{name}:{i + 1}: a docs-test marker must read '<!-- docs-test: skip (reason) -->'")
        if SKIP.match(line) and not (i + 1 < len(lines) and FENCE.match(lines[i + 1])):
            raise ValueError(f"{name}:{i + 1}: a docs-test skip marker must stand on the line right before a fence")
        opening = FENCE.match(line)
        if not opening:
            i += 1
            continue
        indent, language = opening["indent"], opening["language"].lower()
        start, body = i, []
        i += 1
        while i < len(lines) and not (FENCE.match(lines[i]) and not FENCE.match(lines[i])["language"]):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        if i == len(lines):
            raise ValueError(f"{name}:{start + 1}: the fence opened here is never closed")
        marker = SKIP.match(lines[start - 1]) if start > 0 else None
        blocks.append(Block(name, start + 1, language, "\n".join(body) + "\n", marker["reason"] if marker else None))
        i += 1
    return blocks


def bash_script(code: str, substitutions: dict[str, str] | None = None) -> str:
    """The bash block as it runs: continuation lines joined, ``pip install`` and ``pytest`` lines dropped,
    ``hf-sparse`` as ``python -m hf_sparse``, then each ``substitutions`` key replaced by its value."""
    logical, current = [], ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    if current:
        logical.append(current)
    kept = []
    for line in logical:
        command = line.strip()
        if re.match(r"^(python3? -m )?pip install\b", command) or re.match(r"^python3? -m pytest\b", command):
            continue
        line = HF_SPARSE.sub("python -m hf_sparse", line)
        for old, new in (substitutions or {}).items():
            line = line.replace(old, new)
        kept.append(line)
    return "\n".join(kept) + "\n"


def fresh_copy(repo: Path, destination: Path) -> Path:
    """A copy of the repository (sources, demo assets, examples, docs) without git data or build products."""
    shutil.copytree(repo, destination, ignore=IGNORED, symlinks=True)
    return destination


def environment(copy: Path) -> dict[str, str]:
    """The environment blocks run in: the copy's code first, no ../shared, no Hub."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(HF_SPARSE_SHARED=str(copy / "no-shared-here"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", MPLBACKEND="Agg")
    return env


def run_page(copy: Path, page: Path, name: str, substitutions: dict[str, str] | None = None,
             timeout: float = 1200) -> subprocess.CompletedProcess:
    """Run every runnable block of ``page`` inside ``copy`` (one interpreter for the page); the result's return code
    is 0 when all ran, and its stderr names the failing block."""
    args = [sys.executable, str(Path(__file__).resolve()), str(page), "--name", name]
    for old, new in (substitutions or {}).items():
        args += ["--substitute", old, new]
    return subprocess.run(args, cwd=copy, env=environment(copy), capture_output=True, text=True, timeout=timeout)


def _main(argv: list[str]) -> int:
    page, name, substitutions = Path(argv[0]), argv[0], {}
    rest = argv[1:]
    while rest:
        if rest[0] == "--name":
            name, rest = rest[1], rest[2:]
        elif rest[0] == "--substitute":
            substitutions[rest[1]] = rest[2]
            rest = rest[3:]
        else:
            raise SystemExit(f"unknown argument {rest[0]!r}")
    namespace = {"__name__": "__main__"}
    for block in read_blocks(page, name):
        if not block.runnable:
            continue
        print(f"--- {block.where} ({block.language})", flush=True)
        if block.language == "python":
            try:
                exec(compile(block.code, block.where, "exec"), namespace)  # noqa: S102 (the page's own code)
            except BaseException:
                traceback.print_exc()
                print(f"FAILED: the python block at {block.where}", file=sys.stderr)
                return 1
        else:
            sys.stdout.flush()
            completed = subprocess.run(["bash", "-euo", "pipefail", "-c", bash_script(block.code, substitutions)])
            if completed.returncode != 0:
                print(f"FAILED: the bash block at {block.where} (exit {completed.returncode})", file=sys.stderr)
                return 1
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
