"""Where each model family keeps its decoder blocks, in what order a block's linear operators run, and which of
their rows and columns belong together.

The engine needs two facts about an architecture: the list of decoder blocks, and the *operator groups* of a block
in execution order (operators in one group read the same input, e.g. q/k/v). Structured pruning also needs the
*coupled structures*: which rows of q/k/v and columns of o form one attention head and how query heads group under a
key/value head (:class:`AttentionHeads`), which rows of gate/up and columns of down form one MLP channel
(:class:`MLPChannels`), and which config keys describe them. A new family is one :class:`ArchitectureAdapter` passed to
:func:`register_architecture`; a structure it cannot support is named in ``unsupported`` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


#: Structures a structured method can remove (see :meth:`ArchitectureAdapter.structure`).
STRUCTURES = ("attention_heads", "mlp_channels", "blocks", "residual_dims")


@dataclass(frozen=True)
class AttentionHeads:
    """The rows and columns that make up one attention head, relative to a decoder block.

    ``layout`` says how the projections hold the heads:

    * ``"separate"``: ``query``/``key``/``value`` are three linears; query head ``h`` is rows ``h*d:(h+1)*d`` of
      ``query``, key/value head ``g`` rows ``g*d:(g+1)*d`` of ``key``/``value``; query heads ``g*r:(g+1)*r`` (``r`` =
      heads per key/value head) share key/value head ``g`` (grouped-query attention);
    * ``"fused_per_head"``: one linear ``query`` whose rows hold, per head, ``[q_h; k_h; v_h]`` (GPT-NeoX
      ``query_key_value``; multi-head attention only).

    In every layout the columns ``h*d:(h+1)*d`` of ``output`` read head ``h``. ``group_attribute`` /
    ``heads_attribute`` are attributes of the attention module that hold the number of query heads per key/value head
    / the number of heads and must follow the new shape. ``head_dim_key`` is the config key that fixes ``head_dim``
    independently of ``hidden_size``; ``None`` when the model derives ``head_dim = hidden_size // heads``, so a model
    with fewer heads cannot be described by its config alone.
    """

    attention: str  # the attention module, e.g. "self_attn"
    query: str  # the query projection, or the fused q/k/v projection
    output: str
    key: str | None = None
    value: str | None = None
    layout: str = "separate"
    head_dim_attribute: str = "head_dim"  # attribute of the attention module
    group_attribute: str | None = "num_key_value_groups"
    heads_attribute: str | None = None
    heads_key: str = "num_attention_heads"
    kv_heads_key: str | None = "num_key_value_heads"  # None: multi-head attention only
    head_dim_key: str | None = "head_dim"

    def __post_init__(self):
        if self.layout not in ("separate", "fused_per_head"):
            raise ValueError(f"AttentionHeads.layout must be 'separate' or 'fused_per_head', got {self.layout!r}")
        if self.layout == "separate" and (self.key is None or self.value is None):
            raise ValueError("AttentionHeads with layout 'separate' needs key and value projections")


@dataclass(frozen=True)
class MLPChannels:
    """The rows and columns that make up one MLP channel, relative to a decoder block.

    Channel ``c`` is row ``c`` of every linear in ``inputs`` (gate and up, or fc1) and column ``c`` of ``output``.
    With ``fused_halves`` the single input linear holds ``[gate; up]`` (Phi-3 ``gate_up_proj``): channel ``c`` is rows
    ``c`` and ``intermediate + c``. ``width_key`` is the config key of the intermediate width.
    """

    inputs: tuple[str, ...]
    output: str
    fused_halves: bool = False
    width_key: str = "intermediate_size"


@dataclass(frozen=True)
class ResidualDims:
    """Where a sequential pre-norm block reads and writes the residual stream, for per-block residual dimensions.

    The block must compute ``h = h + attention(attention_norm(h))`` then ``h = h + mlp(mlp_norm(h))``, with nothing
    between a sub-block's output and the residual add (no post-norm): then the attention block can read a subset of the
    normed dimensions (``attention_norm``'s output is index-selected; q/k/v keep those input columns) and write a subset
    (``attention``'s output is scattered back to full width; the output projection keeps those rows), and likewise the
    MLP. The readers and writers are the linears of :class:`AttentionHeads` and :class:`MLPChannels`.
    """

    attention_norm: str = "input_layernorm"
    attention: str = "self_attn"
    mlp_norm: str = "post_attention_layernorm"
    mlp: str = "mlp"


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Layout of one model family.

    ``blocks_path`` is the dotted attribute path from the ``*ForCausalLM`` model to the ``nn.ModuleList`` of decoder
    blocks; ``operator_groups`` lists, in execution order, groups of linear-module names relative to a block.
    ``attention_heads`` and ``mlp_channels`` declare the coupled structures structured pruning removes, ``residual_dims``
    where a block reads and writes the residual stream (for per-block residual dimensions); ``unsupported``
    maps a structure name (one of :data:`STRUCTURES`) to the reason this family cannot have it removed.
    """

    model_types: tuple[str, ...]
    blocks_path: tuple[str, ...]  # alternatives, first match wins (e.g. bare model vs. *ForCausalLM)
    operator_groups: tuple[tuple[str, ...], ...]
    notes: str = field(default="", compare=False)
    attention_heads: AttentionHeads | None = None
    mlp_channels: MLPChannels | None = None
    residual_dims: ResidualDims | None = None
    unsupported: dict[str, str] = field(default_factory=dict, compare=False)
    #: config keys holding one entry per decoder block (shortened when blocks are removed)
    per_layer_keys: tuple[str, ...] = ("layer_types",)
    blocks_key: str = "num_hidden_layers"

    def structure(self, name: str, model_type: str | None = None):
        """The declaration of structure ``name`` (``AttentionHeads``, ``MLPChannels``, ``ResidualDims``, or ``True`` for
        ``"blocks"``).

        Raises ``ValueError`` naming the architecture and the structure when this family cannot have it removed.

        >>> get_architecture_for("llama").structure("mlp_channels").output
        'mlp.down_proj'
        """
        if name not in STRUCTURES:
            raise ValueError(f"unknown structure {name!r}; structures are {list(STRUCTURES)}")
        family = model_type or "/".join(self.model_types)
        declared = {"attention_heads": self.attention_heads, "mlp_channels": self.mlp_channels, "blocks": True,
                    "residual_dims": self.residual_dims}[name]
        if name in self.unsupported or declared is None:
            reason = self.unsupported.get(name, "the adapter does not declare it")
            raise ValueError(f"architecture {family!r} does not support structured pruning of {name}: {reason}")
        return declared

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


_LLAMA_HEADS = AttentionHeads(attention="self_attn", query="self_attn.q_proj", key="self_attn.k_proj",
                              value="self_attn.v_proj", output="self_attn.o_proj")
_LLAMA_MLP = MLPChannels(inputs=("mlp.gate_proj", "mlp.up_proj"), output="mlp.down_proj")

_POST_NORMS = ("its blocks normalise the attention and MLP outputs over the full width before the residual add "
               "(post-norms), so a block cannot write only some residual dimensions")

register_architecture(ArchitectureAdapter(
    model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "olmo", "granite"),
    blocks_path=("model.layers", "layers"),
    operator_groups=_LLAMA_GROUPS,
    attention_heads=_LLAMA_HEADS,
    mlp_channels=_LLAMA_MLP,
    residual_dims=ResidualDims(),
))
register_architecture(ArchitectureAdapter(
    model_types=("gemma2",),
    blocks_path=("model.layers", "layers"),
    operator_groups=_LLAMA_GROUPS,
    attention_heads=_LLAMA_HEADS,
    mlp_channels=_LLAMA_MLP,
    unsupported={"residual_dims": _POST_NORMS},
))
register_architecture(ArchitectureAdapter(
    model_types=("olmo2",),
    blocks_path=("model.layers", "layers"),
    operator_groups=_LLAMA_GROUPS,
    mlp_channels=_LLAMA_MLP,
    unsupported={"attention_heads": "q_norm/k_norm normalise over all heads together, so removing a head changes "
                                    "the others' outputs", "residual_dims": _POST_NORMS},
))
register_architecture(ArchitectureAdapter(
    model_types=("gemma3_text",),
    blocks_path=("model.layers", "layers"),
    operator_groups=_LLAMA_GROUPS,
    # q_norm/k_norm normalise each head over head_dim (unlike OLMo2's), so heads can be removed.
    attention_heads=_LLAMA_HEADS,
    mlp_channels=_LLAMA_MLP,
    unsupported={"residual_dims": _POST_NORMS},
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
    attention_heads=AttentionHeads(
        attention="self_attn", query="self_attn.q_proj", key="self_attn.k_proj", value="self_attn.v_proj",
        output="self_attn.out_proj", group_attribute=None, heads_attribute="num_heads", kv_heads_key=None,
        head_dim_key=None,
    ),
    mlp_channels=MLPChannels(inputs=("fc1",), output="fc2", width_key="ffn_dim"),
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
    unsupported={"residual_dims": "parallel residual: attention and MLP read one shared norm's output, so they "
                                  "cannot read different residual dimensions"},
    attention_heads=AttentionHeads(
        attention="attention", query="attention.query_key_value", output="attention.dense", layout="fused_per_head",
        head_dim_attribute="head_size", group_attribute=None, kv_heads_key=None, head_dim_key=None,
    ),
    mlp_channels=MLPChannels(inputs=("mlp.dense_h_to_4h",), output="mlp.dense_4h_to_h"),
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
    attention_heads=AttentionHeads(attention="self_attn", query="self_attn.q_proj", key="self_attn.k_proj",
                                   value="self_attn.v_proj", output="self_attn.dense"),
    mlp_channels=MLPChannels(inputs=("mlp.fc1",), output="mlp.fc2"),
    unsupported={"residual_dims": "parallel residual: attention and MLP read one shared norm's output, so they "
                                  "cannot read different residual dimensions"},
))
register_architecture(ArchitectureAdapter(
    model_types=("phi3",),
    blocks_path=("model.layers", "layers"),
    operator_groups=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    mlp_channels=MLPChannels(inputs=("mlp.gate_up_proj",), output="mlp.down_proj", fused_halves=True),
    unsupported={"attention_heads": "its attention splits qkv_proj at config.num_attention_heads, a value shared by "
                                    "every block, so blocks cannot have their own head counts"},
))


def get_architecture_for(model_type: str) -> ArchitectureAdapter:
    """The adapter registered for ``model_type``; a clear error if there is none."""
    if model_type not in ARCHITECTURES:
        raise ValueError(f"hf_sparse does not know the layout of model_type {model_type!r}; supported: "
                         f"{sorted(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


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
