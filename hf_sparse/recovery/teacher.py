"""The teacher of a distillation run: found, checked against the student and its record, frozen.

A teacher is a loaded model, a local folder, a Hub id, or ``"base"``: the dense model the student's record names
(``base_model``), looked up as a folder of that name in the current directory or beside the student's own folder.
When the record carries ``base_model_sha256`` (a local folder was pruned), a folder teacher that claims to be that
model - ``"base"``, or a folder of the same name - must have the same content hash; a mismatch is refused naming both
hashes (``force=True`` overrides). The teacher must not be the student itself and must predict over the same
vocabulary (same output size; same token-to-id table when both tokenizers are at hand). It is put in ``eval()`` mode
with every parameter frozen, optionally in another dtype or spread over devices (``device_map``).

>>> teacher_info(None)
{}
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..calibration import content_sha256
from ..errors import shown
from ..integrations.peft import unwrap_model
from ..record import SparsityRecord

logger = logging.getLogger(__name__)


@dataclass
class Teacher:
    """A frozen teacher model and what the record says about it (``name``, ``sha256`` when it is a local folder)."""

    model: nn.Module
    name: str | None
    sha256: str | None
    #: how the teacher was corrected before distilling (steps, tokens, held-out perplexity), None when it was not
    correction: dict[str, Any] | None = None


def teacher_info(teacher: Teacher | None) -> dict[str, Any]:
    """The record's ``teacher`` / ``teacher_sha256`` / ``teacher_correction`` keys for ``teacher`` (empty without
    one). The hash is the teacher's as loaded, before any correction."""
    if teacher is None:
        return {}
    return {"teacher": teacher.name or "model", **({"teacher_sha256": teacher.sha256} if teacher.sha256 else {}),
            **({"teacher_correction": teacher.correction} if teacher.correction else {})}


def _local_folder(path: str | Path) -> Path | None:
    try:
        folder = Path(path).expanduser()
        return folder if folder.is_dir() else None
    except (OSError, ValueError):
        return None


def find_base(record: SparsityRecord, student_source: str | None) -> str:
    """The folder (or Hub id) of the record's base model."""
    name = record.base_model
    if not name:
        raise ValueError("teacher='base' needs the record's base_model, but this model's record names none (it was "
                         "pruned from an in-memory model); pass teacher=DIR (--teacher DIR) or a loaded model")
    candidates = [Path(name)]
    if student_source and _local_folder(student_source):
        candidates.append(Path(student_source).expanduser().resolve().parent / name)
    for candidate in candidates:
        if _local_folder(candidate) and (candidate / "config.json").is_file():
            return str(candidate)
    if record.base_model_sha256 is None:
        return name  # a Hub id
    raise ValueError(f"the record's base model {shown(name)} (sha256 {record.base_model_sha256[:12]}...) is not a "
                     "folder in the current directory or beside the student; pass its folder (teacher=DIR, on the command line "
                     "--teacher DIR)")


def _check_hash(folder: str, record: SparsityRecord, force: bool) -> str:
    digest = content_sha256(folder)
    expected = record.base_model_sha256
    if expected is not None and digest != expected:
        if not force:
            raise ValueError(f"teacher {shown(folder)} has sha256 {digest} but the record's base model "
                             f"{shown(record.base_model)} has {expected}: not the model that was pruned (force=True "
                             "to use it anyway)")
        logger.warning("teacher %s differs from the record's base model (sha256 %s vs %s); used because force=True",
                       folder, digest[:12], expected[:12])
    return digest


def _load(source: str, dtype: torch.dtype, device_map: str | None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype,
                                                    **({"device_map": device_map} if device_map else {}))
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"could not load teacher {shown(source)}: {shown(first, 200)}") from error


def _same_vocabulary(student_tokenizer, teacher_tokenizer) -> bool:
    if student_tokenizer is None or teacher_tokenizer is None:
        return True
    return student_tokenizer.get_vocab() == teacher_tokenizer.get_vocab()


def check_teacher(teacher: nn.Module, student: nn.Module) -> None:
    """Refuse a teacher that is the student (or shares its weights) or predicts over another vocabulary."""
    base_teacher, base_student = unwrap_model(teacher), unwrap_model(student)
    if base_teacher is base_student or teacher is student:
        raise ValueError("the teacher is the student model itself; pass the dense model (teacher='base', a folder or "
                         "another loaded model)")
    student_ids = {p.data_ptr() for p in base_student.parameters()}
    if any(p.data_ptr() in student_ids for p in base_teacher.parameters()):
        raise ValueError("the teacher shares weights with the student (a view or shallow copy of it); load the dense "
                         "model separately")
    head_t, head_s = base_teacher.get_output_embeddings(), base_student.get_output_embeddings()
    if head_t is None or head_s is None:
        raise ValueError("teacher and student must be causal language models with an output layer (lm_head)")
    vocab_t, vocab_s = head_t.weight.shape[0], head_s.weight.shape[0]
    if vocab_t != vocab_s:
        raise ValueError(f"the teacher predicts over {vocab_t} tokens, the student over {vocab_s}: distillation needs "
                         "the same vocabulary (the same tokenizer)")


def load_teacher(teacher: Any, student: nn.Module, record: SparsityRecord | None, *, student_tokenizer=None,
                 dtype: str | None = None, device_map: str | None = None, force: bool = False) -> Teacher:
    """Resolve ``teacher`` (``"base"``, a folder, a Hub id or a loaded model) into a frozen, checked
    :class:`Teacher`."""
    student_base = unwrap_model(student)
    torch_dtype = getattr(torch, dtype) if dtype else next(student_base.parameters()).dtype
    name = sha = None
    source = None
    if isinstance(teacher, nn.Module):
        model = teacher
        name = Path(str(getattr(model, "name_or_path", "") or "model")).name or "model"
        if dtype:
            model = model.to(torch_dtype)
    elif isinstance(teacher, str) and teacher:
        if teacher == "base":
            source = find_base(record, getattr(student_base, "name_or_path", None))
            claims_base = True
        else:
            source = teacher
            claims_base = record is not None and record.base_model is not None and \
                Path(teacher).name == record.base_model
        folder = _local_folder(source)
        if folder is not None:
            name = folder.resolve().name
            sha = _check_hash(source, record, force) if claims_base else content_sha256(folder)
        else:
            name = source
        model = _load(source, torch_dtype, device_map)
    else:
        raise ValueError(f"teacher must be 'base', a folder, a Hub id or a loaded model, got {shown(teacher)}")
    check_teacher(model, student)
    if source is not None and student_tokenizer is not None and _local_folder(source):
        from transformers import AutoTokenizer

        try:
            teacher_tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError):
            teacher_tokenizer = None  # a folder without tokenizer files: the output sizes were compared above
        if not _same_vocabulary(student_tokenizer, teacher_tokenizer):
            raise ValueError(f"teacher {shown(source)} has another tokenizer than the student (the token-to-id tables "
                             "differ): distillation compares distributions over the same token ids")
    if device_map is None and not isinstance(teacher, nn.Module):
        device = student_base.get_input_embeddings().weight.device
        model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    logger.info("teacher: %s%s", name, f" (sha256 {sha[:12]}...)" if sha else "")
    return Teacher(model=model, name=name, sha256=sha)


__all__ = ["Teacher", "check_teacher", "find_base", "load_teacher", "teacher_info"]
