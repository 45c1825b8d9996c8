"""Compress or decompress a saved checkpoint folder, one tensor at a time, written atomically.

    hf_sparse.formats.compress_checkpoint("pruned/", "pruned-compact/")      # what save_pretrained(compressed=True) writes
    hf_sparse.formats.decompress_checkpoint("pruned-compact/", "pruned-dense/")  # plain dense export for serving engines

Both read the safetensors shards lazily, keep the shard layout (file names, ``model.safetensors.index.json``), rewrite
``config.json`` (``quantization_config``, the record's ``storage`` entry and the ``model_type`` of
:mod:`hf_sparse.formats.guard`) and copy every other file unchanged. They
write through :func:`hf_sparse.saving.atomic_directory` (temporary sibling, fsync, rename): complete or not at all.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..errors import shown
from ..record import RECORD_KEY, SparsityRecord
from ..saving import atomic_directory, check_destination, check_not_the_input, disk_errors
from .guard import add_guard, strip_guard
from .compact import (
    STORAGE_FORMAT, VALUES, StorageSummary, compress_entry, compressed_groups, decompress_weight, module_patterns,
    quantization_config_entry, tensor_bytes,
)

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        raise ValueError(f"{shown(str(path))} does not exist: a checkpoint folder with {path.name} is needed") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{shown(str(path))} is not valid JSON ({error})") from None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def weight_files(folder: str | os.PathLike) -> tuple[list[str], dict[str, Any] | None]:
    """The safetensors files of a checkpoint folder and its index (``None`` when unsharded)."""
    folder = Path(folder)
    if (folder / INDEX_NAME).exists():
        index = _read_json(folder / INDEX_NAME)
        return sorted(set(index["weight_map"].values())), index
    if (folder / WEIGHTS_NAME).exists():
        return [WEIGHTS_NAME], None
    found = sorted(p.name for p in folder.glob("*.bin")) if folder.is_dir() else []
    raise ValueError(f"{str(folder)!r} has no {WEIGHTS_NAME} or {INDEX_NAME}"
                     + (f" (only {found}: compact storage reads and writes safetensors only)" if found else ""))


def checkpoint_bytes(folder: str | os.PathLike) -> int:
    """Bytes on disk of a checkpoint's safetensors files (headers included)."""
    files, _ = weight_files(folder)
    return sum((Path(folder) / name).stat().st_size for name in files)


def _is_compressed(config: dict[str, Any]) -> bool:
    return (config.get("quantization_config") or {}).get("quant_method") == STORAGE_FORMAT


def _copy_other_files(source: Path, target: Path, written: set[str]) -> None:
    for path in source.iterdir():
        if path.name in written:
            continue
        if path.is_dir():
            shutil.copytree(path, target / path.name)
        else:
            shutil.copy2(path, target / path.name)


def _write_shard(tensors: dict, path: Path) -> None:
    with disk_errors():  # a full disk is an OSError, as for every other file
        save_file(tensors, str(path), metadata={"format": "pt"})


def _finish(source: Path, target: Path, config: dict, files: list[str], index: dict | None,
            weight_map: dict[str, str], total_size: int) -> None:
    _write_json(target / CONFIG_NAME, config)
    if index is not None:
        metadata = {**index.get("metadata", {}), "total_size": total_size}
        _write_json(target / INDEX_NAME, {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))})
    _copy_other_files(source, target, {CONFIG_NAME, INDEX_NAME, *files})


def compress_checkpoint(input_dir: str | os.PathLike, output_dir: str | os.PathLike, overwrite: bool = False,
                        show_progress: bool = True) -> StorageSummary:
    """Write ``input_dir`` (a pruned checkpoint with a sparsity record) to ``output_dir`` in compact storage.

    Every weight of a module in the record is stored in its smallest form (N:M, bitmask or dense); everything else
    as it was. ``output_dir`` must not exist unless ``overwrite``; it appears only once complete.

    >>> summary = compress_checkpoint("pruned", "pruned-compact")  # doctest: +SKIP
    >>> summary.stored_bytes / summary.dense_bytes  # doctest: +SKIP
    0.62
    """
    source = Path(input_dir)
    check_not_the_input(output_dir, source)
    check_destination(output_dir, overwrite)  # an empty name, an existing folder: refused before any reading
    config = _read_json(source / CONFIG_NAME)
    if _is_compressed(config):
        raise ValueError(f"{str(source)!r} is already in compact storage ({STORAGE_FORMAT})")
    if "quantization_config" in config:
        raise ValueError(f"{str(source)!r} has a quantization_config "
                         f"({config['quantization_config'].get('quant_method')!r}): only dense pruned checkpoints compress")
    if RECORD_KEY not in config:
        raise ValueError(f"{str(source)!r} has no {RECORD_KEY!r} in config.json: prune it with hf_sparse first")
    record = SparsityRecord.from_dict(config[RECORD_KEY])
    files, index = weight_files(source)
    modules = module_patterns(record)
    summary, weight_map = StorageSummary(), {}
    with atomic_directory(output_dir, overwrite) as target:
        for name in tqdm(files, desc="Compressing shards", disable=not show_progress):
            shard: dict = {}
            with safe_open(str(source / name), framework="pt") as reader:
                for key in reader.keys():
                    shard.update(compress_entry(key, reader.get_tensor(key), modules, summary))
            weight_map.update({key: name for key in shard})
            _write_shard(shard, target / name)
            del shard
        config[RECORD_KEY] = {**config[RECORD_KEY], "storage": summary.record_entry()}
        config["quantization_config"] = quantization_config_entry()
        config = add_guard(config)
        _finish(source, target, config, files, index, weight_map, summary.stored_bytes)
    logger.info("compressed %s -> %s: %.4f of the dense tensor bytes", source, output_dir,
                summary.stored_bytes / max(summary.dense_bytes, 1))
    return summary


def decompress_checkpoint(input_dir: str | os.PathLike, output_dir: str | os.PathLike, overwrite: bool = False,
                          show_progress: bool = True) -> StorageSummary:
    """Write a compact checkpoint back as a plain dense one (bit-identical weights) that any loader reads.

    >>> decompress_checkpoint("pruned-compact", "pruned-dense")  # doctest: +SKIP
    """
    source = Path(input_dir)
    check_not_the_input(output_dir, source)
    check_destination(output_dir, overwrite)  # an empty name, an existing folder: refused before any reading
    config = _read_json(source / CONFIG_NAME)
    if not _is_compressed(config):
        raise ValueError(f"{str(source)!r} is not in compact storage: its config.json has no quantization_config "
                         f"with quant_method {STORAGE_FORMAT!r}")
    files, index = weight_files(source)
    summary, weight_map = StorageSummary(), {}
    with ExitStack() as stack, atomic_directory(output_dir, overwrite) as target:
        readers = {name: stack.enter_context(safe_open(str(source / name), framework="pt")) for name in files}
        location = {key: name for name, reader in readers.items() for key in reader.keys()}
        groups = compressed_groups(location)
        grouped = {key for group in groups.values() for key in group.values()}
        # A group is written to the shard that holds its values (save_pretrained may split a group across shards).
        owner = {group[VALUES]: prefix for prefix, group in groups.items()}
        for name in tqdm(files, desc="Decompressing shards", disable=not show_progress):
            shard: dict = {}
            for key in readers[name].keys():
                if key in owner:
                    group = groups[owner[key]]
                    parts = {suffix: readers[location[k]].get_tensor(k) for suffix, k in group.items()}
                    stored = sum(tensor_bytes(t) for t in parts.values())
                    shard[key] = decompress_weight(parts)
                    summary.add(tensor_bytes(shard[key]), stored)
                elif key not in grouped:
                    shard[key] = readers[name].get_tensor(key)
                    summary.add(tensor_bytes(shard[key]), tensor_bytes(shard[key]))
            weight_map.update({key: name for key in shard})
            _write_shard(shard, target / name)
            del shard
        config = strip_guard(config)
        config.pop("quantization_config")
        if isinstance(config.get(RECORD_KEY), dict):
            config[RECORD_KEY] = {k: v for k, v in config[RECORD_KEY].items() if k != "storage"}
        _finish(source, target, config, files, index, weight_map, summary.dense_bytes)
    return summary
