"""The README as a new user reads it: every command and snippet runs, in order, on a fresh copy of the repository with
the vendored demo assets (no ../shared, no network), and its numbers link to the results pages (its links are checked
with every docs page, in test_docs).

The quick start runs with fewer windows and samples than it prints by default (the command is the README's; the test
appends ``--max-windows``/``--num-samples``/``--sequence-length``), so the whole README stays well under two minutes.
"""

from __future__ import annotations

import json
import re

import pytest
from safetensors.torch import load_file

from conftest import REPO
from docs_snippets import fresh_copy, read_blocks, run_page

README = REPO / "README.md"
QUICK = {"python examples/quickstart.py": "python examples/quickstart.py --max-windows 8 --num-samples 8 "
                                          "--sequence-length 128"}


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    copy = fresh_copy(REPO, tmp_path_factory.mktemp("readme") / "repo")
    completed = run_page(copy, copy / "README.md", "README.md", substitutions=QUICK, timeout=900)
    return copy, completed


def test_every_readme_command_runs_on_a_fresh_copy(readme_run):
    copy, completed = readme_run
    assert completed.returncode == 0, (completed.stdout[-3000:], completed.stderr[-5000:])
    ran = [block for block in read_blocks(README) if block.runnable]
    assert len(ran) >= 6  # quick start, four recipes (one with two blocks)
    assert completed.stdout.count("--- README.md:") == len(ran)
    # The quick start saved its model; the recipes left what they say they leave.
    assert json.loads((copy / "pruned-demo" / "config.json").read_text())["sparsity_config"]["pattern"] == "2:4"
    record = json.loads((copy / "llama-7m-2of4" / "config.json").read_text())["sparsity_config"]
    assert record["method"] == "sparsegpt" and record["pattern"] == "2:4" and record["overall_sparsity"] == 0.5
    assert "0.5\n" in completed.stdout


def test_the_structured_recipe_saves_a_smaller_model(readme_run):
    copy, completed = readme_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    small = (copy / "llama-7m-flap30" / "model.safetensors").stat().st_size
    dense = (copy / "demo" / "llama-7m-books-fp16" / "model.safetensors").stat().st_size
    # the demo model is stored in float16, the pruned one in float32 (--dtype float32 by default)
    assert small < 2 * dense * 0.9
    ratio = float(re.findall(r"^(0\.\d+)$", completed.stdout, re.MULTILINE)[-1])  # printed after the 0.5
    assert 0.7 < ratio < 0.9


def test_the_recovered_model_keeps_every_zero(readme_run):
    copy, completed = readme_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    pruned = load_file(copy / "llama-7m-2of4" / "model.safetensors")
    recovered = load_file(copy / "llama-7m-2of4-recovered" / "model.safetensors")
    record = json.loads((copy / "llama-7m-2of4" / "config.json").read_text())["sparsity_config"]
    changed = 0
    for module in record["modules"]:
        before, after = pruned[f"{module}.weight"], recovered[f"{module}.weight"]
        assert ((before == 0) == (after == 0)).all(), module
        changed += int(not (before == after).all())
    assert changed > 0  # the recovery trained something


def test_readme_is_short_and_needs_no_shared_folder():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    assert "../shared" not in text


def test_every_measured_number_in_the_readme_prose_is_a_link():
    text = README.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)       # code blocks: commands and their output
    text = re.sub(r"`[^`]*`", "", text)                           # inline code: settings, versions
    text = re.sub(r"\[[^\]]*\]\([^)]*\)", "", text)              # links: the numbers that are measured
    loose = re.findall(r"\d+\.\d+|\d+(?:\.\d+)?×", text)
    assert not loose, f"numbers in the README prose without a link to their results section: {loose}"
