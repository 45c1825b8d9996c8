"""hf_sparse: post-training pruning of Hugging Face causal language models, one line in any script.

    import hf_sparse
    cfg = hf_sparse.SparsityConfig(method="sparsegpt", sparsity=0.5, pattern="2:4", calibration="calibration.txt")
    model = AutoModelForCausalLM.from_pretrained(model_id, sparsity_config=cfg)   # prunes on load

The public names live in :mod:`hf_sparse._api`, imported here at once, with the hooks it installs in transformers.
The one exception is the process of the ``hf-sparse`` command (``hf-sparse ...`` or ``python -m hf_sparse ...``):
there the import waits until a subcommand runs (:func:`load`), so ``--help`` and argument errors do not import
torch and transformers. Any public name that is used earlier loads it too.
"""

import importlib as _importlib
import os as _os
import sys as _sys

from ._version import __version__

_COMMAND = "hf-sparse"


def _started_as_the_command() -> bool:
    """Whether this process is ``hf-sparse ...`` or ``python [options] -m hf_sparse ...`` (from the original
    command line, which Python keeps in ``sys.orig_argv``)."""
    argv = list(getattr(_sys, "orig_argv", None) or [])[1:]
    while argv:
        arg = argv.pop(0)
        if arg in ("-X", "-W", "-Q"):  # options that take a value
            argv = argv[1:]
        elif arg == "-m":
            return bool(argv) and argv[0] in ("hf_sparse", "hf_sparse.__main__")
        elif arg.startswith("-m"):  # -mhf_sparse
            return arg[2:] in ("hf_sparse", "hf_sparse.__main__")
        elif arg == "-c" or not arg.startswith("-"):  # code, or a script: the hf-sparse console script or another
            return arg != "-c" and _os.path.splitext(_os.path.basename(arg))[0] == _COMMAND
    return False


def load() -> None:
    """Import the public API and install the transformers hooks (once; ``import hf_sparse`` does it already outside
    the ``hf-sparse`` command).

    >>> load(); hasattr(load, "__call__") and "prune" in globals()
    True
    """
    if "prune" in globals():
        return
    _api = _importlib.import_module(f"{__name__}._api")
    globals().update({name: getattr(_api, name) for name in _api.__all__})


if _started_as_the_command():

    def __getattr__(name: str):
        if name.startswith("_"):  # the import system asks for submodules (_api) this way: no public name
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        _api = _importlib.import_module(f"{__name__}._api")
        if name not in _api.__all__:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        load()
        return globals()[name]

else:
    from ._api import *  # noqa: F401,F403
    from ._api import __all__  # noqa: F401
