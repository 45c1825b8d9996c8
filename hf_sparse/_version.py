"""The package version, in its own module at the bottom of the layers: model cards (hf_sparse.integrations.hub)
state it, and importing the package root from a layer would import every layer."""

__version__ = "0.1.0"
