"""Writers for other engines' formats, one module per format: :mod:`.gguf` (llama.cpp, Ollama, LM Studio).

This layer sits above surgery, formats and integrations and below the api, evaluation and the CLI.
"""

from .gguf import export_gguf, plan_export

__all__ = ["export_gguf", "plan_export"]
