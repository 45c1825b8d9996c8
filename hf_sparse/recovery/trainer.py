"""``RecoveryTrainer``: ``transformers.Trainer`` whose ``compute_loss`` distils (and/or models language), chunked.

Everything else is the Trainer's: the optimizer and schedule, gradient accumulation and clipping, checkpoints and
resuming after a kill, logging integrations, and multi-process training (``torchrun``/``accelerate launch``, DDP,
DeepSpeed, FSDP) - the teacher is a plain attribute, so the Trainer never wraps, shards or optimizes it.

The forward runs the student with ``logits_to_keep=1`` and ``output_hidden_states=True``: the model itself builds
logits for one position only, and the loss is computed from the final hidden states against the output layer in
chunks of tokens (:mod:`.losses`). The teacher runs the same way under ``no_grad``. During evaluation the loss is
the student's next-token cross-entropy on the held-out sequences, so ``eval_loss`` is a log-perplexity and the logs
carry ``eval_perplexity`` beside it.

A non-finite loss stops training at once with :class:`NonFiniteLossError` naming the step, before any weight update
uses it.

>>> RecoveryTrainer.__mro__[1].__name__
'Trainer'
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback

from .config import RecoveryConfig
from .losses import IGNORE_INDEX, block_mapping, chunked_recovery_loss, hidden_state_loss

logger = logging.getLogger(__name__)


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite; the message names the step."""


def _output_layer(model: nn.Module) -> nn.Module:
    from ..integrations.peft import unwrap_model

    base = unwrap_model(model)
    head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output layer (get_output_embeddings() is None): recovery "
                         "needs a causal language model")
    return head.get_base_layer() if hasattr(head, "get_base_layer") else head


def _head_weight_bias(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    return head.weight, getattr(head, "bias", None)


class RecoveryTrainer(Trainer):
    """A Trainer for recovery: ``recovery_config`` says the objective; ``teacher`` is the frozen dense model (or
    ``None`` for objective ``"lm"``); ``mapping`` pairs student and teacher blocks for the hidden-state loss."""

    def __init__(self, *args: Any, recovery_config: RecoveryConfig, teacher: nn.Module | None = None,
                 mapping: list[tuple[int, int]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recovery_config = recovery_config
        self.teacher = teacher
        self.mapping = mapping
        self.loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean
        self.model_accepts_loss_kwargs = False
        self.loss_history: list[float] = []

    def _teacher_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Any:
        device = self.teacher.get_input_embeddings().weight.device
        with torch.no_grad():
            return self.teacher(input_ids=input_ids.to(device),
                                attention_mask=None if attention_mask is None else attention_mask.to(device),
                                output_hidden_states=True, logits_to_keep=1, use_cache=False)

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        config = self.recovery_config
        input_ids = inputs["input_ids"]  # (batch, seq)
        attention_mask = inputs.get("attention_mask")
        labels = inputs.get("labels", input_ids)
        training = model.training
        kd_weight, lm_weight, hidden_weight = config.weights if training else (0.0, 1.0, 0.0)
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                        logits_to_keep=1, use_cache=False)
        states = outputs.hidden_states
        hidden = states[-1][:, :-1]  # (batch, seq-1, d): final normalised states predicting the next token
        targets = labels[:, 1:].clone()
        if attention_mask is not None:
            targets[attention_mask[:, 1:] == 0] = IGNORE_INDEX
        teacher_states = None
        teacher_logits = None
        if kd_weight or hidden_weight:
            if self.teacher is None:
                raise ValueError(f"objective {config.objective!r} needs a teacher")
            teacher_out = self._teacher_forward(input_ids, attention_mask)
            teacher_states = teacher_out.hidden_states
            teacher_hidden = teacher_states[-1][:, :-1].reshape(-1, teacher_states[-1].shape[-1])
            t_head = _output_layer(self.teacher)
            student_device = hidden.device

            def teacher_logits(rows: torch.Tensor) -> torch.Tensor:
                h = teacher_hidden[rows.to(teacher_hidden.device)]
                return t_head(h).float().to(student_device)  # (chunk, V)

        head = _output_layer(model)
        weight, bias = _head_weight_bias(head)
        flat = hidden.reshape(-1, hidden.shape[-1])
        loss, kd, lm = chunked_recovery_loss(
            flat.to(weight.dtype), weight, bias, teacher_logits if kd_weight else None, targets.reshape(-1),
            kd_weight=kd_weight, lm_weight=lm_weight, temperature=config.temperature, top_k=config.top_k,
            chunk_size=config.chunk_size)
        if hidden_weight:
            mask = None if attention_mask is None else attention_mask.bool()
            loss = loss + hidden_weight * hidden_state_loss(states, teacher_states, self.mapping, mask)
        if training and not torch.isfinite(loss):
            step = self.state.global_step + 1
            raise NonFiniteLossError(
                f"recovery loss is {loss.item()} at step {step} of {self.state.max_steps}; training stopped, the model "
                f"is not recovered (learning_rate={config.lr!r}, sequence_length={input_ids.shape[1]}: lower the "
                "learning rate, use sequences of at least 2 tokens, or train in float32)")
        if training:
            self.loss_history.append(float(loss.detach()))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "eval_loss" in logs and math.isfinite(logs["eval_loss"]):
            logs["eval_perplexity"] = round(math.exp(min(logs["eval_loss"], 700.0)), 4)
        super().log(logs, *args, **kwargs)


class LossLogger(TrainerCallback):
    """Sends the Trainer's logs (loss, learning rate, held-out perplexity) to this package's logger."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            logger.info("step %d: %s", state.global_step,
                        ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in logs.items()))


@torch.no_grad()
def heldout_loss(model: nn.Module, ids: torch.Tensor, batch_size: int, chunk_size: int = 1024) -> float:
    """Mean next-token cross-entropy of ``model`` on the token rows ``ids`` (chunked like training; no Trainer, so
    it can run before ``Trainer.train`` without keeping the Trainer from wrapping the model for DDP)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    weight, bias = _head_weight_bias(_output_layer(model))
    total, count = 0.0, 0
    try:
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start:start + batch_size].to(device)  # (b, seq)
            states = model(input_ids=batch, output_hidden_states=True, logits_to_keep=1, use_cache=False).hidden_states
            hidden = states[-1][:, :-1].reshape(-1, states[-1].shape[-1])
            _, _, lm = chunked_recovery_loss(hidden.to(weight.dtype), weight, bias, None, batch[:, 1:].reshape(-1),
                                             kd_weight=0.0, lm_weight=1.0, chunk_size=chunk_size)
            tokens = batch[:, 1:].numel()
            total += float(lm) * tokens
            count += tokens
    finally:
        model.train(was_training)
    return total / max(1, count)


class RecoveryProgress(ProgressCallback):
    """The Trainer's tqdm bar (on stderr) with loss and held-out perplexity in its postfix, instead of printing every
    log dict to stdout (a command's stdout is its result)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {key: f"{logs[key]:.4g}" for key in ("loss", "eval_perplexity") if isinstance(logs.get(key), float)}
            if shown:
                self.training_bar.set_postfix(shown)


def make_mapping(student: nn.Module, teacher: nn.Module, structure: dict | None) -> list[tuple[int, int]]:
    """Student-to-teacher block pairs for the hidden-state loss, from the record's structure."""
    from ..architectures import get_architecture
    from ..integrations.peft import unwrap_model

    student_base, teacher_base = unwrap_model(student), unwrap_model(teacher)
    student_blocks = len(get_architecture(student_base).blocks(student_base))
    teacher_blocks = len(get_architecture(teacher_base).blocks(teacher_base))
    return block_mapping(structure, student_blocks, teacher_blocks)


__all__ = ["LossLogger", "NonFiniteLossError", "RecoveryProgress", "RecoveryTrainer", "heldout_loss", "make_mapping"]
