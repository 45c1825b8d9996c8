"""DISP-LLM (Gao et al., NeurIPS 2024): dimension-independent structural pruning with a learned hypernetwork.

Ordinary structured pruning removes the same residual-stream (embedding) dimensions in every block, because the
residual couples them. DISP-LLM lets every block read and write its own subset instead: per block, five selections -
the residual dimensions the attention block reads (after its full-width norm) and writes, the ones the MLP reads and
writes, and the MLP's intermediate channels (attention heads keep their width, as in the authors' code). The surgery
(:mod:`hf_sparse.surgery.residual`) folds them into q/k/v columns, o_proj rows, gate/up columns and rows, down_proj
columns and rows, leaving one ``index_select`` per sub-block input and one ``index_add`` per output at run time.

The selections are learned, the LLM stays frozen:

1. **Hypernetwork** (:class:`SelectionNetwork`): fixed random inputs, one 32-vector per selection (5 per block, in
   block order), a bidirectional GRU (32 -> 64 per direction), LayerNorm, GELU and one linear head per selection
   giving a logit per dimension / channel.
   By default (``init="importance"``) every logit also carries a fixed starting value from one dense calibration
   pass (:func:`importance_prior`): the dimensions' Wanda-like output energies, standardised per selection and
   thresholded at the target, so training starts from a good mask at the target share and refines it; the paper
   starts from the hypernetwork alone (``init="random"``).
2. **Masks**: Gumbel-sigmoid ``sigmoid((logit + gumbel + offset) / temperature)`` (temperature 0.4, offset 3.0, so
   a random start keeps almost everything), rounded to 0/1 with a straight-through gradient; a selection that
   would keep nothing keeps its highest-scoring dimension. The frozen model runs with these masks
   (:func:`~hf_sparse.surgery.masked_residual`: exactly the pruned model), so the loss is the pruned model's.
3. **Loss**: a language-modelling term on calibration windows + λ·|log(P(m) / P_target)|, with P(m) the
   decoder-block parameters the hard masks keep (:func:`kept_parameters`, differentiable through the
   straight-through masks). AdamW on the hypernetwork only. The language-modelling term (:func:`fit_loss`) is by
   default KL(dense || masked) of the next-token distributions, the frozen dense model's own predictions on the same
   windows as targets; the paper's cross-entropy on the calibration tokens is ``loss="ce"``. On the 7M test model
   the KL reached a lower held-out perplexity at every sparsity measured (README), at one extra forward per step.
4. **Final masks**: the noise-free scores ``logit + offset`` of the trained network, thresholded at the one global
   value whose kept parameters come closest to the target (every selection keeps at least its best dimension): the
   achieved share is within one dimension's parameters of the target, and the record states it exactly.
   Then, by default (``bias_compensation=True``; off is the paper), FLAP's bias compensation: the linears that lose
   input columns get the cut inputs' dense mean contribution as a bias (:func:`compensation_biases`); training ran
   on that compensated model (the cut inputs filled with their dense means).
5. **Per-block targets** (a non-uniform ``sparsity_profile``, OWL or explicit): block ``i`` is to keep
   ``(1 - t_i)`` of its own parameters. The penalty becomes the mean over blocks of λ·|log(P_i(m) / P_i,target)|, and
   the final masks take one threshold per block, closest to that block's budget (within one dimension's parameters
   of it); the network still learns which dimensions each block keeps.

Deterministic for a seed (the pruning seed initialises the network and draws the noise and the windows). Cost:
``steps`` forward and backward passes of the masked frozen model on ``windows_per_step`` calibration windows (no
weight gradients), plus one forward pass of the dense model with ``loss="kl"``; the hypernetwork itself is
negligible.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..surgery import BlockEdit, MLPEdit, ResidualEdit, StructuredEdits, masked_residual
from ..surgery.apply import _submodule
from .base import MethodOptions, PaperReference, register_method
from .structured import StructuredPruningMethod

if TYPE_CHECKING:
    from ..engine.structured import InputMoments, StructuredSession

logger = logging.getLogger(__name__)

#: the five selections of one block, in execution order (the hypernetwork's sequence order within a block)
SELECTIONS = ("attention_input", "attention_output", "mlp_input", "mlp_channels", "mlp_output")
#: what the masked model fits during training (``DISPOptions.loss``)
LOSSES = ("kl", "ce")
#: where the selection logits start (``DISPOptions.init``)
INITS = ("importance", "random")


@dataclass
class DISPOptions(MethodOptions):
    steps: int = field(default=200, metadata={
        "help": "Hypernetwork training steps (the paper: 10,000 steps of 2048 tokens on GPUs).", "range": ">= 1"})
    lam: float = field(default=1.0, metadata={
        "help": "λ, the weight of the parameter penalty |log(kept / target)| (the paper: 6; the authors' script 16). "
                "The final threshold lands on the target whatever λ; a smaller λ only lets the share wander a little "
                "during training and leaves the language-modelling term more say (1: lower perplexity than 2, 6 or 16 "
                "on the 7M test model).", "range": "> 0"})
    lr: float = field(default=3e-3, metadata={"help": "AdamW learning rate of the hypernetwork.", "range": "> 0"})
    temperature: float = field(default=0.4, metadata={
        "help": "Gumbel-sigmoid temperature.", "range": "> 0"})
    offset: float = field(default=3.0, metadata={
        "help": "Added to every logit before the Gumbel-sigmoid: a positive offset starts from keeping (almost) "
                "everything.", "range": ">= 0"})
    windows_per_step: int = field(default=4, metadata={
        "help": "Calibration windows per step (tokens per step = this x sequence_length).", "range": ">= 1"})
    loss: str = field(default="kl", metadata={
        "help": "What the masked model is trained to fit: 'kl' (the default), KL(dense || masked) of the next-token "
                "distributions, the frozen dense model run on the same windows without gradients; 'ce' (the paper), "
                "cross-entropy on the calibration tokens. 'kl' costs one extra forward pass per step.",
        "choices": LOSSES})
    init: str = field(default="importance", metadata={
        "help": "Where the selections start: 'importance' (the default), every logit offset by a calibration "
                "importance score of its dimension (one dense pass), so the first masks already keep the most "
                "important dimensions at the target share and training refines them; 'random' (the paper), the "
                "hypernetwork alone, starting from keeping almost everything.", "choices": INITS})
    bias_compensation: bool = field(default=True, metadata={
        "help": "FLAP's bias compensation for the cut input columns: q/k/v, gate/up and down_proj get the removed "
                "inputs' mean contribution on the dense model as a bias (written dimensions get none). Training "
                "then runs the compensated model: cut inputs take their dense mean instead of 0."})


# ---------------------------------------------------------------------------------------------------------------
# Parameter count as a function of the five selections


@dataclass(frozen=True)
class BlockCosts:
    """What one block's kept parameters are as a function of its selection sizes (s1..s5 in :data:`SELECTIONS`
    order): ``fixed + attention_rows·s1 + attention_width·s2 + s4·(readers·s3 + reader_biases) + s5·(s4 +
    writer_bias)``. ``attention_rows`` = output features of q+k+v (weights per read dimension), ``attention_width``
    = o_proj's inputs (+1 with a bias), ``readers`` = the MLP's input linears (gate, up), ``reader_biases`` = how many
    of them have a bias, ``writer_bias`` = 1 when down_proj has one; ``fixed`` is everything else (norms, q/k/v
    biases)."""

    fixed: int
    attention_rows: int
    attention_width: int
    readers: int
    reader_biases: int
    writer_bias: int
    hidden_size: int
    channels: int

    def parameters(self, s1, s2, s3, s4, s5):
        """Kept parameters for selection sizes ``s1..s5`` (ints or 0-d tensors; differentiable in tensors).

        >>> BlockCosts(10, 3, 2, 2, 0, 0, 4, 5).parameters(4, 4, 4, 5, 4)  # the dense block: 10+12+8+40+20
        90
        """
        return (self.fixed + self.attention_rows * s1 + self.attention_width * s2
                + s4 * (self.readers * s3 + self.reader_biases) + s5 * (s4 + self.writer_bias))


def block_costs(session: StructuredSession, index: int) -> BlockCosts:
    """:class:`BlockCosts` of dense block ``index``, read from its linears (fixed = block total minus the rest)."""
    heads, mlp = session.require("attention_heads"), session.require("mlp_channels")
    block = session.blocks[index]
    q, k, v, o = (_submodule(block, n) for n in (heads.query, heads.key, heads.value, heads.output))
    readers = [_submodule(block, n) for n in mlp.inputs]
    down = _submodule(block, mlp.output)
    hidden, channels = q.in_features, down.in_features
    costs = BlockCosts(0, q.out_features + k.out_features + v.out_features, o.in_features + (o.bias is not None),
                       len(readers), sum(r.bias is not None for r in readers), int(down.bias is not None), hidden,
                       channels)
    total = sum(p.numel() for p in block.parameters())
    variable = costs.parameters(hidden, hidden, hidden, channels, hidden)
    return BlockCosts(total - variable, *(getattr(costs, f) for f in (
        "attention_rows", "attention_width", "readers", "reader_biases", "writer_bias", "hidden_size", "channels")))


def kept_per_block(costs: list[BlockCosts], masks: list[torch.Tensor]) -> list:
    """Parameters each block keeps under ``masks`` (five per block, :data:`SELECTIONS` order); differentiable."""
    return [block.parameters(*[m.sum() for m in masks[5 * index: 5 * index + 5]]) for index, block in enumerate(costs)]


def kept_parameters(costs: list[BlockCosts], masks: list[torch.Tensor]):
    """Decoder-block parameters kept by ``masks`` (five per block, :data:`SELECTIONS` order); differentiable."""
    total = 0
    for kept in kept_per_block(costs, masks):
        total = total + kept
    return total


def parameter_penalty(kept, target, lam: float) -> torch.Tensor:
    """λ·|log(kept / target)|: zero on target, symmetric in the ratio; the mean over the entries when ``kept`` and
    ``target`` are per-block tensors (per-block targets: each block's budget weighs the same).

    >>> round(parameter_penalty(torch.tensor(200.0), 100.0, 6.0).item(), 4)  # 6·log 2
    4.1589
    >>> round(parameter_penalty(torch.tensor([200.0, 100.0]), torch.tensor([100.0, 100.0]), 6.0).item(), 4)
    2.0794
    """
    return (lam * torch.log(kept / target).abs()).mean()


def fit_loss(model: nn.Module, batch: torch.Tensor, logits: torch.Tensor, loss: str) -> torch.Tensor:
    """The language-modelling term of the training loss for the masked model's ``logits`` ``(windows, seq - 1,
    vocab)`` on ``batch`` ``(windows, seq)``: ``"ce"``, the cross-entropy on the next tokens (the paper), or ``"kl"``,
    the mean over positions of KL(dense || masked), with ``model`` run unmasked on ``batch`` without gradients (call
    it outside :func:`~hf_sparse.surgery.masked_residual`).

    >>> fit_loss(model, batch, model(batch).logits[:, :-1], "kl")  # doctest: +SKIP
    tensor(0.)
    """
    targets = batch[:, 1:].reshape(-1)
    if loss == "ce":
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets)
    with torch.no_grad():
        dense = F.log_softmax(model(input_ids=batch, use_cache=False).logits[:, :-1].float(), dim=-1)
    return (dense.exp() * (dense - F.log_softmax(logits, dim=-1))).sum(-1).mean()


# ---------------------------------------------------------------------------------------------------------------
# The hypernetwork


def straight_through_mask(scores: torch.Tensor) -> torch.Tensor:
    """The 0/1 mask ``scores > 0`` (the best entry kept when none is) in the forward pass, with the gradient of
    ``sigmoid(scores)`` in the backward pass (straight-through).

    >>> straight_through_mask(torch.tensor([-2.0, -1.0])).tolist()
    [0.0, 1.0]
    """
    soft = torch.sigmoid(scores)
    hard = (scores > 0).to(soft.dtype)
    if not bool(hard.any()):
        hard = hard.clone()
        hard[scores.argmax()] = 1.0
    return hard + soft - soft.detach()


class SelectionNetwork(nn.Module):
    """DISP-LLM's hypernetwork: one logit per dimension of each selection, from fixed random inputs through a
    bidirectional GRU. ``widths`` lists the selections' sizes in order (five per block).

    >>> net = SelectionNetwork([8, 8, 8, 16, 8])
    >>> [t.shape[0] for t in net()]
    [8, 8, 8, 16, 8]
    """

    def __init__(self, widths: list[int], input_size: int = 32, hidden_size: int = 64,
                 prior: list[torch.Tensor] | None = None):
        super().__init__()
        # Fixed inputs: a buffer, not a parameter (the paper's are frozen too), so the optimizer never sees them.
        self.register_buffer("inputs", torch.randn(len(widths), 1, input_size))  # (selections, batch 1, input)
        self.gru = nn.GRU(input_size, hidden_size, bidirectional=True)
        self.norm = nn.LayerNorm(2 * hidden_size)
        self.heads = nn.ModuleList(nn.Linear(2 * hidden_size, width, bias=False) for width in widths)
        self.widths = list(widths)
        # A fixed per-dimension starting point added to the heads' logits (the importance start); the network
        # learns the change from it.
        if prior is not None and [p.numel() for p in prior] != self.widths:
            raise ValueError(f"prior widths {[p.numel() for p in prior]} differ from the selections' {self.widths}")
        self.register_buffer("prior", torch.cat([p.reshape(-1).float() for p in prior]) if prior is not None
                             else torch.zeros(sum(self.widths)))

    def forward(self) -> list[torch.Tensor]:
        states, _ = self.gru(self.inputs)  # (selections, 1, 2 * hidden)
        features = F.gelu(self.norm(states[:, 0]))
        priors = self.prior.split(self.widths)
        return [head(features[i]) + priors[i] for i, head in enumerate(self.heads)]


def sample_masks(logits: list[torch.Tensor], temperature: float, offset: float,
                 generator: torch.Generator) -> list[torch.Tensor]:
    """Straight-through hard masks from a Gumbel-sigmoid sample of every selection."""
    masks = []
    for logit in logits:
        uniform = torch.rand(logit.shape, generator=generator).to(logit.device)
        gumbel = -torch.log(-torch.log(uniform + 1e-20) + 1e-20)
        masks.append(straight_through_mask((logit + gumbel + offset) / temperature))
    return masks


def closest_threshold(scores: list[torch.Tensor], costs: list[BlockCosts], target: float) -> float:
    """The one global threshold on ``scores`` whose masks (entries at or above it, plus each selection's best
    entry) keep the number of parameters closest to ``target``.

    >>> c = [BlockCosts(0, 1, 1, 1, 0, 0, 2, 2)]  # params = s1 + s2 + s3·s4 + s4·s5
    >>> s = [torch.tensor([1.0, 5.0])] * 3 + [torch.tensor([2.0, 3.0]), torch.tensor([4.0, 0.5])]
    >>> closest_threshold(s, c, 7)  # 6 kept at threshold 2 is closer to 7 than 10 at 1
    2.0
    """

    def count(threshold: float) -> float:
        return float(kept_parameters(costs, _masks_at(scores, threshold)))

    candidates = torch.cat([s.reshape(-1) for s in scores]).unique().sort().values  # ascending: fewer kept
    low, high = 0, len(candidates) - 1  # find the first candidate keeping at most the target
    if count(candidates[high].item()) > target:
        return candidates[high].item()
    while low < high:
        middle = (low + high) // 2
        if count(candidates[middle].item()) <= target:
            high = middle
        else:
            low = middle + 1
    choice = candidates[low].item()
    if low > 0 and abs(count(candidates[low - 1].item()) - target) < abs(count(choice) - target):
        choice = candidates[low - 1].item()
    return choice


def _masks_at(scores: list[torch.Tensor], threshold: float) -> list[torch.Tensor]:
    """0/1 masks of the entries at or above ``threshold``, each selection keeping at least its best entry."""
    masks = []
    for s in scores:
        keep = s >= threshold
        keep[s.argmax()] = True
        masks.append(keep.float())
    return masks


def threshold_masks(scores: list[torch.Tensor], costs: list[BlockCosts], target: float) -> list[torch.Tensor]:
    """Keep every entry whose score is at least one global threshold (and each selection's best entry), the
    threshold chosen so the kept parameters are closest to ``target`` (:func:`closest_threshold`).

    >>> c = [BlockCosts(0, 1, 1, 1, 0, 0, 2, 2)]
    >>> s = [torch.tensor([1.0, 5.0])] * 3 + [torch.tensor([2.0, 3.0]), torch.tensor([4.0, 0.5])]
    >>> [m.tolist() for m in threshold_masks(s, c, 7)]
    [[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]]
    """
    return _masks_at(scores, closest_threshold(scores, costs, target))


def per_block_thresholds(scores: list[torch.Tensor], costs: list[BlockCosts], target: float,
                         block_targets: list[float] | None) -> list[float]:
    """The threshold of every block: one global :func:`closest_threshold` for ``target``, or with
    ``block_targets`` each block's own, closest to its budget."""
    if block_targets is None:
        return [closest_threshold(scores, costs, target)] * len(costs)
    return [closest_threshold(scores[5 * i: 5 * i + 5], costs[i: i + 1], block_target)
            for i, block_target in enumerate(block_targets)]


# ---------------------------------------------------------------------------------------------------------------
# The importance start


#: how far apart (in logits) two dimensions one standard deviation of log-importance apart start
PRIOR_SCALE = 3.0
#: how many standard deviations the four residual selections' scores are raised over the MLP channels' before the
#: start's threshold: cutting the residual stream is costlier than cutting MLP channels of the same importance rank.
#: On SmolLM2-135M at 20%, the start alone (no training) gave perplexity 114 with no shift (every selection loses the
#: same share), 63 with 1 and 58 with 2, where nearly all cuts fall on MLP channels (README).
RESIDUAL_SHIFT = 2.0


def dense_moments(session: StructuredSession) -> list[dict[str, InputMoments]]:
    """Per block, the input moments of the linears the selections touch on the dense model (one calibration pass):
    q_proj (the attention's normed input), o_proj, the MLP's first input linear (its normed input) and down_proj,
    by their names relative to the block."""
    heads, mlp = session.require("attention_heads"), session.require("mlp_channels")
    observe = (heads.query, heads.output, mlp.inputs[0], mlp.output)
    return [step.moments for step in session.dense_block_passes(observe=observe, desc="disp_llm dense statistics")]


def _mean_square(moments: InputMoments) -> torch.Tensor:
    """E[x²] per channel: (n-1)/n · sample variance + mean²."""
    return (moments.variance * (moments.count - 1) / moments.count + moments.mean.pow(2)).float()


def importance_scores(session: StructuredSession, moments: list[dict[str, InputMoments]]) -> list[torch.Tensor]:
    """One score per dimension of every selection (five per block, :data:`SELECTIONS` order) from the dense
    ``moments`` (:func:`dense_moments`): the squared output a dimension carries, Wanda-like, with the diagonal of the
    input's second moment ``E[x_j²]``:

    - a read dimension ``d`` (attention or MLP input, after the norm): ``E[x_d²] · Σ_r W[r, d]²`` over the rows of
      the linears that read it (q, k, v; or gate, up);
    - an MLP channel ``c``: ``E[h_c²] · ‖W_down[:, c]‖²``;
    - a written dimension ``d`` (a row of o_proj or down_proj): ``Σ_j W[d, j]² E[x_j²]``, the diagonal estimate
      of that output's mean square.
    """
    heads, mlp = session.require("attention_heads"), session.require("mlp_channels")
    scores = []
    for index, block in enumerate(moments):
        def column_energy(names) -> torch.Tensor:
            return sum(session.weight(index, n).pow(2).sum(0) for n in names)

        w_out, w_down = session.weight(index, heads.output), session.weight(index, mlp.output)
        channel_square = _mean_square(block[mlp.output])
        scores += [_mean_square(block[heads.query]) * column_energy((heads.query, heads.key, heads.value)),
                   w_out.pow(2) @ _mean_square(block[heads.output]),
                   _mean_square(block[mlp.inputs[0]]) * column_energy(mlp.inputs),
                   channel_square * w_down.pow(2).sum(0),
                   w_down.pow(2) @ channel_square]
    return scores


def compensation_fills(session: StructuredSession,
                       moments: list[dict[str, InputMoments]]) -> dict[int, dict[str, torch.Tensor]]:
    """What a cut entry of each block's read selections and MLP channels is replaced by while the masked model
    trains with ``bias_compensation`` (:func:`~hf_sparse.surgery.masked_residual`'s ``fills``): the dense input
    means, so the loss the hypernetwork sees is that of the compensated model :func:`compensation_biases` builds."""
    heads, mlp = session.require("attention_heads"), session.require("mlp_channels")
    return {index: {"attention_input": block[heads.query].mean.float(),
                    "mlp_input": block[mlp.inputs[0]].mean.float(),
                    "mlp_channels": block[mlp.output].mean.float()} for index, block in enumerate(moments)}


def compensation_biases(session: StructuredSession, index: int, moments: dict[str, InputMoments],
                        masks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """FLAP's bias compensation carried over to DISP-LLM's cuts in block ``index`` (``masks``: its five
    selections): a linear that loses input columns (q/k/v for the attention's read dimensions, gate/up for the
    MLP's, down_proj for the MLP channels) gets their mean contribution on the dense model, ``W[:, removed] ·
    E[x_removed]``, as a bias, on its kept rows. Written dimensions (rows of o_proj / down_proj) are gone from the
    stream and have nothing to carry them, so they get none."""
    heads, mlp = session.require("attention_heads"), session.require("mlp_channels")
    attn_in, _attn_out, mlp_in, channels, mlp_out = (m.bool() for m in masks)
    written_rows = mlp_out.nonzero().reshape(-1)
    cuts = [((heads.query, heads.key, heads.value), attn_in, heads.query, None),
            (tuple(mlp.inputs), mlp_in, mlp.inputs[0], channels.nonzero().reshape(-1)),
            ((mlp.output,), channels, mlp.output, written_rows)]
    biases = {}
    for names, kept, observed, rows in cuts:
        removed = (~kept).nonzero().reshape(-1)
        if removed.numel() == 0:
            continue
        mean = moments[observed].mean.float()[removed]
        for name in names:
            bias = session.weight(index, name)[:, removed] @ mean
            biases[name] = bias if rows is None else bias[rows]
    return biases


def importance_prior(scores: list[torch.Tensor], costs: list[BlockCosts], target: float,
                     block_targets: list[float] | None, residual_shift: float = RESIDUAL_SHIFT) -> list[torch.Tensor]:
    """Starting logits from importance ``scores``: each selection's log-scores standardised (mean 0, std 1: the
    kinds are not comparable raw; the residual selections then raised by ``residual_shift``), the one threshold
    that meets the target (or each block's) subtracted, times :data:`PRIOR_SCALE`. A positive prior is a dimension
    the target keeps, so training starts at the target share with the important dimensions kept, instead of from
    keeping everything.

    >>> c = [BlockCosts(0, 1, 1, 1, 0, 0, 2, 2)]
    >>> s = [torch.tensor([1.0, 5.0])] * 3 + [torch.tensor([2.0, 3.0]), torch.tensor([4.0, 0.5])]
    >>> [(p > 0).tolist() for p in importance_prior(s, c, 7, None)]  # standardised: [-0.71, 0.71], residual +2
    [[True, True], [True, True], [True, True], [False, True], [True, True]]
    >>> [(p > 0).tolist() for p in importance_prior(s, c, 3, None)]  # a tighter budget reaches the residual
    [[False, True], [False, True], [False, True], [False, True], [True, False]]
    """
    standard = []
    for position, s in enumerate(scores):
        logs = s.double().clamp_min(1e-30).log()
        std = logs.std() if logs.numel() > 1 else logs.new_tensor(0.0)
        shift = 0.0 if SELECTIONS[position % len(SELECTIONS)] == "mlp_channels" else residual_shift
        standard.append(((logs - logs.mean()) / (std if std > 0 else 1.0) + shift).float())
    thresholds = per_block_thresholds(standard, costs, target, block_targets)
    prior = []
    for index, s in enumerate(standard):
        threshold = thresholds[index // len(SELECTIONS)]
        keep = _masks_at([s], threshold)[0].bool()
        # The sign must be the threshold's mask: an entry exactly on the threshold (kept) would otherwise start at 0.
        centred = torch.where(keep, (s - threshold).clamp_min(1e-6), (s - threshold).clamp_max(-1e-6))
        prior.append(PRIOR_SCALE * centred)
    return prior


def edits_from_masks(masks: list[torch.Tensor], costs: list[BlockCosts]) -> StructuredEdits:
    """The block edits that keep what ``masks`` (five per block, :data:`SELECTIONS` order) keep; a selection that
    keeps everything is left out."""
    edits = StructuredEdits()
    for index, block in enumerate(costs):
        kept = {name: tuple(torch.nonzero(m).reshape(-1).tolist())
                for name, m in zip(SELECTIONS, masks[5 * index: 5 * index + 5])}
        full = {name: (block.channels if name == "mlp_channels" else block.hidden_size) for name in SELECTIONS}
        selected = {name: k if len(k) < full[name] else None for name, k in kept.items()}
        residual = {name: v for name, v in selected.items() if name != "mlp_channels"}
        edit = BlockEdit()
        if any(v is not None for v in residual.values()):
            edit.residual = ResidualEdit(**residual)
        if selected["mlp_channels"] is not None:
            edit.mlp = MLPEdit(selected["mlp_channels"])
        if edit.residual is not None or edit.mlp is not None:
            edits.blocks[index] = edit
    return edits


# ---------------------------------------------------------------------------------------------------------------


@register_method
class DISPLLMPruning(StructuredPruningMethod):
    """Learn per-block residual, attention and MLP widths with a hypernetwork; the LLM stays frozen."""

    name = "disp_llm"
    display_name = "DISP-LLM"
    paper = PaperReference("DISP-LLM: Dimension-Independent Structural Pruning for Large Language Models",
                           "Gao et al.", 2024, "https://arxiv.org/abs/2410.11988")
    removes = ("residual_dims", "mlp_channels")
    per_block_targets = True
    options_class = DISPOptions

    def plan_edits(self, session: StructuredSession, sparsity: float) -> StructuredEdits:
        session.require("residual_dims")
        session.require("attention_heads")
        costs = [block_costs(session, index) for index in range(session.num_blocks)]
        total = session.block_parameters
        target = (1.0 - sparsity) * total
        # Per-block targets: each block's kept parameters are budgeted on their own, in the loss and at the end.
        block_targets = None if session.block_targets is None else [
            (1.0 - session.block_targets[index]) * session.parameters_of_block(index) for index in range(len(costs))]
        widths = [w for c in costs for w in (c.hidden_size, c.hidden_size, c.hidden_size, c.channels, c.hidden_size)]
        device = session.model.get_input_embeddings().weight.device
        moments = dense_moments(session) if self.options.init == "importance" or self.options.bias_compensation \
            else None
        prior = None
        if self.options.init == "importance":
            # Shifted by -offset: the noise-free score logit + offset then starts at the prior itself.
            prior = [p - self.options.offset for p in importance_prior(importance_scores(session, moments), costs,
                                                                     target, block_targets)]
        # Initialised from the pruning seed (api seeds the RNG); the dense pass above draws no random numbers.
        network = SelectionNetwork(widths, prior=prior).to(device)
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
        fills = compensation_fills(session, moments) if self.options.bias_compensation else None
        self._train(session, network, costs, target, total, generator, block_targets, fills)
        with torch.no_grad():
            scores = [logit + self.options.offset for logit in network()]
        if block_targets is None:
            masks = threshold_masks(scores, costs, target)
        else:  # one threshold per block, each closest to that block's budget
            masks = [mask for index, block_target in enumerate(block_targets)
                     for mask in threshold_masks(scores[5 * index: 5 * index + 5], costs[index: index + 1],
                                                 block_target)]
        kept = float(kept_parameters(costs, masks))
        logger.info("disp_llm: final masks keep %.4f of the block parameters (target %.4f)", kept / total,
                    1 - sparsity)
        edits = edits_from_masks(masks, costs)
        if self.options.bias_compensation:
            for index, edit in edits.blocks.items():
                edit.new_biases.update(compensation_biases(session, index, moments[index],
                                                           masks[5 * index: 5 * index + 5]))
        return edits

    def _train(self, session: StructuredSession, network: SelectionNetwork, costs: list[BlockCosts], target: float,
               total: int, generator: torch.Generator, block_targets: list[float] | None = None,
               fills: dict[int, dict[str, torch.Tensor]] | None = None) -> None:
        options, model = self.options, session.model
        windows = session.calibration_ids
        device = model.get_input_embeddings().weight.device
        optimizer = torch.optim.AdamW(network.parameters(), lr=options.lr)
        frozen = [p for p in model.parameters() if p.requires_grad]
        for p in frozen:  # no weight gradients: only the masks' (hence the hypernetwork's) are needed
            p.requires_grad_(False)
        progress = tqdm(range(options.steps), desc="disp_llm hypernetwork", unit="step",
                        disable=not session.show_progress)
        try:
            with torch.enable_grad():
                for _step in progress:
                    chosen = torch.randperm(len(windows), generator=generator)[: options.windows_per_step]
                    batch = windows[chosen].to(device)
                    masks = sample_masks(network(), options.temperature, options.offset, generator)
                    per_block = {i: dict(zip(SELECTIONS, masks[5 * i: 5 * i + 5])) for i in range(len(costs))}
                    with masked_residual(model, session.adapter, per_block, fills):
                        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
                    ce = fit_loss(model, batch, logits, options.loss)
                    if block_targets is None:
                        kept = kept_parameters(costs, masks)
                        penalty = parameter_penalty(kept, target, options.lam)
                    else:
                        per_block = torch.stack(kept_per_block(costs, masks))
                        kept = per_block.sum()
                        penalty = parameter_penalty(per_block, per_block.new_tensor(block_targets), options.lam)
                    loss = ce + penalty
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    progress.set_postfix(loss=f"{loss.item():.3f}", **{options.loss: f"{ce.item():.3f}"},
                                         kept=f"{kept.item() / total:.3f}")
        finally:
            progress.close()
            for p in frozen:
                p.requires_grad_(True)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"disp_llm training diverged (loss {loss.item()}); try a smaller lr than {options.lr}")
