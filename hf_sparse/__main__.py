"""``python -m hf_sparse ...`` is the ``hf-sparse`` command."""

from .cli import main

raise SystemExit(main())
