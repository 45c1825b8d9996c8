"""PEFT on pruned models without losing the sparsity: LoRA whose update is masked, through peft's own classes.

A plain LoRA merge adds the dense low-rank product ``B @ A`` to every weight, so a 50%-sparse matrix comes out fully
dense. :func:`get_sparse_peft_model` registers a LoRA layer for ``nn.Linear`` (peft's experimental
``LoraConfig._register_custom_module``) whose update is ``M ⊙ (B A) · scaling``, with ``M`` the keep-mask that
:func:`hf_sparse.get_masks` reads from the model's record. Everything else is peft's: ``get_peft_model``,
``save_pretrained`` of the adapter, ``PeftModel.from_pretrained``, ``merge_and_unload``.

Two modes:

* ``"masked"`` (default): the mask is applied in the training forward too, so training sees exactly the model that
  merging produces; the merged model's logits equal the adapted model's.
* ``"merge"``: ordinary LoRA while training, the mask is applied only when merging. Cheaper per step (no dense
  ``(out, in)`` product), but the merged model is *not* the model that was trained: the pruned part of the update
  is thrown away at the end, so it recovers less. Prefer ``"masked"``.

peft's HiRA (``HiraConfig``) is also accepted: its update is ``W ⊙ (B A)``, which keeps every zero of ``W`` by
construction, so it needs no mask.

The custom-module registration is not serialized with the adapter: load saved adapters with
:func:`load_sparse_adapter` (or call :func:`register_sparse_lora` on the config before ``PeftModel.from_pretrained``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from peft import HiraConfig, LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..record import get_masks, read_record

logger = logging.getLogger(__name__)

MODES = ("masked", "merge")
# peft initializations that rewrite the base weight (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA, ...) would fill the zeros
# in before training even starts; only these leave it untouched.
SUPPORTED_LORA_INITS = (True, False, "gaussian")
# A keep-mask is handed to the LoRA layer through this attribute of the nn.Linear being wrapped, only while
# get_peft_model / PeftModel.from_pretrained run (peft builds the layer, so the mask cannot be a constructor argument).
_MASK_ATTR = "_hf_sparse_keep_mask"


class SparseLoraLinear(LoraLinear):
    """peft's LoRA ``Linear`` whose update keeps the pruned weights at zero: ``ΔW = M ⊙ (B A) · scaling``.

    The keep-mask is a non-persistent buffer ``sparsity_mask`` (``True`` = kept; ``None`` for a dense base layer), so
    it follows ``.to(device)`` but never enters a state dict or the saved adapter. Without a mask attached by
    :func:`get_sparse_peft_model`, the exact zeros of the base weight are the mask - the same rule
    :func:`hf_sparse.get_masks` uses. In this class (mode ``"masked"``) the training forward uses the masked update;
    :class:`MergeMaskedLoraLinear` masks at merge time only.
    """

    mask_in_forward = True

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
        base = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        weight = getattr(base, "weight", None)
        if type(weight) is not nn.Parameter or not weight.dtype.is_floating_point:
            # bitsandbytes/GPTQ/... layers subclass nn.Linear; adding a delta to their packed weights is meaningless.
            raise ValueError(
                f"sparsity-keeping LoRA needs a floating-point nn.Linear base weight, got {type(base).__name__} with "
                f"{type(weight).__name__} of dtype {getattr(weight, 'dtype', None)}; for a quantized base train with "
                "plain peft and merge the adapter into the unquantized pruned checkpoint with load_sparse_adapter()"
            )
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        mask = getattr(base, _MASK_ATTR, None)
        if mask is None:
            mask = weight.detach() != 0
            if bool(mask.all()):
                mask = None  # nothing pruned here: plain LoRA, no buffer
        self.register_buffer("sparsity_mask", mask, persistent=False)

    def update_layer(self, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        super().update_layer(adapter_name, *args, **kwargs)
        if adapter_name in self.lora_variant:
            # DoRA and the other variants merge through their own code paths, which this class does not mask.
            raise ValueError(
                f"LoRA variant {type(self.lora_variant[adapter_name]).__name__} is not supported by sparsity-keeping "
                "LoRA: use a plain LoraConfig (use_dora=False, no alora/arrow/bdlora/velora/kasa/mica options)"
            )

    def _masked(self, delta: torch.Tensor) -> torch.Tensor:
        if self.sparsity_mask is None:
            return delta
        # where(), not multiply: 0 * inf would be NaN, and -x * 0 would write a -0.0 into a pruned position.
        return torch.where(self.sparsity_mask.to(delta.device), delta, torch.zeros((), dtype=delta.dtype,
                                                                                   device=delta.device))

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """peft's ``B @ A · scaling`` with the pruned positions set to zero; used by merge and unmerge."""
        return self._masked(super().get_delta_weight(adapter))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if (not self.mask_in_forward or self.sparsity_mask is None or self.disable_adapters or self.merged
                or kwargs.get("adapter_names") is not None):
            if kwargs.get("adapter_names") is not None and self.mask_in_forward and self.sparsity_mask is not None:
                raise ValueError("mixed-adapter batches (adapter_names=...) are not supported in mode='masked'; "
                                 "merge the adapter or use mode='merge'")
            return super().forward(x, *args, **kwargs)
        self._check_forward_args(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for active_adapter in self.active_adapters:
            if active_adapter not in self.lora_A.keys():
                continue
            lora_A, lora_B = self.lora_A[active_adapter], self.lora_B[active_adapter]
            scaling = self.scaling[active_adapter]
            x = self._cast_input_dtype(x, lora_A.weight.dtype)
            # The dense (out, in) update, masked: the same tensor merge adds to the weight, so the trained model
            # and the merged model are one model.
            delta = self._masked((lora_B.weight @ lora_A.weight) * scaling)  # (out, in)
            bias = lora_B.bias * scaling if self.lora_bias.get(active_adapter) and lora_B.bias is not None else None
            result = result + F.linear(self.lora_dropout[active_adapter](x), delta, bias)
        return result.to(result_dtype)

    def __repr__(self) -> str:
        return "sparse_" + super().__repr__()


class MergeMaskedLoraLinear(SparseLoraLinear):
    """Mode ``"merge"``: ordinary LoRA forward while training, the mask applied only when merging (weaker recovery)."""

    mask_in_forward = False


_LAYER_FOR_MODE = {"masked": SparseLoraLinear, "merge": MergeMaskedLoraLinear}


def _check_mode(mode: str) -> type[SparseLoraLinear]:
    if mode not in _LAYER_FOR_MODE:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return _LAYER_FOR_MODE[mode]


def register_sparse_lora(config: LoraConfig, mode: str = "masked") -> LoraConfig:
    """Make ``config`` build sparsity-keeping LoRA layers for ``nn.Linear`` (in place; returns ``config``).

    peft does not serialize this registration, so do it again before ``PeftModel.from_pretrained`` when loading a
    saved adapter by hand (:func:`load_sparse_adapter` does both steps):

    >>> config = register_sparse_lora(LoraConfig.from_pretrained("adapter-dir"))  # doctest: +SKIP
    >>> model = PeftModel.from_pretrained(pruned_model, "adapter-dir", config=config)  # doctest: +SKIP
    """
    if not isinstance(config, LoraConfig):
        raise ValueError(f"register_sparse_lora needs a peft LoraConfig, got {type(config).__name__}")
    if config.use_dora:
        raise ValueError("use_dora=True is not supported by sparsity-keeping LoRA (DoRA merges through its own path); "
                         "set use_dora=False")
    if config.init_lora_weights not in SUPPORTED_LORA_INITS:
        raise ValueError(
            f"init_lora_weights={config.init_lora_weights!r} rewrites the base weights and would fill the pruned "
            f"zeros in; use one of {SUPPORTED_LORA_INITS}"
        )
    config._register_custom_module({nn.Linear: _check_mode(mode)})
    return config


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel / DDP wrapper (the model itself when it is not wrapped)."""
    while True:
        if isinstance(model, PeftModel):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "config"):
            model = model.module
        else:
            return model


def sparse_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Keep-masks of the pruned modules that actually have zeros (an all-kept mask needs no masking, e.g. a module
    a structured method shrank instead of zeroing). Raises if the model has no sparsity record.

    >>> masks = sparse_masks(pruned_model); sorted(masks)[:1]  # doctest: +SKIP
    ['model.layers.0.mlp.down_proj']
    """
    return {name: mask for name, mask in get_masks(unwrap_model(model)).items() if not bool(mask.all())}


@contextlib.contextmanager
def _attached_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> Iterator[None]:
    modules = dict(unwrap_model(model).named_modules())
    tagged = []
    try:
        for name, mask in masks.items():
            module = modules[name]
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            setattr(base, _MASK_ATTR, mask.to(base.weight.device))
            tagged.append(base)
        yield
    finally:
        for base in tagged:
            if hasattr(base, _MASK_ATTR):
                delattr(base, _MASK_ATTR)


def _is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None
                or getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def _warn_if_kbit_prepared(model: nn.Module) -> None:
    """Warn when ``prepare_model_for_kbit_training`` seems to have run on a model that is not quantized.

    That function freezes every parameter, upcasts every float16/bfloat16 weight to float32 (twice the memory, and
    a pruned model's zeros buy nothing back) and turns on gradient checkpointing - meant for 4/8-bit bases only.
    Its traces, read cheaply: all parameters frozen, and float32 weights under a half-precision config or
    gradient checkpointing on.
    """
    if _is_quantized(model):
        return
    params = list(model.parameters())
    if not params or any(p.requires_grad for p in params):
        return
    config_dtype = getattr(getattr(model, "config", None), "dtype", None)
    upcast = config_dtype in (torch.float16, torch.bfloat16, "float16", "bfloat16") and all(
        p.dtype == torch.float32 for p in params if p.dtype.is_floating_point)
    # transformers 5 renamed is_gradient_checkpointing (deprecated) to is_activation_checkpointing.
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    checkpointing = bool(getattr(model, flag, False))
    if upcast or checkpointing:
        logger.warning(
            "this model looks prepared with peft.prepare_model_for_kbit_training but is not quantized: that call "
            "upcasts every weight to float32 and is meant for 4/8-bit models only. For a sparse model in "
            "float16/bfloat16 skip it (enable gradient checkpointing yourself if memory is tight)."
        )


def get_sparse_peft_model(model: nn.Module, peft_config: LoraConfig | HiraConfig, mode: str = "masked",
                          adapter_name: str = "default", **kwargs: Any) -> PeftModel:
    """``peft.get_peft_model`` for a pruned model: after training, ``merge_and_unload()`` is exactly as sparse as before.

    ``peft_config`` is a ``LoraConfig`` (its custom-module registration is made on a copy, the caller's config is not
    changed) or a ``HiraConfig`` (sparse by construction, passed through). ``mode`` is ``"masked"`` (default; the
    mask also applies in the training forward) or ``"merge"`` (mask at merge only, weaker). Extra keyword arguments
    go to ``get_peft_model``.

    >>> model = AutoModelForCausalLM.from_pretrained("pruned-dir")  # doctest: +SKIP
    >>> peft_model = get_sparse_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))  # doctest: +SKIP
    >>> ...  # train with transformers.Trainer or any loop  # doctest: +SKIP
    >>> merged = peft_model.merge_and_unload()  # same zeros, same N:M groups  # doctest: +SKIP
    """
    _check_mode(mode)
    record = read_record(unwrap_model(model))
    if record is None:
        raise ValueError("this model has no sparsity_config record (it was not pruned by hf_sparse); use "
                         "peft.get_peft_model directly, or prune it first with hf_sparse.prune")
    if record.structure is not None and not record.modules:
        # Structurally pruned only: smaller matrices, no zeros to keep, so plain LoRA is exactly right.
        return get_peft_model(model, peft_config, adapter_name=adapter_name, **kwargs)
    _warn_if_kbit_prepared(model)
    if isinstance(peft_config, HiraConfig):
        # HiRA's update is W ⊙ (B A): zero stays zero without any mask.
        return get_peft_model(model, peft_config, adapter_name=adapter_name, **kwargs)
    if not isinstance(peft_config, LoraConfig):
        raise ValueError(f"peft_config must be a LoraConfig or HiraConfig, got {type(peft_config).__name__}; other "
                         "adapters may fill the pruned weights in when merged")
    if _is_quantized(model):
        raise ValueError("sparsity-keeping LoRA needs an unquantized base: train QLoRA with plain peft, then merge "
                         "the saved adapter into the floating-point pruned checkpoint with load_sparse_adapter()")
    config = register_sparse_lora(copy.deepcopy(peft_config), mode)
    masks = sparse_masks(model)
    with _attached_masks(model, masks):
        peft_model = get_peft_model(model, config, adapter_name=adapter_name, **kwargs)
    _check_covered(peft_model, masks)
    return peft_model


def load_sparse_adapter(model: nn.Module, adapter_path: str, mode: str = "masked", adapter_name: str = "default",
                        is_trainable: bool = False, **kwargs: Any) -> PeftModel:
    """``PeftModel.from_pretrained`` for an adapter saved from :func:`get_sparse_peft_model` (or any LoRA adapter):
    re-registers the sparsity-keeping layer, so ``merge_and_unload()`` keeps the base model's zeros.

    >>> peft_model = load_sparse_adapter(pruned_model, "adapter-dir")  # doctest: +SKIP
    >>> merged = peft_model.merge_and_unload()  # doctest: +SKIP
    """
    _check_mode(mode)
    config = kwargs.pop("config", None) or PeftConfig.from_pretrained(adapter_path)
    if isinstance(config, HiraConfig):
        return PeftModel.from_pretrained(model, adapter_path, adapter_name=adapter_name, is_trainable=is_trainable,
                                         config=config, **kwargs)
    config = register_sparse_lora(config, mode)
    masks = sparse_masks(model)
    with _attached_masks(model, masks):
        peft_model = PeftModel.from_pretrained(model, adapter_path, adapter_name=adapter_name,
                                               is_trainable=is_trainable, config=config, **kwargs)
    _check_covered(peft_model, masks)
    return peft_model


def _check_covered(peft_model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Every pruned module peft adapted must be one of ours; otherwise merging would densify it."""
    modules = dict(unwrap_model(peft_model).named_modules())
    adapted = 0
    for name in masks:
        module = modules.get(name)
        if isinstance(module, BaseTunerLayer):
            if not isinstance(module, SparseLoraLinear):
                raise ValueError(f"pruned module {name!r} was wrapped by {type(module).__name__}, which would not keep "
                                 "its zeros when merged")
            adapted += 1
    logger.info("sparsity-keeping LoRA on %d of %d pruned modules", adapted, len(masks))


__all__ = [
    "MODES",
    "MergeMaskedLoraLinear",
    "SparseLoraLinear",
    "get_sparse_peft_model",
    "load_sparse_adapter",
    "register_sparse_lora",
    "sparse_masks",
    "unwrap_model",
]
