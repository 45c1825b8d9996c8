"""``recover()``: train a pruned model back toward its dense teacher (or on the LM loss), keeping its sparsity.

Steps: check the options and the data before any weight is touched; find and check the teacher; pack the data;
wrap the student in sparsity-keeping LoRA (merged at the end) or keep full fine-tuning's zeros with the mask keeper;
train with :class:`~.trainer.RecoveryTrainer`; check that every pruned weight is still exactly zero (and every shape
unchanged); write the ``recovery`` entry of the record; with ``output`` save atomically.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from torch import nn

from ..integrations.peft import get_sparse_peft_model, unwrap_model
from ..record import get_masks, read_record, write_record
from .config import RecoveryConfig
from .data import SequenceDataset, collate, describe_data, pack_training_data
from .mask_keeper import KeepSparsityCallback
from .teacher import Teacher, load_teacher, teacher_info
from .trainer import LossLogger, RecoveryProgress, RecoveryTrainer, heldout_loss, make_mapping

logger = logging.getLogger(__name__)


@dataclass
class RecoveryResult:
    """What :func:`recover` returns: the trained model (merged, for LoRA), the per-step training losses, the
    held-out perplexity before and after (``None`` without held-out data), the time spent training (wall clock and
    this process's CPU time, which other processes on the machine do not inflate), with
    ``output``, where the checkpoint was saved and, with ``keep_teacher=True``, the frozen teacher the student
    learned from (after its correction, if any)."""

    model: nn.Module
    losses: list[float]
    config: RecoveryConfig
    seconds: float
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    tokens: int = 0
    output: Path | None = None
    cpu_seconds: float = 0.0
    log_history: list[dict[str, Any]] = field(default_factory=list)
    teacher: nn.Module | None = None


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in unwrap_model(model).state_dict().items()}


def _training_arguments(config: RecoveryConfig, checkpoint_dir: str, show_progress: bool, has_eval: bool):
    from transformers import TrainingArguments

    options: dict[str, Any] = {
        "output_dir": checkpoint_dir, "max_steps": config.steps, "per_device_train_batch_size": config.batch_size,
        "per_device_eval_batch_size": config.batch_size, "learning_rate": config.lr,
        "lr_scheduler_type": "cosine", "warmup_steps": int(config.warmup_ratio * config.steps),
        "weight_decay": config.weight_decay, "max_grad_norm": config.max_grad_norm or 0.0, "seed": config.seed,
        "data_seed": config.seed, "logging_steps": config.logging_steps, "report_to": "none",
        "disable_tqdm": not show_progress, "remove_unused_columns": False, "prediction_loss_only": True,
        "save_strategy": "steps" if config.save_steps else "no", "save_steps": config.save_steps or 500,
        "eval_strategy": "steps" if (config.eval_steps and has_eval) else "no",
        "eval_steps": config.eval_steps, "dataloader_num_workers": 0, "optim": "adamw_torch",
        "label_names": ["labels"], "use_cpu": not torch.cuda.is_available(),
        "ddp_find_unused_parameters": False,
    }
    options.update(config.trainer_args)
    return TrainingArguments(**options)


def _last_checkpoint(folder: str) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(folder) if Path(folder).is_dir() else None


def correct_teacher(teacher: Teacher, tokenizer, data: Any, config: RecoveryConfig, *, data_weights: Any = None,
                    copy_first: bool = False, show_progress: bool = True) -> Teacher:
    """Minitron's teacher correction: train ``teacher`` for ``config.teacher_correction_steps`` steps on ``data``
    with the LM loss - the student's training method, learning rate, batch, sequence length and seed, so the
    corrected teacher is exactly the dense model given the same training (the adaptation control) when the step
    counts match - and return it frozen. ``copy_first`` trains a copy (a model the caller passed in stays as it was).

    Why: a teacher distils what it knows. When the training text is not what the teacher was trained on, the student
    learns the teacher's view of that text while LM-loss recovery adapts to it; correcting the teacher first gives
    distillation both (docs/results/distillation.md).
    """
    import copy

    model = copy.deepcopy(teacher.model) if copy_first else teacher.model
    logger.info("teacher correction: %d LM steps on the training data", config.teacher_correction_steps)
    result = recover(model, tokenizer, data, config, data_weights=data_weights, dense_control=True,
                     show_progress=show_progress, objective="lm", lm_weight=1.0, teacher=None, teacher_correction_steps=0,
                     steps=config.teacher_correction_steps, checkpoint_dir=None, save_steps=None, resume=False,
                     hidden_weight=0.0)
    corrected = result.model
    corrected.eval()
    corrected.requires_grad_(False)
    correction = {"steps": config.teacher_correction_steps, "tokens": result.tokens, "objective": "lm",
                  "method": config.method,
                  **({"heldout_perplexity_before": round(result.perplexity_before, 4)}
                     if result.perplexity_before is not None else {}),
                  **({"heldout_perplexity_after": round(result.perplexity_after, 4)}
                     if result.perplexity_after is not None else {})}
    return Teacher(model=corrected, name=teacher.name, sha256=teacher.sha256, correction=correction)


def recover(model: nn.Module, tokenizer, data: Any, config: RecoveryConfig | None = None, *,
            teacher_model: nn.Module | None = None, data_weights: Any = None, output: str | None = None,
            overwrite: bool = False, callbacks: list | None = None, show_progress: bool = True,
            dense_control: bool = False, keep_teacher: bool = False, **overrides: Any) -> RecoveryResult:
    """Recover ``model`` (pruned by hf_sparse) by distillation from its dense teacher or on the LM loss.

    ``data`` is any calibration source (text file or folder, dataset name, list of strings, token ids; a mix with
    ``data_weights``), packed into sequences with a held-out part. Options come from ``config`` and/or keyword
    overrides (``objective=``, ``teacher=``, ``steps=``, ``method=``, ``temperature=``...). ``teacher_model`` is an
    already loaded teacher (instead of ``config.teacher``). ``model`` itself is trained (LoRA layers are merged
    back into it); the result's ``model`` is the recovered model, exactly as sparse and the same shapes as before.
    ``dense_control=True`` accepts a dense model (no record; nothing to keep) and trains it the same way: the
    control that separates recovery from adaptation to the training text. With ``output`` the recovered model (and
    ``tokenizer``) is saved there atomically: a kill leaves no half-written folder, and with ``checkpoint_dir`` +
    ``resume=True`` a rerun continues from the last checkpoint. ``keep_teacher=True`` returns the teacher in the
    result (by default it is let go, so its memory is freed): with ``teacher_correction_steps == steps`` the
    corrected teacher *is* the dense control, so a caller that wants both trains the dense model once.

    >>> result = recover(pruned_model, tokenizer, "calibration.txt", objective="distill+lm", teacher="base",
    ...                  steps=200)  # doctest: +SKIP
    >>> result.perplexity_before, result.perplexity_after  # doctest: +SKIP
    (89.3, 41.2)
    """
    config = config or RecoveryConfig()
    if overrides:
        config = RecoveryConfig(**{**asdict(config), **overrides})
    record = read_record(model)
    if record is None and not dense_control:
        raise ValueError("recover() needs a model pruned by hf_sparse (config.sparsity_config is missing); "
                         "dense_control=True trains a dense model the same way (the control for adaptation)")
    if record is None and config.uses_teacher and teacher_model is None and config.teacher == "base":
        raise ValueError("a dense model has no record naming its base model: pass teacher=DIR or teacher_model")
    if dense_control and record is not None:
        raise ValueError("dense_control=True is for a dense model, but this one was pruned by hf_sparse")
    if output is not None:
        from ..saving import check_destination

        check_destination(output, overwrite)
    # strict: the zeros must match the record before we start
    masks_before = get_masks(model) if record is not None else {}
    shapes_before = _shapes(model)
    packed = pack_training_data(data, tokenizer, config.sequence_length, config.heldout_fraction,
                                config.max_heldout, config.seed, weights=data_weights,
                                num_sequences=config.steps * config.batch_size)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and config.sequence_length > context:
        raise ValueError(f"sequence_length={config.sequence_length} is longer than the model's context "
                         f"({context} tokens); use at most {context}")
    teacher: Teacher | None = None
    if config.uses_teacher:
        teacher = load_teacher(teacher_model if teacher_model is not None else config.teacher, model, record,
                               student_tokenizer=tokenizer, dtype=config.teacher_dtype,
                               device_map=config.teacher_device_map, force=config.force_teacher)
    elif teacher_model is not None:
        raise ValueError("teacher_model was given but objective='lm' does not use a teacher; use objective='distill+lm' or 'distill'")
    vocab = unwrap_model(model).get_output_embeddings().weight.shape[0]
    if int(packed.train.max()) >= vocab:
        raise ValueError(f"recovery data holds token id {int(packed.train.max())}, outside the model's vocabulary of "
                         f"{vocab}: the data was tokenized with another tokenizer")
    # The correction trains the whole teacher: only after every check on the data has passed.
    if teacher is not None and config.teacher_correction_steps:
        teacher = correct_teacher(teacher, tokenizer, data, config, data_weights=data_weights,
                                  copy_first=teacher_model is not None, show_progress=show_progress)
    mapping = make_mapping(model, teacher.model, record.structure if record else None) \
        if teacher and config.hidden_weight else None

    torch.manual_seed(config.seed)
    student = model
    trainer_callbacks: list = [LossLogger(), *(callbacks or [])]
    if config.method == "lora":
        alpha = config.alpha if config.alpha is not None else 2 * config.rank
        lora = LoraConfig(r=config.rank, lora_alpha=alpha, lora_dropout=config.dropout,
                          target_modules=config.target_modules, task_type="CAUSAL_LM")
        if record is None:
            from peft import get_peft_model

            student = get_peft_model(model, lora)
        else:
            student = get_sparse_peft_model(model, lora, mode=config.mode)
    else:
        model.requires_grad_(True)
        if masks_before:
            trainer_callbacks.append(KeepSparsityCallback(masks_before))
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False

    temporary = config.checkpoint_dir is None
    checkpoint_dir = tempfile.mkdtemp(prefix="hf_sparse-recovery-") if temporary else config.checkpoint_dir
    heldout = SequenceDataset(packed.heldout) if packed.heldout.shape[0] else None
    args = _training_arguments(config, checkpoint_dir, show_progress, heldout is not None)
    # Every process reads its own share of the sequences: enough rows for all of them, every step.
    train_ids = packed.batches_for(config.steps, config.batch_size * args.world_size * args.gradient_accumulation_steps)
    trainer = RecoveryTrainer(
        model=student, args=args,
        train_dataset=SequenceDataset(train_ids), eval_dataset=heldout, data_collator=collate,
        callbacks=trainer_callbacks, recovery_config=config, teacher=teacher.model if teacher else None,
        mapping=mapping)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    # Both print every log dict to stdout; LossLogger logs them, RecoveryProgress shows them on the bar.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if show_progress:
        trainer.add_callback(RecoveryProgress())
    try:
        resume_from = _last_checkpoint(checkpoint_dir) if config.resume else None
        before = None
        if heldout is not None and resume_from is None:
            # Not trainer.evaluate(): called before train() it keeps the Trainer from wrapping the model for DDP.
            before = heldout_loss(student, packed.heldout, config.batch_size, config.chunk_size)
        if resume_from is not None:
            logger.info("recovery: resuming from %s", resume_from)
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer.train(resume_from_checkpoint=resume_from)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        after = heldout_loss(student, packed.heldout, config.batch_size, config.chunk_size) \
            if heldout is not None else None
        log_history = list(trainer.state.log_history)
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
        if temporary:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
    recovered = student.merge_and_unload() if config.method == "lora" else model
    recovered.eval()
    recovered.requires_grad_(False)

    masks_after = get_masks(recovered) if record is not None else {}  # raises if any recorded module's sparsity changed
    for name, mask in masks_before.items():
        if not torch.equal(mask, masks_after[name]):
            raise RuntimeError(f"recovery changed the sparsity pattern of {name!r}; this is a bug in hf_sparse")
    shapes_after = _shapes(recovered)
    if shapes_after != shapes_before:
        changed = sorted(set(shapes_after.items()) ^ set(shapes_before.items()))[:1]
        raise RuntimeError(f"recovery changed the model's shapes ({changed}); this is a bug in hf_sparse")

    tokens = config.steps * config.batch_size * config.sequence_length * trainer.args.world_size * \
        trainer.args.gradient_accumulation_steps
    ppl_before = math.exp(before) if before is not None else None
    ppl_after = math.exp(after) if after is not None else None
    entry = {
        "method": config.method, "objective": config.objective, **teacher_info(teacher),
        **({"mode": config.mode, "rank": config.rank,
            "alpha": config.alpha if config.alpha is not None else 2 * config.rank,
            "target_modules": config.target_modules if isinstance(config.target_modules, str)
            else list(config.target_modules)} if config.method == "lora" else {}),
        **({"temperature": config.temperature, "kd_weight": config.kd_weight} if config.uses_teacher else {}),
        **({"top_k": config.top_k} if config.uses_teacher and config.top_k else {}),
        **({"lm_weight": config.lm_weight} if config.objective == "distill+lm" else {}),
        **({"hidden_weight": config.hidden_weight} if config.uses_teacher and config.hidden_weight else {}),
        "steps": config.steps, "batch_size": config.batch_size, "sequence_length": config.sequence_length,
        "tokens": tokens, "learning_rate": config.lr, "seed": config.seed, **describe_data(data, data_weights),
        **({"heldout_perplexity_before": round(ppl_before, 4)} if ppl_before is not None else {}),
        **({"heldout_perplexity_after": round(ppl_after, 4)} if ppl_after is not None else {}),
    }
    if record is not None:
        record.recovery = entry
        write_record(recovered, record)
    losses = list(trainer.loss_history)
    if losses:
        logger.info("recovery (%s, %s): %d steps in %.0f s, loss %.3f -> %.3f", config.objective, config.method,
                    config.steps, seconds, sum(losses[:10]) / len(losses[:10]), sum(losses[-10:]) / len(losses[-10:]))
    saved = None
    if output is not None and trainer.args.process_index == 0:
        from ..saving import save_checkpoint

        saved = save_checkpoint(recovered, tokenizer, output, overwrite=overwrite)
    return RecoveryResult(model=recovered, losses=losses, config=config, seconds=seconds,
                          perplexity_before=ppl_before, perplexity_after=ppl_after, tokens=tokens, output=saved,
                          cpu_seconds=cpu_seconds, log_history=log_history,
                          teacher=teacher.model if keep_teacher and teacher is not None else None)


__all__ = ["RecoveryResult", "correct_teacher", "recover"]
