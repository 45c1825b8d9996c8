"""The plan: which linear operators of which blocks are pruned, to which sparsity each, in which groups.

Everything here works on a meta-device skeleton, so the plan is made (and checked) before any weight is loaded.
The target sparsity of every module is part of the plan (:class:`TargetSparsity`), so a per-layer profile is a
different plan, not a different engine.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import nn

from ..architectures import ArchitectureAdapter, get_architecture
from ..masks import SparsityPattern


class TargetSparsity:
    """The sparsity each pruned module is to reach, by full module name.

    >>> TargetSparsity.uniform(0.5)("model.layers.0.mlp.up_proj")
    0.5
    >>> TargetSparsity.per_module({"a": 0.25}, default=0.5)("b")
    0.5
    """

    def __init__(self, rule: Callable[[str], float], description: str, value: float | None = None,
                 blocks: Mapping[int, float] | None = None):
        self._rule = rule
        self.description = description
        #: the one sparsity of a uniform target (``None`` otherwise): structured methods read it as the fraction of
        #: the block parameters to remove
        self.value = value
        #: each block's share of its own parameters to remove, when a sparsity profile decided per block (``None``
        #: otherwise): structured methods that take per-block targets read it instead of ``value``
        self.blocks = dict(blocks) if blocks is not None else None

    @classmethod
    def uniform(cls, sparsity: float) -> TargetSparsity:
        """The same sparsity for every module."""
        return cls(lambda _name: sparsity, f"uniform {sparsity!r}", value=sparsity)

    @classmethod
    def per_module(cls, sparsities: Mapping[str, float], default: float | None = None,
                   blocks: Mapping[int, float] | None = None) -> TargetSparsity:
        """``sparsities[name]`` for the listed modules, ``default`` for the others (an error if it is ``None``);
        ``blocks`` (block index -> share of its parameters) is what structured methods read of the same plan.

        >>> TargetSparsity.per_module({"b.0.q": 0.3}, blocks={0: 0.3}).blocks
        {0: 0.3}
        """
        sparsities = dict(sparsities)

        def rule(name: str) -> float:
            if name in sparsities:
                return sparsities[name]
            if default is None:
                raise ValueError(f"no target sparsity for module {name!r}: it is pruned but not listed among "
                                 f"{sorted(sparsities)}; list it or give a default")
            return default

        return cls(rule, f"per module ({len(sparsities)} listed, default {default!r})", blocks=blocks)

    @classmethod
    def coerce(cls, value: TargetSparsity | float | Mapping[str, float] | Callable[[str], float]) -> TargetSparsity:
        """A :class:`TargetSparsity` from itself, one number, a ``{name: sparsity}`` mapping or a function of the
        module name."""
        if isinstance(value, TargetSparsity):
            return value
        if isinstance(value, Mapping):
            return cls.per_module(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return cls.uniform(float(value))
        if callable(value):
            return cls(value, getattr(value, "__name__", "function"))
        raise ValueError(f"target sparsity must be a number, a {{module name: sparsity}} mapping or a function of "
                         f"the module name, got {value!r}")

    def __call__(self, name: str) -> float:
        value = self._rule(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not 0.0 <= value < 1.0:
            raise ValueError(f"target sparsity of module {name!r} must be a number in [0, 1), got {value!r}")
        return value

    def __repr__(self) -> str:
        return f"TargetSparsity({self.description})"


@dataclass
class PruningTarget:
    """One linear operator to prune: its full module name, the module, and its target sparsity."""

    name: str
    module: nn.Linear
    sparsity: float


@dataclass
class BlockPlan:
    """One decoder block: its index and full name, the block, its targets, and the groups they are pruned in."""

    index: int
    name: str
    block: nn.Module
    targets: list[PruningTarget]
    groups: list[list[PruningTarget]] = field(default_factory=list)


@dataclass
class PruningPlan:
    """Every decoder block in order, with what is pruned in it. Made by :func:`plan_targets`."""

    adapter: ArchitectureAdapter
    blocks: list[BlockPlan]

    @property
    def targets(self) -> list[PruningTarget]:
        return [t for block in self.blocks for t in block.targets]

    @property
    def sparsity(self) -> dict[str, float]:
        """Target sparsity per pruned module, in pruning order."""
        return {t.name: t.sparsity for t in self.targets}


def select_targets(block: nn.Module, block_name: str, include: list[str] | None, exclude: list[str] | None,
                   sparsity: TargetSparsity | Callable[[str], float] | float) -> list[PruningTarget]:
    """Linears of ``block`` to prune, filtered by the include/exclude regular expressions on full names.

    >>> [t.name for t in select_targets(nn.Sequential(nn.Linear(2, 2)), "b", None, None, 0.5)]
    ['b.0']
    """
    sparsity = TargetSparsity.coerce(sparsity)
    targets = []
    for rel_name, module in block.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        name = f"{block_name}.{rel_name}"
        if include and not any(re.search(p, name) for p in include):
            continue
        if exclude and any(re.search(p, name) for p in exclude):
            continue
        targets.append(PruningTarget(name, module, sparsity(name)))
    return targets


def group_targets(targets: list[PruningTarget], block_name: str, adapter: ArchitectureAdapter,
                  sequential: bool) -> list[list[PruningTarget]]:
    """Split a block's targets into execution-order groups (or one group when ``sequential`` is False)."""
    if not sequential:
        return [targets]
    by_rel = {t.name[len(block_name) + 1 :]: t for t in targets}
    groups = [[by_rel.pop(rel) for rel in group if rel in by_rel] for group in adapter.operator_groups]
    groups = [g for g in groups if g]
    if by_rel:
        # Operators the adapter does not place (e.g. extra adapters) are pruned last, after everything they may read.
        groups.append(list(by_rel.values()))
    return groups


def check_pattern_fits(targets: list[PruningTarget], pattern: SparsityPattern) -> None:
    """Raise before anything is pruned if an N:M ``pattern`` cannot tile a target's input dimension."""
    if not pattern.is_n_m:
        return
    for target in targets:
        if target.module.in_features % pattern.m:
            raise ValueError(
                f"pattern {str(pattern)!r} needs in_features to be a multiple of {pattern.m}, but module "
                f"{target.name!r} has in_features={target.module.in_features}; leave it out with "
                f"exclude=[{target.name!r}] or use a pattern whose M divides {target.module.in_features}"
            )


def plan_targets(model: nn.Module, include: list[str] | None, exclude: list[str] | None, pattern: SparsityPattern,
                 sparsity: TargetSparsity | Callable[[str], float] | float,
                 sequential_within_block: bool = False) -> PruningPlan:
    """The plan for ``model``, checked up front: raises if nothing matches ``include``/``exclude`` or the pattern
    cannot tile a target. With ``sequential_within_block`` each block's targets are split into the architecture's
    execution-order groups. Works on a meta-device skeleton, so it can run before any weight is loaded.

    >>> plan = plan_targets(model, None, None, SparsityPattern.parse("2:4"), 0.5)  # doctest: +SKIP
    >>> plan.sparsity["model.layers.0.mlp.up_proj"]  # doctest: +SKIP
    0.5
    """
    sparsity = TargetSparsity.coerce(sparsity)
    adapter = get_architecture(model)
    prefix = adapter.block_prefix(model)
    blocks = []
    for index, block in enumerate(adapter.blocks(model)):
        block_name = f"{prefix}.{index}"
        targets = select_targets(block, block_name, include, exclude, sparsity)
        groups = group_targets(targets, block_name, adapter, sequential_within_block)
        blocks.append(BlockPlan(index, block_name, block, targets, groups))
    plan = PruningPlan(adapter, blocks)
    if not plan.targets:
        raise ValueError(f"no linear module matched include={include!r} exclude={exclude!r} inside the decoder blocks")
    check_pattern_fits(plan.targets, pattern)
    return plan
