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
import re
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..errors import PATH_SHOWN, shown
from ..record import RECORD_KEY, SparsityRecord
from ..saving import atomic_directory, check_destination, check_not_the_input, disk_errors
from .guard import add_guard, strip_guard
from .compact import (
    STORAGE_FORMAT, VALUES, StorageSummary, check_modules_present, compress_entry, compressed_groups,
    decompress_weight, module_patterns, quantization_config_entry, tensor_bytes,
)
from .integrity import check_group, check_hash_coverage, expected_hashes

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"[A-Za-z0-9._-]+\.safetensors")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        raise ValueError(f"{shown(str(path), PATH_SHOWN)} does not exist: a checkpoint folder with {path.name} is "
                         "needed") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{shown(str(path), PATH_SHOWN)} is not valid JSON ({shown(str(error))})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{shown(str(path), PATH_SHOWN)} must hold a JSON object, got {type(data).__name__}")
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def weight_files(folder: str | os.PathLike) -> tuple[list[str], dict[str, Any] | None]:
    """The safetensors files of a checkpoint folder and its index (``None`` when unsharded)."""
    folder = Path(folder)
    if (folder / INDEX_NAME).exists():
        index = _read_json(folder / INDEX_NAME)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{shown(str(folder / INDEX_NAME), PATH_SHOWN)} has no weight_map object of tensor name "
                             "-> shard file")
        files = sorted(set(weight_map.values()))
        for name in files:
            # A shard is a file of this folder: a path elsewhere would be read, and written, outside the checkpoint.
            if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name) or name in (".", ".."):
                raise ValueError(f"{INDEX_NAME} names the shard {shown(name)}; a shard must be a .safetensors file "
                                 "name inside the checkpoint folder (no directories)")
            if not (folder / name).is_file():
                raise ValueError(f"{INDEX_NAME} names the shard {shown(name)}, which is not in "
                                 f"{shown(str(folder), PATH_SHOWN)}")
        return files, index
    if (folder / WEIGHTS_NAME).exists():
        return [WEIGHTS_NAME], None
    found = sorted(p.name for p in folder.glob("*.bin")) if folder.is_dir() else []
    raise ValueError(f"{shown(str(folder), PATH_SHOWN)} has no {WEIGHTS_NAME} or {INDEX_NAME}"
                     + (f" (only {found}: compact storage reads and writes safetensors only)" if found else ""))


def checkpoint_bytes(folder: str | os.PathLike) -> int:
    """Bytes on disk of a checkpoint's safetensors files (headers included)."""
    files, _ = weight_files(folder)
    return sum((Path(folder) / name).stat().st_size for name in files)


def _is_compressed(config: dict[str, Any]) -> bool:
    marker = config.get("quantization_config")
    return isinstance(marker, dict) and marker.get("quant_method") == STORAGE_FORMAT


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
        raise ValueError(f"{shown(str(source), PATH_SHOWN)} is already in compact storage ({STORAGE_FORMAT})")
    if "quantization_config" in config:
        marker = config["quantization_config"]
        method = marker.get("quant_method") if isinstance(marker, dict) else marker
        raise ValueError(f"{shown(str(source), PATH_SHOWN)} has a quantization_config ({shown(method)}): only dense "
                         "pruned checkpoints compress")
    if RECORD_KEY not in config:
        raise ValueError(f"{shown(str(source), PATH_SHOWN)} has no {shown(RECORD_KEY)} in config.json: prune it with hf_sparse first")
    record = SparsityRecord.from_dict(config[RECORD_KEY])
    if not record.modules:
        raise ValueError(f"{shown(str(source), PATH_SHOWN)} lists no pruned modules in its record (structured pruning made the matrices "
                         "smaller instead): there are no zeros to drop; keep it as it is")
    files, index = weight_files(source)
    modules = module_patterns(record)
    with ExitStack() as stack:
        readers = [stack.enter_context(safe_open(str(source / name), framework="pt")) for name in files]
        check_modules_present(modules, _locations(files, readers))
    summary, weight_map = StorageSummary(), {}
    with atomic_directory(output_dir, overwrite) as target:
        for name in tqdm(files, desc="Compressing shards", disable=not show_progress):
            shard: dict = {}
            with safe_open(str(source / name), framework="pt") as reader:
                for key in reader.keys():
                    shard.update(compress_entry(key, reader.get_tensor(key), modules, summary, record.modules))
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


def _locations(files: list[str], readers) -> dict[str, str]:
    """Key -> the file holding it; a key stored twice is refused (which copy a loader takes is arbitrary)."""
    location: dict[str, str] = {}
    for name, reader in zip(files, readers):
        for key in reader.keys():
            if key in location:
                raise ValueError(f"tensor {shown(key)} is stored twice (in {shown(location[key])} and {shown(name)}); the "
                                 "checkpoint is damaged or was edited")
            location[key] = name
    return location


def compact_record(config: dict[str, Any], where: str) -> SparsityRecord:
    """The validated record of a compact checkpoint's ``config.json`` (a compact checkpoint always has one)."""
    if RECORD_KEY not in config:
        raise ValueError(f"{where} is marked as compact storage but has no {shown(RECORD_KEY)} record to check it against; "
                         "the checkpoint is damaged or was edited")
    return SparsityRecord.from_dict(config[RECORD_KEY])


def verify_compact(files: list[str | os.PathLike], record: SparsityRecord, where: str,
                   shapes: dict[str, tuple[int, ...]] | None = None) -> None:
    """Check every compressed weight of a compact checkpoint's safetensors ``files`` before anything is decoded:
    its entries against each other, the record (pattern, sparsity, content hash) and ``shapes`` (module name ->
    the model's weight shape, when known). Raises a one-line ``ValueError`` naming the first bad weight."""
    with ExitStack() as stack:
        readers = {str(f): stack.enter_context(safe_open(str(f), framework="pt")) for f in files}
        location = _locations(list(readers), list(readers.values()))
        groups = compressed_groups(location)
        hashes = expected_hashes(record.storage, where)
        check_hash_coverage(hashes, set(groups))
        for prefix, group in groups.items():
            parts = {suffix: readers[location[key]].get_tensor(key) for suffix, key in group.items()}
            check_group(prefix, parts, **group_checks(prefix, record, hashes, shapes))


def group_checks(prefix: str, record: SparsityRecord, hashes: dict[str, str] | None,
                 shapes: dict[str, tuple[int, ...]] | None) -> dict[str, Any]:
    """What the compressed weight of module ``prefix`` is checked against (keywords of
    :func:`~hf_sparse.formats.integrity.check_group`); a module the record does not list is refused."""
    if prefix not in record.modules:
        raise ValueError(f"{shown(prefix + '.' + VALUES)} is stored in compact form but the sparsity record does not "
                         "list the module; the checkpoint is damaged or was edited")
    return {"pattern": record.pattern_of(prefix), "sparsity": record.modules[prefix],
            "shape": (shapes or {}).get(prefix), "expected_hash": (hashes or {}).get(prefix)}


def model_weight_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]] | None:
    """Module name -> weight shape of the model ``config`` (a config.json dictionary) describes, built on the meta
    device (no memory); ``None`` (with a warning) when transformers cannot build it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    plain = {k: v for k, v in strip_guard(config).items()
             if k not in ("quantization_config", RECORD_KEY, "architectures", "transformers_version")}
    try:
        built = AutoConfig.for_model(**plain)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(built)
    except Exception as error:  # noqa: BLE001 - an architecture this transformers does not build: record checks only
        logger.warning("could not build the model from config.json to check the stored shapes against it (%s); "
                       "checking the entries against each other and the record only", shown(str(error), PATH_SHOWN))
        return None
    return {name.removesuffix(".weight"): tuple(p.shape) for name, p in model.state_dict().items()
            if name.endswith(".weight")}


def decompress_checkpoint(input_dir: str | os.PathLike, output_dir: str | os.PathLike, overwrite: bool = False,
                          show_progress: bool = True) -> StorageSummary:
    """Write a compact checkpoint back as a plain dense one (bit-identical weights) that any loader reads.

    Every compressed weight is checked before it is decoded (its entries, the record's pattern and sparsity, the
    content hash recorded at compress time, the model's shapes; see :mod:`hf_sparse.formats.integrity`): a damaged
    or edited checkpoint raises a ``ValueError`` naming the weight, and nothing is written.

    >>> decompress_checkpoint("pruned-compact", "pruned-dense")  # doctest: +SKIP
    """
    source = Path(input_dir)
    check_not_the_input(output_dir, source)
    check_destination(output_dir, overwrite)  # an empty name, an existing folder: refused before any reading
    config = _read_json(source / CONFIG_NAME)
    if not _is_compressed(config):
        raise ValueError(f"{shown(str(source), PATH_SHOWN)} is not in compact storage: its config.json has no quantization_config "
                         f"with quant_method {shown(STORAGE_FORMAT)}")
    record = compact_record(config, repr(str(source)))
    files, index = weight_files(source)
    shapes = model_weight_shapes(config)
    summary, weight_map = StorageSummary(), {}
    with ExitStack() as stack, atomic_directory(output_dir, overwrite) as target:
        readers = {name: stack.enter_context(safe_open(str(source / name), framework="pt")) for name in files}
        location = _locations(files, list(readers.values()))
        groups = compressed_groups(location)
        hashes = expected_hashes(record.storage, repr(str(source)))
        check_hash_coverage(hashes, set(groups))
        grouped = {key for group in groups.values() for key in group.values()}
        # A group is written to the shard that holds its values (save_pretrained may split a group across shards).
        owner = {group[VALUES]: prefix for prefix, group in groups.items()}
        for name in tqdm(files, desc="Decompressing shards", disable=not show_progress):
            shard: dict = {}
            for key in readers[name].keys():
                if key in owner:
                    prefix = owner[key]
                    group = groups[prefix]
                    parts = {suffix: readers[location[k]].get_tensor(k) for suffix, k in group.items()}
                    check_group(prefix, parts, **group_checks(prefix, record, hashes, shapes))
                    stored = sum(tensor_bytes(t) for t in parts.values())
                    shard[key] = decompress_weight(parts, module=prefix)
                    summary.add(tensor_bytes(shard[key]), stored)
                elif key not in grouped:
                    shard[key] = readers[name].get_tensor(key)
                    summary.add(tensor_bytes(shard[key]), tensor_bytes(shard[key]))
            weight_map.update({key: name for key in shard})
            _write_shard(shard, target / name)
            del shard
        config = strip_guard(config)
        config.pop("quantization_config")
        config[RECORD_KEY] = {k: v for k, v in config[RECORD_KEY].items() if k != "storage"}
        _finish(source, target, config, files, index, weight_map, summary.dense_bytes)
    return summary
