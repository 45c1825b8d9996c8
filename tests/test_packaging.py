"""The built wheel is complete: installed in a fresh virtual environment (no source tree on the path), it renders a
model card (the template is package data) and runs the ``hf-sparse`` command."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from conftest import REPO

# Rendered by the installed package, in a process that cannot see the source tree.
CARD_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_sparse
    from hf_sparse.integrations.hub import render_model_card

    assert Path(hf_sparse.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()), hf_sparse.__file__
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    hf_sparse.prune(model, hf_sparse.SparsityConfig(method="magnitude", pattern="2:4"), show_progress=False)
    print(render_model_card(model, evaluation={"pruned_perplexity": 12.5}, base_model="org/base").text)
""")


def _build_wheel(tmp_path: Path) -> Path:
    # Built from a copy of what the wheel is made of, so the build never writes build/ or *.egg-info into the repo.
    source = tmp_path / "source"
    source.mkdir()
    shutil.copytree(REPO / "hf_sparse", source / "hf_sparse", ignore=shutil.ignore_patterns("__pycache__"))
    for path in [REPO / "pyproject.toml", REPO / "README.md", *REPO.glob("LICEN[CS]E*")]:
        shutil.copy(path, source / path.name)
    wheels = tmp_path / "wheels"
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-w", str(wheels), "-q"]
    if importlib.util.find_spec("setuptools") is not None:
        command.append("--no-build-isolation")  # offline and fast: this interpreter's setuptools builds it
    subprocess.run(command, check=True, capture_output=True, text=True, cwd=tmp_path)
    (wheel,) = wheels.glob("hf_sparse-*.whl")
    return wheel


def _fresh_venv(tmp_path: Path) -> Path:
    """A new venv that sees this interpreter's packages (torch, transformers...) but not hf_sparse's source."""
    venv = tmp_path / "venv"
    # No pip of its own (ensurepip is the slow part): this interpreter's pip installs into it with --python.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    # When this interpreter is itself a venv, --system-site-packages reaches only the base Python's packages:
    # a .pth file adds this interpreter's site-packages after the new venv's own (so the wheel wins).
    new_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
    Path(new_site, "outer-site-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.mark.slow  # builds a wheel and a venv, imports torch twice: ~30 s on 2 cores
def test_installed_wheel_renders_a_model_card(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the source tree must stay invisible
    wheel = _build_wheel(tmp_path)
    python = _fresh_venv(tmp_path)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, text=True, env=env, cwd=tmp_path)
    result = subprocess.run([str(python), "-c", CARD_SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    card = result.stdout
    assert "| Pruning method | Magnitude (`magnitude`, options `{\"per_row\": false}`) |" in card
    assert "| pruned (Magnitude, 2:4) | 12.50 |" in card
    assert "## Sparsity record" in card
    console = Path(python).parent / ("hf-sparse.exe" if os.name == "nt" else "hf-sparse")
    listing = subprocess.run([str(console), "methods", "--threads", "1"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    assert listing.returncode == 0, listing.stderr
    assert "\nsparsegpt: " in "\n" + listing.stdout
