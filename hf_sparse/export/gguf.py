"""GGUF export for llama.cpp (and Ollama, LM Studio, ... which read the same files).

:func:`export_gguf` writes a dense, unstructured/N:M-pruned or structurally pruned Llama-family model as one ``.gguf``
file. The GGUF architecture follows the shapes of the model's blocks, read from its modules:

* every block has one shape (dense models, unstructured and 2:4 models -- their zeros stay zeros --, uniform FLAP/PIP,
  layer removal: removed blocks are simply not there) -> the family's own architecture (``llama`` for Llama and
  Mistral, ``qwen2`` for Qwen2), with one head count, key/value head count and feed-forward width;
* the blocks differ in heads, key/value groups or MLP width -> ``deci`` (NVIDIA's Nemotron-NAS layout, which llama.cpp
  builds layer by layer): ``{arch}.attention.head_count``, ``.head_count_kv`` and ``.feed_forward_length`` are arrays
  with one value per layer;
* biases (FLAP's compensation on ``o_proj``/``down_proj``, Qwen2's q/k/v biases) go into the bias tensors the chosen
  architecture has (``llama`` and ``deci`` load optional q/k/v, output, gate, up and down biases; ``qwen2`` only q/k/v,
  so a Qwen2 model with other biases goes to ``deci``); an all-zero bias (those that make uniform FLAP's biases
  Llama config keys) is not written.

What no architecture expresses is refused with a one-line error naming it, never written wrongly: blocks that read
and write their own residual dimensions (DISP-LLM), a bias with no slot (e.g. on ``lm_head``), a parameter the layout
does not know, a rope scaling llama.cpp would apply differently, a family without a mapping. The tokenizer and chat
template are written with the ``gguf`` package's vocabulary helpers (:mod:`.gguf_vocab`); the sparsity record goes
into the metadata key :data:`RECORD_KEY` as JSON. The file is written to a temporary sibling and renamed into place.

``llama`` and ``deci`` apply rotary embeddings to interleaved pairs, transformers' Llama to the two halves of each
head: the query and key rows of every head are reordered on export (as llama.cpp's own converter does), so the
attention scores are unchanged.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..architectures import get_architecture
from ..errors import shown
from ..record import read_record
from ..saving import atomic_file
from ..surgery.apply import block_shape
from .gguf_vocab import read_vocab

logger = logging.getLogger(__name__)

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
#: model_type -> GGUF architecture for models whose blocks all have one shape
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
#: GGUF architecture for blocks of different shapes
PER_LAYER_ARCH = "deci"
#: the metadata key holding the sparsity record (JSON)
RECORD_KEY = "hf_sparse.sparsity_config"

# Block parameter (relative to a decoder block) -> GGUF tensor name (relative to blk.N)
_BLOCK_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.weight": "ffn_down.weight", "mlp.down_proj.bias": "ffn_down.bias",
}
# Bias tensors each architecture loads (llama.cpp's llama, deci and qwen2 tensor lists)
_BIAS_SLOTS = {
    "llama": {"attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias", "ffn_gate.bias", "ffn_up.bias",
              "ffn_down.bias"},
    "deci": {"attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias", "ffn_gate.bias", "ffn_up.bias",
             "ffn_down.bias"},
    "qwen2": {"attn_q.bias", "attn_k.bias", "attn_v.bias"},
}
# Architectures whose rotary embedding pairs interleaved dimensions (q/k rows reordered on export)
_INTERLEAVED_ROPE = {"llama", "deci"}


@dataclass(frozen=True)
class LayerShape:
    """One exported layer: query heads, key/value heads and feed-forward width."""

    heads: int
    kv_heads: int
    ff: int


@dataclass
class ExportPlan:
    """What :func:`export_gguf` writes for a model: the GGUF architecture, every layer's shape and the tensors (GGUF
    name -> (source parameter name, tensor)). Built by :func:`plan_export` before anything is written."""

    arch: str
    layers: list[LayerShape]
    head_dim: int
    hidden_size: int
    vocab_rows: int
    context_length: int
    rms_eps: float
    rope_theta: float
    rope_linear_factor: float | None
    tensors: dict[str, tuple[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def uniform(self) -> bool:
        return len(set(self.layers)) == 1


def _config_value(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _rope(config) -> tuple[float, float | None]:
    """(rope theta, linear scaling factor or None); other rope scalings are refused."""
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(parameters, dict) and "rope_theta" not in parameters and \
            all(isinstance(v, dict) for v in parameters.values()) and parameters:
        raise ValueError(f"per-layer-type rope parameters {sorted(parameters)} have no GGUF mapping in hf_sparse")
    kind = parameters.get("rope_type", parameters.get("type", "default")) if isinstance(parameters, dict) else "default"
    theta = float(parameters.get("rope_theta") or _config_value(config, "rope_theta", default=10000.0))
    if kind in (None, "default"):
        return theta, None
    if kind == "linear":
        return theta, float(parameters["factor"])
    raise ValueError(f"rope scaling {shown(kind)} has no GGUF mapping in hf_sparse (exported: default, linear)")


def _interleave_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from transformers' half-split rotary layout to llama.cpp's interleaved pairs: within
    a head of ``d`` rows, rows ``(0, d/2, 1, d/2+1, ...)``. Works on a weight ``(heads * d, in)`` or a bias."""
    shape = weight.shape
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def plan_export(model: nn.Module) -> ExportPlan:
    """The :class:`ExportPlan` of ``model``, or a one-line ``ValueError`` naming what GGUF cannot express.

    >>> from transformers import AutoModelForCausalLM
    >>> plan = plan_export(AutoModelForCausalLM.from_pretrained("demo/llama-7m-books-fp16"))
    >>> plan.arch, len(plan.layers), plan.layers[0]
    ('llama', 6, LayerShape(heads=8, kv_heads=4, ff=768))
    """
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {shown(model_type)} has no GGUF mapping in hf_sparse; export_gguf writes "
                         f"{sorted(FAMILIES)}")
    if model_type == "mistral" and getattr(config, "sliding_window", None) and \
            config.sliding_window < config.max_position_embeddings:
        raise ValueError(f"mistral with sliding_window={config.sliding_window} below its context "
                         f"{config.max_position_embeddings}: llama.cpp's llama architecture attends to the whole "
                         "context")
    adapter = get_architecture(model)
    blocks = adapter.blocks(model)
    prefix = adapter.block_prefix(model)
    layers = []
    for index, block in enumerate(blocks):
        shape = block_shape(adapter, block)
        if shape.residual_dims is not None:
            raise ValueError(f"block {index} reads and writes its own residual dimensions (DISP-LLM); no GGUF "
                             "architecture expresses per-block residual selections")
        layers.append(LayerShape(shape.attention_heads, shape.kv_heads, shape.mlp_channels))
    head_dim = block_shape(adapter, blocks[0]).head_dim
    hidden = int(config.hidden_size)
    uniform = len(set(layers)) == 1
    names = dict(model.named_parameters(remove_duplicate=False))
    biases = {_BLOCK_TENSORS.get(name.split(".", 3)[-1]) for name, tensor in names.items()
              if name.startswith(prefix + ".") and name.endswith(".bias") and tensor.detach().any()}
    arch = FAMILIES[model_type]
    if not uniform or not biases <= _BIAS_SLOTS[arch] or \
            (arch == "qwen2" and layers[0].heads * head_dim != hidden):
        arch = PER_LAYER_ARCH
    theta, linear = _rope(config)
    embed = model.get_input_embeddings().weight
    plan = ExportPlan(arch, layers, head_dim, hidden, embed.shape[0],
                      int(_config_value(config, "max_position_embeddings", default=2048)),
                      float(_config_value(config, "rms_norm_eps", default=1e-6)), theta, linear)
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embed
    for name, tensor in names.items():
        if name.startswith(prefix + "."):
            index, rest = name[len(prefix) + 1:].split(".", 1)
            target = _BLOCK_TENSORS.get(rest)
            if target is None:
                raise ValueError(f"parameter {shown(name)} has no place in GGUF architecture {arch!r}")
            if target.endswith(".bias") and not tensor.detach().any():
                continue  # an all-zero bias adds nothing, and llama.cpp would still spend an addition on it
            if target.endswith(".bias") and target not in _BIAS_SLOTS[arch]:
                raise ValueError(f"bias {shown(name)} has no slot in GGUF architecture {arch!r}")
            layer = layers[int(index)]
            if arch in _INTERLEAVED_ROPE and target.startswith(("attn_q.", "attn_k.")):
                tensor = _interleave_rows(tensor.detach(), layer.heads if target.startswith("attn_q") else
                                          layer.kv_heads)
            plan.tensors[f"blk.{index}.{target}"] = (name, tensor)
        elif tensor is embed:
            plan.tensors["token_embd.weight"] = (name, tensor)
        elif output is not None and tensor is output.weight:
            if not tied:
                plan.tensors["output.weight"] = (name, tensor)
        elif output is not None and tensor is getattr(output, "bias", None):
            raise ValueError(f"bias {shown(name)} has no slot in GGUF architecture {arch!r}")
        elif name.endswith("norm.weight") and name.count(".") <= 2:
            plan.tensors["output_norm.weight"] = (name, tensor)
        else:
            raise ValueError(f"parameter {shown(name)} has no place in GGUF architecture {arch!r}")
    return plan


_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def _encode(tensor: torch.Tensor, outtype: str):
    """(array, raw GGML type or None) for one tensor: 1-D tensors (norms, biases) stay float32, as llama.cpp wants;
    q8_0 needs rows that are a multiple of 32 and falls back to f16 otherwise."""
    import gguf

    tensor = tensor.detach().to(torch.float32).cpu()
    data = tensor.numpy()
    if data.ndim == 1 or outtype == "f32":
        return data, None
    half = tensor.to(torch.float16).numpy()
    if outtype == "q8_0":
        if data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        return half, None
    if outtype == "bf16":
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    return half, None


def _check_destination(path: str | os.PathLike, overwrite: bool) -> Path:
    path = Path(path).expanduser().absolute()
    if path.exists() or path.is_symlink():
        if path.is_dir():
            raise ValueError(f"output {shown(str(path))} is a folder; name a .gguf file")
        if not overwrite:
            raise ValueError(f"output {shown(str(path))} already exists; choose a new file or pass overwrite=True "
                             "(--overwrite)")
    if not path.parent.is_dir():
        raise ValueError(f"cannot write {shown(str(path))}: its folder does not exist")
    if not os.access(path.parent, os.W_OK):
        raise ValueError(f"cannot write {shown(str(path))}: its folder is not writable")
    return path


def _load(model_or_folder: Any, tokenizer: Any) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(model_or_folder, nn.Module):
        model = model_or_folder
        if tokenizer is None:
            source = Path(str(getattr(model, "name_or_path", "") or ""))
            if not (source / "tokenizer.json").is_file():
                raise ValueError("the model carries no tokenizer folder (name_or_path); pass tokenizer=")
            tokenizer = AutoTokenizer.from_pretrained(source)
        return model, tokenizer
    folder = Path(model_or_folder).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(f"input {shown(str(model_or_folder))} is not a checkpoint folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if tokenizer is None:
        if not (folder / "tokenizer.json").is_file():
            raise ValueError(f"checkpoint {shown(str(folder))} has no tokenizer.json; pass tokenizer=")
        tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer


def export_gguf(model_or_folder: nn.Module | str | os.PathLike, path: str | os.PathLike, outtype: str = "f32",
                overwrite: bool = False, tokenizer: Any = None, show_progress: bool = True) -> Path:
    """Write ``model_or_folder`` (a loaded model, or a checkpoint folder) as the GGUF file ``path`` for llama.cpp.

    ``outtype``: ``"f32"``, ``"f16"``, ``"bf16"`` or ``"q8_0"`` for the matrices (norms and biases stay float32;
    a q8_0 matrix whose rows are not a multiple of 32 is written in f16). ``tokenizer`` defaults to the one in the
    folder (or the model's ``name_or_path``). Returns the absolute path. See the module docstring for which GGUF
    architecture a model gets and what is refused.

    >>> import hf_sparse
    >>> path = hf_sparse.export_gguf("demo/llama-7m-books-fp16", "/tmp/demo-7m.gguf", outtype="f16",
    ...                              overwrite=True, show_progress=False)
    >>> path.name
    'demo-7m.gguf'
    """
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF export needs the gguf package: pip install 'hf-sparse[gguf]'") from None

    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {shown(outtype)} is not supported; use one of {list(OUTTYPES)}")
    destination = _check_destination(path, overwrite)
    model, tokenizer = _load(model_or_folder, tokenizer)
    plan = plan_export(model)
    vocab = read_vocab(tokenizer)
    vocab.pad_to(plan.vocab_rows)
    record = read_record(model)

    with atomic_file(destination) as temporary:  # a kill or an error leaves no partial file
        writer = gguf.GGUFWriter(temporary, plan.arch)
        _write_metadata(writer, plan, vocab, record, outtype, getattr(model, "name_or_path", "") or "")
        for name, (source, tensor) in tqdm(plan.tensors.items(), desc=f"gguf {outtype}", unit="tensor",
                                           disable=not show_progress):
            data, raw = _encode(tensor, outtype)
            writer.add_tensor(name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if destination.exists() and not overwrite:  # another writer was faster
            raise ValueError(f"output {shown(str(destination))} already exists; choose a new file or pass "
                             "overwrite=True")
    logger.info("wrote %s (%s, %d layers, %s)", destination, plan.arch, len(plan.layers), outtype)
    return destination


def _write_metadata(writer, plan: ExportPlan, vocab, record, outtype: str, name: str) -> None:
    import gguf

    per_layer = plan.arch == PER_LAYER_ARCH

    def one_or_all(values: list[int]):
        return values if per_layer or len(set(values)) > 1 else values[0]

    writer.add_name(Path(str(name)).name or "hf_sparse export")
    writer.add_context_length(plan.context_length)
    writer.add_embedding_length(plan.hidden_size)
    writer.add_block_count(len(plan.layers))
    writer.add_feed_forward_length(one_or_all([layer.ff for layer in plan.layers]))
    writer.add_head_count(one_or_all([layer.heads for layer in plan.layers]))
    writer.add_head_count_kv(one_or_all([layer.kv_heads for layer in plan.layers]))
    writer.add_key_length(plan.head_dim)
    writer.add_value_length(plan.head_dim)
    writer.add_rope_dimension_count(plan.head_dim)
    writer.add_rope_freq_base(plan.rope_theta)
    if plan.rope_linear_factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(plan.rope_linear_factor)
    writer.add_layer_norm_rms_eps(plan.rms_eps)
    writer.add_vocab_size(plan.vocab_rows)
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[outtype]))
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.add_to(writer)
    if record is not None:
        writer.add_string(RECORD_KEY, json.dumps(record.to_dict(), sort_keys=True))


__all__ = ["FAMILIES", "OUTTYPES", "PER_LAYER_ARCH", "RECORD_KEY", "ExportPlan", "LayerShape", "export_gguf",
           "plan_export"]
