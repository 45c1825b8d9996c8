"""Zero-shot tasks (a local lm-eval task), the speed bench's JSON, resumable sweeps, and model cards with pictures.

Everything runs on the vendored demo model (demo/llama-7m-books-fp16, loaded in float32), so none of it is slow."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import torch

import hf_sparse
from hf_sparse import plots
from hf_sparse.evaluation.sweep import RESULTS_NAME, SweepPoint, format_sweep_table, read_results, sweep_points

from conftest import DEMO_CALIBRATION, DEMO_HELDOUT, DEMO_MODEL

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(DEMO_MODEL)


def _magnitude_pruned(model):
    import copy

    pruned = copy.deepcopy(model)
    hf_sparse.prune(pruned, hf_sparse.SparsityConfig(method="magnitude", sparsity=0.5), show_progress=False)
    return pruned


# ---------------------------------------------------------------------------------------------------------------
# Zero-shot


@torch.no_grad()
def _direct_accuracy(model, tokenizer, docs) -> float:
    """Multiple-choice accuracy computed by hand: the choice with the largest summed log-probability of its tokens
    after the context (lm-eval's rule: continuation = " " + choice, split off the tokenized whole)."""
    correct = 0
    for doc in docs:
        scores = []
        context_ids = tokenizer(doc["context"], add_special_tokens=False).input_ids
        for choice in doc["choices"]:
            whole = tokenizer(doc["context"] + " " + choice, add_special_tokens=False).input_ids
            ids = torch.tensor([whole])
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)  # (seq, vocab)
            scores.append(sum(log_probs[t - 1, whole[t]].item() for t in range(len(context_ids), len(whole))))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    return correct / len(docs)


def test_zero_shot_on_a_local_task_matches_the_log_likelihoods_and_goes_into_the_card(demo, monkeypatch, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval-harness is the optional extra hf-sparse[eval]")
    from hf_sparse.evaluation import record_zero_shot, zero_shot

    model, tokenizer = demo
    pruned = _magnitude_pruned(model)
    limit = 6
    docs = json.loads((TASKS_DIR / "tiny_books_mc.json").read_text())[:limit]
    # The YAML names its JSON file relatively: lm-eval (through datasets) resolves it against the working directory.
    monkeypatch.chdir(TASKS_DIR)
    scores = zero_shot(pruned, tokenizer, ["tiny_books_mc"], include_path=TASKS_DIR, limit=limit,
                       show_progress=False)
    assert set(scores) == {"tiny_books_mc"}
    metrics = scores["tiny_books_mc"]
    assert metrics["acc"] == pytest.approx(_direct_accuracy(pruned, tokenizer, docs), abs=1e-12)
    assert 0.0 <= metrics["acc_norm"] <= 1.0 and metrics["acc_stderr"] > 0
    assert pruned.training is False  # the mode it had before

    added = record_zero_shot(pruned, scores, limit=limit)
    assert added == {"pruned_tiny_books_mc_acc": round(metrics["acc"], 6),
                     "pruned_tiny_books_mc_acc_norm": round(metrics["acc_norm"], 6), "zero_shot_limit": limit}
    record = hf_sparse.read_record(pruned)
    assert record.evaluation["zero_shot_limit"] == limit
    card = hf_sparse.hub.render_model_card(pruned).text
    assert "tiny books mc acc" in card and f"{metrics['acc']:.2f}" in card


def test_unknown_tasks_and_bad_arguments_are_refused_early(demo):
    from types import SimpleNamespace

    from hf_sparse.evaluation import zero_shot_entry
    from hf_sparse.evaluation.zero_shot import _check_tasks

    manager = SimpleNamespace(all_tasks=["arc_easy", "arc_challenge", "piqa"])
    assert _check_tasks("arc_easy,piqa", manager) == ["arc_easy", "piqa"]
    with pytest.raises(ValueError, match="unknown lm-eval task 'arc_esay'; did you mean arc_easy"):
        _check_tasks(["arc_esay"], manager)
    with pytest.raises(ValueError, match="tasks is empty"):
        _check_tasks([], manager)
    with pytest.raises(ValueError, match="stage 'final' is not allowed"):
        zero_shot_entry({"piqa": {"acc": 0.5}}, "final")
    pytest.importorskip("lm_eval")
    model, tokenizer = demo
    with pytest.raises(ValueError, match="include_path '/no/such/tasks' is not a folder"):
        hf_sparse.evaluation.zero_shot(model, tokenizer, ["piqa"], include_path="/no/such/tasks")
    with pytest.raises(ValueError, match="limit must be a positive"):
        hf_sparse.evaluation.zero_shot(model, tokenizer, ["piqa"], limit=0)


# ---------------------------------------------------------------------------------------------------------------
# Bench


def test_bench_json_reports_sane_numbers_for_model_and_baseline(demo, capsys):
    from hf_sparse.cli import main

    model, _ = demo
    runs = 2
    assert main(["bench", str(DEMO_MODEL), "--baseline", str(DEMO_MODEL), "--prompt-length", "16",
                 "--new-tokens", "4", "--runs", str(runs), "--warmup", "1", "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["prompt_length"] == 16 and report["settings"]["new_tokens"] == 4
    names = list(report["results"])
    assert names == [DEMO_MODEL.name, f"{DEMO_MODEL.name} (baseline)"]  # the same folder twice, kept apart
    checkpoint = sum(f.stat().st_size for f in DEMO_MODEL.glob("*.safetensors"))
    for name in names:
        r = report["results"][name]
        assert len(r["prefill_s"]) == runs and len(r["decode_s"]) == runs
        assert all(t > 0 for t in r["prefill_s"] + r["decode_s"])
        assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 and r["time_to_first_token_s"] > 0
        # The medians are the medians of the runs listed.
        assert r["decode_tokens_per_s"] == pytest.approx(4 / statistics.median(r["decode_s"]))
        assert r["prefill_tokens_per_s"] == pytest.approx(16 / statistics.median(r["prefill_s"]))
        # bench loads the checkpoint in its own dtype (float16 here), the fixture's model is float32
        # (its rotary buffers stay float32 in both)
        assert r["weights_bytes"] == sum(t.numel() * 2 for t in model.parameters()) + sum(
            t.numel() * t.element_size() for t in model.buffers())
        assert r["checkpoint_bytes"] == checkpoint
        assert r["peak_memory_bytes"] is None or r["peak_memory_bytes"] >= r["weights_bytes"]
    ratio = report["ratio"]
    first, second = (report["results"][n] for n in names)
    assert ratio["of"] == names[0] and ratio["to"] == names[1]
    assert ratio["decode_tokens_per_s"] == pytest.approx(first["decode_tokens_per_s"] / second["decode_tokens_per_s"])
    assert ratio["checkpoint_bytes"] == 1.0


def test_bench_refuses_prompts_longer_than_the_context(demo):
    from hf_sparse.evaluation import benchmark

    model, _ = demo
    context = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"exceeds the context of 'model' \\({context} tokens\\)"):
        benchmark(model, prompt_length=context, new_tokens=1, show_progress=False)
    with pytest.raises(ValueError, match="runs must be a positive integer, got 0"):
        benchmark(model, runs=0, show_progress=False)


# ---------------------------------------------------------------------------------------------------------------
# Sweeps


def _sweep(model, tokenizer, output, **kwargs):
    base = hf_sparse.SparsityConfig(calibration=str(DEMO_CALIBRATION), num_samples=4, sequence_length=64)
    return hf_sparse.evaluation.run_sweep(
        model, tokenizer, base, ["magnitude", "wanda"], [0.3, 0.6], DEMO_HELDOUT.read_text(), output,
        patterns=["unstructured", "2:4"], eval_sequence_length=64, eval_max_windows=4, model_name="demo",
        show_progress=False, **kwargs)


def test_a_resumed_sweep_skips_finished_points_and_writes_the_same_csv(demo, monkeypatch, tmp_path):
    import hf_sparse.api

    model, tokenizer = demo
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    whole = _sweep(model, tokenizer, tmp_path / "whole")
    assert [p.key for p in whole][:2] == [("dense", "dense", "0.0000"), ("magnitude", "unstructured", "0.3000")]
    assert len(whole) == 1 + 2 * 3
    assert all(torch.equal(dense_state[k], v) for k, v in model.state_dict().items())  # the model stays dense
    by_key = {p.key: p for p in whole}
    assert by_key[("wanda", "2:4", "0.5000")].achieved_sparsity == pytest.approx(0.5)
    assert by_key[("wanda", "unstructured", "0.6000")].perplexity > by_key[("dense", "dense", "0.0000")].perplexity

    real_prune, calls = hf_sparse.api.prune, []

    def interrupted_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the sweep is killed during its third pruning run
        calls.append(1)
        return real_prune(*args, **kwargs)

    monkeypatch.setattr(hf_sparse.api, "prune", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        _sweep(model, tokenizer, tmp_path / "resumed")
    assert len(read_results(tmp_path / "resumed")) == 1 + 2  # dense and the two finished points were saved

    counted = []
    monkeypatch.setattr(hf_sparse.api, "prune", lambda *a, **k: counted.append(1) or real_prune(*a, **k))
    resumed = _sweep(model, tokenizer, tmp_path / "resumed")
    assert len(counted) == 6 - 2  # only the points that were not finished
    assert (tmp_path / "resumed" / RESULTS_NAME).read_text() == (tmp_path / "whole" / RESULTS_NAME).read_text()
    assert resumed == whole
    counted.clear()
    _sweep(model, tokenizer, tmp_path / "resumed")  # a finished sweep has nothing left to do
    assert counted == []
    if plots.plots_available():
        assert (tmp_path / "whole" / "sweep.png").read_bytes().startswith(PNG_MAGIC)
    rows = list(csv.DictReader((tmp_path / "whole" / RESULTS_NAME).open()))
    assert [r["method"] for r in rows] == ["dense"] + ["magnitude"] * 3 + ["wanda"] * 3


def test_a_sweep_with_other_settings_is_refused_not_mixed_in(demo, tmp_path):
    model, tokenizer = demo
    base = hf_sparse.SparsityConfig(num_samples=4, sequence_length=64)
    run = hf_sparse.evaluation.run_sweep
    run(model, tokenizer, base, ["magnitude"], [0.5], "some held-out text " * 200, tmp_path, eval_sequence_length=32,
        eval_max_windows=2, plot=False, show_progress=False)
    with pytest.raises(ValueError, match="holds a sweep with other settings \\(eval_sequence_length differ\\)"):
        run(model, tokenizer, base, ["magnitude"], [0.5], "some held-out text " * 200, tmp_path,
            eval_sequence_length=16, eval_max_windows=2, plot=False, show_progress=False)
    with pytest.raises(ValueError, match="appears twice"):
        sweep_points(["wanda"], [0.5, 0.5])
    with pytest.raises(ValueError, match="pattern"):
        run(model, tokenizer, base, ["magnitude"], [0.5], "text", tmp_path / "x", patterns=["3-of-4"])
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_sweep_table_has_one_row_per_method_and_pattern():
    points = [SweepPoint("dense", "dense", 0.0, 0.0, 50.0), SweepPoint("wanda", "unstructured", 0.5, 0.5, 55.0),
              SweepPoint("wanda", "unstructured", 0.7, 0.7, 75.0)]
    assert format_sweep_table(points).splitlines()[3] == "| wanda | unstructured | - | 55.00 | 75.00 |"


# ---------------------------------------------------------------------------------------------------------------
# Pictures and cards


def test_the_model_card_embeds_its_pictures(demo, tmp_path):
    pytest.importorskip("matplotlib", reason="pictures are the optional extra hf-sparse[plots]")
    model, tokenizer = demo
    pruned = _magnitude_pruned(model)
    card = hf_sparse.hub.save_with_model_card(pruned, tokenizer, tmp_path / "card",
                                              evaluation={"dense_perplexity": 50.0, "pruned_perplexity": 60.0},
                                              license="apache-2.0")
    text = card.read_text()
    assert "## Pictures" in text
    assert "![Achieved sparsity per block and module](sparsity.png)" in text
    assert "![Evaluation: dense, pruned](evaluation.png)" in text
    for name in ("sparsity.png", "evaluation.png"):
        assert (card.parent / name).read_bytes().startswith(PNG_MAGIC)


def test_without_matplotlib_the_card_is_text_only_and_says_so(demo, monkeypatch, tmp_path):
    model, tokenizer = demo
    pruned = _magnitude_pruned(model)
    monkeypatch.setattr(plots, "plots_available", lambda: False)
    card = hf_sparse.hub.save_with_model_card(pruned, tokenizer, tmp_path / "card", license="apache-2.0")
    assert 'This card is text only: pictures need matplotlib: pip install "hf-sparse[plots]"' in card.read_text()
    assert not list(card.parent.glob("*.png"))


def test_structured_records_draw_the_kept_width_with_removed_blocks(tmp_path):
    pytest.importorskip("matplotlib")
    structure = {"version": 1, "original": {"num_blocks": 4, "attention_heads": 8, "kv_heads": 4, "head_dim": 32,
                                            "mlp_channels": 768},
                 "removed_blocks": [2],
                 "blocks": [{"original_index": i, "attention_heads": h, "kv_heads": h // 2, "mlp_channels": c}
                            for i, h, c in ((0, 8, 768), (1, 6, 512), (3, 4, 384))]}
    png = plots.sparsity_figure({"modules": {}, "structure": structure}, tmp_path / "structure.png")
    assert png.startswith(PNG_MAGIC) and (tmp_path / "structure.png").read_bytes() == png
    with pytest.raises(ValueError, match="nothing to draw"):
        plots.sparsity_figure({"modules": {}})
    assert plots.evaluation_figure({"eval_data": "x.txt"}) is None
    assert plots.evaluation_figure({"dense_perplexity": 5.0, "pruned_piqa_acc": 0.6}).startswith(PNG_MAGIC)
