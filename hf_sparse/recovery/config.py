"""``RecoveryConfig``: every option of a recovery run, one dataclass whose fields carry their help and limits.

Three objectives train the pruned student:

* ``"distill+lm"`` (default): ``kd_weight × KL + lm_weight × cross-entropy`` - distillation from the dense teacher
  with the next-token loss beside it (measured better than either alone on both test models:
  docs/results/distillation.md);
* ``"distill"``: the KL divergence between the dense teacher's next-token distribution and the student's
  (temperature ``temperature``, optionally only over the teacher's ``top_k`` logits), plus an optional loss on
  intermediate hidden states (``hidden_weight``);
* ``"lm"``: the usual next-token cross-entropy on the training text (no teacher).

Two ways to train: ``method="lora"`` (sparsity-keeping LoRA, merged at the end; :mod:`hf_sparse.peft`) or
``method="full"`` (every weight trained, a mask keeper re-zeroing pruned weights after each optimizer step).

>>> config = RecoveryConfig(objective="distill", steps=50)
>>> config.temperature, config.method, config.teacher
(1.0, 'lora', 'base')
>>> RecoveryConfig(temperature=0)
Traceback (most recent call last):
...
ValueError: temperature must be a positive number, got 0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..validation import validate_dataclass
from ..integrations.peft import MODES

OBJECTIVES = ("distill", "lm", "distill+lm")
METHODS = ("lora", "full")
TEACHER_DTYPES = ("float32", "bfloat16", "float16")
#: learning rates used when ``learning_rate`` is left at ``None``: adapters take a larger step than whole weights
DEFAULT_LEARNING_RATES = {"lora": 1e-3, "full": 1e-4}


@dataclass
class RecoveryConfig:
    """Options of a recovery run (defaults suit a few hundred steps on a small model; see docs/guides/recover.md)."""

    objective: str = field(default="distill+lm", metadata={
        "help": "'distill+lm' (KL to the dense teacher + next-token cross-entropy), 'distill' (KL only) or 'lm' "
                "(cross-entropy only, no teacher).",
        "choices": OBJECTIVES})
    teacher: str | None = field(default="base", metadata={
        "help": "'base' (the dense model the record names, hash-checked), a local folder or a Hub id; a loaded "
                "model goes to recover(teacher_model=...). Unused for objective='lm'."})
    force_teacher: bool = field(default=False, metadata={
        "help": "Use the teacher even when its hash differs from the record's base_model_sha256."})
    teacher_dtype: str | None = field(default=None, metadata={
        "help": "Load the teacher in this dtype (default: the student's).", "choices": (None, *TEACHER_DTYPES)})
    teacher_device_map: str | None = field(default=None, metadata={
        "help": "transformers device_map for the teacher ('auto', 'cpu', 'cuda:1', ...); default: the student's "
                "device."})
    teacher_correction_steps: int = field(default=0, metadata={
        "help": "Teacher correction (Minitron): first train the teacher this many steps on the training data with the "
                "LM loss (the student's training method, learning rate, batch and seed), then distil from the "
                "corrected teacher; 0 = distil from the teacher as it is. Use it when the training text is not what "
                "the teacher was trained on (docs/results/distillation.md).", "range": ">= 0"})
    temperature: float = field(default=1.0, metadata={
        "help": "Softmax temperature of the KL term (1 measured better than 2 on SmolLM2 by ~3 perplexity; 2 was "
                "0.03-0.16 better on the 7M model; docs/results/distillation.md).", "range": "> 0"})
    top_k: int | None = field(default=None, metadata={
        "help": "Distil the teacher's k most likely tokens one by one and the rest of the vocabulary as one bucket; "
                "None = the whole vocabulary.",
        "range": "> 0"})
    kd_weight: float = field(default=1.0, metadata={"help": "Weight of the KL term.", "range": ">= 0"})
    lm_weight: float = field(default=1.0, metadata={"help": "Weight of the cross-entropy term (objective 'lm' "
                                                            "and 'distill+lm').", "range": ">= 0"})
    hidden_weight: float = field(default=0.0, metadata={
        "help": "Weight of the intermediate hidden-state loss (normalised MSE between each student block's output "
                "and its teacher block's, blocks mapped through the record's structure); 0 disables it.",
        "range": ">= 0"})
    chunk_size: int = field(default=128, metadata={
        "help": "Tokens per chunk of the loss: at most chunk_size x vocabulary logits exist at once (128 measured "
                "fastest on CPU for a 49k vocabulary, 64-1024 within 15%).",
        "range": "> 0"})
    method: str = field(default="lora", metadata={"help": "'lora' (sparsity-keeping, merged) or 'full'.",
                                                  "choices": METHODS})
    rank: int = field(default=16, metadata={"help": "LoRA rank r.", "range": "> 0"})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha; default 2 x rank.", "range": "> 0"})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout.", "range": "[0, 1)"})
    target_modules: str | list[str] = field(default="all-linear", metadata={"help": "peft target_modules."})
    mode: str = field(default="masked", metadata={"help": "LoRA: 'masked' (mask in the training forward too) or "
                                                          "'merge'.", "choices": MODES})
    steps: int = field(default=200, metadata={"help": "Optimizer steps.", "range": "> 0"})
    batch_size: int = field(default=8, metadata={"help": "Sequences per step and process.", "range": "> 0"})
    sequence_length: int = field(default=256, metadata={"help": "Tokens per training sequence.", "range": ">= 2"})
    learning_rate: float | None = field(default=None, metadata={
        "help": "Peak AdamW learning rate; None = 1e-3 for LoRA, 1e-4 for full fine-tuning.", "range": "> 0"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Fraction of steps of linear warmup.",
                                                        "range": "[0, 1)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay.", "range": ">= 0"})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Gradient clipping; None disables it.",
                                                               "range": "> 0"})
    heldout_fraction: float = field(default=0.05, metadata={
        "help": "Share of the packed sequences held out (never trained on) for the loss and perplexity before, "
                "during and after training.", "range": "[0, 1)"})
    max_heldout: int = field(default=32, metadata={"help": "At most this many held-out sequences.",
                                                   "range": ">= 0"})
    eval_steps: int | None = field(default=None, metadata={
        "help": "Evaluate on the held-out sequences every this many steps (None: before and after only).",
        "range": "> 0"})
    logging_steps: int = field(default=10, metadata={"help": "Log the training loss every this many steps.",
                                                     "range": "> 0"})
    checkpoint_dir: str | None = field(default=None, metadata={
        "help": "Trainer checkpoints go here (None: a temporary folder, removed at the end)."})
    save_steps: int | None = field(default=None, metadata={
        "help": "Save a resumable checkpoint every this many steps (needs checkpoint_dir).", "range": "> 0"})
    resume: bool = field(default=False, metadata={
        "help": "Continue from the last checkpoint in checkpoint_dir (after a kill); starts fresh if none."})
    seed: int = field(default=1, metadata={"help": "Seed for the data order and adapter initialisation."})
    trainer_args: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "More transformers.TrainingArguments (e.g. gradient_accumulation_steps, bf16, deepspeed, fsdp)."})

    def __post_init__(self):
        validate_dataclass(self)
        if self.objective == "distill" and self.kd_weight == 0 and self.hidden_weight == 0:
            raise ValueError("objective='distill' with kd_weight=0 and hidden_weight=0 trains on nothing; give a "
                             "positive kd_weight or hidden_weight")
        if self.objective == "distill+lm" and self.kd_weight == 0 and self.lm_weight == 0:
            raise ValueError("objective='distill+lm' with kd_weight=0 and lm_weight=0 trains on nothing")
        if self.objective == "lm" and self.lm_weight == 0:
            raise ValueError("objective='lm' with lm_weight=0 trains on nothing; give a positive lm_weight")
        if self.teacher_correction_steps and not self.uses_teacher:
            raise ValueError(f"teacher_correction_steps={self.teacher_correction_steps} corrects a teacher, but "
                             "objective='lm' has none; use objective='distill' or 'distill+lm'")
        if self.save_steps is not None and self.checkpoint_dir is None:
            raise ValueError(f"save_steps={self.save_steps} needs checkpoint_dir (where the checkpoints go)")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir (the folder of the run to continue)")
        for key in ("output_dir", "max_steps", "per_device_train_batch_size", "learning_rate", "seed"):
            if key in self.trainer_args:
                raise ValueError(f"trainer_args[{key!r}] is set by RecoveryConfig; use its own field instead")

    @property
    def uses_teacher(self) -> bool:
        return self.objective != "lm"

    @property
    def lr(self) -> float:
        """The learning rate in use (the per-method default when ``learning_rate`` is ``None``)."""
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LEARNING_RATES[self.method]

    @property
    def weights(self) -> tuple[float, float, float]:
        """``(kd, lm, hidden)`` weights as the objective uses them (terms the objective leaves out are 0)."""
        kd = self.kd_weight if self.uses_teacher else 0.0
        lm = self.lm_weight if self.objective != "distill" else 0.0
        hidden = self.hidden_weight if self.uses_teacher else 0.0
        return kd, lm, hidden


__all__ = ["DEFAULT_LEARNING_RATES", "METHODS", "OBJECTIVES", "RecoveryConfig", "TEACHER_DTYPES"]
