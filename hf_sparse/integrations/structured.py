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

from safetensors import safe_open

from ..architectures import get_architecture
from ..errors import shown
from ..record import read_record
from ..surgery import STRUCTURED_QUANT_METHOD, check_loaded_structure, mark_for_loading, shrink_to_structure
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


def check_block_tensors(model: PreTrainedModel, files: list) -> None:
    """Before any weight is read: every tensor of the decoder blocks of the shaped skeleton ``model`` is in the
    checkpoint ``files`` with the same shape (read from the safetensors headers only), and the checkpoint stores no
    block tensor the skeleton lacks. Otherwise a record edited to say other shapes, or a config edited to build more
    blocks than were saved, would load random or mismatched weights; the error names the first tensor."""
    adapter = get_architecture(model)
    blocks = adapter.blocks(model)
    path = next(name for name, module in model.named_modules() if module is blocks)
    prefixes = [f"{path}."]
    base = getattr(model, "base_model_prefix", "")
    if base and not path.startswith(f"{base}."):
        prefixes.append(f"{base}.{path}.")
    stored: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as reader:
            for key in reader.keys():
                stored[key] = tuple(reader.get_slice(key).get_shape())
    block_keys = {key for key in stored if any(key.startswith(p) for p in prefixes)}
    expected = {}
    for name, tensor in model.state_dict().items():
        if name.startswith(prefixes[0]):
            key = next((p + name[len(prefixes[0]):] for p in prefixes if p + name[len(prefixes[0]):] in stored), name)
            expected[key] = tuple(tensor.shape)
    for key, shape in expected.items():
        if key not in stored:
            raise ValueError(f"the checkpoint has no {shown(key)}, which its sparsity_config.structure needs (config "
                             "and record describe more than was saved); the checkpoint was edited")
        if stored[key] != shape:
            raise ValueError(f"{shown(key)} is stored with shape {stored[key]} but sparsity_config.structure gives "
                             f"{shape}; the record does not describe these weights")
    extra = sorted(block_keys - set(expected))
    if extra:
        raise ValueError(f"the checkpoint stores {shown(extra[0])} ({len(extra)} such tensors), which the blocks "
                         "described by config.json and sparsity_config.structure do not have; the checkpoint was edited")


class StructuredShapeLoader(HfSparseQuantizer):
    """Builds the smaller modules of a structured checkpoint before its weights are loaded; prunes nothing."""

    def validate_environment(self, *args, **kwargs) -> None:
        if not self.pre_quantized:
            raise ValueError(f"quantization_config.quant_method={STRUCTURED_QUANT_METHOD!r} only marks checkpoints "
                             "saved by hf_sparse; to prune, pass sparsity_config=SparsityConfig(...)")

    def _process_model_before_weight_loading(self, model: PreTrainedModel, checkpoint_files=None,
                                             **kwargs) -> PreTrainedModel:
        if not shape_for_record(model):
            raise ValueError(f"config.json has quantization_config.quant_method={STRUCTURED_QUANT_METHOD!r} but no "
                             "sparsity_config.structure to take the block shapes from")
        files = [f for f in checkpoint_files or () if str(f).endswith(".safetensors")]
        if files:
            check_block_tensors(model, files)
        return model

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs) -> PreTrainedModel:
        # A plain model for PEFT, Trainer and generate, keeping only the marker so save_pretrained writes it again.
        remove_quantization_state(model)
        structure = read_record(model).structure
        check_loaded_structure(get_architecture(model), model, structure)
        mark_for_loading(model, structure)
        return model


register_under(STRUCTURED_QUANT_METHOD, StructuredShapeConfig, StructuredShapeLoader)
