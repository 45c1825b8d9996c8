"""Sparsity sweeps: prune one model at many (method, pattern, sparsity) settings and measure each, resumably.

The calibration windows are drawn once and the dense perplexity is measured once; every setting prunes a fresh copy
of the dense model with those windows. Results go to ``DIR/results.csv`` after every point (written to a temporary
file and renamed, so a kill never leaves a torn file); a sweep started again on the same ``DIR`` with the same
settings skips the points already there. ``DIR/sweep.json`` holds the settings (with hashes of the calibration windows
and of the evaluation text) and a sweep with different settings is refused rather than mixed in.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import SparsityConfig
from ..errors import PATH_SHOWN, shown
from ..masks import SparsityPattern
from ..plots import PlotsUnavailable, sweep_figure
from ..saving import atomic_write_file
from .perplexity import perplexity

logger = logging.getLogger(__name__)

RESULTS_NAME = "results.csv"
SETTINGS_NAME = "sweep.json"
PLOT_NAME = "sweep.png"
COLUMNS = ("method", "pattern", "target_sparsity", "achieved_sparsity", "perplexity")
DENSE = "dense"


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One setting of a sweep and, once measured, its result."""

    method: str
    pattern: str
    target_sparsity: float
    achieved_sparsity: float | None = None
    perplexity: float | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return self.method, self.pattern, f"{self.target_sparsity:.4f}"

    def row(self) -> dict[str, str]:
        return {"method": self.method, "pattern": self.pattern, "target_sparsity": f"{self.target_sparsity:.4f}",
                "achieved_sparsity": f"{self.achieved_sparsity:.6f}", "perplexity": f"{self.perplexity:.6f}"}

    @classmethod
    def from_row(cls, row: dict[str, str]) -> SweepPoint:
        return cls(row["method"], row["pattern"], float(row["target_sparsity"]), float(row["achieved_sparsity"]),
                   float(row["perplexity"]))


def sweep_points(methods: Sequence[str], sparsities: Sequence[float],
                 patterns: Sequence[str] = ("unstructured",)) -> list[SweepPoint]:
    """The settings of a sweep, in the order they run and are written: per method, per pattern, per sparsity (an N:M
    pattern fixes its sparsity, so it is one point per method).

    >>> [p.key for p in sweep_points(["wanda"], [0.5, 0.7], ["unstructured", "2:4"])]
    [('wanda', 'unstructured', '0.5000'), ('wanda', 'unstructured', '0.7000'), ('wanda', '2:4', '0.5000')]
    """
    for name, value in (("methods", methods), ("sparsities", sparsities), ("patterns", patterns)):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ValueError(f"{name} must be a list, got {shown(value)} ({type(value).__name__})"
                             + (f"; write [{shown(value)}]" if isinstance(value, (str, int, float)) else ""))
    for level in sparsities:
        if isinstance(level, bool) or not isinstance(level, (int, float)):
            raise ValueError(f"sparsities must hold numbers in [0, 1), got {shown(level)} ({type(level).__name__})")
    if not methods:
        raise ValueError("methods is empty; give at least one registered method, e.g. ['wanda', 'sparsegpt']")
    if not patterns:
        raise ValueError("patterns is empty; give 'unstructured' and/or N:M patterns such as '2:4'")
    points: list[SweepPoint] = []
    for method in methods:
        for pattern_text in patterns:
            pattern = SparsityPattern.parse(pattern_text)
            if pattern.is_n_m:
                levels = [pattern.implied_sparsity]
            else:
                if not sparsities:
                    raise ValueError("sparsities is empty; give levels in [0, 1) for the unstructured pattern")
                levels = list(sparsities)
            for level in levels:
                point = SweepPoint(method, str(pattern), float(level))
                if point.key in {p.key for p in points}:
                    raise ValueError(f"the setting {point.key} appears twice; give each method, pattern and "
                                     "sparsity once")
                points.append(point)
    return points


def _sha256_of_tensor(ids: torch.Tensor | None) -> str | None:
    if ids is None:
        return None
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _csv_text(points: list[SweepPoint]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for point in points:
        writer.writerow(point.row())
    return buffer.getvalue()


def read_results(output_dir: str | os.PathLike) -> list[SweepPoint]:
    """The points of ``DIR/results.csv`` (empty if there is none yet), the dense row first.

    The file is read back on resume, possibly after a hand edit, so every row is checked (:func:`check_row`): a
    row that this code could not have written raises a one-line ``ValueError`` naming the file, the row and the
    value, instead of being kept and plotted.

    >>> read_results("/no/such/sweep")
    []
    """
    path = Path(output_dir) / RESULTS_NAME
    if not path.exists():
        return []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{shown(str(path), PATH_SHOWN)} has columns {shown(reader.fieldnames)}, not "
                             f"{list(COLUMNS)}: not a hf_sparse sweep")
        points: dict[tuple[str, str, str], int] = {}
        results = []
        for number, row in enumerate(reader, start=2):  # line 1 is the header
            point = check_row(row, f"{path} line {number}")
            if point.key in points:
                raise ValueError(f"{shown(str(path), PATH_SHOWN)} line {number} repeats the setting {point.key} of "
                                 f"line {points[point.key]}; delete one of them (or restart the sweep)")
            points[point.key] = number
            results.append(point)
        return results


def check_row(row: dict[str, Any], where: str) -> SweepPoint:
    """One ``results.csv`` row as a :class:`SweepPoint`, refusing what a sweep never writes: an empty or unknown
    method or pattern, a sparsity outside [0, 1), a perplexity that is not a finite number >= 1, extra cells.

    >>> check_row({"method": "wanda", "pattern": "2:4", "target_sparsity": "0.5", "achieved_sparsity": "0.5",
    ...            "perplexity": "nan"}, "results.csv line 3")
    Traceback (most recent call last):
    ...
    ValueError: results.csv line 3: perplexity 'nan' is not allowed; a finite number >= 1 (a perplexity); fix or delete the row, or restart the sweep
    """
    fix = "fix or delete the row, or restart the sweep"
    if None in row or any(value is None for value in row.values()):
        raise ValueError(f"{where}: has {'more' if None in row else 'fewer'} cells than the {len(COLUMNS)} columns; {fix}")
    method, pattern = row["method"], row["pattern"]
    if not method or len(method) > 100 or not method.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"{where}: method {shown(method)} is not a method name; {fix}")
    if method == DENSE or pattern == DENSE:
        if (method, pattern) != (DENSE, DENSE):
            raise ValueError(f"{where}: the dense row needs method and pattern 'dense', got {shown(method)} and "
                             f"{shown(pattern)}; {fix}")
    else:
        try:
            SparsityPattern.parse(pattern)
        except ValueError:
            raise ValueError(f"{where}: pattern {shown(pattern)} is not a sparsity pattern; {fix}") from None
    numbers = {}
    for column, allowed, ok in (
            ("target_sparsity", "a number in [0, 1)", lambda v: 0.0 <= v < 1.0),
            ("achieved_sparsity", "a number in [0, 1]", lambda v: 0.0 <= v <= 1.0),
            ("perplexity", "a finite number >= 1 (a perplexity)", lambda v: math.isfinite(v) and v >= 1.0)):
        text = row[column]
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not ok(value):
            raise ValueError(f"{where}: {column} {shown(text)} is not allowed; {allowed}; {fix}")
        numbers[column] = value
    if method == DENSE and numbers["target_sparsity"] != 0.0:
        raise ValueError(f"{where}: the dense row has target_sparsity {shown(row['target_sparsity'])}; it must be 0")
    return SweepPoint(method, pattern, numbers["target_sparsity"], numbers["achieved_sparsity"],
                      numbers["perplexity"])


def _check_settings(output: Path, settings: dict[str, Any], restart: bool) -> None:
    path = output / SETTINGS_NAME
    if path.exists() and not restart:
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{shown(str(path), PATH_SHOWN)} is not valid JSON ({shown(str(error))}); restore it, or "
                             "restart=True (--restart) to discard the sweep's results") from None
        if not isinstance(stored, dict):
            raise ValueError(f"{shown(str(path), PATH_SHOWN)} must hold a JSON object of sweep settings, got "
                             f"{type(stored).__name__}; restart=True (--restart) discards the sweep's results")
        differing = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
        if differing:
            raise ValueError(f"{output} holds a sweep with other settings ({', '.join(differing)} differ); use "
                             "another output folder, or restart=True (--restart) to discard its results")
    elif restart:
        (output / RESULTS_NAME).unlink(missing_ok=True)
    atomic_write_file(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")


def run_sweep(model: nn.Module, tokenizer, base_config: SparsityConfig, methods: Sequence[str],
              sparsities: Sequence[float], eval_texts: str | Sequence[str], output_dir: str | os.PathLike,
              patterns: Sequence[str] = ("unstructured",), *, eval_sequence_length: int = 2048,
              eval_max_windows: int | None = None, eval_batch_size: int = 8, model_name: str | None = None,
              restart: bool = False, plot: bool = True, show_progress: bool = True) -> list[SweepPoint]:
    """Prune copies of ``model`` at every setting, measure perplexity on ``eval_texts``, write ``output_dir``.

    ``base_config`` gives everything but method, pattern and sparsity (calibration source and size, seed, include/
    exclude, device); ``model`` itself stays dense. Returns every point, the dense one first (method ``"dense"``).
    With ``plot`` (and matplotlib installed) ``output_dir/sweep.png`` shows perplexity against sparsity.

    >>> base = hf_sparse.SparsityConfig(calibration="calibration.txt", num_samples=32, sequence_length=256)  # doctest: +SKIP
    >>> run_sweep(model, tokenizer, base, ["wanda", "sparsegpt"], [0.5, 0.7], test_text, "sweep/",
    ...           eval_sequence_length=256, eval_max_windows=50)  # doctest: +SKIP
    """
    from ..api import prune
    from ..calibration import load_calibration

    points = sweep_points(methods, sparsities, patterns)
    for name, value, allowed in (("eval_sequence_length", eval_sequence_length, "a positive integer"),
                                 ("eval_batch_size", eval_batch_size, "a positive integer"),
                                 ("eval_max_windows", eval_max_windows, "a positive integer or None")):
        if (value is not None or name != "eval_max_windows") and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be {allowed}, got {shown(value)}")
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(context, int) and eval_sequence_length > context:
        raise ValueError(f"eval_sequence_length={eval_sequence_length} is longer than the model's context "
                         f"(max_position_embeddings={context}); use at most {context}")
    # Every setting is validated before the first (long) pruning run.
    configs = {}
    for point in points:
        fixed = SparsityPattern.parse(point.pattern).is_n_m
        configs[point.key] = dataclasses.replace(base_config, method=point.method, pattern=point.pattern,
                                                 sparsity=None if fixed else point.target_sparsity)
    output = Path(output_dir).expanduser()
    if output.exists() and not output.is_dir():
        raise ValueError(f"output {shown(str(output), PATH_SHOWN)} is a file; give a folder for the sweep's results")
    output.mkdir(parents=True, exist_ok=True)

    calibration_ids = None
    if any(config.needs_calibration for config in configs.values()):
        # Drawn once: every setting sees exactly the same windows (and the hash makes a resumed sweep check that).
        calibration_ids = load_calibration(
            base_config.calibration, tokenizer or base_config.tokenizer, base_config.num_samples,
            base_config.sequence_length, base_config.seed, split=base_config.calibration_split,
            column=base_config.calibration_column, subset=base_config.calibration_subset)
    texts = [eval_texts] if isinstance(eval_texts, str) else list(eval_texts)
    settings = {
        "model": model_name or getattr(model, "name_or_path", None) or type(model).__name__,
        "calibration_sha256": _sha256_of_tensor(calibration_ids),
        "calibration_shape": list(calibration_ids.shape) if calibration_ids is not None else None,
        "eval_sha256": hashlib.sha256("\n\n".join(texts).encode("utf-8")).hexdigest(),
        "eval_sequence_length": eval_sequence_length, "eval_max_windows": eval_max_windows,
        "seed": base_config.seed, "method_options": base_config.method_options,
        "include": base_config.include, "exclude": base_config.exclude,
    }
    _check_settings(output, settings, restart)

    def measure(candidate: nn.Module) -> float:
        return perplexity(candidate, tokenizer, texts, sequence_length=eval_sequence_length,
                          batch_size=eval_batch_size, max_windows=eval_max_windows, show_progress=False)

    done = {point.key: point for point in read_results(output)}
    dense_key = (DENSE, DENSE, f"{0.0:.4f}")
    ordered_keys = [dense_key] + [point.key for point in points]
    stale = sorted(set(done) - set(ordered_keys))
    if stale:
        logger.info("keeping %d earlier results that are not part of this sweep: %s", len(stale), stale)
        ordered_keys += stale

    def save() -> None:
        atomic_write_file(output / RESULTS_NAME, _csv_text([done[k] for k in ordered_keys if k in done]))

    todo = [point for point in points if point.key not in done]
    if done:
        logger.info("resuming the sweep in %s: %d of %d settings already measured", output,
                    len(points) - len(todo), len(points))
    bar = tqdm(total=len(points) + 1, initial=len(points) + 1 - len(todo) - (dense_key not in done),
               desc="sweep", unit="setting", disable=not show_progress)
    try:
        if dense_key not in done:
            bar.set_postfix_str("dense")
            done[dense_key] = SweepPoint(DENSE, DENSE, 0.0, 0.0, round(measure(model), 6))
            save()
            bar.update()
        for point in todo:
            bar.set_postfix_str(f"{point.method} {point.pattern} {point.target_sparsity:.2f}")
            candidate = copy.deepcopy(model)  # the dense model is never touched
            config = dataclasses.replace(configs[point.key], calibration=calibration_ids, tokenizer=None)
            start = time.perf_counter()
            record = prune(candidate, config, tokenizer=tokenizer, show_progress=show_progress)
            seconds = time.perf_counter() - start
            # Rounded as results.csv stores them, so a resumed sweep returns exactly what an uninterrupted one does.
            result = dataclasses.replace(point, achieved_sparsity=round(record.overall_sparsity, 6),
                                         perplexity=round(measure(candidate), 6))
            del candidate
            done[point.key] = result
            save()
            logger.info("%s %s %.2f: perplexity %.3f (pruned in %.1f s)", point.method, point.pattern,
                        point.target_sparsity, result.perplexity, seconds)
            bar.set_postfix_str(f"{point.method} {point.pattern} {point.target_sparsity:.2f}: ppl {result.perplexity:.2f}")
            bar.update()
    finally:
        bar.close()
    results = [done[k] for k in ordered_keys if k in done]
    if plot:
        try:
            sweep_figure(results, output / PLOT_NAME, title=settings["model"])
        except PlotsUnavailable as error:
            logger.warning("%s; wrote %s only", error, output / RESULTS_NAME)
    return results


def format_sweep_table(points: Sequence[SweepPoint]) -> str:
    """A Markdown table of a sweep: one row per method and pattern, one column per sparsity.

    >>> pts = [SweepPoint("dense", "dense", 0.0, 0.0, 53.1), SweepPoint("wanda", "unstructured", 0.5, 0.5, 56.4),
    ...        SweepPoint("wanda", "2:4", 0.5, 0.5, 62.1)]
    >>> print(format_sweep_table(pts))
    | method | pattern | 0% | 50% |
    |---|---|---|---|
    | dense | - | 53.10 | - |
    | wanda | unstructured | - | 56.40 |
    | wanda | 2:4 | - | 62.10 |
    """
    levels = sorted({p.target_sparsity for p in points if p.method != DENSE} | {0.0})
    rows: dict[tuple[str, str], dict[float, float]] = {}
    for p in points:
        rows.setdefault((p.method, "-" if p.method == DENSE else p.pattern), {})[p.target_sparsity] = p.perplexity
    lines = ["| method | pattern | " + " | ".join(f"{level:.0%}" for level in levels) + " |",
             "|---|---|" + "---|" * len(levels)]
    for (method, pattern), values in rows.items():
        cells = [f"{values[level]:.2f}" if level in values else "-" for level in levels]
        lines.append(f"| {method} | {pattern} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
