"""The tokenizer of a GGUF export: vocabulary, merges, special tokens and chat template, written with the ``gguf``
package's vocabulary helpers so that llama.cpp splits text into exactly the tokens transformers gives.

Two kinds of Hugging Face tokenizer are written:

* **byte-level BPE** (GPT-2 style: the 7M model, SmolLM2, Llama 3, Qwen2) as GGUF tokenizer model ``"gpt2"``, with
  the pre-tokenizer named by ``tokenizer.ggml.pre``. llama.cpp knows pre-tokenizers by name, so the one in
  ``tokenizer.json`` is matched against the ones whose llama.cpp names are known here (:data:`PRE_TOKENIZERS`);
  another is refused rather than written with a name that splits text differently;
* **SentencePiece-style BPE with byte fallback** (Llama 2, Mistral) as ``"llama"``.

Whether a BOS/EOS token is added is read from what the tokenizer does (it is written explicitly, so llama.cpp does not
fall back to its own default for the pre-tokenizer).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Pre-tokenizer regular expressions as they appear in tokenizer.json files (facts about those tokenizers).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(step: dict, use_regex: bool) -> bool:
    return step.get("type") == "ByteLevel" and bool(step.get("use_regex", True)) == use_regex \
        and not step.get("add_prefix_space", False)


def _split(step: dict, pattern: str) -> bool:
    return step.get("type") == "Split" and step.get("pattern", {}).get("Regex") == pattern \
        and step.get("behavior") == "Isolated" and not step.get("invert", False)


def _steps(pre: dict | None) -> list[dict]:
    if not pre:
        return []
    return list(pre.get("pretokenizers", [])) if pre.get("type") == "Sequence" else [pre]


#: llama.cpp pre-tokenizer name -> test on (the ``pre_tokenizer`` steps, whether the BPE model ignores merges for
#: whole words in its vocabulary) of a byte-level BPE ``tokenizer.json``; llama.cpp's ``llama-bpe`` ignores merges,
#: the others do not
PRE_TOKENIZERS = {
    "gpt-2": lambda s, ignore: len(s) == 1 and _byte_level(s[0], use_regex=True) and not ignore,
    "smollm": lambda s, ignore: len(s) == 2 and s[0].get("type") == "Digits" and s[0].get("individual_digits") is True
    and _byte_level(s[1], use_regex=True) and not ignore,
    "llama-bpe": lambda s, ignore: len(s) == 2 and _split(s[0], _LLAMA3_SPLIT) and _byte_level(s[1], use_regex=False)
    and ignore,
    "qwen2": lambda s, ignore: len(s) == 2 and _split(s[0], _QWEN2_SPLIT) and _byte_level(s[1], use_regex=False)
    and not ignore,
}


def _describe(pre: Any) -> str:
    text = json.dumps(pre, ensure_ascii=True)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class GGUFVocab:
    """What the writer needs of a tokenizer (see :func:`read_vocab`)."""

    model: str  # "gpt2" or "llama"
    pre: str | None
    tokens: list[str | bytes]
    scores: list[float]
    types: list[int]
    special: Any  # gguf.SpecialVocab: merges, special token ids, add_* flags, chat template
    add_bos: bool
    add_eos: bool

    def pad_to(self, size: int) -> None:
        """Pad the vocabulary with unused tokens up to the embedding rows ``size`` (a model may have more rows than
        its tokenizer has tokens); refuses a tokenizer with more tokens than the model has rows."""
        import gguf

        if len(self.tokens) > size:
            raise ValueError(f"the tokenizer has {len(self.tokens)} tokens but the model's embedding only {size} rows; "
                             "export needs the tokenizer the model was trained with")
        for index in range(len(self.tokens), size):
            self.tokens.append(f"[PAD{index}]")
            self.scores.append(-1000.0)
            self.types.append(int(gguf.TokenType.UNUSED))

    def add_to(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        # the add-BOS/EOS flags are written from what the tokenizer does, not from its config files
        self.special.add_special_token.pop("bos", None)
        self.special.add_special_token.pop("eos", None)
        self.special.add_to_gguf(writer, quiet=True)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)


def _adds(tokenizer, token_id: int | None, first: bool) -> bool:
    if token_id is None:
        return False
    with_special = tokenizer("a b", add_special_tokens=True)["input_ids"]
    return bool(with_special) and (with_special[0] if first else with_special[-1]) == token_id


def read_vocab(tokenizer) -> GGUFVocab:
    """The GGUF vocabulary of a transformers (fast) tokenizer, or a one-line ``ValueError`` naming what the helpers
    do not know.

    >>> from transformers import AutoTokenizer
    >>> vocab = read_vocab(AutoTokenizer.from_pretrained("demo/llama-7m-books-fp16"))
    >>> vocab.model, vocab.pre, len(vocab.tokens), vocab.add_bos
    ('gpt2', 'gpt-2', 4096, False)
    """
    import gguf

    if not getattr(tokenizer, "is_fast", False) or not hasattr(tokenizer, "save_pretrained"):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} is not a fast (tokenizer.json) tokenizer; GGUF export "
                         "writes byte-level BPE and SentencePiece-style BPE vocabularies from tokenizer.json")
    with tempfile.TemporaryDirectory(prefix="hf_sparse-vocab-") as folder:
        tokenizer.save_pretrained(folder)
        path = Path(folder)
        data = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        model = data.get("model", {})
        decoder = (data.get("decoder") or {}).get("type")
        if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder == "ByteLevel":
            steps = _steps(data.get("pre_tokenizer"))
            ignore = bool(model.get("ignore_merges", False))
            pre = next((name for name, test in PRE_TOKENIZERS.items() if test(steps, ignore)), None)
            if pre is None:
                raise ValueError(f"the tokenizer's pre-tokenizer {_describe(data.get('pre_tokenizer'))} (ignore_"
                                 f"merges={ignore}) has no llama.cpp name known to hf_sparse (known: "
                                 f"{sorted(PRE_TOKENIZERS)})")
            if data.get("normalizer"):
                raise ValueError(f"the byte-level tokenizer has a normalizer {_describe(data['normalizer'])}, which "
                                 "llama.cpp's BPE tokenizers do not apply")
            vocab, kind = gguf.BpeVocab(path), "gpt2"
        elif model.get("type") == "BPE" and model.get("byte_fallback"):
            vocab, kind, pre = gguf.LlamaHfVocab(path), "llama", None
        else:
            raise ValueError(f"tokenizer model {model.get('type')!r} (decoder {decoder!r}) is not one the gguf "
                             "vocabulary helpers write: byte-level BPE or SentencePiece-style BPE with byte fallback")
        tokens, scores, types = [], [], []
        for text, score, token_type in vocab.all_tokens():
            tokens.append(text)
            scores.append(float(score))
            types.append(int(token_type))
        # Added tokens may sit inside the base vocabulary (the 7M model's <s>, SmolLM2's <|im_start|>): the helper
        # lists them as normal tokens, so their types come from tokenizer.json.
        for added in data.get("added_tokens", []):
            index = added["id"]
            if index < len(types):
                types[index] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
        special = gguf.SpecialVocab(path, load_merges=kind == "gpt2", n_vocab=len(tokens))
    add_bos = _adds(tokenizer, tokenizer.bos_token_id, first=True)
    add_eos = _adds(tokenizer, tokenizer.eos_token_id, first=False)
    return GGUFVocab(kind, pre, tokens, scores, types, special, add_bos, add_eos)


__all__ = ["GGUFVocab", "PRE_TOKENIZERS", "read_vocab"]
