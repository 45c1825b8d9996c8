"""Where each model family keeps its decoder blocks and in what order a block's linear operators run.

The engine needs exactly two facts about an architecture: the list of decoder blocks, and the *operator groups*
of a block in execution order (operators in one group read the same input, e.g. q/k/v). A new family is one
:class:`ArchitectureAdapter` passed to :func:`register_architecture`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Layout of one model family.

    ``blocks_path`` is the dotted attribute path from the ``*ForCausalLM`` model to the ``nn.ModuleList`` of decoder
    blocks; ``operator_groups`` lists, in execution order, groups of linear-module names relative to a block.
    """

    model_types: tuple[str, ...]
    blocks_path: tuple[str, ...]  # alternatives, first match wins (e.g. bare model vs. *ForCausalLM)
    operator_groups: tuple[tuple[str, ...], ...]
    notes: str = field(default="", compare=False)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        for path in self.blocks_path:
            module = model
            try:
                for part in path.split("."):
                    module = getattr(module, part)
            except AttributeError:
                continue
            if isinstance(module, nn.ModuleList):
                return module
        raise ValueError(
            f"could not find the decoder blocks of {type(model).__name__} at any of {list(self.blocks_path)}"
        )

    def block_prefix(self, model: nn.Module) -> str:
        """Dotted module name of the block list inside ``model`` (for building full module names)."""
        blocks = self.blocks(model)
        for name, module in model.named_modules():
            if module is blocks:
                return name
        raise ValueError("decoder block list is not a submodule of the model")


_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

ARCHITECTURES: dict[str, ArchitectureAdapter] = {}


def register_architecture(adapter: ArchitectureAdapter) -> ArchitectureAdapter:
    """Make ``adapter`` the layout for each of its ``model_types`` (a ``config.model_type`` value)."""
    for model_type in adapter.model_types:
        ARCHITECTURES[model_type] = adapter
    return adapter


register_architecture(ArchitectureAdapter(
    model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "granite"),
    blocks_path=("model.layers", "layers"),
    operator_groups=_LLAMA_GROUPS,
))
register_architecture(ArchitectureAdapter(
    model_types=("gemma3_text",),
    blocks_path=("model.layers", "layers"),
    operator_groups=_LLAMA_GROUPS,
    notes="Llama's operators; q_norm/k_norm are RMSNorms, not linears. Sliding-window and full-attention layers "
          "get their own masks and rotary bases, which the engine captures per block (config.layer_types).",
))
register_architecture(ArchitectureAdapter(
    model_types=("opt",),
    blocks_path=("model.decoder.layers", "decoder.layers"),
    operator_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    ),
))
register_architecture(ArchitectureAdapter(
    model_types=("gpt_neox",),
    blocks_path=("gpt_neox.layers", "layers"),
    operator_groups=(
        ("attention.query_key_value",),
        ("attention.dense",),
        ("mlp.dense_h_to_4h",),
        ("mlp.dense_4h_to_h",),
    ),
    notes="Parallel residual: the MLP reads the block input, so its group does not depend on attention's.",
))
register_architecture(ArchitectureAdapter(
    model_types=("phi",),
    blocks_path=("model.layers", "layers"),
    operator_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.dense",),
        ("mlp.fc1",),
        ("mlp.fc2",),
    ),
))
register_architecture(ArchitectureAdapter(
    model_types=("phi3",),
    blocks_path=("model.layers", "layers"),
    operator_groups=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
))


def get_architecture(model: nn.Module) -> ArchitectureAdapter:
    """The adapter for ``model`` (looked up by ``model.config.model_type``); a clear error if there is none."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else None
    for candidate in (model_type, getattr(text_config, "model_type", None)):
        if candidate in ARCHITECTURES:
            return ARCHITECTURES[candidate]
    raise ValueError(
        f"hf_sparse does not know the layout of model_type {model_type!r} ({type(model).__name__}). Supported: "
        f"{sorted(ARCHITECTURES)}. To add it, register an adapter: hf_sparse.architectures.register_architecture("
        "ArchitectureAdapter(model_types=(...,), blocks_path=('model.layers',), operator_groups=((...),)))"
    )
