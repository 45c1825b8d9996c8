"""Prune on load: hf_sparse as a transformers quantizer, plus the ``sparsity_config=`` keyword on ``from_pretrained``.

Three entry points, all ending in :func:`hf_sparse.prune` after the weights are loaded:

* ``AutoModelForCausalLM.from_pretrained(path, sparsity_config=cfg)`` - needs the small hook that ``import hf_sparse``
  installs (:func:`install_from_pretrained_hook`); without it transformers would hand the unknown keyword to the
  model's ``__init__`` (``TypeError``), or a ``"sparsity_config"`` key in a pruned checkpoint's ``config.json`` would
  silently swallow it.
* ``AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg)`` - transformers' own quantizer registry
  (``"hf_sparse"`` is registered below); no hook involved.
* ``hf_sparse.AutoSparseModelForCausalLM.from_pretrained(path, sparsity_config=cfg)`` - hook-free.

Pruning is not quantization: once the weights are pruned, the quantizer removes every trace of itself
(``model.hf_quantizer``, ``config.quantization_config``, ``config._is_quantized``, ``model.is_quantized``,
``model.quantization_method``) so the model is a plain model for ``save_pretrained``, PEFT, ``Trainer`` and serving
engines. What was done is recorded in ``config.sparsity_config`` (see :mod:`hf_sparse.record`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections.abc import Callable
from typing import Any, Iterator

from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.models.auto.auto_factory import _BaseAutoModelClass
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from ..architectures import get_architecture
from ..calibration import check_fits_model, check_source, is_token_source, tokenizer_for
from ..config import QUANT_METHOD, SparsityConfig
from ..config.profiles import UNIFORM, check_profile_fits
from ..engine import check_device_available, plan_targets
from ..record import read_record
from ..surgery import check_loaded_structure, mark_for_loading
from .gguf import from_pretrained_gguf

logger = logging.getLogger(__name__)

SPARSITY_KWARG = "sparsity_config"

# The verb that prunes a loaded model: hf_sparse.prune (hf_sparse.api). The api is a layer above the integrations
# (it uses the GGUF helpers here), so it is handed in, not imported: `import hf_sparse` calls set_prune_function.
_PRUNE: Callable[..., Any] | None = None


def set_prune_function(prune: Callable[..., Any]) -> None:
    """Set the function prune on load calls once the weights are loaded: ``prune(model, config, tokenizer=...)``.

    ``import hf_sparse`` sets :func:`hf_sparse.prune`; there is no need to call this yourself.

    >>> import hf_sparse
    >>> set_prune_function(hf_sparse.prune)
    """
    global _PRUNE
    _PRUNE = prune


def prune_loaded(model: PreTrainedModel, config: SparsityConfig, tokenizer=None):
    """Prune a model ``from_pretrained`` has just loaded, with the function :func:`set_prune_function` set."""
    if _PRUNE is None:
        raise RuntimeError("prune on load needs hf_sparse.prune: import hf_sparse (it sets it) before loading")
    return _PRUNE(model, config, tokenizer=tokenizer)

# The SparsityConfig the caller passed to the from_pretrained call now running (set by the hook and by
# AutoSparseModelForCausalLM). transformers builds the quantizer from the checkpoint's quantization_config when
# config.json has one, dropping the caller's; the quantizer reads this to let the caller's explicit config win.
_EXPLICIT_CONFIG: contextvars.ContextVar[SparsityConfig | None] = contextvars.ContextVar("hf_sparse_explicit_config",
                                                                                         default=None)


@contextlib.contextmanager
def _explicit_config(kwargs: dict[str, Any]) -> Iterator[None]:
    value = kwargs.get("quantization_config")
    token = _EXPLICIT_CONFIG.set(value if isinstance(value, SparsityConfig) else None)
    try:
        yield
    finally:
        _EXPLICIT_CONFIG.reset(token)


class PlainModelQuantizer(HfQuantizer):
    """A quantizer that leaves an ordinary dense model behind (pruned, decoded or reshaped weights are plain tensors):
    it saves and trains like any model. The base of every hf_sparse quantizer."""

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return False


class HfSparseQuantizer(PlainModelQuantizer):
    """Prunes a model right after ``from_pretrained`` has loaded its weights, then leaves a plain model behind.

    transformers builds it from a :class:`~hf_sparse.SparsityConfig` passed as ``quantization_config``:

    >>> cfg = hf_sparse.SparsityConfig(method="magnitude", sparsity=0.5)  # doctest: +SKIP
    >>> model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg)  # doctest: +SKIP
    >>> model.config.sparsity_config["overall_sparsity"], hasattr(model, "hf_quantizer")  # doctest: +SKIP
    (0.5, False)
    """

    # Pruning reads dense weights; a checkpoint need not be "pre-quantized" for it.
    requires_calibration = False

    def __init__(self, quantization_config: SparsityConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._tokenizer = None  # loaded before the weights when text calibration needs one
        explicit = _EXPLICIT_CONFIG.get()
        if self.pre_quantized and explicit is not None:
            # config.json carries quantization_config.quant_method="hf_sparse" (hf_sparse never writes one: the
            # checkpoint is untrusted or hand-edited) and the caller passed a config: the caller's wins, and the
            # weights are pruned with it.
            logger.warning(
                "the checkpoint's config.json has its own quantization_config with quant_method=%r; it is ignored "
                "and the sparsity_config you passed (method=%r, sparsity=%r) is applied", QUANT_METHOD,
                explicit.method, explicit.sparsity,
            )
            self.quantization_config = explicit
            self.pre_quantized = False

    # The checks below run before any weight is read, so a typo does not cost a multi-gigabyte load.
    def validate_environment(self, *args, **kwargs) -> None:
        if self.pre_quantized:
            return
        config = self.quantization_config
        config.validate()  # a field may have been changed since the config was built
        check_device_available(config.device)
        if config.needs_calibration:
            check_source(config.calibration, config.calibration_reader)

    def _process_model_before_weight_loading(self, model: PreTrainedModel, **kwargs) -> PreTrainedModel:
        if self.pre_quantized:
            return model
        # The model is still an empty (meta) skeleton: its layout and shapes are known, its weights are not loaded.
        config = self.quantization_config
        # A structured checkpoint pruned again (say wanda on a FLAP model): first give the skeleton its smaller shapes.
        from .structured import shape_for_record

        shape_for_record(model)
        if config.parsed_pattern.is_structured:
            # Structured methods need the architecture's coupled structures: unsupported ones raise here.
            from ..methods.structured import check_structures

            check_structures(model, config.method)
            if config.sparsity_profile != UNIFORM:  # per-block targets: an explicit profile's blocks must exist
                check_plan_before_loading(model, config)
            return model
        # Unsupported architecture, include/exclude matching nothing, N:M not tiling a layer, an explicit sparsity
        # profile naming a block past the model or a module that does not exist: all raise here.
        check_plan_before_loading(model, config)
        if config.needs_calibration:
            check_fits_model(config.calibration, config.sequence_length, model)
            if not is_token_source(config.calibration) and config.tokenizer is None:
                self._tokenizer = tokenizer_for(model)  # a folder without a tokenizer fails here, not after the load
        return model

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs) -> PreTrainedModel:
        config = self.quantization_config
        if self.pre_quantized:
            # The checkpoint's own config.json carries an hf_sparse quantization_config (written by something other
            # than hf_sparse, which never writes one): its weights are already pruned, so pruning again would be wrong.
            logger.warning(
                "%s has quantization_config.quant_method=%r: treating its weights as already pruned and dropping that "
                "quantization_config (hf_sparse keeps its record in config.sparsity_config)",
                getattr(model, "name_or_path", type(model).__name__), QUANT_METHOD,
            )
        else:
            prune_loaded(model, config, tokenizer=config.tokenizer or self._tokenizer)
        remove_quantization_state(model)
        # A structured result whose blocks differ keeps the marker that makes it load only through hf_sparse.
        record = read_record(model)
        mark_for_loading(model, record.structure if record is not None else None)
        return model


def check_plan_before_loading(model: PreTrainedModel, config: SparsityConfig) -> None:
    """The checks that need the model's layout but not its weights, on ``model`` (usually an empty meta-device
    skeleton): the architecture is supported, ``include``/``exclude`` match something, an N:M pattern tiles every
    target, and the sparsity profile fits the model (an explicit profile's block indices and regular expressions).

    >>> with torch.device("meta"):  # doctest: +SKIP
    ...     skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    >>> check_plan_before_loading(skeleton, SparsityConfig(method="magnitude", sparsity_profile={"40": 0.5}))  # doctest: +SKIP
    Traceback (most recent call last):
    ValueError: sparsity_profile names block(s) [40], but the model has 30 decoder blocks (0..29)
    """
    # Structured methods remove units of whole blocks: include/exclude do not apply, a profile's blocks are all of them.
    structured = config.parsed_pattern.is_structured
    plan = plan_targets(model, None if structured else config.include, None if structured else config.exclude,
                        config.parsed_pattern, lambda _: config.sparsity)
    check_profile_fits(plan, config.sparsity_profile, config.sparsity)


def remove_quantization_state(model: PreTrainedModel) -> None:
    """Undo what ``from_pretrained`` and ``HfQuantizer.preprocess_model/postprocess_model`` attached (transformers 5.x).

    ``from_pretrained`` sets ``model.hf_quantizer``; ``preprocess_model`` sets ``model.is_quantized`` and
    ``model.quantization_method``; ``postprocess_model`` sets ``config.quantization_config`` and, on the config of every
    ``PreTrainedModel`` submodule, ``config._is_quantized`` (which some modeling code tests with ``hasattr``). All are
    removed rather than set to falsy values, so the model looks exactly like one loaded without a quantizer.
    """
    for attribute in ("hf_quantizer", "is_quantized", "quantization_method"):
        if attribute in vars(model):
            delattr(model, attribute)
    for module in model.modules():
        config = getattr(module, "config", None) if isinstance(module, PreTrainedModel) else None
        if config is None:
            continue
        configs = [config]
        if hasattr(config, "get_text_config"):
            configs.append(config.get_text_config(decoder=True))
        for cfg in configs:
            for attribute in ("quantization_config", "_is_quantized"):
                if attribute in vars(cfg):
                    delattr(cfg, attribute)


def register_under(quant_method: str, config_class: type, quantizer_class: type) -> None:
    """Register ``config_class`` and ``quantizer_class`` with transformers under ``quant_method``; a second import (or
    a reload) is a no-op, another library's class under that name raises."""
    for mapping, cls, register in (
        (AUTO_QUANTIZATION_CONFIG_MAPPING, config_class, register_quantization_config),
        (AUTO_QUANTIZER_MAPPING, quantizer_class, register_quantizer),
    ):
        existing = mapping.get(quant_method)
        if existing is None:
            register(quant_method)(cls)
        elif existing is not cls:
            if (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
                raise ValueError(
                    f"transformers already has {existing.__module__}.{existing.__qualname__} registered under "
                    f"{quant_method!r}; hf_sparse needs that name for {cls.__qualname__}"
                )
            mapping[quant_method] = cls  # the same class from a reloaded module: use the fresh one


def _register() -> None:
    """Register the config and the quantizer under ``"hf_sparse"``."""
    register_under(QUANT_METHOD, SparsityConfig, HfSparseQuantizer)


_register()


def _as_sparsity_config(value: Any) -> SparsityConfig:
    if isinstance(value, SparsityConfig):
        return value
    if isinstance(value, dict):
        return SparsityConfig.from_dict(value)
    raise ValueError(
        f"{SPARSITY_KWARG} must be a hf_sparse.SparsityConfig or a dict of its fields, got {type(value).__name__}"
    )


def _move_sparsity_kwarg(kwargs: dict[str, Any], sparsity_config: Any = None) -> dict[str, Any]:
    """Pop ``sparsity_config`` from ``kwargs`` and pass it on as ``quantization_config`` (which nothing absorbs)."""
    if SPARSITY_KWARG in kwargs:
        sparsity_config = kwargs.pop(SPARSITY_KWARG)
    if sparsity_config is None:
        return kwargs
    sparsity_config = _as_sparsity_config(sparsity_config)
    other = kwargs.get("quantization_config")
    if other is not None and other is not sparsity_config:
        quant_method = other.get("quant_method") if isinstance(other, dict) else getattr(other, "quant_method", None)
        quant_method = getattr(quant_method, "value", quant_method)  # transformers' enum -> its string
        raise ValueError(
            f"from_pretrained got sparsity_config (method={sparsity_config.method!r}, pattern="
            f"{sparsity_config.pattern!r}) and a different quantization_config ({type(other).__name__}, "
            f"quant_method={quant_method!r}); pass only one: prune on load with sparsity_config, save, then "
            "re-load the pruned model with quantization_config to quantize it"
        )
    kwargs["quantization_config"] = sparsity_config
    return kwargs


# The classmethod objects as found in each class's __dict__, so uninstalling restores exactly these.
_ORIGINALS: dict[type, classmethod] = {}


def _hook_targets() -> list[type]:
    """``PreTrainedModel`` and every ``AutoModel*`` class that holds its own ``from_pretrained``.

    ``_BaseAutoModelClass`` alone is not enough: transformers' ``auto_class_update`` gives every ``AutoModel*`` class
    its own *copy* of ``_BaseAutoModelClass.from_pretrained`` when the class is created, so each copy is wrapped.
    """
    targets, pending = [PreTrainedModel], [_BaseAutoModelClass]
    while pending:
        cls = pending.pop()
        if isinstance(cls.__dict__.get("from_pretrained"), classmethod):
            targets.append(cls)
        pending.extend(cls.__subclasses__())
    return list(dict.fromkeys(targets))


def check_loaded_record(model: Any) -> Any:
    """A structured checkpoint that plain transformers built from its rewritten config (``loading: "config"``) must
    have the blocks and shapes its record says: a ``num_hidden_layers`` raised by hand would otherwise leave randomly
    initialised blocks behind a model that evaluates as if nothing happened. Returns ``model``."""
    raw = getattr(getattr(model, "config", None), "sparsity_config", None)
    # Only a record with a structure says what shapes the model must have; any other record is data read on demand.
    if isinstance(model, PreTrainedModel) and isinstance(raw, dict) and raw.get("structure") is not None:
        check_loaded_structure(get_architecture(model), model, read_record(model).structure)
    return model


def _wrap(original: classmethod) -> classmethod:
    function = original.__func__

    @functools.wraps(function)
    def from_pretrained(cls, *args, **kwargs):
        if kwargs.get("gguf_file"):  # transformers loads GGUF through its own quantizer: prune after the load
            return from_pretrained_gguf(functools.partial(function, cls), *args, **kwargs)
        kwargs = _move_sparsity_kwarg(kwargs)
        with _explicit_config(kwargs):
            return check_loaded_record(function(cls, *args, **kwargs))

    from_pretrained._hf_sparse_hook = True
    return classmethod(from_pretrained)


def install_from_pretrained_hook() -> None:
    """Teach every ``from_pretrained`` of transformers models the ``sparsity_config=`` keyword (idempotent).

    ``import hf_sparse`` calls this. It wraps ``PreTrainedModel.from_pretrained`` and the ``from_pretrained`` of
    every ``AutoModel*`` class (they read the config with the keyword arguments before the model class sees them);
    :func:`uninstall_from_pretrained_hook` puts the originals back. Each wrapper only moves the keyword to
    ``quantization_config``; everything else goes through untouched.

    >>> install_from_pretrained_hook()
    >>> is_from_pretrained_hook_installed()
    True
    """
    for target in _hook_targets():
        original = target.__dict__["from_pretrained"]
        if target in _ORIGINALS or getattr(original.__func__, "_hf_sparse_hook", False):
            continue
        _ORIGINALS[target] = original
        setattr(target, "from_pretrained", _wrap(original))
    logger.debug("hf_sparse from_pretrained hook installed")


def uninstall_from_pretrained_hook() -> None:
    """Restore the original ``from_pretrained`` functions (idempotent).

    ``quantization_config=SparsityConfig(...)`` and :class:`AutoSparseModelForCausalLM` keep working without the hook.

    >>> uninstall_from_pretrained_hook(); is_from_pretrained_hook_installed()
    False
    >>> install_from_pretrained_hook()
    """
    for target in list(_ORIGINALS):
        setattr(target, "from_pretrained", _ORIGINALS.pop(target))
    logger.debug("hf_sparse from_pretrained hook removed")


def is_from_pretrained_hook_installed() -> bool:
    """Whether :func:`install_from_pretrained_hook` is in effect."""
    return bool(_ORIGINALS)


class AutoSparseModelForCausalLM:
    """``AutoModelForCausalLM`` with a ``sparsity_config`` argument; needs no hook.

    >>> cfg = hf_sparse.SparsityConfig(method="wanda", pattern="2:4", calibration="calibration.txt",
    ...                                num_samples=32, sequence_length=256)  # doctest: +SKIP
    >>> model = hf_sparse.AutoSparseModelForCausalLM.from_pretrained(path, sparsity_config=cfg)  # doctest: +SKIP
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args,
                        sparsity_config: SparsityConfig | dict | None = None, **kwargs) -> PreTrainedModel:
        """Load ``pretrained_model_name_or_path`` and, given a ``sparsity_config``, prune it as it loads."""
        # Call the unwrapped function: the keyword is converted here, and this must not depend on the hook.
        original = _ORIGINALS.get(AutoModelForCausalLM, AutoModelForCausalLM.__dict__["from_pretrained"]).__func__
        if kwargs.get("gguf_file"):
            return from_pretrained_gguf(functools.partial(original, AutoModelForCausalLM), pretrained_model_name_or_path,
                                        *model_args, sparsity_config=sparsity_config, **kwargs)
        kwargs = _move_sparsity_kwarg(kwargs, sparsity_config)
        with _explicit_config(kwargs):
            return original(AutoModelForCausalLM, pretrained_model_name_or_path, *model_args, **kwargs)
