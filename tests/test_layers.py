"""The package's layers: no import cycle between its parts, the import-linter contracts of pyproject.toml hold, and
the few places where a lower layer is handed something from a higher one (instead of importing it) behave.

Every import statement counts, those inside functions and under ``TYPE_CHECKING`` too (grimp, which import-linter
builds on, reads them all).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_sparse
from hf_sparse.engine import run_structured
from hf_sparse.integrations import transformers as transformers_integration
from hf_sparse.methods import build_method

from conftest import tiny_llama

grimp = pytest.importorskip("grimp", reason="the layer checks need import-linter (the dev extra)")

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "hf_sparse"
# The parts below the integrations may use transformers for these two things only, neither of them loading a model:
# SparsityConfig subclasses QuantizationConfigMixin (from_pretrained accepts it), text calibration loads a tokenizer.
ALLOWED_TRANSFORMERS_BELOW_INTEGRATIONS = {
    ("hf_sparse.config.sparsity", "from transformers.utils.quantization_config import QuantizationConfigMixin"),
    ("hf_sparse.calibration.sources", "from transformers import AutoTokenizer"),
    ("hf_sparse.formats.checkpoint", "from transformers import AutoConfig, AutoModelForCausalLM"),
}
BELOW_INTEGRATIONS = ("formats", "plots", "saving", "record", "config", "methods", "engine", "calibration", "surgery",
                      "kernels", "architectures", "masks", "validation", "likelihood", "threads", "errors", "_version")


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(PACKAGE, include_external_packages=False, cache_dir=None)


def _part(module: str) -> str:
    """``hf_sparse.engine.statistics`` -> ``engine``; the package root is ``""``."""
    return module.split(".")[1] if "." in module else ""


def _part_edges(graph: grimp.ImportGraph) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            a, b = _part(module), _part(imported)
            if a and b and a != b:
                edges.setdefault(a, set()).add(b)
    return edges


def strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components of a directed graph given as adjacency sets.

    >>> sorted(map(sorted, strongly_connected({"a": {"b"}, "b": {"a", "c"}, "c": set()})))
    [['a', 'b'], ['c']]
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in edges.get(node, ()):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            components.append(component)

    for node in sorted(set(edges) | {b for targets in edges.values() for b in targets}):
        if node not in index:
            visit(node)
    return components


def test_the_cycle_finder_finds_a_cycle_through_three_parts():
    cycles = [c for c in strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) if len(c) > 1]
    assert cycles == [{"a", "b", "c"}]


def test_no_import_cycle_between_the_parts_of_the_package(graph):
    edges = _part_edges(graph)
    assert {"engine", "methods", "config", "api", "integrations", "cli"} <= set(edges)  # the graph was read
    cycles = [sorted(c) for c in strongly_connected(edges) if len(c) > 1]
    assert cycles == []


def test_the_library_imports_its_root_package_nowhere_but_in_the_cli(graph):
    # `from hf_sparse import x` inside a layer would import every layer: only the command line may do it.
    importers = {_part(m) for m in graph.find_modules_that_directly_import(PACKAGE)}
    assert importers <= {"cli", "__main__"}


def test_the_engine_and_the_methods_import_nothing_above_them(graph):
    edges = _part_edges(graph)
    above = {"config", "record", "saving", "formats", "plots", "integrations", "api", "evaluation", "cli",
             "recovery", "training", "export", "peft", "hub", "testbed"}
    assert edges.get("engine", set()) & (above | {"methods"}) == set()
    assert edges.get("methods", set()) & above == set()


def test_below_the_integrations_transformers_is_used_only_for_a_config_base_class_and_a_tokenizer():
    full = grimp.build_graph(PACKAGE, include_external_packages=True, cache_dir=None)
    found = set()
    for module in full.find_modules_that_directly_import("transformers"):
        if _part(module) in BELOW_INTEGRATIONS:
            for detail in full.get_import_details(importer=module, imported="transformers"):
                found.add((module, detail["line_contents"].strip()))
    assert found == ALLOWED_TRANSFORMERS_BELOW_INTEGRATIONS


def test_lint_imports_keeps_every_contract_of_pyproject():
    # A fresh interpreter in the project root, as CI runs it; no cache written into the tree.
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_layers_contract_names_every_part_of_the_package(graph):
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads TOML")
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")
    assert layers["exhaustive"] is True and layers["containers"] == [PACKAGE]
    named = {name.strip().strip("()") for layer in layers["layers"] for name in layer.split("|")}
    parts = {_part(m) for m in graph.modules} - {""}
    assert parts <= named


# ---------------------------------------------------------------------------------------------------------------
# What a lower layer is handed instead of importing it


def test_import_hf_sparse_hands_prune_on_load_the_api_verb():
    assert transformers_integration._PRUNE is hf_sparse.prune


def test_prune_on_load_without_a_prune_function_says_what_to_import(monkeypatch):
    monkeypatch.setattr(transformers_integration, "_PRUNE", None)
    with pytest.raises(RuntimeError, match="prune on load needs hf_sparse.prune: import hf_sparse"):
        transformers_integration.prune_loaded(tiny_llama(), hf_sparse.SparsityConfig(method="magnitude"))


def test_prune_on_load_calls_the_function_it_was_handed(monkeypatch):
    calls = []
    monkeypatch.setattr(transformers_integration, "_PRUNE", lambda model, config, tokenizer=None:
                        calls.append((model, config, tokenizer)) or "record")
    model, config = tiny_llama(), hf_sparse.SparsityConfig(method="magnitude")
    assert transformers_integration.prune_loaded(model, config, tokenizer="tok") == "record"
    assert calls == [(model, config, "tok")]


def test_the_engine_refuses_a_model_already_pruned_structurally_reading_the_stored_record():
    model = tiny_llama()
    model.config.sparsity_config = {"pattern": "structured", "structure": {"removed_blocks": [1]}}
    with pytest.raises(ValueError, match="already pruned structurally"):
        run_structured(model, build_method("shortgpt"), torch.zeros(1, 8, dtype=torch.long), 0.25,
                       show_progress=False)


def test_a_registered_method_has_the_engines_protocol():
    from hf_sparse.engine import MethodProtocol

    for name in hf_sparse.METHODS:
        assert isinstance(build_method(name), MethodProtocol), name
