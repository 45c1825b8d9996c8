"""Hub-ready checkpoints: a model card (``README.md``) generated from the sparsity record, and save/push helpers.

``model.save_pretrained`` already writes ``config.json`` with ``"sparsity_config"`` (the record); what it does not
write is a card saying what the checkpoint is. :func:`save_with_model_card` writes weights, config, tokenizer and a
card rendered from ``hf_sparse/model_card.md`` (a Jinja template shipped as package data, rendered by
``huggingface_hub.ModelCard``):
base model, method, pattern, achieved sparsity overall and per module type, calibration data, recovery, the
evaluation table (dense / pruned / recovered perplexity, when known), how to load it with and without hf_sparse, and
a YAML header with ``base_model``, ``license``, ``tags``, ``library_name`` and ``pipeline_tag``.

transformers' own ``push_to_hub`` replaces ``README.md`` with its generic card unless the repository already has
one, so push with :func:`push_to_hub` here (one commit with every file); later ``model.push_to_hub`` calls keep the
card that is already on the Hub.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
import tempfile
from collections import OrderedDict
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData
from torch import nn

from .._version import __version__
from ..architectures import get_architecture
from ..errors import shown
from ..formats.compact import describe_storage, module_patterns, storage_summary
from ..masks import SparsityPattern
from ..plots import card_figures
from ..methods import METHODS
from ..record import RECORD_KEY, SparsityRecord, read_record, write_record
from ..saving import check_destination, save_checkpoint
from ..surgery import shape_rows, shape_summary

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
#: the card template, package data of hf_sparse (so an installed wheel writes cards); template_path= uses another
DEFAULT_TEMPLATE = "model_card.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_STAGES = ("dense", "pruned", "recovered")


def hub_model_id(name: str | None) -> str | None:
    """``name`` if it can be a Hub model id (``org/name``, not a local path), else ``None``.

    >>> hub_model_id("meta-llama/Llama-3.1-8B"), hub_model_id("/models/llama"), hub_model_id("pruned-dir")
    ('meta-llama/Llama-3.1-8B', None, None)
    """
    if not name or not _HUB_ID.match(name) or Path(name).expanduser().exists():
        return None
    return name


# Characters that start Markdown inline markup (HTML is escaped separately); escaping them keeps text inert.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|~])")
# Text that is safe inside a Markdown code span, even in a table cell (no backtick, no pipe, no HTML).
_CODE_SAFE = re.compile(r"[\w .,:;=+@/(){}\[\]\"'-]+")


def _text(value: Any) -> str:
    r"""Untrusted text (the record comes from a config.json) as inert Markdown: one line, HTML escaped, markup
    characters backslash-escaped.

    >>> _text("<script>alert(1)</script> | *x*")
    '&lt;script&gt;alert(1)&lt;/script&gt; \\| \\*x\\*'
    """
    one_line = " ".join(str(value).split())
    return _MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(one_line, quote=False))


def _literal(value: Any) -> str:
    """``value`` as a code span when that is safe, else as escaped text.

    >>> _literal("calibration.txt"), _literal("<b>.txt")
    ('`calibration.txt`', '&lt;b&gt;.txt')
    """
    text = " ".join(str(value).split())
    return f"`{text}`" if _CODE_SAFE.fullmatch(text) else _text(text)


def _inert_json(data: Any) -> str:
    """Indented JSON whose strings cannot close the code fence or open HTML (``<`` ``>`` ``&`` and the backtick are
    written as ``\\u`` escapes: the same JSON value)."""
    text = json.dumps(data, indent=2, default=str)
    for char in "<>&`":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text


_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")


def check_repo_id(repo_id: str | None) -> None:
    """Refuse a ``repo_id`` that is not a Hub repository name (``name`` or ``org/name``): the card prints it inside
    Python code, where a quote or a backtick would change what the card shows.

    >>> check_repo_id("me/llama-2of4")
    >>> check_repo_id('x")<img src=y>')
    Traceback (most recent call last):
    ...
    ValueError: repo_id 'x")<img src=y>' is not a Hub repository name; allowed: 'name' or 'org/name' (letters, digits, '.', '_', '-')
    """
    if repo_id is not None and (not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id)):
        raise ValueError(f"repo_id {shown(repo_id)} is not a Hub repository name; allowed: 'name' or 'org/name' "
                         "(letters, digits, '.', '_', '-')")


def _short_name(name: str) -> str:
    """A Hub id as is; a local path by its last component (a card must not publish someone's file system)."""
    return name if hub_model_id(name) else Path(str(name).rstrip("/")).name or str(name)


def sparsity_by_module_type(model: nn.Module, record: SparsityRecord | None = None) -> list[dict[str, Any]]:
    """Achieved sparsity of the pruned modules grouped by the last part of their name (``q_proj``, ``down_proj``...),
    measured from the weights' zeros, in model order.

    >>> sparsity_by_module_type(model)[0]  # doctest: +SKIP
    {'name': 'q_proj', 'sparsity': 0.5, 'weights': 393216, 'modules': 6}
    """
    record = record or read_record(model)
    if record is None:
        raise ValueError(f"the model has no {RECORD_KEY!r} record: prune it with hf_sparse first")
    modules = dict(model.named_modules())
    groups: OrderedDict[str, list[int]] = OrderedDict()
    for name in record.modules:
        module = modules.get(name)
        if module is None:
            raise ValueError(f"{RECORD_KEY} names module {name!r}, which this model does not have")
        weight = module.weight
        zeros, total, count = groups.setdefault(name.rsplit(".", 1)[-1], [0, 0, 0])
        groups[name.rsplit(".", 1)[-1]] = [zeros + int((weight == 0).sum()), total + weight.numel(), count + 1]
    return [{"name": key, "sparsity": zeros / total, "weights": total, "modules": count}
            for key, (zeros, total, count) in groups.items()]


def _calibration_text(calibration: dict[str, Any] | None) -> str:
    if not calibration:
        return "none (data-free method)"
    kind = calibration.get("kind")
    if kind == "mix":
        parts = " + ".join(f"{_calibration_text(one)} ({one['share'] * 100:.0f}%)" for one in calibration["sources"])
        n, length = calibration.get("num_samples"), calibration.get("sequence_length")
        return f"mix of {parts}" + (f"; {n} sequences × {length} tokens, seed {calibration.get('seed', 0)}"
                                     if n and length else "")
    # A file or folder is recorded by base name + sha256, a dataset by its name: either way the name is what to show.
    source = (_short_name(calibration["name"]) if kind in ("name_or_path", "file", "folder") and calibration.get("name")
              else f"{calibration.get('count', '?')} {'texts' if kind == 'texts' else 'token sequences'}"
                   f" (sha256 {str(calibration.get('sha256', ''))[:12]})")
    size = ""
    if calibration.get("num_samples") and calibration.get("sequence_length"):
        n, length = calibration["num_samples"], calibration["sequence_length"]
        size = f", {n} sequences × {length} tokens ({n * length:,} tokens), seed {calibration.get('seed', 0)}"
    return f"{_literal(source)}{_text(size)}"


def _profile_text(profile: dict[str, Any] | None) -> str:
    if not profile:
        return ""
    blocks = profile.get("block_sparsity") or {}
    spread = (f": blocks from {min(blocks.values()) * 100:.1f}% to {max(blocks.values()) * 100:.1f}%"
              if blocks else "")
    achieved = profile.get("block_achieved")  # structured: whole units removed, the shares reached per block
    if achieved and blocks:
        spread += (f" of their parameters (removed: {min(achieved.values()) * 100:.1f}% to "
                   f"{max(achieved.values()) * 100:.1f}%)")
    options = (f" ({', '.join(_text(f'{k}={json.dumps(v)}') for k, v in profile.get('options', {}).items())})"
               if profile.get("options") else "")
    return f"{_text(profile['name'])}{options}{spread}"


def _domain_text(check: dict[str, Any] | None) -> str:
    if not check:
        return ""
    verdict = ("**differ**: pruning methods fitted to calibration data may do worse than magnitude pruning on "
               "the target text" if check["mismatch"] else "look alike")
    return (f"calibration vs. target text on the dense model: loss {check['calibration_loss']:.2f} vs "
            f"{check['target_loss']:.2f} nats/token, token overlap {check['token_overlap']:.2f} — {verdict}")


def _recovery_text(recovery: dict[str, Any] | None) -> str:
    if not recovery:
        return ""
    method = str(recovery.get("method", "lora"))
    parts = [{"lora": "LoRA", "hira": "HiRA", "full": "full fine-tuning"}.get(method, _text(method))]
    if recovery.get("objective"):
        objective = {"distill": "distillation", "lm": "language-modelling loss",
                     "distill+lm": "distillation + language-modelling loss"}.get(str(recovery["objective"]))
        parts.append(objective or _text(recovery["objective"]))
    if recovery.get("teacher"):
        teacher = f"teacher {_literal(_short_name(str(recovery['teacher'])))}"
        correction = recovery.get("teacher_correction")
        if isinstance(correction, dict) and correction.get("steps") is not None:
            teacher += f" (corrected first: {_text(correction['steps'])} language-modelling steps on the same data)"
        parts.append(teacher)
    if recovery.get("mode"):
        parts.append(f"mode {_literal(recovery['mode'])} (sparsity kept)")
    for key, label in (("rank", "rank"), ("alpha", "alpha"), ("steps", "steps"), ("batch_size", "batch"),
                       ("sequence_length", "tokens/seq"), ("tokens", "tokens seen"), ("learning_rate", "lr")):
        if recovery.get(key) is not None:
            parts.append(f"{label} {_text(recovery[key])}")
    if recovery.get("data"):
        parts.append(f"on {_literal(_short_name(str(recovery['data'])))}")
    before, after = recovery.get("heldout_perplexity_before"), recovery.get("heldout_perplexity_after")
    if isinstance(before, (int, float)) and isinstance(after, (int, float)):
        parts.append(f"held-out perplexity {before:.2f} → {after:.2f}")
    if isinstance(recovery.get("control_perplexity"), (int, float)):
        parts.append(f"dense model given the same training: perplexity {recovery['control_perplexity']:.2f}")
    return ", ".join(parts)


def _evaluation_table(evaluation: dict[str, Any], labels: dict[str, str]) -> tuple[list[str], list[dict], str]:
    """Columns, rows and a note from keys ``<stage>_<metric>`` (stage: dense/pruned/recovered); other keys describe
    the setup (``eval_data``, ``eval_sequence_length``, ``eval_windows``)."""
    metrics: list[str] = []
    values: dict[str, dict[str, Any]] = {}
    for key, value in evaluation.items():
        stage, _, metric = key.partition("_")
        if stage in _STAGES and metric and isinstance(value, (int, float)):
            if metric not in metrics:
                metrics.append(metric)
            values.setdefault(stage, {})[metric] = value
    rows = [{"label": labels[stage], "values": [_fmt(values[stage].get(m)) for m in metrics]}
            for stage in _STAGES if stage in values]
    columns = [_text(m.replace("_", " ")) + (" ↓" if m == "perplexity" else "") for m in metrics]
    setup = []
    if evaluation.get("eval_data"):
        setup.append(f"on {_literal(_short_name(str(evaluation['eval_data'])))}")
    if evaluation.get("eval_sequence_length"):
        setup.append(f"non-overlapping windows of {int(evaluation['eval_sequence_length'])} tokens")
    if evaluation.get("eval_windows"):
        setup.append(f"{int(evaluation['eval_windows'])} windows")
    note = ("Measured " + ", ".join(setup) + ".") if setup else ""
    return columns, rows, note


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def _template_text(template_path: str | os.PathLike | None) -> str:
    if template_path is not None:
        return Path(template_path).read_text(encoding="utf-8")
    return resources.files("hf_sparse").joinpath(DEFAULT_TEMPLATE).read_text(encoding="utf-8")


def render_model_card(model: nn.Module, *, evaluation: dict[str, Any] | None = None, base_model: str | None = None,
                      repo_id: str | None = None, license: str | None = None, tags: list[str] | None = None,
                      model_name: str | None = None, template_path: str | os.PathLike | None = None,
                      pictures: str | None = None, storage: dict[str, Any] | None = None) -> ModelCard:
    """The model card of a pruned (or recovered) model, as a ``huggingface_hub.ModelCard``.

    ``storage`` is the ``storage`` entry of a compact checkpoint (:meth:`hf_sparse.formats.StorageSummary.record_entry`;
    default: the record's own, if any): the card then states the stored bytes against dense and how to load it.

    ``pictures`` is Markdown for the card's "Pictures" section (see
    :func:`hf_sparse.plots.card_figures`; :func:`save_with_model_card` writes the PNG files beside it).

    ``evaluation`` adds to (and overrides) ``record.evaluation``: keys ``dense_perplexity``, ``pruned_perplexity``,
    ``recovered_perplexity`` (any ``<stage>_<metric>``), and ``eval_data``/``eval_sequence_length``/``eval_windows``
    describing the measurement. ``base_model`` defaults to the record's, then to the model's ``name_or_path``; it
    goes into the YAML header only when it is a Hub id.

    >>> card = render_model_card(model, evaluation={"dense_perplexity": 53.06, "pruned_perplexity": 62.1})  # doctest: +SKIP
    >>> card.data.tags  # doctest: +SKIP
    ['hf_sparse', 'sparse', 'pruned', 'wanda', '2:4-sparsity', 'text-generation']
    """
    record = read_record(model)
    if record is None:
        raise ValueError(f"the model has no {RECORD_KEY!r} record: prune it with hf_sparse first")
    check_repo_id(repo_id)
    storage = storage if storage is not None else record.storage
    evaluation = {**record.evaluation, **(evaluation or {})}
    base = base_model or record.base_model or getattr(model, "name_or_path", None) or None
    pattern = SparsityPattern.parse(record.pattern)
    method_class = METHODS.get(record.method)  # the record names a registered method (checked when it was read)
    method = _text(method_class.display_name if method_class else record.method)
    paper = method_class.paper if method_class else None
    pattern_tag = f"{pattern}-sparsity" if pattern.is_n_m else (
        "structured-pruning" if pattern.is_structured else "unstructured-sparsity")
    card_tags = ["hf_sparse", "sparse", "pruned", record.method, pattern_tag]
    if record.recovery:
        card_tags.append("lora-recovery" if record.recovery.get("method", "lora") == "lora" else "recovery")
        if str(record.recovery.get("objective", "")).startswith("distill"):
            card_tags.append("distillation")
    card_tags += [t for t in (tags or []) if t not in card_tags]
    data = ModelCardData(
        base_model=hub_model_id(base), license=license, library_name="transformers", pipeline_tag="text-generation",
        tags=card_tags,
    )
    if license is None and repo_id is not None:  # only a published card needs one: local copies are the user's own
        logger.warning("the model card has no license: pass license=... (the base model's license usually applies)")
    if record.structure is not None and not record.modules:
        # Structured: the matrices are smaller, so the rows are block shapes rather than zeros per module type.
        rows = shape_rows(get_architecture(model), model, record.structure)
        pruned_parameters, overall = record.structure["original"]["block_parameters"], record.overall_sparsity
    else:
        rows = sparsity_by_module_type(model, record)
        pruned_parameters = sum(row["weights"] for row in rows)
        overall = sum(row["sparsity"] * row["weights"] for row in rows) / pruned_parameters
    amount = (f"{record.target_sparsity:.0%} of its decoder-block parameters removed (structured)"
              if pattern.is_structured else f"{record.target_sparsity:.0%} unstructured sparsity")
    stage_labels = {
        "dense": f"dense ({_text(_short_name(base))})" if base else "dense (base model)",
        "pruned": f"pruned ({_text(method)}, {pattern})",
        "recovered": f"recovered ({_recovery_text(record.recovery).split(',')[0] or 'fine-tuned'}, sparsity kept)",
    }
    columns, evaluation_rows, note = _evaluation_table(evaluation, stage_labels)
    base_text = _text(_short_name(base)) if base else None
    name = _text(model_name or (repo_id.split("/")[-1] if repo_id else "")) or (
        f"{base_text} pruned to {pattern if pattern.is_n_m else f'{record.target_sparsity:.0%}'} with {method}"
        if base else f"{method} {pattern} pruned model")
    recovered = (f" and recovered ({_recovery_text(record.recovery).split(', teacher')[0].split(', rank')[0]}, "
                 "sparsity kept)") if record.recovery else ""
    summary = (f"{base_text or 'A causal language model'} pruned with {method} to "
               f"{'the ' + str(pattern) + ' pattern' if pattern.is_n_m else amount}"
               f"{recovered}, using hf_sparse.")
    card = ModelCard.from_template(
        data, template_str=_template_text(template_path),
        model_name=name, summary=summary,
        base_model_display=f"[{base}](https://huggingface.co/{base})" if hub_model_id(base) else
        (_literal(_short_name(base)) if base else "unknown"),
        method_display=f"{method} ({_literal(record.method)}" + (
            f", options {_literal(json.dumps(record.method_options))})" if record.method_options else ")"),
        paper_display=f"[{paper.citation}]({paper.url})" if paper else "",
        pattern_display=f"{pattern} (N:M semi-structured)" if pattern.is_n_m else (
            "structured (whole heads, MLP channels or blocks removed)" if pattern.is_structured else "unstructured"),
        structure_display=shape_summary(record.structure) if record.structure is not None else "",
        pattern_is_n_m=pattern.is_n_m, pattern_n=pattern.n, pattern_m=pattern.m,
        target_sparsity=record.target_sparsity, overall_sparsity=overall,
        pruned_parameters=f"{pruned_parameters:,}", num_modules=len(record.modules),
        calibration_display=_calibration_text(record.calibration), recovery_display=_recovery_text(record.recovery),
        profile_display=_profile_text(record.sparsity_profile), domain_display=_domain_text(record.domain_check),
        hf_sparse_version=__version__,
        sparsity_rows=[{**row, "name": _literal(row["name"]), "weights": f"{row['weights']:,}"} for row in rows],
        evaluation_rows=evaluation_rows, evaluation_columns=columns, evaluation_note=note,
        architecture=_literal((getattr(model.config, "architectures", None) or [type(model).__name__])[0]),
        repo_id=repo_id or "path/to/this-checkpoint",
        record_json=_inert_json({**record.to_dict(), "modules": f"{len(record.modules)} modules, listed in config.json",
                                 "evaluation": evaluation}),
        pictures=pictures,
        storage_display=(f"compact ({_literal(storage.get('format'))} version {_text(storage.get('version'))}): "
                         f"{_text(describe_storage(storage))}") if storage else "",
    )
    return card


def save_with_model_card(model: nn.Module, tokenizer, output_dir: str | os.PathLike, push_to_hub: bool = False,
                         repo_id: str | None = None, evaluation: dict[str, Any] | None = None, *,
                         overwrite: bool = False, base_model: str | None = None, license: str | None = None,
                         tags: list[str] | None = None, private: bool | None = None, token: str | bool | None = None,
                         commit_message: str | None = None, template_path: str | os.PathLike | None = None,
                         compressed: bool = False) -> Path:
    """Save ``model`` (and ``tokenizer``, if given) to ``output_dir`` with a generated ``README.md``; optionally push.

    ``evaluation`` is merged into the record first, so ``config.json`` carries the numbers the card shows; a missing
    ``record.base_model`` is filled from the model's ``name_or_path``. The folder is written atomically
    (:func:`hf_sparse.saving.save_checkpoint`): an existing ``output_dir`` is refused unless ``overwrite=True`` (and
    then only a checkpoint is replaced), and the card is rendered before anything is written. With ``push_to_hub``
    the folder is uploaded to ``repo_id`` in one commit. Returns the path of the written card.

    >>> save_with_model_card(model, tokenizer, "llama-2of4", evaluation={"pruned_perplexity": 62.1})  # doctest: +SKIP
    PosixPath('/home/me/llama-2of4/README.md')
    """
    record = read_record(model)
    if record is None:
        raise ValueError(f"the model has no {RECORD_KEY!r} record: prune it with hf_sparse first")
    if push_to_hub and not repo_id:
        raise ValueError("push_to_hub=True needs repo_id='org/name'")
    check_destination(output_dir, overwrite)  # before the record is touched
    if record.base_model is None:
        source = base_model or getattr(model, "name_or_path", None)
        record.base_model = _short_name(source) if source else None
        write_record(model, record)

    def card() -> dict[str, str | bytes]:
        # Called after the evaluation is merged into the record, so the bars show the numbers the card lists.
        figures, pictures = card_figures(read_record(model))
        storage = None
        if compressed:  # the card states the bytes the compact checkpoint stores (computed, not yet written)
            storage = storage_summary(model.state_dict(), module_patterns(read_record(model))).record_entry()
        rendered = render_model_card(model, base_model=base_model, repo_id=repo_id, license=license, tags=tags,
                                     template_path=template_path, pictures=pictures, storage=storage)
        return {CARD_NAME: str(rendered), **figures}

    output = save_checkpoint(model, tokenizer, output_dir, overwrite=overwrite, evaluation=evaluation,
                             extra_files=card, compressed=compressed)
    if push_to_hub:
        upload_folder(output, repo_id, private=private, token=token, commit_message=commit_message)
    return output / CARD_NAME


def upload_folder(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None,
                  token: str | bool | None = None, commit_message: str | None = None):
    """Create ``repo_id`` if needed and upload every file of ``folder`` in one ``HfApi.create_commit``.

    One explicit commit (rather than ``HfApi.upload_folder``, which may split large folders into several) keeps the
    card, the config and the weights in step on the Hub.
    """
    from huggingface_hub import CommitOperationAdd

    folder = Path(folder)
    api = HfApi(library_name="hf_sparse")
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    operations = [CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
                  for path in sorted(folder.rglob("*")) if path.is_file() and ".git" not in path.parts]
    return api.create_commit(repo_id=repo_id, operations=operations, token=token,
                             commit_message=commit_message or "Upload sparse model (hf_sparse)")


def push_to_hub(model: nn.Module, repo_id: str, tokenizer=None, evaluation: dict[str, Any] | None = None,
                **kwargs: Any):
    """Push ``model`` (+ ``tokenizer``) with its generated card to ``repo_id``: :func:`save_with_model_card` into a
    temporary folder, then one commit. Keyword arguments as for :func:`save_with_model_card`.

    >>> hf_sparse.hub.push_to_hub(merged, "me/llama-2of4-recovered", tokenizer, license="llama3.1")  # doctest: +SKIP
    """
    with tempfile.TemporaryDirectory() as tmp:
        # A fresh folder inside the temporary one: the atomic save writes only where nothing exists yet.
        save_with_model_card(model, tokenizer, Path(tmp) / "checkpoint", push_to_hub=True, repo_id=repo_id, evaluation=evaluation,
                             **kwargs)


__all__ = [
    "hub_model_id",
    "push_to_hub",
    "render_model_card",
    "save_with_model_card",
    "sparsity_by_module_type",
    "upload_folder",
]
