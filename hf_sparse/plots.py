"""Pictures of a pruned model and of a sweep, as PNG bytes (matplotlib, the optional extra ``hf-sparse[plots]``).

* :func:`sweep_figure` — perplexity against sparsity, one line per method, N:M patterns as separate markers, the
  dense level as a dashed line;
* :func:`sparsity_figure` — achieved sparsity per block and module type (a heat map), or, for a structurally pruned
  model, the width each block kept (attention heads, key/value heads, MLP channels) with removed blocks marked;
* :func:`evaluation_figure` — dense / pruned / recovered bars for every recorded metric;
* :func:`card_figures` — the files and the Markdown a model card embeds.

Figures are drawn on ``matplotlib.figure.Figure`` objects, never through ``pyplot``: no global backend is switched
and nothing opens a window, so a library call is safe inside notebooks and servers.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pictures need matplotlib: pip install "hf-sparse[plots]"'
SPARSITY_PNG = "sparsity.png"
EVALUATION_PNG = "evaluation.png"
_STAGES = ("dense", "pruned", "recovered")
_STAGE_COLORS = {"dense": "#7f7f7f", "pruned": "#1f77b4", "recovered": "#2ca02c"}
_BLOCK_INDEX = re.compile(r"\.(\d+)\.")


class PlotsUnavailable(ImportError):
    """matplotlib is not installed."""


def plots_available() -> bool:
    """Whether matplotlib can be imported (the card and the sweep then carry pictures).

    >>> isinstance(plots_available(), bool)
    True
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise PlotsUnavailable(INSTALL_HINT) from error
    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def write_png(data: bytes, path: str | os.PathLike) -> Path:
    """Write PNG bytes atomically (:func:`hf_sparse.saving.atomic_write_file`)."""
    from .saving import atomic_write_file

    return atomic_write_file(path, data)


# ---------------------------------------------------------------------------------------------------------------
# Sweeps


def sweep_figure(points: Sequence[Any], path: str | os.PathLike | None = None, title: str | None = None) -> bytes:
    """Perplexity against target sparsity for sweep points (:class:`hf_sparse.evaluation.sweep.SweepPoint`).

    Unstructured settings of a method form one line; each N:M pattern is a separate marker at its sparsity; the dense
    perplexity is a dashed horizontal line. The y axis is logarithmic when the values span more than a factor of 3.
    Returns the PNG bytes (and writes them to ``path`` if given).

    >>> png = sweep_figure(points, "sweep.png")  # doctest: +SKIP
    """
    figure = _figure(6.4, 4.2)
    axes = figure.add_subplot()
    dense = [p.perplexity for p in points if p.method == "dense"]
    pruned = [p for p in points if p.method != "dense"]
    methods = list(dict.fromkeys(p.method for p in pruned))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    markers = iter(("s", "^", "D", "v", "P", "X"))
    pattern_markers: dict[str, str] = {}
    for method in methods:
        line = sorted((p.target_sparsity, p.perplexity) for p in pruned
                      if p.method == method and p.pattern == "unstructured")
        if line:
            axes.plot([x for x, _ in line], [y for _, y in line], marker="o", color=colors[method], label=method)
        for p in pruned:
            if p.method == method and p.pattern != "unstructured":
                marker = pattern_markers.setdefault(p.pattern, next(markers, "*"))
                axes.plot([p.target_sparsity], [p.perplexity], linestyle="none", marker=marker, markersize=9,
                          markerfacecolor="none", markeredgewidth=2, color=colors[method],
                          label=f"{method} {p.pattern}")
    values = [p.perplexity for p in pruned] + dense
    if dense:
        axes.axhline(dense[0], color="black", linestyle="--", linewidth=1, label=f"dense ({dense[0]:.2f})")
    if values and max(values) / min(values) > 3:
        axes.set_yscale("log")
        from matplotlib.ticker import ScalarFormatter

        axes.yaxis.set_major_formatter(ScalarFormatter())
        axes.yaxis.set_minor_formatter(ScalarFormatter())
    levels = sorted({p.target_sparsity for p in pruned})
    if levels:
        axes.set_xticks(levels, [f"{level:.0%}" for level in levels])
    axes.set_xlabel("target sparsity")
    axes.set_ylabel("perplexity (lower is better)")
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize="small")
    if title:
        axes.set_title(title, fontsize="medium")
    data = _png(figure)
    if path is not None:
        write_png(data, path)
    return data


# ---------------------------------------------------------------------------------------------------------------
# Model cards


def _block_and_type(name: str) -> tuple[int | None, str]:
    match = _BLOCK_INDEX.search(name)
    return (int(match.group(1)) if match else None), name.rsplit(".", 1)[-1]


def _structure_figure(structure: dict[str, Any]):
    original = structure.get("original", {})
    num_blocks = int(original.get("num_blocks", 0))
    removed = set(structure.get("removed_blocks", []))
    kept = {block["original_index"]: block for block in structure.get("blocks", [])}
    if not num_blocks:
        num_blocks = len(kept) + len(removed)
    series = [(key, label) for key, label in (("attention_heads", "attention heads"), ("kv_heads", "key/value heads"),
                                              ("mlp_channels", "MLP channels")) if original.get(key)]
    figure = _figure(min(11.0, max(6.0, 0.45 * num_blocks + 2)), 3.6)
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(series))
    for s, (key, label) in enumerate(series):
        xs, ys = [], []
        for index in range(num_blocks):
            if index in kept and kept[index].get(key) is not None:
                xs.append(index + (s - (len(series) - 1) / 2) * width)
                ys.append(kept[index][key] / original[key])
        axes.bar(xs, ys, width=width, label=f"{label} (of {original[key]})", color=f"C{s}")
    for index in sorted(removed):
        axes.bar([index], [1.0], width=0.8, color="none", edgecolor="#d62728", hatch="//", linewidth=1)
        axes.text(index, 0.5, "removed", rotation=90, ha="center", va="center", color="#d62728", fontsize="small",
                  bbox={"facecolor": "white", "edgecolor": "none", "pad": 2})
    axes.set_ylim(0, 1.22)  # headroom for the legend above the full-width bars
    axes.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    axes.set_xlim(-0.6, num_blocks - 0.4)
    axes.set_xticks(range(num_blocks))
    axes.set_xlabel("block (original index)")
    axes.set_ylabel("kept fraction of original width")
    axes.legend(fontsize="small", loc="upper center", ncol=len(series), frameon=False)
    removed_text = f", {len(removed)} of {num_blocks} blocks removed" if removed else ""
    axes.set_title(f"Width kept per block{removed_text}", fontsize="medium")
    return figure


def _mask_figure(modules: dict[str, float], overall: float | None, pattern: str | None = None):
    blocks = sorted({b for b, _ in map(_block_and_type, modules) if b is not None})
    types = list(dict.fromkeys(t for _, t in map(_block_and_type, modules)))
    has_other = any(b is None for b, _ in map(_block_and_type, modules))
    columns = blocks + ([None] if has_other else [])
    grid = [[math.nan] * len(columns) for _ in types]
    for name, value in modules.items():
        block, kind = _block_and_type(name)
        grid[types.index(kind)][columns.index(block)] = value
    figure = _figure(min(10.0, max(5.0, 0.42 * len(columns) + 2.6)), max(2.6, 0.38 * len(types) + 1.4))
    axes = figure.add_subplot()
    image = axes.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    axes.set_yticks(range(len(types)), types)
    step = max(1, len(columns) // 24)  # at most ~24 labels on the x axis
    axes.set_xticks(range(0, len(columns), step),
                    ["other" if c is None else str(c) for c in columns][::step])
    axes.set_xlabel("block")
    if len(columns) <= 16:
        for row, kind in enumerate(types):
            for col in range(len(columns)):
                value = grid[row][col]
                if not math.isnan(value):
                    axes.text(col, row, f"{value:.0%}", ha="center", va="center", fontsize="x-small",
                              color="white" if value < 0.6 else "black")
    figure.colorbar(image, ax=axes, label="sparsity", fraction=0.05)
    title = "Achieved sparsity per block and module"
    details = [p for p in (pattern if pattern and pattern != "unstructured" else None,
                           f"overall {overall:.1%}" if overall is not None else None) if p]
    axes.set_title(title + (f" ({', '.join(details)})" if details else ""), fontsize="medium")
    return figure


def sparsity_figure(record: Any, path: str | os.PathLike | None = None) -> bytes:
    """Per-layer picture of a sparsity record (:class:`hf_sparse.SparsityRecord` or its dict): a heat map of the
    achieved sparsity per block and module type, or, when the record has a ``structure`` entry (structured
    pruning), the kept width per block with removed blocks hatched. Returns PNG bytes (written to ``path`` if given).

    >>> png = sparsity_figure(hf_sparse.read_record(model), "sparsity.png")  # doctest: +SKIP
    """
    data = record if isinstance(record, dict) else record.to_dict()
    structure = data.get("structure")
    if structure:
        figure = _structure_figure(structure)
    elif data.get("modules"):
        figure = _mask_figure(data["modules"], data.get("overall_sparsity"), data.get("pattern"))
    else:
        raise ValueError("the record has neither per-module sparsities nor a structure entry: nothing to draw")
    png = _png(figure)
    if path is not None:
        write_png(png, path)
    return png


def _stage_metrics(evaluation: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{"dense_perplexity": 53.1, "pruned_arc_easy_acc": 0.6}`` -> ``{"perplexity": {"dense": 53.1}, ...}``."""
    metrics: dict[str, dict[str, float]] = {}
    for key, value in evaluation.items():
        stage, _, metric = key.partition("_")
        if stage in _STAGES and metric and isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.setdefault(metric, {})[stage] = float(value)
    return metrics


def evaluation_figure(evaluation: dict[str, Any], path: str | os.PathLike | None = None,
                      labels: dict[str, str] | None = None, max_panels: int = 6) -> bytes | None:
    """Bars of every ``<stage>_<metric>`` entry of a record's ``evaluation`` (one panel per metric, one bar per stage
    dense / pruned / recovered); ``None`` when there is nothing to draw. ``labels`` renames the stages.

    >>> png = evaluation_figure({"dense_perplexity": 53.1, "pruned_perplexity": 62.1})  # doctest: +SKIP
    """
    metrics = _stage_metrics(evaluation)
    if not metrics:
        return None
    names = list(metrics)[:max_panels]
    if len(metrics) > max_panels:
        logger.info("evaluation picture: showing %d of %d metrics", max_panels, len(metrics))
    figure = _figure(min(3.0 * len(names), 12.0) + 0.5, 3.2)
    for i, metric in enumerate(names):
        axes = figure.add_subplot(1, len(names), i + 1)
        stages = [s for s in _STAGES if s in metrics[metric]]
        values = [metrics[metric][s] for s in stages]
        bars = axes.bar(range(len(stages)), values, color=[_STAGE_COLORS[s] for s in stages])
        axes.bar_label(bars, labels=[f"{v:.2f}" if abs(v) >= 1 else f"{v:.3f}" for v in values], fontsize="small")
        axes.set_xticks(range(len(stages)), [(labels or {}).get(s, s) for s in stages], fontsize="small")
        lower_better = metric.endswith("perplexity")
        axes.set_title(metric.replace("_", " ") + (" (lower is better)" if lower_better else ""), fontsize="medium")
        axes.set_ylim(0, max(values) * 1.18)
        axes.spines[["top", "right"]].set_visible(False)
    png = _png(figure)
    if path is not None:
        write_png(png, path)
    return png


def card_figures(record: Any) -> tuple[dict[str, bytes], str]:
    """The pictures of a model card and the Markdown that embeds them: ``({file name: PNG bytes}, markdown)``.

    Without matplotlib there are no files and the Markdown says how to get the pictures.

    >>> files, markdown = card_figures(hf_sparse.read_record(model))  # doctest: +SKIP
    """
    if not plots_available():
        return {}, f"_This card is text only: {INSTALL_HINT}._"
    data = record if isinstance(record, dict) else record.to_dict()
    files = {SPARSITY_PNG: sparsity_figure(data)}
    kind = "Kept width per block" if data.get("structure") else "Achieved sparsity per block and module"
    lines = [f"![{kind}]({SPARSITY_PNG})"]
    evaluation = data.get("evaluation") or {}
    labels = {"pruned": f"pruned\n{data.get('method', '')} {data.get('pattern', '')}".rstrip()}
    bars = evaluation_figure(evaluation, labels=labels)
    if bars is not None:
        stages = [s for s in _STAGES if any(key.startswith(f"{s}_") for key in evaluation)]
        lines.append(f"![Evaluation: {', '.join(stages)}]({EVALUATION_PNG})")
        files[EVALUATION_PNG] = bars
    return files, "\n\n".join(lines)
