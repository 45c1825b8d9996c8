"""What the record says about calibration data: a small JSON descriptor that never holds the data or a local path.

``config.json`` is published with the checkpoint, so a descriptor names a local file or folder by its base name and
identifies its content by a sha256; a Hugging Face dataset (or Hub id) keeps its name; texts and token ids are
counted and hashed. The same rule serves a local base-model folder (:func:`describe_local_folder`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import shown
from ..validation import validate_mapping

KINDS = ("name_or_path", "file", "folder", "texts", "token_ids", "mix")
_CHUNK = 1 << 20
_HEX64 = 64


def sha256_hex(name: str, value: Any) -> Any:
    """``value`` if it is ``None`` or a sha256 hex digest (a ``"check"`` for :mod:`hf_sparse.validation`)."""
    if value is not None and not (isinstance(value, str) and len(value) == _HEX64
                                  and all(c in "0123456789abcdef" for c in value)):
        raise ValueError(f"{name} must be a sha256 (64 lowercase hex digits), got {shown(value)}")
    return value


def _no_path(name: str, value: Any) -> Any:
    if isinstance(value, str) and (value.startswith(("/", "~", "\\")) or (len(value) > 2 and value[1] == ":")):
        raise ValueError(f"{name} must be a name, not an absolute local path, got {shown(value)}")
    return value


@dataclass
class CalibrationDescriptor:
    """The shape of ``sparsity_config.calibration`` (every key but ``kind`` optional)."""

    kind: str = field(metadata={"help": "Where the data came from.", "choices": KINDS})
    name: str | None = field(default=None, metadata={"help": "Dataset name or Hub id; base name of a local file "
                                                              "or folder.", "check": _no_path})
    count: int | None = field(default=None, metadata={"help": "Texts or token rows given.", "range": ">= 0"})
    sha256: str | None = field(default=None, metadata={"help": "Hash of the content.", "check": sha256_hex})
    num_samples: int | None = field(default=None, metadata={"help": "Windows drawn.", "range": "> 0"})
    sequence_length: int | None = field(default=None, metadata={"help": "Tokens per window.", "range": "> 0"})
    seed: int | None = field(default=None, metadata={"help": "Window sampling seed."})
    share: float | None = field(default=None, metadata={"help": "A mix's source: its share of the windows.",
                                                        "range": "(0, 1]"})
    sources: list[dict] | None = field(default=None, metadata={"help": "A mix: each source's descriptor and share.",
                                                               "check": lambda name, value: _mix_sources(name, value)})


def _mix_sources(name: str, value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise ValueError(f"{name} must be a non-empty list of source descriptors, got {shown(value)}")
    return [check_descriptor(item, prefix=f"{name}[{index}].") for index, item in enumerate(value)]


def check_descriptor(data: Any, prefix: str = "sparsity_config.calibration.") -> dict[str, Any]:
    """``data`` validated as a :class:`CalibrationDescriptor` (untrusted JSON); returns it unchanged in content.

    Old records may name a local path under ``name_or_path``: it is refused only for the new kinds, so version-1
    records stay readable.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.')} must be an object, got {shown(data)} ({type(data).__name__})")
    legacy_path = data.get("kind") == "name_or_path"
    checked = validate_mapping({k: v for k, v in data.items() if not (legacy_path and k == "name")},
                               CalibrationDescriptor, prefix)
    if legacy_path:
        name = data.get("name")
        if not isinstance(name, str):
            raise ValueError(f"{prefix}name must be a string, got {shown(name)} ({type(name).__name__})")
        checked["name"] = name
    return {key: checked[key] for key in data}


def _hash_file(path: Path, digest) -> None:
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)


def _folder_files(path: Path) -> list[Path]:
    # Hidden entries (.git, .cache) are not content; sorted so the hash does not depend on the file system's order.
    return sorted(p for p in path.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(path).parts))


_HASHES: dict[tuple, str] = {}


def _signature(path: Path) -> tuple:
    """What must change for the content to change: names, sizes and modification times (to reuse a hash)."""
    files = [path] if path.is_file() else _folder_files(path)
    return (str(path.resolve()), *((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


def content_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and bytes, in sorted order).

    >>> import tempfile, pathlib; d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "a.txt").write_text("x")
    >>> content_sha256(d / "a.txt") == hashlib.sha256(b"x").hexdigest()
    True
    """
    path = Path(path)
    # Descriptors are built more than once per run (the record, SparsityConfig.to_dict): hash each content once.
    signature = _signature(path)
    if signature in _HASHES:
        return _HASHES[signature]
    digest = hashlib.sha256()
    if path.is_file():
        _hash_file(path, digest)
    else:
        for file in _folder_files(path):
            digest.update(file.relative_to(path).as_posix().encode("utf-8") + b"\x00")
            _hash_file(file, digest)
            digest.update(b"\x00")
    _HASHES[signature] = digest.hexdigest()
    return _HASHES[signature]


def _local_path(source: str) -> Path | None:
    try:
        path = Path(source).expanduser()
        return path if path.exists() else None
    except (OSError, ValueError):  # a long raw text is not a path
        return None


def describe_local_folder(source: str | None) -> tuple[str | None, str | None]:
    """``(name, sha256)`` of a model source: a local folder by base name and content hash, a Hub id as it is.

    >>> describe_local_folder("meta-llama/Llama-3.1-8B")
    ('meta-llama/Llama-3.1-8B', None)
    """
    if not source:
        return None, None
    path = _local_path(str(source))
    if path is None:
        return str(source), None
    return path.resolve().name, content_sha256(path)


def describe_calibration(source: Any, weights: Any = None) -> dict[str, Any] | None:
    """A small JSON descriptor of a calibration source: its kind, a name where it has one, and a content hash.
    With ``weights`` the source is a mix (:mod:`.mixes`): every source's descriptor with its share.

    >>> describe_calibration(["some text"])["kind"], describe_calibration("wikitext")
    ('texts', {'kind': 'name_or_path', 'name': 'wikitext'})
    """
    if source is None:
        return None
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if weights is not None:
        largest = max(weights)  # scaled first: huge weights must not overflow the sum
        weights = [w / largest for w in weights]
        total = float(sum(weights))
        return {"kind": "mix", "sources": [{**describe_calibration(one), "share": round(w / total, 6)}
                                           for one, w in zip(source, weights)]}
    if isinstance(source, str):
        path = _local_path(source)
        if path is None:
            return {"kind": "name_or_path", "name": source}
        return {"kind": "file" if path.is_file() else "folder", "name": path.resolve().name,
                "sha256": content_sha256(path)}
    digest = hashlib.sha256()
    if isinstance(source, torch.Tensor):
        digest.update(source.detach().cpu().to(torch.int64).numpy().tobytes())
        return {"kind": "token_ids", "count": int(source.shape[0]), "sha256": digest.hexdigest()}
    items = list(source)
    if all(isinstance(item, str) for item in items):
        for item in items:
            digest.update(item.encode("utf-8") + b"\x00")
        return {"kind": "texts", "count": len(items), "sha256": digest.hexdigest()}
    for item in items:
        digest.update(torch.as_tensor(item, dtype=torch.int64).numpy().tobytes() + b"\x00")
    return {"kind": "token_ids", "count": len(items), "sha256": digest.hexdigest()}


__all__ = ["CalibrationDescriptor", "KINDS", "check_descriptor", "content_sha256", "describe_calibration",
           "describe_local_folder", "sha256_hex"]
