"""Pruning methods. One file per method; importing it registers it (one line below per method)."""

from .base import (METHODS, LinearStatistics, MethodOptions, PaperReference, PruningMethod, build_method,
                   get_method_class, register_method)
from . import magnitude, sparsegpt, wanda  # noqa: F401  (registration)
from . import fista  # noqa: F401  (registration)
from . import flap, shortgpt, sleb  # noqa: F401  (registration: structured methods)
from . import pip  # noqa: F401  (registration)
from . import disp_llm  # noqa: F401  (registration)

__all__ = ["METHODS", "LinearStatistics", "MethodOptions", "PaperReference", "PruningMethod", "build_method",
           "get_method_class", "register_method"]
