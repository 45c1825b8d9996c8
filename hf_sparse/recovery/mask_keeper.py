"""Keep a pruned model's zeros through *full* fine-tuning (no LoRA): re-apply the masks after every optimizer step.

An optimizer step writes every weight: Adam moments, weight decay and any non-zero gradient fill pruned positions
in. Zeroing the pruned positions again right after each step is the one rule that holds for every optimizer,
schedule and precision. Three ways to use it:

* ``transformers.Trainer``: ``Trainer(..., callbacks=[KeepSparsityCallback()])``;
* any loop with a torch optimizer (plain PyTorch, accelerate): ``keep_sparsity(model, optimizer)`` once, before the
  loop - it hooks ``optimizer.step`` itself;
* by hand: ``keeper = MaskKeeper(model)`` and ``keeper.apply()`` after each ``optimizer.step()``.

Masks come from :func:`hf_sparse.get_masks` (the record in ``config.sparsity_config`` and the weights' exact zeros),
read once before training. Sharded training (FSDP, DeepSpeed ZeRO-3) replaces the parameters with shards and is not
supported. LoRA does not change the base weights: for it use :mod:`hf_sparse.peft` instead.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ..integrations.peft import unwrap_model
from ..record import get_masks

logger = logging.getLogger(__name__)


class MaskKeeper:
    """Holds the pruned positions of a model's recorded modules and zeroes them again on :meth:`apply`.

    >>> keeper = MaskKeeper(pruned_model)  # doctest: +SKIP
    >>> loss.backward(); optimizer.step(); keeper.apply()  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor] | None = None) -> None:
        base = unwrap_model(model)
        if masks is None:
            masks = get_masks(base)  # strict: raises if the zeros were already filled in
        modules = dict(base.named_modules())
        self._entries: list[tuple[nn.Module, torch.Tensor]] = []
        for name, mask in masks.items():
            module = modules.get(name)
            if module is None:
                raise ValueError(f"mask for {name!r}, which this model does not have")
            if hasattr(module, "get_base_layer"):  # a peft-wrapped layer: the weight is its base layer's
                module = module.get_base_layer()
            if tuple(mask.shape) != tuple(module.weight.shape):
                raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, weight has "
                                 f"{tuple(module.weight.shape)}")
            if bool(mask.all()):
                continue
            # Store the pruned positions (True = zero it), on the weight's device, so apply() is one masked_fill_.
            self._entries.append((module, (~mask.bool()).to(module.weight.device)))
        self._handles: list[Any] = []

    def __len__(self) -> int:
        return len(self._entries)

    @torch.no_grad()
    def apply(self) -> None:
        """Set every pruned weight to exactly zero again."""
        for module, pruned in self._entries:
            weight = module.weight
            if pruned.device != weight.device:
                pruned = pruned.to(weight.device)
            weight.masked_fill_(pruned, 0.0)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradients of pruned weights, so optimizer state (Adam moments) never builds up for them.
        Optional: :meth:`apply` is what guarantees the zeros."""
        for module, pruned in self._entries:
            grad = module.weight.grad
            if grad is not None:
                grad.masked_fill_(pruned.to(grad.device), 0.0)

    def attach(self, optimizer: torch.optim.Optimizer) -> MaskKeeper:
        """Call :meth:`apply` after every ``optimizer.step()`` (a torch step post-hook; an accelerate
        ``AcceleratedOptimizer`` is hooked through the optimizer it wraps)."""
        inner = getattr(optimizer, "optimizer", optimizer)
        if not hasattr(inner, "register_step_post_hook"):
            raise ValueError(f"{type(optimizer).__name__} has no register_step_post_hook: call keeper.apply() after "
                             "each optimizer step yourself")
        self._handles.append(inner.register_step_post_hook(lambda *_args, **_kwargs: self.apply()))
        return self

    def detach(self) -> None:
        """Remove the optimizer hooks added by :meth:`attach`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def keep_sparsity(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                  masks: dict[str, torch.Tensor] | None = None) -> MaskKeeper:
    """Keep ``model``'s pruned weights at zero through full fine-tuning in a plain loop.

    With an ``optimizer`` the masks are re-applied after each of its steps automatically; without one call
    ``keeper.apply()`` after each step.

    >>> keeper = keep_sparsity(model, optimizer)  # doctest: +SKIP
    >>> for batch in loader:  # doctest: +SKIP
    ...     model(**batch).loss.backward(); optimizer.step(); optimizer.zero_grad()
    >>> keeper.detach()  # doctest: +SKIP
    """
    keeper = MaskKeeper(model, masks)
    keeper.apply()
    if optimizer is not None:
        keeper.attach(optimizer)
    logger.info("keeping the zeros of %d pruned modules through training", len(keeper))
    return keeper


class KeepSparsityCallback(TrainerCallback):
    """``transformers.Trainer`` callback that re-applies the masks after every optimizer step.

    Masks are read from the model when training begins (or given). Works for full fine-tuning and is harmless with
    LoRA (whose base weights do not move).

    >>> trainer = Trainer(model=pruned_model, args=args, train_dataset=ds,
    ...                   callbacks=[KeepSparsityCallback()])  # doctest: +SKIP
    """

    def __init__(self, masks: dict[str, torch.Tensor] | None = None) -> None:
        self.masks = masks
        self.keeper: MaskKeeper | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.keeper is None:
            if model is None:
                raise ValueError("KeepSparsityCallback needs the model: transformers.Trainer passes it to callbacks")
            self.keeper = MaskKeeper(model, self.masks)
        self.keeper.apply()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.keeper is not None:
            self.keeper.mask_gradients()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.keeper is not None:
            self.keeper.apply()


__all__ = ["KeepSparsityCallback", "MaskKeeper", "keep_sparsity"]
