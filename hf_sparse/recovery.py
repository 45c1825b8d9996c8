"""Recover a pruned model's quality with a short sparsity-keeping LoRA run on text, then merge.

:func:`recover` is the library verb (the example and ``hf-sparse recover`` call it): it draws training windows from
text the way calibration does, trains LoRA adapters made by :func:`hf_sparse.peft.get_sparse_peft_model` with AdamW
and a warmup + cosine schedule, merges them with peft's ``merge_and_unload`` and checks that every pruned weight is
still exactly zero. The merged model's record gains a ``recovery`` entry, so ``config.json`` and the model card say
what was done.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from peft import LoraConfig
from torch import nn
from tqdm.auto import tqdm

from .calibration import describe_calibration, load_calibration
from .validation import validate_dataclass
from .integrations.peft import MODES, get_sparse_peft_model
from .record import get_masks, read_record, write_record

logger = logging.getLogger(__name__)


@dataclass
class RecoveryConfig:
    """Options of a LoRA recovery run (defaults suit a few hundred steps on a small model)."""

    rank: int = field(default=16, metadata={"help": "LoRA rank r.", "range": "> 0"})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha; default 2 × rank."})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout.", "range": "[0, 1)"})
    target_modules: str | list[str] = field(default="all-linear", metadata={"help": "peft target_modules."})
    mode: str = field(default="masked", metadata={"help": "'masked' (mask in the training forward too) or 'merge'.",
                                                  "choices": MODES})
    steps: int = field(default=200, metadata={"help": "Optimizer steps.", "range": "> 0"})
    batch_size: int = field(default=8, metadata={"help": "Sequences per step.", "range": "> 0"})
    sequence_length: int = field(default=256, metadata={"help": "Tokens per training sequence.", "range": "> 0"})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate.", "range": "> 0"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Fraction of steps of linear warmup.",
                                                        "range": "[0, 1)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on the adapters.",
                                                       "range": ">= 0"})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Gradient clipping; None disables it."})
    seed: int = field(default=1, metadata={"help": "Seed for window sampling and adapter initialisation."})

    def __post_init__(self):
        validate_dataclass(self)


@dataclass
class RecoveryResult:
    """What :func:`recover` returns: the merged model and the training losses (one per step)."""

    model: nn.Module
    losses: list[float]
    config: RecoveryConfig
    seconds: float


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def recover(model: nn.Module, tokenizer, data: Any, config: RecoveryConfig | None = None, *,
            show_progress: bool = True, **overrides: Any) -> RecoveryResult:
    """Train sparsity-keeping LoRA on ``data`` and return the merged model, exactly as sparse as ``model``.

    ``data`` is anything :func:`hf_sparse.calibration.load_calibration` reads (text file or folder, dataset name,
    list of strings, token ids); ``steps × batch_size`` windows of ``sequence_length`` tokens are drawn from it.
    Options come from ``config`` and/or keyword overrides (``rank=``, ``steps=``, ``learning_rate=``, ``mode=``...).
    ``model`` itself is modified (peft wraps its layers, merging writes its weights): the result's ``model`` is it.

    >>> result = recover(pruned_model, tokenizer, "calibration.txt", steps=200, rank=16)  # doctest: +SKIP
    >>> result.model.save_pretrained("recovered")  # doctest: +SKIP
    """
    config = config or RecoveryConfig()
    if overrides:
        config = RecoveryConfig(**{**asdict(config), **overrides})
    record = read_record(model)
    if record is None:
        raise ValueError("recover() needs a model pruned by hf_sparse (config.sparsity_config is missing)")
    masks_before = get_masks(model)  # strict: the zeros must match the record before we start
    device = model.get_input_embeddings().weight.device
    windows = load_calibration(data, tokenizer, num_samples=config.steps * config.batch_size,
                               sequence_length=config.sequence_length, seed=config.seed)  # (steps*batch, seq)
    if windows.shape[0] < config.steps * config.batch_size:
        # Token-id input with fewer rows than needed: cycle through it.
        repeats = math.ceil(config.steps * config.batch_size / windows.shape[0])
        windows = windows.repeat(repeats, 1)[: config.steps * config.batch_size]

    torch.manual_seed(config.seed)
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha if config.alpha is not None else 2 * config.rank,
                      lora_dropout=config.dropout, target_modules=config.target_modules, task_type="CAUSAL_LM")
    peft_model = get_sparse_peft_model(model, lora, mode=config.mode)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup = int(config.warmup_ratio * config.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, config.steps, warmup))
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    peft_model.train()
    losses: list[float] = []
    start = time.perf_counter()
    progress = tqdm(range(config.steps), desc="LoRA recovery", unit="step", disable=not show_progress)
    try:
        for step in progress:
            ids = windows[step * config.batch_size : (step + 1) * config.batch_size].to(device)
            loss = peft_model(input_ids=ids, labels=ids).loss
            if not torch.isfinite(loss):
                # Never train on (or merge, or report) a NaN: say where it appeared and the usual causes.
                raise ValueError(
                    f"LoRA recovery loss is {loss.item()} at step {step + 1} of {config.steps}; the model is not "
                    f"recovered (learning_rate={config.learning_rate!r}, sequence_length={config.sequence_length}: "
                    "lower the learning rate, use windows of at least 2 tokens, or try float32)")
            loss.backward()
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            progress.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
    seconds = time.perf_counter() - start
    merged = peft_model.merge_and_unload()
    merged.eval()

    masks_after = get_masks(merged)  # raises if any recorded module's sparsity changed
    for name, mask in masks_before.items():
        if not torch.equal(mask, masks_after[name]):
            raise RuntimeError(f"recovery changed the sparsity pattern of {name!r}; this is a bug in hf_sparse")
    record.recovery = {
        "method": "lora", "mode": config.mode, "rank": config.rank, "alpha": lora.lora_alpha,
        "target_modules": config.target_modules if isinstance(config.target_modules, str)
        else list(config.target_modules),
        "steps": config.steps, "batch_size": config.batch_size, "sequence_length": config.sequence_length,
        "learning_rate": config.learning_rate, "seed": config.seed, **_describe_data(data),
    }
    write_record(merged, record)
    logger.info("LoRA recovery: %d steps in %.0f s, loss %.3f -> %.3f", config.steps, seconds,
                sum(losses[:10]) / len(losses[:10]), sum(losses[-10:]) / len(losses[-10:]))
    return RecoveryResult(model=merged, losses=losses, config=config, seconds=seconds)


def _describe_data(data: Any) -> dict[str, Any]:
    descriptor = describe_calibration(data) or {}
    if descriptor.get("kind") in ("name_or_path", "file", "folder"):
        # A dataset name, or a local file/folder by base name and content hash (never its local path).
        return {"data": descriptor["name"], **({"data_sha256": descriptor["sha256"]} if "sha256" in descriptor else {})}
    return {"data": descriptor}


__all__ = ["RecoveryConfig", "RecoveryResult", "recover"]
