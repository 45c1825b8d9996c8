"""Loading structurally pruned checkpoints whose blocks differ in shape: a transformers quantizer that only shapes.

A checkpoint whose blocks all have one shape needs nothing: its config's own keys were rewritten and plain
transformers builds it. One whose blocks differ (FLAP, or biases the config cannot express) carries
``quantization_config = {"quant_method": "hf_sparse_structured"}`` in ``config.json``. With hf_sparse imported, that
quant_method is registered here: transformers builds the model as an empty (meta-device) skeleton from the config,
:meth:`StructuredShapeLoader._process_model_before_weight_loading` shrinks it to the shapes in
``config.sparsity_config["structure"]`` (:func:`hf_sparse.surgery.shrink_to_structure`), and only then are the weights
read, with any ``dtype`` and ``device_map``: the dense model is never built. Blocks with their own residual
dimensions (DISP-LLM) get placeholder index buffers of the recorded sizes, filled from the checkpoint like weights. Without hf_sparse, transformers does not
know the quant_method, says so naming it, and the smaller weights do not fit the dense modules, so loading fails
instead of producing wrong weights.

>>> import hf_sparse  # doctest: +SKIP
>>> model = AutoModelForCausalLM.from_pretrained("flap-30")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedModel
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..architectures import get_architecture
from ..record import read_record
from ..surgery import STRUCTURED_QUANT_METHOD, mark_for_loading, shrink_to_structure
from .transformers import HfSparseQuantizer, register_under, remove_quantization_state

logger = logging.getLogger(__name__)


@dataclass
class StructuredShapeConfig(QuantizationConfigMixin):
    """The ``quantization_config`` marker of a checkpoint whose block shapes only hf_sparse can build."""

    quant_method: str = field(default=STRUCTURED_QUANT_METHOD)

    def __post_init__(self):
        self.quant_method = STRUCTURED_QUANT_METHOD

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": STRUCTURED_QUANT_METHOD}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        config = cls()
        return (config, kwargs) if return_unused_kwargs else config


def shape_for_record(model: PreTrainedModel) -> bool:
    """Shrink an empty model built from a structured checkpoint's config to its recorded shapes; ``False`` when the
    config records no structure (nothing to do)."""
    record = read_record(model.config)
    if record is None or record.structure is None:
        return False
    shrink_to_structure(get_architecture(model), model, record.structure)
    return True


class StructuredShapeLoader(HfSparseQuantizer):
    """Builds the smaller modules of a structured checkpoint before its weights are loaded; prunes nothing."""

    def validate_environment(self, *args, **kwargs) -> None:
        if not self.pre_quantized:
            raise ValueError(f"quantization_config.quant_method={STRUCTURED_QUANT_METHOD!r} only marks checkpoints "
                             "saved by hf_sparse; to prune, pass sparsity_config=SparsityConfig(...)")

    def _process_model_before_weight_loading(self, model: PreTrainedModel, **kwargs) -> PreTrainedModel:
        if not shape_for_record(model):
            raise ValueError(f"config.json has quantization_config.quant_method={STRUCTURED_QUANT_METHOD!r} but no "
                             "sparsity_config.structure to take the block shapes from")
        return model

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs) -> PreTrainedModel:
        # A plain model for PEFT, Trainer and generate, keeping only the marker so save_pretrained writes it again.
        remove_quantization_state(model)
        mark_for_loading(model, read_record(model).structure)
        return model


register_under(STRUCTURED_QUANT_METHOD, StructuredShapeConfig, StructuredShapeLoader)
