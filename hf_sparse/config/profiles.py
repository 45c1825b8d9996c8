"""Sparsity profiles: how the overall target sparsity is shared out over the decoder blocks and their linears.

* ``"uniform"`` (the default): every pruned module gets ``SparsityConfig.sparsity``.
* ``"owl"``: Outlier-Weighted Layerwise sparsity (Yin et al., ICML 2024). Block ``i`` pools the Wanda score
  ``|W|·‖X‖`` of all its pruned linears; ``D_i`` is the share of those scores above ``m`` times their mean. ``D`` is
  min-max normalised over the blocks to ``[0, 2λ]`` and block ``i`` loses that much of its sparsity, shifted so that
  the overall sparsity equals the target: more outliers, fewer weights pruned. The paper shifts by the plain mean
  over blocks, which hits the target only when all blocks have the same size; here the shift is the mean weighted
  by each block's pruned parameters, so the parameter-weighted overall sparsity is the target exactly (up to the
  rounding of one weight per matrix). The scores come from one dense statistics pass through the engine
  (:meth:`hf_sparse.engine.LayerwiseEngine.summarize_dense_blocks`), block by block.
* an explicit profile: a dict from block index (an int, or a string of digits as JSON gives it) or module-name
  regular expression (``re.search`` on the full name) to sparsity. A module takes the value of the regular
  expression that matches it, else its block's, else ``SparsityConfig.sparsity``.

Whatever the profile, :func:`allocate` returns a :class:`SparsityAllocation`: a target per pruned module *and* a
target fraction per block. Unstructured methods read the first; structured methods that remove heads or channels
(FLAP, PIP, DISP-LLM) read the second as the share of each block's parameters to remove, so FLAP- and OWL-style
allocation are one code path. For them an explicit profile takes block indices only (a module cannot lose a share
of itself when whole heads and channels go: :func:`require_block_indices`), and OWL weighs the blocks by all their
parameters (``block_sizes``), which is what structured sparsity counts.

>>> owl_block_sparsities([1.0, 2.0, 3.0], [10, 10, 10], sparsity=0.5, lam=0.1)
[0.6, 0.5, 0.4]
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import shown
from ..validation import check_value, validate_mapping

if TYPE_CHECKING:
    from torch import nn

    from ..engine import LayerwiseEngine, PruningPlan

UNIFORM, OWL = "uniform", "owl"
NAMED_PROFILES = (UNIFORM, OWL)


@dataclass
class OwlOptions:
    """``profile_options`` of ``sparsity_profile="owl"`` (keys ``"m"`` and ``"lambda"``)."""

    m: float = field(default=5.0, metadata={"help": "Outlier threshold: a score is an outlier above m x the block's "
                                                    "mean score (the paper's M).", "range": "> 0"})
    lambda_: float = field(default=0.08, metadata={"help": "Half-width of the sparsity range: blocks get sparsity "
                                                           "within about S ± lambda (the paper's λ).",
                                                   "range": "[0, 0.5]"})

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None) -> OwlOptions:
        options = dict(options or {})
        if "lambda_" in options:
            raise ValueError("profile_options: spell the OWL option 'lambda', not 'lambda_'")
        if "lambda" in options:
            options["lambda_"] = options.pop("lambda")
        try:
            return cls(**validate_mapping(options, cls, "owl profile_options."))
        except ValueError as error:
            raise ValueError(str(error).replace("lambda_", "lambda")) from None

    def to_dict(self) -> dict[str, float]:
        return {"m": self.m, "lambda": self.lambda_}


# ----------------------------------------------------------------------------------------------------------------
# Checks used by SparsityConfig's field declarations


def check_profile(name: str, value: Any) -> Any:
    """A ``"check"`` (see :mod:`hf_sparse.validation`): ``"uniform"``, ``"owl"`` or an explicit
    ``{index or regex: sparsity}`` dict; an explicit dict comes back with its sparsities checked (keys as given)."""
    if isinstance(value, str):
        if value not in NAMED_PROFILES:
            raise ValueError(f"{name} must be one of {NAMED_PROFILES} or a dict from block index or module-name "
                             f"regular expression to sparsity, got {shown(value)}")
        return value
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"{name} must be one of {NAMED_PROFILES} or a non-empty dict from block index or module-name "
                         f"regular expression to sparsity, got {shown(value)}")
    checked = {}
    blocks: dict[int, Any] = {}
    for key, sparsity in value.items():
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise ValueError(f"{name} keys must be block indices or regular expressions, got {shown(key)} "
                             f"({type(key).__name__})")
        if isinstance(key, int) and key < 0:
            raise ValueError(f"{name} block index must be >= 0, got {shown(key)}")
        if isinstance(key, int) or key.isdigit():
            index = int(key)
            if index in blocks:
                raise ValueError(f"{name} gives block {index} twice (keys {shown(blocks[index])} and {shown(key)}); "
                                 "give each block one value")
            blocks[index] = key
        if isinstance(key, str) and not key.isdigit():
            try:
                re.compile(key)
            except re.error as error:
                raise ValueError(f"{name} key {shown(key)} is not a valid regular expression: {error}") from None
        checked[key] = check_value(f"{name}[{shown(key)}]", sparsity, float, {"range": "[0, 1)"})
    return checked


def require_block_indices(profile: str | Mapping, pattern: str = "structured") -> None:
    """Raise if an explicit ``profile`` has a module-name regular expression among its keys: with ``pattern``
    (structured) a profile gives each decoder block the share of its parameters to remove.

    >>> require_block_indices({"0": 0.2, "mlp": 0.5})
    Traceback (most recent call last):
    ...
    ValueError: sparsity_profile key 'mlp' is a module-name regular expression; with pattern='structured' a profile gives each decoder block the share of its parameters to remove, so its keys must be block indices, e.g. {"0": 0.2, "5": 0.35}
    """
    if isinstance(profile, str):
        return
    for key in profile:
        if not (isinstance(key, int) or key.isdigit()):
            raise ValueError(f"sparsity_profile key {shown(key)} is a module-name regular expression; with "
                             f"pattern={shown(pattern)} a profile gives each decoder block the share of its parameters to "
                             'remove, so its keys must be block indices, e.g. {"0": 0.2, "5": 0.35}')


def profile_name(profile: str | Mapping) -> str:
    """``"uniform"``, ``"owl"`` or ``"explicit"``."""
    return profile if isinstance(profile, str) else "explicit"


def check_profile_options(profile: str | Mapping, options: Mapping[str, Any]) -> dict[str, Any]:
    """The validated options of ``profile`` (only OWL has any)."""
    if profile == OWL:
        return OwlOptions.from_dict(options).to_dict()
    if options:
        raise ValueError(f"profile_options {shown(dict(options))} given, but sparsity profile {shown(profile_name(profile))} "
                         "takes no options (only 'owl' does: m, lambda)")
    return {}


# ----------------------------------------------------------------------------------------------------------------
# The math, on plain numbers


def outlier_ratio(scores: torch.Tensor, m: float) -> float:
    """OWL's ``D``: the share of ``scores`` above ``m`` times their mean.

    >>> outlier_ratio(torch.tensor([1.0, 1.0, 1.0, 9.0]), 2.0)
    0.25
    """
    scores = scores.reshape(-1).double()
    return float((scores > m * scores.mean()).sum()) / scores.numel()


def owl_block_sparsities(outlier_ratios: list[float], block_sizes: list[int], sparsity: float,
                         lam: float) -> list[float]:
    """Per-block sparsity from the blocks' outlier ratios ``D``: min-max normalised to ``[0, 2·lam]``, subtracted
    from ``sparsity`` after a shift by their mean weighted by ``block_sizes`` (pruned parameters per block), so
    ``Σ size·s = sparsity · Σ size`` exactly. Equal ``D`` everywhere gives the uniform profile.

    >>> owl_block_sparsities([1.0, 2.0, 3.0], [1, 1, 2], sparsity=0.5, lam=0.1)
    [0.625, 0.525, 0.425]
    """
    if len(outlier_ratios) != len(block_sizes) or not block_sizes:
        raise ValueError(f"need one outlier ratio per block, got {len(outlier_ratios)} for {len(block_sizes)} blocks")
    low, high = min(outlier_ratios), max(outlier_ratios)
    span = high - low
    normalised = [0.0 if span == 0 else (d - low) / span * 2 * lam for d in outlier_ratios]
    total = sum(block_sizes)
    shift = sum(n * size for n, size in zip(normalised, block_sizes)) / total
    sparsities = [sparsity - (n - shift) for n in normalised]
    for index, value in enumerate(sparsities):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"OWL with lambda={shown(lam)} gives block {index} sparsity {value:.4f}, outside [0, 1) at "
                             f"target {shown(sparsity)}; use a smaller lambda")
    # Round off float noise (1e-17) so hand-checkable cases read as written; 12 digits keep Σ size·s exact enough.
    return [round(value, 12) for value in sparsities]


# ----------------------------------------------------------------------------------------------------------------
# The allocation


@dataclass
class SparsityAllocation:
    """What a profile decided: the target of every pruned module and, for structured methods, of every block
    (the parameter-weighted mean over its pruned modules), with the profile's name, options and statistics.

    >>> SparsityAllocation("uniform", {}, {0: 0.5}, {"b.0.q": 0.5}).to_record()["block_sparsity"]
    {'0': 0.5}
    """

    profile: str
    options: dict[str, Any]
    block_sparsity: dict[int, float]
    module_sparsity: dict[str, float]
    # OWL: each block's outlier ratio D (for the record: shows why a block got its share)
    block_outlier_ratio: dict[int, float] | None = None
    explicit: dict[str, float] | None = None

    def to_record(self) -> dict[str, Any]:
        """JSON form for ``sparsity_config.sparsity_profile`` (block indices as strings, as JSON needs)."""
        out: dict[str, Any] = {"name": self.profile, "options": dict(self.options),
                               "block_sparsity": {str(i): round(s, 6) for i, s in self.block_sparsity.items()}}
        if self.block_outlier_ratio is not None:
            out["block_outlier_ratio"] = {str(i): round(d, 6) for i, d in self.block_outlier_ratio.items()}
        if self.explicit is not None:
            out["explicit"] = dict(self.explicit)
        return out


def explicit_module_sparsity(plan: PruningPlan, profile: Mapping, default: float) -> dict[str, float]:
    """Each pruned module's target under an explicit profile; raises for a block index past the model's blocks, a
    regular expression matching no pruned module, or a module two regular expressions give different values."""
    by_index = {int(k): v for k, v in profile.items() if isinstance(k, int) or k.isdigit()}
    by_regex = {k: v for k, v in profile.items() if isinstance(k, str) and not k.isdigit()}
    too_far = sorted(i for i in by_index if i >= len(plan.blocks))
    if too_far:
        raise ValueError(f"sparsity_profile names block(s) {shown(too_far)}, but the model has {len(plan.blocks)} "
                         f"decoder blocks (0..{len(plan.blocks) - 1})")
    pruned_blocks = {block.index for block in plan.blocks if block.targets}
    unused = sorted(i for i in by_index if i not in pruned_blocks)
    if unused and pruned_blocks:
        raise ValueError(f"sparsity_profile gives block(s) {shown(unused)} a sparsity, but include/exclude leave no "
                         f"module of them to prune (pruned blocks: {shown(sorted(pruned_blocks))}); drop those keys or "
                         "widen include")
    matched: set[str] = set()
    sparsities = {}
    for block in plan.blocks:
        for target in block.targets:
            hits = {pattern: value for pattern, value in by_regex.items() if re.search(pattern, target.name)}
            matched.update(hits)
            if len(set(hits.values())) > 1:
                raise ValueError(f"module {shown(target.name)} matches sparsity_profile keys {sorted(hits)} with different "
                                 f"sparsities {sorted(set(hits.values()))}; make the regular expressions disjoint")
            sparsities[target.name] = (next(iter(hits.values())) if hits
                                       else by_index.get(block.index, default))
    unmatched = sorted(set(by_regex) - matched)
    if unmatched:
        raise ValueError(f"sparsity_profile key(s) {unmatched} match no pruned module (e.g. {shown(plan.targets[0].name)})")
    return sparsities


def check_profile_fits(plan: PruningPlan, profile: str | Mapping, sparsity: float) -> None:
    """Raise now if ``profile`` cannot be applied to the model ``plan`` describes: for an explicit profile, a block
    index past the model's blocks, a regular expression matching no pruned module, or two regular expressions giving
    one module different values. Reads module names only, so ``plan`` may come from an empty (meta-device) skeleton:
    prune on load calls this before any weight is read. Named profiles (uniform, OWL) fit every model.

    >>> check_profile_fits(plan, {"9": 0.5}, 0.5)  # doctest: +SKIP
    Traceback (most recent call last):
    ValueError: sparsity_profile names block(s) [9], but the model has 2 decoder blocks (0..1)
    """
    if not isinstance(profile, str):
        explicit_module_sparsity(plan, profile, sparsity)


def _block_means(plan: PruningPlan, module_sparsity: Mapping[str, float]) -> dict[int, float]:
    means = {}
    for block in plan.blocks:
        size = sum(t.module.weight.numel() for t in block.targets)
        if size:
            means[block.index] = sum(module_sparsity[t.name] * t.module.weight.numel() for t in block.targets) / size
    return means


def owl_allocation(engine: LayerwiseEngine, model: nn.Module, calibration_ids: torch.Tensor, batch_size: int,
                   sparsity: float, options: Mapping[str, Any],
                   block_sizes: Mapping[int, int] | None = None) -> SparsityAllocation:
    """OWL's targets for ``model``: one dense statistics pass (``sq_norm`` of every pruned linear's input), the
    blocks' outlier ratios, then :func:`owl_block_sparsities` weighted by ``block_sizes`` (default: each block's
    pruned linear weights)."""
    owl = OwlOptions.from_dict(options)

    def block_outlier_ratio(weights_and_stats) -> float:
        # Wanda's score per weight, (out, in) per linear, pooled over the block's linears.
        scores = [weight.abs() * (stats.sq_norm / stats.n_tokens).sqrt().unsqueeze(0)
                  for _target, weight, stats in weights_and_stats]
        return outlier_ratio(torch.cat([s.reshape(-1) for s in scores]), owl.m)

    ratios = engine.summarize_dense_blocks(model, calibration_ids, batch_size, frozenset({"sq_norm"}),
                                           block_outlier_ratio, description="OWL outlier statistics")
    plan = engine.plan(model)
    sizes = [block_sizes[block.index] if block_sizes is not None else
             sum(t.module.weight.numel() for t in block.targets) for block in plan.blocks]
    indices = [block.index for block in plan.blocks if block.targets]
    block_values = owl_block_sparsities([ratios[i] for i in indices], [sizes[i] for i in indices], sparsity,
                                        owl.lambda_)
    block_sparsity = dict(zip(indices, block_values))
    module_sparsity = {t.name: block_sparsity[block.index] for block in plan.blocks for t in block.targets}
    return SparsityAllocation(OWL, owl.to_dict(), block_sparsity, module_sparsity,
                              block_outlier_ratio={i: ratios[i] for i in indices})


def allocate(profile: str | Mapping, options: Mapping[str, Any], sparsity: float, engine: LayerwiseEngine,
             model: nn.Module, calibration_ids: torch.Tensor | None, batch_size: int,
             block_sizes: Mapping[int, int] | None = None) -> SparsityAllocation:
    """The targets of ``profile`` for ``model`` (pruned by ``engine``), before anything is pruned.

    ``block_sizes`` (block index -> parameters) says what a block's share is a share of, when that is more than its
    pruned linears: structured methods pass every parameter of each block (norms too), so OWL's shift makes the
    parameter-weighted mean of the blocks' shares the target exactly as structured sparsity counts it.

    >>> allocation = allocate("owl", {"m": 5, "lambda": 0.08}, 0.7, engine, model, ids, 8)  # doctest: +SKIP
    >>> allocation.block_sparsity  # doctest: +SKIP
    {0: 0.78, 1: 0.73, ...}
    """
    plan = engine.plan(model)
    if profile == UNIFORM:
        module_sparsity = {t.name: sparsity for t in plan.targets}
        return SparsityAllocation(UNIFORM, {}, _block_means(plan, module_sparsity), module_sparsity)
    if profile == OWL:
        if calibration_ids is None:
            raise ValueError("sparsity_profile='owl' needs calibration data (its outlier statistics are Wanda scores "
                             "of the dense model): set SparsityConfig(calibration=...)")
        return owl_allocation(engine, model, calibration_ids, batch_size, sparsity, options, block_sizes)
    module_sparsity = explicit_module_sparsity(plan, profile, sparsity)
    return SparsityAllocation("explicit", {}, _block_means(plan, module_sparsity), module_sparsity,
                              explicit={str(k): float(v) for k, v in profile.items()})


def profile_needs_calibration(profile: str | Mapping) -> bool:
    """True if the profile reads calibration statistics (OWL)."""
    return profile == OWL


def allocation_overall(plan: PruningPlan, allocation: SparsityAllocation) -> float:
    """The parameter-weighted target over the plan's modules (equals the config's sparsity for uniform and OWL)."""
    total = sum(t.module.weight.numel() for t in plan.targets)
    return math.fsum(allocation.module_sparsity[t.name] * t.module.weight.numel() for t in plan.targets) / total


__all__ = ["NAMED_PROFILES", "OWL", "UNIFORM", "OwlOptions", "SparsityAllocation", "allocate", "allocation_overall",
           "check_profile", "check_profile_fits", "check_profile_options", "explicit_module_sparsity", "outlier_ratio",
           "owl_block_sparsities", "profile_name", "profile_needs_calibration", "require_block_indices"]
