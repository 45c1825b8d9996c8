"""Bad input, round three: model-card injection, profiles, target data, domain checks, sweep files, calibration
weights, and hostile values in errors. Every case is an exact, one-line error raised before any weight changes (or,
for the card, inert text)."""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch

import hf_sparse
from conftest import DEMO_MODEL, tiny_llama
from hf_sparse.evaluation.sweep import RESULTS_NAME, read_results
from hf_sparse.integrations.hub import render_model_card, save_with_model_card
from hf_sparse.record import SparsityRecord, read_record, write_record
from test_calibration_fit import _ListTokenizer

IDS = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- model cards -------------------------------------------------------------------------------------------------

def test_profile_option_keys_and_values_reach_the_card_escaped(tmp_path):
    model = tiny_llama()
    cfg = hf_sparse.SparsityConfig(method="magnitude", sparsity=0.5, sparsity_profile={"0": 0.4, "1": 0.6})
    hf_sparse.prune(model, cfg, show_progress=False)
    record = read_record(model)
    record.sparsity_profile = {**record.sparsity_profile,
                               "options": {"<img src=x onerror=alert(1)>": "`</td><script>x</script>`"}}
    write_record(model, SparsityRecord.from_dict(record.to_dict()))  # the record accepts any JSON options
    text = str(render_model_card(model))
    prose = text.split("## Sparsity record")[0]
    assert "<img" not in text and "<script" not in text and "</td>" not in text
    assert "&lt;img src=x onerror=alert(1)&gt;" in prose
    assert text.count("```") == 6  # no code span or fence opened by the record


def test_block_rows_of_a_structured_card_are_inert(tmp_path):
    model = tiny_llama()
    cfg = hf_sparse.SparsityConfig(method="flap", pattern="structured", sparsity=0.3, calibration=IDS,
                                   num_samples=4, sequence_length=16)
    hf_sparse.prune(model, cfg, show_progress=False)
    text = str(render_model_card(model))
    rows = [line for line in text.splitlines() if line.startswith("| `block 0")]
    assert rows and "new biases on mlp.down_proj" in rows[0] and rows[0].count("`") == 2


def test_a_backtick_in_new_biases_never_reaches_a_card():
    model = tiny_llama()
    cfg = hf_sparse.SparsityConfig(method="flap", pattern="structured", sparsity=0.3, calibration=IDS,
                                   num_samples=4, sequence_length=16)
    hf_sparse.prune(model, cfg, show_progress=False)
    data = copy.deepcopy(model.config.sparsity_config)
    data["structure"]["blocks"][0]["new_biases"] = ["mlp`<img src=x onerror=alert(1)>`"]
    with pytest.raises(ValueError, match="new_biases must be a list of distinct module names"):
        SparsityRecord.from_dict(data)


def test_repo_id_that_is_not_a_hub_name_is_refused_before_anything_is_written(tmp_path):
    model = tiny_llama()
    hf_sparse.prune(model, hf_sparse.SparsityConfig(method="magnitude", sparsity=0.5), show_progress=False)
    for repo_id in ['x")\nimport os  # ', "a/b/c", "<img src=x>", "x" * 300]:
        with pytest.raises(ValueError, match="is not a Hub repository name") as caught:
            save_with_model_card(model, None, tmp_path / "out", repo_id=repo_id)
        assert len(str(caught.value)) < 300
        assert not (tmp_path / "out").exists()
    assert "me/model-2of4" in str(render_model_card(model, repo_id="me/model-2of4"))


def test_storage_entry_with_non_numbers_is_refused():
    model = tiny_llama()
    hf_sparse.prune(model, hf_sparse.SparsityConfig(method="magnitude", sparsity=0.5), show_progress=False)
    data = copy.deepcopy(model.config.sparsity_config)
    data["storage"] = {"format": "hf_sparse_compact", "version": 1, "dense_bytes": "many", "stored_bytes": 1}
    with pytest.raises(ValueError, match="storage.dense_bytes must be"):
        SparsityRecord.from_dict(data)
    data["storage"] = {"format": "hf_sparse_compact", "version": 1, "dense_bytes": 2, "stored_bytes": 1,
                       "encodings": {"<b>" * 100: 1}}
    with pytest.raises(ValueError, match="storage.encodings must be an object"):
        SparsityRecord.from_dict(data)


# --- profiles ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("profile", [{0: 0.2, "0": 0.8}, {"1": 0.2, "01": 0.8}])
def test_a_block_given_twice_in_a_profile_is_refused(profile):
    with pytest.raises(ValueError, match="gives block [01] twice"):
        hf_sparse.SparsityConfig(method="magnitude", sparsity=0.5, sparsity_profile=profile)


def test_a_profile_key_for_a_block_include_leaves_unpruned_is_refused_before_pruning():
    model = tiny_llama()
    before = _weights(model)
    cfg = hf_sparse.SparsityConfig(method="magnitude", sparsity=0.5, include=[r"layers\.0\."],
                                   sparsity_profile={"0": 0.4, "1": 0.7})
    with pytest.raises(ValueError, match=r"gives block\(s\) \[1\] a sparsity, but include/exclude leave no module"):
        hf_sparse.prune(model, cfg, show_progress=False)
    assert _unchanged(model, before) and read_record(model) is None


# --- target data and the domain check ----------------------------------------------------------------------------

@pytest.mark.parametrize("value,message", [
    ({"text": "the served text"}, "got {'text': 'the served text'} (dict)"),
    ("no such file, just text", "is not an existing file or folder"),
    (42, "got 42 (int)"),
    ([], "that is empty"),
    (["text", 3], "holding 3 (int)"),
    (b"bytes", "(bytes)"),
])
def test_target_data_of_the_wrong_kind_is_refused_naming_its_type(value, message):
    with pytest.raises(ValueError, match="target_data") as caught:
        hf_sparse.SparsityConfig(method="wanda", calibration=IDS, target_data=value)
    assert message in str(caught.value)


def test_flap_records_its_domain_check_and_a_second_pass_keeps_one():
    texts = ["".join(chr(i % 20) for i in range(300))]
    model = tiny_llama()
    cfg = hf_sparse.SparsityConfig(method="flap", pattern="structured", sparsity=0.3, calibration=IDS,
                                   num_samples=4, sequence_length=16, target_data=texts, tokenizer=_ListTokenizer())
    record = hf_sparse.prune(model, cfg, show_progress=False)
    assert record.domain_check is not None and record.domain_check["target"]["kind"] == "texts"
    assert SparsityRecord.from_dict(record.to_dict()).domain_check == record.domain_check

    model = tiny_llama()
    first = hf_sparse.SparsityConfig(method="wanda", sparsity=0.5, calibration=IDS, num_samples=4,
                                     sequence_length=16, include=["mlp"], target_data=texts,
                                     tokenizer=_ListTokenizer())
    check = hf_sparse.prune(model, first, show_progress=False).domain_check
    second = hf_sparse.SparsityConfig(method="magnitude", sparsity=0.5, include=["self_attn"])
    merged = hf_sparse.prune(model, second, show_progress=False)
    assert merged.passes is not None and len(merged.passes) == 2 and merged.domain_check == check


# --- sweep results read back on resume ---------------------------------------------------------------------------

GOOD = [["dense", "dense", "0.0000", "0.000000", "53.100000"],
        ["wanda", "unstructured", "0.5000", "0.500000", "56.400000"]]


def _results(tmp_path, rows):
    path = tmp_path / RESULTS_NAME
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["method", "pattern", "target_sparsity", "achieved_sparsity", "perplexity"])
        writer.writerows(rows)
    return tmp_path


@pytest.mark.parametrize("row,message", [
    (["wanda", "2:4", "0.5000", "0.500000", "nan"], "line 4: perplexity 'nan' is not allowed"),
    (["wanda", "2:4", "0.5000", "0.500000", "-5"], "line 4: perplexity '-5' is not allowed"),
    (["wanda", "2:4", "0.5000", "0.500000", "inf"], "perplexity 'inf' is not allowed"),
    (["wanda", "unstructured", "5.0", "0.500000", "60"], "target_sparsity '5.0' is not allowed"),
    (["wanda", "unstructured", "0.7", "1.5", "60"], "achieved_sparsity '1.5' is not allowed"),
    (["wanda", "unstructured", "0.5000", "0.500000", "56.4"], "line 4 repeats the setting"),
    (["wanda", "9:4", "0.5", "0.5", "60"], "pattern '9:4' is not a sparsity pattern"),
    (["<img>", "2:4", "0.5", "0.5", "60"], "method '<img>' is not a method name"),
    (["wanda", "2:4", "0.5", "0.5"], "fewer cells"),
    (["wanda", "2:4", "0.5", "0.5", "60", "extra"], "more cells"),
    (["dense", "2:4", "0.0", "0.0", "60"], "the dense row needs"),
])
def test_hand_edited_sweep_results_are_refused_on_resume(tmp_path, row, message):
    folder = _results(tmp_path, GOOD + [row])
    with pytest.raises(ValueError, match="results.csv") as caught:
        read_results(folder)
    assert message in str(caught.value) and "\n" not in str(caught.value)




def test_a_resumed_sweep_with_a_bad_row_stops_before_pruning(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    model = tiny_llama(vocab_size=4096)
    base = hf_sparse.SparsityConfig(method="magnitude")
    text = "It was the best of times, it was the worst of times. " * 40
    kwargs = dict(eval_sequence_length=32, eval_max_windows=2, plot=False, show_progress=False, model_name="tiny")
    hf_sparse.evaluation.run_sweep(model, tokenizer, base, ["magnitude"], [0.5], text, tmp_path, **kwargs)
    rows = list(csv.reader((tmp_path / RESULTS_NAME).open(encoding="utf-8")))
    rows[2][4] = "nan"
    _results(tmp_path, rows[1:])
    calls = []
    monkeypatch.setattr(hf_sparse.api, "prune", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match="perplexity 'nan' is not allowed"):
        hf_sparse.evaluation.run_sweep(model, tokenizer, base, ["magnitude"], [0.5, 0.7], text, tmp_path, **kwargs)
    assert not calls


# --- calibration weights -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("weights,message", [
    ([float("nan"), 1], "calibration_weights[0] must be a finite number, got nan (float)"),
    (["x", 1], "calibration_weights[0] must be a finite number, got 'x' (str)"),
    ([1, float("inf")], "calibration_weights[1] must be a finite number, got inf (float)"),
    ([True, 1], "calibration_weights[0] must be a finite number, got True (bool)"),
    ([1e-300, 1], "calibration_weights[0] = 1e-300 gives source 0 none of the 8 windows"),
    ([1, 1, 1e-9], "calibration_weights[2] = 1e-09 gives source 2 none of the 8 windows"),
    ([1], "one weight per calibration source (2)"),
])
def test_calibration_weights_errors_say_which_weight_and_what_is_allowed(weights, message):
    sources = [["some text here"], ["other text"]] if len(weights) != 3 else [["a"], ["b"], ["c"]]
    with pytest.raises(ValueError) as caught:
        hf_sparse.SparsityConfig(method="wanda", calibration=sources, calibration_weights=weights, num_samples=8,
                                 sequence_length=8)
    assert message in str(caught.value) and "list of strings" not in str(caught.value)


def test_huge_weights_do_not_overflow_the_mix():
    from hf_sparse.calibration.mixes import mix_counts

    assert mix_counts([1e308, 1e308], 4) == [2, 2]
    cfg = hf_sparse.SparsityConfig(method="wanda", calibration=[["a b c"], ["d e f"]],
                                   calibration_weights=[1e308, 1e308], num_samples=4, sequence_length=8)
    assert cfg.calibration_weights == [1e308, 1e308]


def test_tiny_weight_fails_before_the_callers_model_is_touched():
    model = tiny_llama()
    before = _weights(model)
    with pytest.raises(ValueError, match="none of the 4 windows"):
        hf_sparse.prune(model, {"method": "wanda", "calibration": [IDS.tolist(), IDS.tolist()],
                                "calibration_weights": [1e-300, 1], "num_samples": 4, "sequence_length": 16},
                        show_progress=False)
    assert _unchanged(model, before) and read_record(model) is None


# --- hostile values are cut in every message ---------------------------------------------------------------------

HUGE = "x" * 1_000_000


@pytest.mark.parametrize("kwargs", [
    {"method": HUGE}, {"pattern": HUGE}, {"sparsity": HUGE}, {"sparsity_profile": HUGE},
    {"sparsity_profile": {HUGE + "(": 0.5}}, {"sparsity_profile": {"0": HUGE}}, {"method_options": {HUGE: 1}},
    {"calibration": [["a"], ["b"]], "calibration_weights": [HUGE, 1]}, {"num_samples": HUGE},
    {"device": HUGE}, {"include": [HUGE + "("]}, {"profile_options": {HUGE: 1}},
    {"calibration": IDS, "target_data": {HUGE: 1}},
])
def test_errors_echo_hostile_values_cut_short(kwargs):
    with pytest.raises(ValueError) as caught:
        hf_sparse.SparsityConfig(**{"method": "magnitude", **kwargs})
    assert len(str(caught.value)) < 600, str(caught.value)[:200]


def test_record_fields_with_hostile_values_are_cut_short():
    model = tiny_llama()
    hf_sparse.prune(model, hf_sparse.SparsityConfig(method="magnitude", sparsity=0.5), show_progress=False)
    good = model.config.sparsity_config
    for key, value in [("method", HUGE), ("pattern", HUGE), ("base_model_sha256", HUGE),
                       ("evaluation", {"pruned_perplexity": HUGE}),
                       ("method_options", {HUGE: 1}), ("recovery", {"rank": HUGE})]:
        data = json.loads(json.dumps(good))
        data[key] = value
        with pytest.raises(ValueError) as caught:
            SparsityRecord.from_dict(data)
        assert len(str(caught.value)) < 600, (key, str(caught.value)[:200])
    # a module name is only checked against the model: get_masks names it, cut
    model.config.sparsity_config = {**good, "modules": {**good["modules"], HUGE: 0.5}}
    with pytest.raises(ValueError, match="which this model does not have") as caught:
        hf_sparse.get_masks(model)
    assert len(str(caught.value)) < 600


# --- found by trying: SparsityConfig fields, mixes, GGUF -------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    ({"seed": 2 ** 70}, "seed must be an integer in [-2**63, 2**64)"),
    ({"device": "meta"}, "device 'meta' holds no data"),
    ({"include": []}, "include=[] lists no regular expression"),
    ({"exclude": []}, "exclude=[] lists no regular expression"),
])
def test_config_values_that_crashed_or_were_silently_odd(kwargs, message):
    with pytest.raises(ValueError) as caught:
        hf_sparse.SparsityConfig(method="wanda", calibration=IDS, **kwargs)
    assert message in str(caught.value)


def test_negative_zero_sparsity_is_recorded_as_zero():
    model = tiny_llama()
    record = hf_sparse.prune(model, hf_sparse.SparsityConfig(method="magnitude", sparsity=-0.0), show_progress=False)
    assert "-0.0" not in json.dumps(record.to_dict())


@pytest.mark.parametrize("sources,message", [
    ([IDS, None], "calibration source 1 of the mix is None"),
    ([IDS, []], "calibration source 1 of the mix: calibration [] is empty"),
    ([IDS, {"a": 1}], "calibration source 1 of the mix: calibration source of type dict is not supported"),
])
def test_a_bad_source_in_a_mix_is_named_by_its_position(sources, message):
    model = tiny_llama()
    before = _weights(model)
    with pytest.raises(ValueError) as caught:
        cfg = hf_sparse.SparsityConfig(method="wanda", calibration=sources, calibration_weights=[1, 1],
                                       num_samples=4, sequence_length=16)
        hf_sparse.prune(model, cfg, show_progress=False)
    assert message in str(caught.value) and _unchanged(model, before)


def test_flap_pruned_from_a_gguf_file_saves_a_checkpoint_that_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_sparse.integrations.gguf import from_pretrained_gguf
    from test_gguf import StandInLoader

    (tmp_path / "tiny.gguf").write_bytes(b"GGUF stand-in bytes")
    cfg = hf_sparse.SparsityConfig(method="flap", pattern="structured", sparsity=0.3, calibration=IDS,
                                   num_samples=4, sequence_length=16)
    model = from_pretrained_gguf(StandInLoader(), tmp_path, gguf_file="tiny.gguf", sparsity_config=cfg)
    assert model.config.quantization_config == {"quant_method": "hf_sparse_structured"}
    model.save_pretrained(tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(loaded(IDS[:1]).logits, model(IDS[:1]).logits)


def test_a_path_object_as_calibration_works_alone_and_in_a_mix():
    from pathlib import Path

    from transformers import AutoTokenizer

    from conftest import DEMO_CALIBRATION

    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    record = hf_sparse.prune(tiny_llama(vocab_size=4096), hf_sparse.SparsityConfig(
        method="wanda", calibration=Path(DEMO_CALIBRATION), num_samples=2, sequence_length=16),
        tokenizer=tokenizer, show_progress=False)
    assert record.calibration["kind"] == "file" and record.calibration["name"] == "calibration-slice.txt"
    record = hf_sparse.prune(tiny_llama(vocab_size=4096), hf_sparse.SparsityConfig(
        method="wanda", calibration=[Path(DEMO_CALIBRATION), ["some other text " * 20]],
        calibration_weights=[1e308, 1e308], num_samples=2, sequence_length=16), tokenizer=tokenizer,
        show_progress=False)
    assert [s["share"] for s in record.calibration["sources"]] == [0.5, 0.5]


@pytest.mark.parametrize("source,message", [
    (["text", 1], "calibration list item 1 is 1 (int)"),
    ([[1, 2], "x"], "calibration list item 1 is 'x' (str)"),
    ({"text": "x"}, "calibration source of type dict is not supported"),
    (3.5, "calibration source of type float is not supported"),
])
def test_calibration_of_the_wrong_shape_is_named_before_pruning(source, message):
    model = tiny_llama()
    before = _weights(model)
    with pytest.raises(ValueError) as caught:
        hf_sparse.prune(model, hf_sparse.SparsityConfig(method="wanda", calibration=source, num_samples=2,
                                                        sequence_length=4), tokenizer=_ListTokenizer(),
                        show_progress=False)
    assert message in str(caught.value) and _unchanged(model, before)


@pytest.mark.parametrize("changes,message", [
    ({"methods": "magnitude"}, "methods must be a list, got 'magnitude' (str); write ['magnitude']"),
    ({"sparsities": 0.5}, "sparsities must be a list, got 0.5 (float)"),
    ({"sparsities": ["0.5"]}, "sparsities must hold numbers in [0, 1), got '0.5' (str)"),
    ({"patterns": "2:4"}, "patterns must be a list"),
    ({"eval_sequence_length": 0}, "eval_sequence_length must be a positive integer, got 0"),
    ({"eval_batch_size": 0}, "eval_batch_size must be a positive integer, got 0"),
    ({"eval_max_windows": 0}, "eval_max_windows must be a positive integer or None, got 0"),
    ({"eval_sequence_length": 4096}, "eval_sequence_length=4096 is longer than the model's context"),
])
def test_sweep_arguments_are_checked_before_anything_runs(tmp_path, changes, message):
    from transformers import AutoTokenizer

    args = dict(methods=["magnitude"], sparsities=[0.5], patterns=["unstructured"], eval_sequence_length=32,
                eval_batch_size=2, eval_max_windows=2)
    args.update(changes)
    with pytest.raises(ValueError) as caught:
        hf_sparse.evaluation.run_sweep(
            tiny_llama(vocab_size=4096), AutoTokenizer.from_pretrained(DEMO_MODEL),
            hf_sparse.SparsityConfig(method="magnitude"), eval_texts="It was the best of times. " * 40,
            output_dir=tmp_path / "sweep", plot=False, show_progress=False, **args)
    assert message in str(caught.value)
    assert not (tmp_path / "sweep").exists()


def test_sparsegpt_and_fista_dampening_too_small_to_factorise_is_refused():
    for method in ("sparsegpt", "fista"):
        with pytest.raises(ValueError, match=f"{method} dampening must be at least 1e-06"):
            hf_sparse.SparsityConfig(method=method, calibration=IDS, method_options={"dampening": 1e-300})
    assert hf_sparse.SparsityConfig(method="sparsegpt", calibration=IDS,
                                    method_options={"dampening": 1e-6}).method_options == {"dampening": 1e-6}


def test_flap_channel_multiple_wider_than_the_mlp_is_refused_before_any_edit():
    model = tiny_llama()
    before = _weights(model)
    cfg = hf_sparse.SparsityConfig(method="flap", pattern="structured", sparsity=0.3, calibration=IDS,
                                   num_samples=4, sequence_length=16, method_options={"channel_multiple": 1_000_000})
    with pytest.raises(ValueError, match="channel_multiple=1000000 is not below the MLP width of block 0 "
                                         r"\(128 channels\)"):
        hf_sparse.prune(model, cfg, show_progress=False)
    assert _unchanged(model, before) and read_record(model) is None


@pytest.mark.parametrize("text,message", [("{broken", "is not valid JSON"), ("[1, 2]", "must hold a JSON object")])
def test_a_broken_sweep_settings_file_is_one_line(tmp_path, text, message):
    from transformers import AutoTokenizer

    (tmp_path / "sweep.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        hf_sparse.evaluation.run_sweep(
            tiny_llama(vocab_size=4096), AutoTokenizer.from_pretrained(DEMO_MODEL),
            hf_sparse.SparsityConfig(method="magnitude"), ["magnitude"], [0.5], "It was the best of times. " * 40,
            tmp_path, eval_sequence_length=32, eval_max_windows=2, plot=False, show_progress=False)
