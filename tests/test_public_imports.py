"""Every public submodule imports the way the README writes it, in a fresh interpreter (no state from other tests)."""

from __future__ import annotations

import subprocess
import sys

FORMS = [
    "import hf_sparse.peft; hf_sparse.peft.get_sparse_peft_model",
    "from hf_sparse.peft import get_sparse_peft_model, load_sparse_adapter, register_sparse_lora",
    "from hf_sparse.hub import save_with_model_card, push_to_hub, render_model_card",
    "import hf_sparse.hub; hf_sparse.hub.save_with_model_card",
    "from hf_sparse.evaluation import perplexity",
    "import hf_sparse.evaluate; hf_sparse.evaluate.perplexity",
    "import hf_sparse; hf_sparse.peft.get_sparse_peft_model; hf_sparse.hub.push_to_hub; hf_sparse.evaluate.perplexity",
    "from hf_sparse.training import KeepSparsityCallback, keep_sparsity, MaskKeeper",
    "from hf_sparse.recovery import recover, RecoveryConfig",
    "import hf_sparse.recovery; hf_sparse.recovery.recover",
]


def test_public_import_forms():
    """One fresh interpreter runs every form, each in its own namespace (a fresh process per form costs minutes on a
    loaded 2-core machine; the first form still sees a cold import)."""
    script = "\n".join(f"exec({statement!r}, {{}})" for statement in FORMS)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr.strip().splitlines()[-3:]


def test_every_declared_dependency_is_imported():
    """Each dependency in pyproject.toml is imported somewhere in the package (optimum and pyyaml were declared but
    never used), and every third-party package the code imports is declared (as a dependency or an optional extra)."""
    import re
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]

    def names(requirements):
        return {re.split(r"[<>=!~; \[]", r, maxsplit=1)[0].lower().replace("-", "_") for r in requirements}

    declared = names(project["dependencies"])
    # Optional extras (lm-eval, matplotlib) are imported lazily by the features that need them (gguf is imported by
    # transformers, not by us); "dev" is the tests'.
    extras = names(r for extra, reqs in project["optional-dependencies"].items() if extra != "dev" for r in reqs)
    source = "\n".join(p.read_text() for p in (root / "hf_sparse").rglob("*.py"))
    imported = set(re.findall(r"^\s*(?:import|from)\s+([a-z_][a-z0-9_]*)", source, flags=re.M))
    assert declared - imported == set(), f"declared but never imported: {sorted(declared - imported)}"
    stdlib = set(sys.stdlib_module_names)
    third_party = {name for name in imported if name not in stdlib and name != "hf_sparse"}
    assert third_party - declared - extras == set(), f"imported but not declared: {sorted(third_party - declared)}"
