"""The interface every pruning method implements, and the registry that names them.

A method only decides *what a pruned weight matrix is*, given that matrix and the calibration statistics it asked
for. Everything else (calibration data, walking the decoder blocks, hooks, devices, the sparsity record) is the
engine's job and is written once in :mod:`hf_sparse.engine`.

Adding a method is one new file in this folder with a class decorated by :func:`register_method`, plus one import
line in ``methods/__init__.py``. A statistic the engine does not collect yet is registered in the same file with
:func:`hf_sparse.engine.statistics.register_statistic`.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..validation import validate_dataclass
# LinearStatistics is part of a method's interface (what prune_weight is handed); the engine fills it.
from ..engine.statistics import LinearStatistics, check_statistics
from ..errors import shown
from ..masks import SparsityPattern

__all__ = ["METHODS", "LinearStatistics", "MethodOptions", "PruningMethod", "build_method", "get_method_class",
           "register_method"]


@dataclass
class MethodOptions:
    """Base class of a method's options: a dataclass whose fields carry help text in ``metadata["help"]`` and what
    they allow (``"range"``, ``"choices"``, see :mod:`hf_sparse.validation`), checked on construction."""

    #: the method the options belong to, starting every error message ("sparsegpt block_size must be ..."); set by
    #: :func:`register_method`
    method_name: ClassVar[str] = ""

    def __post_init__(self):
        validate_dataclass(self, prefix=self.method_name)

    @classmethod
    def from_dict(cls, method: str, values: dict[str, Any] | None) -> MethodOptions:
        values = dict(values or {})
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise ValueError(
                f"unknown option(s) {shown(unknown)} for method {shown(method)}; allowed: {sorted(allowed) or 'none'}"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PaperReference:
    """The paper a method comes from, as the model card and ``hf-sparse methods`` cite it.

    >>> PaperReference("SparseGPT", "Frantar and Alistarh", 2023, "https://arxiv.org/abs/2301.00774").citation
    'Frantar and Alistarh (2023), SparseGPT'
    """

    title: str
    authors: str
    year: int
    url: str

    @property
    def citation(self) -> str:
        return f"{self.authors} ({self.year}), {self.title}"


class PruningMethod(ABC):
    """One pruning method. Subclasses set the class attributes and implement :meth:`prune_weight`."""

    name: ClassVar[str]
    #: how people write the method's name (model cards, ``hf-sparse methods``); defaults to ``name``
    display_name: ClassVar[str | None] = None
    #: where the method is published (``None`` for folklore baselines)
    paper: ClassVar[PaperReference | None] = None
    #: whether the method reads calibration data (a data-free method must ask for no statistics)
    needs_calibration: ClassVar[bool] = True
    options_class: ClassVar[type[MethodOptions]] = MethodOptions
    #: names of the statistics the engine collects for every pruned linear (registered in
    #: :data:`hf_sparse.engine.statistics.STATISTICS`, which a method file can extend); empty means no calibration
    statistics: ClassVar[frozenset[str]] = frozenset()
    #: feed every block the *dense* model's activations (blocks become independent and can be pruned in parallel)
    #: instead of the outputs of the already-pruned blocks
    propagate_dense: ClassVar[bool] = False
    #: pattern kinds the method can produce
    supports_patterns: ClassVar[tuple[str, ...]] = ("unstructured", "n:m")
    #: the method removes whole structures (heads, channels, blocks) through ``plan_edits`` instead of masking
    #: weights: the engine runs it in the ``structured`` pipeline
    edits_structure: ClassVar[bool] = False

    def __init__(self, options: MethodOptions | None = None):
        self.options = options if options is not None else self.options_class()

    @property
    def sequential_within_block(self) -> bool:
        """Prune a block's operators group by group, each group's statistics taken after the previous groups were
        pruned (intra-block error correction). ``False`` takes all statistics from the unpruned block at once."""
        return False

    def statistics_for(self, module: nn.Module) -> frozenset[str]:
        """The statistics to collect for one linear ``module``: :attr:`statistics` (which must list every name this
        returns), unless the method can do with fewer for some shapes, where one statistic is cheaper to collect
        than another that gives the same."""
        return self.statistics

    def recorded_options(self, pattern: SparsityPattern) -> dict[str, Any]:
        """The options as the record states them: :attr:`options` as a dict, with any default that depends on the
        pattern replaced by the value that ran (so the record says what was done, not ``None``)."""
        return self.options.to_dict()

    @abstractmethod
    def prune_weight(
        self,
        weight: torch.Tensor,
        stats: LinearStatistics | None,
        pattern: SparsityPattern,
        sparsity: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(new_weight, keep_mask)`` for a float32 ``weight`` of shape ``(out, in)``.

        ``new_weight`` may differ from ``weight`` on kept entries (reconstruction methods update them); the engine
        multiplies it by ``keep_mask`` so pruned entries are exact zeros whatever the method returns.
        """


METHODS: dict[str, type[PruningMethod]] = {}


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator adding a :class:`PruningMethod` subclass to the registry under ``cls.name``."""
    if not issubclass(cls, PruningMethod):
        raise TypeError(f"{cls!r} must subclass hf_sparse.methods.PruningMethod")
    check_statistics(cls.statistics, cls.__name__)
    _check_metadata(cls)
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"a pruning method named {cls.name!r} is already registered")
    if cls.options_class is not MethodOptions and not cls.options_class.method_name:
        cls.options_class.method_name = cls.name
    METHODS[cls.name] = cls
    return cls


def _check_metadata(cls: type[PruningMethod]) -> None:
    """The descriptive class attributes of a method being registered; ``display_name`` defaults to ``name``."""
    if not isinstance(getattr(cls, "name", None), str) or not cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute name = '...' (the registry key)")
    if cls.__dict__.get("display_name") is None:  # not inherited: a subclass is another method
        cls.display_name = cls.name
    if cls.paper is not None and not isinstance(cls.paper, PaperReference):
        raise ValueError(f"{cls.__name__}.paper must be a PaperReference or None, got {cls.paper!r}")
    if not cls.needs_calibration and cls.statistics:
        raise ValueError(f"{cls.__name__} sets needs_calibration = False but asks for statistics "
                         f"{sorted(cls.statistics)}, which come from calibration data")


def get_method_class(name: str) -> type[PruningMethod]:
    """The registered class for ``name``; raises ``ValueError`` listing the registered names otherwise."""
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"unknown pruning method {shown(name)}; registered methods: {sorted(METHODS)}")
    return METHODS[name]


def build_method(name: str, options: dict[str, Any] | None = None) -> PruningMethod:
    """Instantiate method ``name`` with validated ``options``."""
    cls = get_method_class(name)
    return cls(cls.options_class.from_dict(name, options))
