"""The documentation's code runs and its links resolve.

Every page of docs/ with a runnable block (fenced ``python`` or ``bash`` without a skip marker) runs on a fresh copy
of the repository, block by block in order, as tests/docs_snippets.py describes; README.md is run by
tests/test_readme.py. Every relative link of README.md and docs/ must name an existing file, and a link with an anchor
a heading of the page it names (mkdocs --strict checks docs/ too, but not the README).
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

from conftest import REPO
from docs_snippets import bash_script, fresh_copy, read_blocks, run_page

DOCS = REPO / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
RUNNABLE_PAGES = [page for page in PAGES if any(block.runnable for block in read_blocks(page))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\((?P<image>[^)\s]+)\)")


def slug(heading: str) -> str:
    """The anchor python-markdown's table of contents (and so mkdocs) gives a heading."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors_of(page: Path) -> set[str]:
    """The anchors of a Markdown page's headings (outside code blocks), numbered as python-markdown numbers
    repeated ones, plus explicit ``{ #id }`` attributes."""
    anchors, seen, in_code = set(), {}, False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        heading = re.match(r"^#{1,6}\s+(.*?)\s*(?:\{\s*#(?P<id>[\w-]+)\s*\})?\s*$", line)
        if in_code or not heading:
            continue
        if heading["id"]:
            anchors.add(heading["id"])
            continue
        base = slug(heading[1])
        count = seen.get(base, 0)
        anchors.add(base if count == 0 else f"{base}_{count}")
        seen[base] = count + 1
    return anchors


def relative_links(page: Path) -> list[tuple[str, str]]:
    """(path, anchor) of every relative link and image of ``page``, outside code; path is '' for a link to an
    anchor of the page itself."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    text = re.sub(r"`[^`\n]*`", "", text)
    links = []
    for match in LINK.finditer(text):
        target = match["target"] or match["image"]
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("/"):
            continue  # absolute URLs (https:, mailto:) are not checked: no network
        path, _, anchor = target.partition("#")
        links.append((path, anchor))
    return links


@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=[str(p.relative_to(DOCS)) for p in RUNNABLE_PAGES])
def test_every_docs_snippet_runs_on_a_fresh_copy(page, tmp_path):
    copy = fresh_copy(REPO, tmp_path / "repo")
    name = str(page.relative_to(REPO))
    completed = run_page(copy, copy / name, name)
    assert completed.returncode == 0, (completed.stdout[-3000:], completed.stderr[-5000:])
    ran = [block for block in read_blocks(page) if block.runnable]
    assert completed.stdout.count(f"--- {name}:") == len(ran)


@pytest.mark.parametrize("page", [*PAGES, REPO / "README.md"], ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    for target, anchor in relative_links(page):
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.relative_to(REPO)} links to {target}, which does not exist"
        if anchor and path.suffix == ".md":
            assert anchor in anchors_of(path), f"{page.relative_to(REPO)} links to {target}#{anchor}: no such heading"


def test_skip_markers_are_well_formed_and_name_a_reason():
    for page in [*PAGES, REPO / "README.md"]:
        for block in read_blocks(page, str(page.relative_to(REPO))):  # raises on a malformed or stray marker
            assert block.skip_reason is None or block.skip_reason.strip(), block.where


def test_no_page_asks_for_the_shared_folder_in_code_that_runs():
    for page in [*PAGES, REPO / "README.md"]:
        for block in read_blocks(page, str(page.relative_to(REPO))):
            if block.runnable:
                assert "../shared" not in block.code, f"{block.where} runs with ../shared: mark it skipped, say why"


def test_bash_blocks_run_the_copys_cli_and_skip_installs():
    script = bash_script("pip install -e '.[dev]'\nhf-sparse prune a \\\n    --method wanda\npython -m pytest -q\n"
                         "echo hf-sparse[eval] ok\n")
    assert script == "python -m hf_sparse prune a      --method wanda\necho hf-sparse[eval] ok\n"


def test_a_skip_marker_without_a_reason_or_fence_is_refused(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- docs-test: skip -->\n```bash\nls\n```\n")
    with pytest.raises(ValueError, match="must read"):
        read_blocks(page)
    page.write_text("<!-- docs-test: skip (needs a GPU) -->\n\n```bash\nls\n```\n")
    with pytest.raises(ValueError, match="right before a fence"):
        read_blocks(page)
    page.write_text("<!-- docs-test: skip (needs a GPU) -->\n```bash\nls\n```\n```python\nx = 1\n```\n")
    skipped, run = read_blocks(page)
    assert (skipped.skip_reason, skipped.runnable, run.runnable) == ("needs a GPU", False, True)


def test_slugs_match_the_table_of_contents():
    assert slug("FISTA on SmolLM2-135M") == "fista-on-smollm2-135m"
    assert slug("`hf-sparse prune`: the command") == "hf-sparse-prune-the-command"
    assert slug("Speed and memory (one thread)") == "speed-and-memory-one-thread"
