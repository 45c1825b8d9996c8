"""Zero-shot (and few-shot) accuracy through lm-eval-harness, on the model already in memory.

The model is handed to lm-eval's own ``HFLM`` as an object, so it is never loaded a second time: whatever hf_sparse
did to it (masks, smaller matrices after structured pruning, compact weights, a ``device_map`` over several devices)
is what gets evaluated. lm-eval is an optional dependency: ``pip install "hf-sparse[eval]"``.
"""

from __future__ import annotations

import difflib
import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..record import RECORD_KEY, merge_evaluation, read_record

logger = logging.getLogger(__name__)

INSTALL_HINT = 'zero-shot evaluation needs lm-eval-harness: pip install "hf-sparse[eval]" (lm-eval==0.4.13)'
_STAGES = ("dense", "pruned", "recovered")


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(f"{INSTALL_HINT} ({error})") from error
    return lm_eval, HFLM, TaskManager


def _check_tasks(tasks: Sequence[str], task_manager) -> list[str]:
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    tasks = [t.strip() for t in tasks]
    if not tasks:
        raise ValueError("tasks is empty; give lm-eval task names such as ['arc_easy', 'hellaswag']")
    known = set(task_manager.all_tasks)
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown lm-eval task {task!r}{hint} (`lm-eval ls tasks` lists the known ones; "
                             "local YAML tasks need include_path=DIR)")
    return tasks


def _task_manager(TaskManager, tasks: Sequence[str], include_path: str | Path | None):
    """A ``TaskManager`` that knows ``tasks`` (checked), and the task list. Indexing lm-eval's thousands of built-in
    task files takes a while, so when every task is one of ``include_path``'s own, only that folder is indexed."""
    folder = str(Path(include_path).expanduser()) if include_path else None
    if folder is not None:
        local = TaskManager(include_path=folder, include_defaults=False)
        try:
            return local, _check_tasks(tasks, local)
        except ValueError:
            pass  # some task is a built-in one: index everything
    manager = TaskManager(include_path=folder)
    return manager, _check_tasks(tasks, manager)


def _metrics(task_results: dict[str, Any]) -> dict[str, float]:
    """``{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}`` -> ``{"acc": 0.5, "acc_stderr": 0.1}``."""
    metrics = {}
    for key, value in task_results.items():
        metric, _, filter_name = key.partition(",")
        if not filter_name or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metrics[metric if filter_name == "none" else f"{metric}_{filter_name}"] = float(value)
    return metrics


def zero_shot(model: nn.Module, tokenizer, tasks: Sequence[str], include_path: str | Path | None = None,
              limit: int | float | None = None, num_fewshot: int | None = None, batch_size: int = 1,
              seed: int = 0, show_progress: bool = True) -> dict[str, dict[str, float]]:
    """Run lm-eval-harness ``tasks`` on the loaded ``model``; returns ``{task: {metric: value}}``.

    ``include_path`` is a folder of extra task YAML files (lm-eval's task format); ``limit`` evaluates at most that
    many documents per task (a fraction if below 1, as in lm-eval); ``num_fewshot`` defaults to each task's own
    (zero for the usual pruning-paper tasks). Metrics are lm-eval's (``acc``, ``acc_norm`` and their ``_stderr``).
    The model's train/eval mode is restored afterwards.

    >>> scores = zero_shot(model, tokenizer, ["arc_easy", "piqa"], limit=200)  # doctest: +SKIP
    >>> scores["arc_easy"]["acc"]  # doctest: +SKIP
    0.6149
    """
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    if include_path is not None and not Path(include_path).expanduser().is_dir():
        raise ValueError(f"include_path {str(include_path)!r} is not a folder; give the folder of task YAML files")
    if limit is not None and not limit > 0:
        raise ValueError(f"limit must be a positive number of documents (or a fraction in (0, 1)), got {limit!r}")
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {num_fewshot!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    # lm-eval logs through the "lm_eval" logger; quiet runs keep only its errors. It warns, too, that an object passed
    # as `pretrained` makes its loading options moot: true and expected here, so that warning is always held back.
    lm_eval_logger = logging.getLogger("lm_eval")
    previous_level = lm_eval_logger.level
    was_training = model.training
    try:
        lm_eval_logger.setLevel(logging.ERROR)
        task_manager, tasks = _task_manager(TaskManager, tasks, include_path)
        # HFLM keeps a reference to this very object: no reload, the pruned weights and shapes are what is scored.
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        lm_eval_logger.setLevel(previous_level if show_progress else logging.ERROR)
        if not show_progress:  # lm-eval's request loops take disable_tqdm, which its evaluator never passes
            for request_type in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
                setattr(lm, request_type, functools.partial(getattr(lm, request_type), disable_tqdm=True))
        output = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=task_manager,
            log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    finally:
        lm_eval_logger.setLevel(previous_level)
        model.train(was_training)
    results = {task: _metrics(values) for task, values in output["results"].items()}
    for task, metrics in results.items():
        logger.info("%s: %s", task, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return results


def check_available() -> None:
    """Raise ``ImportError`` with the install hint when lm-eval-harness is missing (cheap: no task index is built)."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise ImportError(INSTALL_HINT)


def zero_shot_entry(results: dict[str, dict[str, float]], stage: str, *, limit: int | float | None = None,
                    num_fewshot: int | None = None) -> dict[str, Any]:
    """The record's ``evaluation`` keys for :func:`zero_shot` results: ``<stage>_<task>_<metric>`` (stderr values
    left out: the card shows the metric) plus the setup (``zero_shot_limit``, ``zero_shot_num_fewshot``).

    >>> zero_shot_entry({"arc_easy": {"acc": 0.61234567, "acc_stderr": 0.01}}, "pruned", limit=100)
    {'pruned_arc_easy_acc': 0.612346, 'zero_shot_limit': 100}
    """
    if stage not in _STAGES:
        raise ValueError(f"stage {stage!r} is not allowed; use one of {', '.join(_STAGES)}")
    entry: dict[str, Any] = {f"{stage}_{task}_{metric}": round(value, 6) for task, metrics in results.items()
                             for metric, value in metrics.items() if not metric.endswith("_stderr")}
    entry.update({key: value for key, value in (("zero_shot_limit", limit), ("zero_shot_num_fewshot", num_fewshot))
                  if value is not None})
    return entry


def record_zero_shot(model: nn.Module, results: dict[str, dict[str, float]], stage: str | None = None,
                     *, limit: int | float | None = None, num_fewshot: int | None = None) -> dict[str, Any]:
    """Store :func:`zero_shot` results in the model's sparsity record (``record.evaluation``), for its model card;
    ``stage`` defaults to ``"recovered"`` after recovery, else ``"pruned"``. Returns the entries added
    (:func:`zero_shot_entry`).

    >>> record_zero_shot(model, {"arc_easy": {"acc": 0.61, "acc_stderr": 0.01}})  # doctest: +SKIP
    {'pruned_arc_easy_acc': 0.61}
    """
    record = read_record(model)
    if record is None:
        raise ValueError(f"the model has no {RECORD_KEY!r} record: only a model pruned by hf_sparse has one")
    entry = zero_shot_entry(results, stage or ("recovered" if record.recovery else "pruned"), limit=limit,
                            num_fewshot=num_fewshot)
    merge_evaluation(model, entry)
    return entry
