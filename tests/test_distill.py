"""Recovery by distillation: the chunked loss (exact values and gradients, never all logits at once), the teacher
(found, hash-checked, refused when wrong), the options and data refused with one-line errors, zeros kept bit for bit
and structured shapes kept through LoRA and full fine-tuning, and - on the real 7M model - distillation beating LM
recovery at equal tokens."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import hf_sparse
from hf_sparse.recovery import RecoveryConfig, chunked_recovery_loss, recover
from hf_sparse.recovery import losses as losses_module
from hf_sparse.recovery.losses import block_mapping, hidden_state_loss

from conftest import (CALIBRATION_TXT, DEMO_CALIBRATION, DEMO_HELDOUT, DEMO_MODEL, MODEL_DIR, TEST_TXT,
                      load_pretrained, tiny_llama)

IDS = torch.randint(0, 128, (48, 16), generator=torch.Generator().manual_seed(0))
QUICK = dict(steps=3, batch_size=4, sequence_length=16, show_progress=False, logging_steps=1)


@pytest.fixture(scope="module")
def demo_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_MODEL)


def pruned_tiny(pattern: str = "2:4", seed: int = 0, **overrides):
    model = tiny_llama(seed, **overrides)
    hf_sparse.prune(model, hf_sparse.SparsityConfig(method="magnitude", pattern=pattern,
                                                    sparsity=0.5 if pattern == "unstructured" else None),
                    show_progress=False)
    return model


def structured_tiny(method: str, sparsity: float, seed: int = 0):
    model = tiny_llama(seed, num_hidden_layers=4)
    hf_sparse.prune(model, hf_sparse.SparsityConfig(method=method, pattern="structured", sparsity=sparsity,
                                                    calibration=IDS[:8], num_samples=8, sequence_length=16),
                    show_progress=False)
    return model


# ---------------------------------------------------------------------------------------------------------------
# The loss


def reference_loss(h, weight, bias, t_logits, labels, kd_weight, lm_weight, T, top_k):
    s = F.linear(h, weight, bias)
    counted = labels != -100
    log_q, log_p = torch.log_softmax(t_logits / T, -1), torch.log_softmax(s / T, -1)
    if top_k:  # k outcomes and one bucket for the rest, for teacher and student alike
        index = t_logits.topk(top_k, -1).indices
        rest_q = 1 - log_q.exp().gather(-1, index).sum(-1, keepdim=True)
        rest_p = 1 - log_p.exp().gather(-1, index).sum(-1, keepdim=True)
        log_q = torch.cat([log_q.gather(-1, index), rest_q.log()], -1)
        log_p = torch.cat([log_p.gather(-1, index), rest_p.log()], -1)
    kd = (T * T * (log_q.exp() * (log_q - log_p)).sum(-1))[counted].mean()
    lm = F.cross_entropy(s[counted], labels[counted])
    return kd_weight * kd + lm_weight * lm, kd, lm


@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_chunked_loss_matches_the_formula_in_value_and_gradient(top_k, T):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(13, 5, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, generator=g, requires_grad=True)
    t_logits = torch.randn(13, 11, dtype=torch.float64, generator=g)
    labels = torch.randint(0, 11, (13,), generator=g)
    labels[[2, 7]] = -100
    loss, kd, lm = chunked_recovery_loss(h, weight, bias, lambda rows: t_logits[rows], labels, kd_weight=0.7,
                                         lm_weight=0.3, temperature=T, top_k=top_k, chunk_size=4)
    expected, expected_kd, expected_lm = reference_loss(h, weight, bias, t_logits, labels, 0.7, 0.3, T, top_k)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), abs=1e-5)
    assert float(kd) == pytest.approx(float(expected_kd.detach()), abs=1e-5)
    assert float(lm) == pytest.approx(float(expected_lm.detach()), abs=1e-5)
    for got, want in zip(torch.autograd.grad(loss, [h, weight, bias]),
                         torch.autograd.grad(expected, [h, weight, bias])):
        assert torch.allclose(got, want, atol=1e-6)


def test_kl_is_zero_when_the_student_is_the_teacher():
    h, weight = torch.randn(6, 4), torch.randn(10, 4)
    _, kd, _ = chunked_recovery_loss(h, weight, None, lambda rows: h[rows] @ weight.T, torch.zeros(6, dtype=torch.long),
                                     kd_weight=1.0, lm_weight=0.0, chunk_size=4)
    assert abs(float(kd)) < 1e-6


def test_no_more_than_one_chunk_of_logits_exists(monkeypatch):
    """The student's logits are built chunk_size rows at a time (and the teacher's are asked for the same rows)."""
    built, asked = [], []
    linear = F.linear

    def spy(x, w, b=None):
        out = linear(x, w, b)
        built.append(out.shape[0])
        return out

    monkeypatch.setattr(losses_module.F, "linear", spy)
    h = torch.randn(50, 8, requires_grad=True)
    weight = torch.randn(64, 8)

    def teacher(rows):
        asked.append(rows.numel())
        return torch.randn(rows.numel(), 64)

    loss, _, _ = chunked_recovery_loss(h, weight, None, teacher, torch.randint(0, 64, (50,)), kd_weight=1.0,
                                       lm_weight=1.0, chunk_size=8)
    loss.backward()
    assert max(built) == 8 and sum(built) == 50 and max(asked) == 8


def test_block_mapping_follows_removed_blocks():
    structure = {"blocks": [{"original_index": 0}, {"original_index": 1}, {"original_index": 3}]}
    assert block_mapping(structure, 3, 4) == [(0, 0), (1, 1), (2, 3)]
    assert block_mapping(None, 2, 2) == [(0, 0), (1, 1)]
    with pytest.raises(ValueError, match="cannot map the student's 3 blocks onto the teacher's 2"):
        block_mapping(structure, 3, 2)


def test_hidden_state_loss_is_zero_for_equal_states_and_positive_otherwise():
    states = tuple(torch.randn(2, 5, 8) for _ in range(4))  # embeddings + 3 blocks (the last normalised)
    assert float(hidden_state_loss(states, states, [(0, 0), (1, 1), (2, 2)])) == 0.0
    other = tuple(s + 0.1 for s in states)
    assert float(hidden_state_loss(states, other, [(0, 0), (1, 1), (2, 2)])) > 0


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line each, naming the value and what is allowed


@pytest.mark.parametrize("options, message", [
    ({"temperature": 0}, "temperature must be a positive number, got 0"),
    ({"temperature": -1.0}, "temperature must be a positive number, got -1.0"),
    ({"temperature": math.nan}, "temperature must be a positive number, got nan"),
    ({"kd_weight": -0.5}, "kd_weight must be a number >= 0, got -0.5"),
    ({"lm_weight": math.nan}, "lm_weight must be a number >= 0, got nan"),
    ({"hidden_weight": -1}, "hidden_weight must be a number >= 0, got -1"),
    ({"objective": "kl"}, "objective must be one of"),
    ({"top_k": 0}, "top_k must be a positive integer or None, got 0"),
    ({"sequence_length": 1}, "sequence_length must be an integer >= 2, got 1"),
    ({"objective": "distill", "kd_weight": 0, "hidden_weight": 0},
     "objective='distill' with kd_weight=0 and hidden_weight=0 trains on"),
    ({"kd_weight": 0, "lm_weight": 0}, "objective='distill\\+lm' with kd_weight=0 and lm_weight=0 trains on nothing"),
    ({"save_steps": 5}, "save_steps=5 needs checkpoint_dir"),
    ({"trainer_args": {"max_steps": 3}}, r"trainer_args\['max_steps'\] is set by RecoveryConfig"),
    ({"teacher_correction_steps": -1}, "teacher_correction_steps must be an integer >= 0, got -1"),
    ({"objective": "lm", "teacher_correction_steps": 5},
     "teacher_correction_steps=5 corrects a teacher, but objective='lm' has none"),
])
def test_bad_options_are_refused_in_one_line(options, message):
    with pytest.raises(ValueError, match=message) as error:
        RecoveryConfig(**options)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("data, message", [
    (None, "recovery needs training data, got None"),
    ([], r"recovery needs training data, got \[\]"),
    (["", "  "], "recovery data has no text"),
    (torch.zeros((0, 16), dtype=torch.long), "token-id calibration is empty"),
])
def test_no_data_is_refused_before_training(data, message):
    model = pruned_tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        recover(model, None, data, objective="lm", **QUICK)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_an_empty_text_file_is_no_data(tmp_path, demo_tokenizer):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="recovery data has no text|has no text"):
        recover(pruned_tiny(vocab_size=len(demo_tokenizer)), demo_tokenizer, str(tmp_path / "empty.txt"),
                objective="lm",
                **QUICK)


def test_teacher_that_is_the_student_is_refused():
    model = pruned_tiny()
    with pytest.raises(ValueError, match="the teacher is the student model itself"):
        recover(model, None, IDS, teacher_model=model, **QUICK)
    with pytest.raises(ValueError, match="the teacher shares weights with the student"):
        recover(model, None, IDS, teacher_model=copy.copy(model), **QUICK)


def test_teacher_with_another_vocabulary_is_refused():
    with pytest.raises(ValueError, match="the teacher predicts over 256 tokens, the student over 128"):
        recover(pruned_tiny(), None, IDS, teacher_model=tiny_llama(1, vocab_size=256), **QUICK)


def test_teacher_with_another_tokenizer_is_refused(tmp_path, demo_tokenizer):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    teacher_dir = tmp_path / "teacher"
    tiny_llama(1, vocab_size=len(demo_tokenizer)).save_pretrained(teacher_dir)
    words = {f"w{i}": i for i in range(len(demo_tokenizer))}  # as many tokens, other strings
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(words, unk_token="w0")))
    other.save_pretrained(teacher_dir)
    student = pruned_tiny(vocab_size=len(demo_tokenizer))
    ids = torch.randint(0, len(demo_tokenizer), (48, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="has another tokenizer than the student"):
        recover(student, demo_tokenizer, ids, teacher=str(teacher_dir), **QUICK)


def test_data_from_another_tokenizer_is_refused():
    ids = IDS.clone()
    ids[3, 4] = 500
    with pytest.raises(ValueError, match="token id 500, outside the model's vocabulary of 128"):
        recover(pruned_tiny(), None, ids, objective="lm", **{**QUICK, "heldout_fraction": 0})


def _pruned_from_folder(tmp_path):
    """A dense folder, and a student pruned from it (its record names the folder and its hash)."""
    dense_dir = tmp_path / "dense-tiny"
    tiny_llama(0).save_pretrained(dense_dir)
    student = AutoModelForCausalLM.from_pretrained(dense_dir)
    hf_sparse.prune(student, hf_sparse.SparsityConfig(method="magnitude", pattern="2:4"), show_progress=False)
    return dense_dir, student


def test_teacher_base_is_the_recorded_folder_checked_by_hash(tmp_path, monkeypatch):
    dense_dir, student = _pruned_from_folder(tmp_path)
    record = hf_sparse.read_record(student)
    assert record.base_model == "dense-tiny" and record.base_model_sha256
    result = recover(student, None, IDS, teacher="base", **QUICK)  # found beside the student's own folder
    recovery = hf_sparse.read_record(result.model).recovery
    assert recovery["teacher"] == "dense-tiny" and recovery["teacher_sha256"] == record.base_model_sha256
    assert recovery["objective"] == "distill+lm" and recovery["tokens"] == 3 * 4 * 16


def test_teacher_whose_hash_differs_is_refused_naming_both_hashes(tmp_path):
    dense_dir, student = _pruned_from_folder(tmp_path)
    expected = hf_sparse.read_record(student).base_model_sha256
    tiny_llama(5).save_pretrained(dense_dir)  # other weights under the same name
    with pytest.raises(ValueError, match=rf"has sha256 [0-9a-f]{{64}} but the record's base model 'dense-tiny' has "
                                         rf"{expected}: not the model that was pruned \(force=True"):
        recover(copy.deepcopy(student), None, IDS, teacher="base", **QUICK)
    with pytest.raises(ValueError, match="not the model that was pruned"):  # the folder by its path, same name
        recover(copy.deepcopy(student), None, IDS, teacher=str(dense_dir), **QUICK)
    result = recover(student, None, IDS, teacher="base", force_teacher=True, **QUICK)
    assert hf_sparse.read_record(result.model).recovery["teacher_sha256"] != expected


def test_teacher_base_without_a_recorded_base_model_says_what_to_do():
    with pytest.raises(ValueError, match="teacher='base' needs the record's base_model"):
        recover(pruned_tiny(), None, IDS, teacher="base", **QUICK)


def test_missing_teacher_folder_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="could not load teacher") as error:
        recover(pruned_tiny(), None, IDS, teacher=str(tmp_path / "nowhere"), **QUICK)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("options, step", [({"learning_rate": 1e30}, 2),
                                           ({"learning_rate": 1e30, "method": "full"}, 2)])
def test_non_finite_loss_stops_naming_the_step(options, step):
    with pytest.raises(ValueError, match=rf"recovery loss is nan at step {step} of 3; training stopped"):
        recover(pruned_tiny(), None, IDS, teacher_model=tiny_llama(0), **{**QUICK, **options})


# ---------------------------------------------------------------------------------------------------------------
# Students of every kind keep what they are


def assert_zeros_kept(model, masks):
    after = hf_sparse.get_masks(model)
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        assert torch.equal(after[name], mask), name
        weight = modules[name].weight
        assert torch.equal(weight[~mask], torch.zeros_like(weight[~mask])), name
        assert not torch.signbit(weight[~mask]).any(), name  # +0.0, not -0.0: the bits, not just the value


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
@pytest.mark.parametrize("method, mode", [("lora", "masked"), ("lora", "merge"), ("full", "masked")])
@pytest.mark.parametrize("objective", ["distill", "distill+lm"])
def test_masked_students_keep_every_zero(pattern, method, mode, objective):
    student = pruned_tiny(pattern)
    masks = hf_sparse.get_masks(student)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    result = recover(student, None, IDS, teacher_model=tiny_llama(0), method=method, mode=mode, objective=objective,
                     learning_rate=1e-2, top_k=16, **QUICK)
    assert_zeros_kept(result.model, masks)
    changed = [k for k, v in result.model.state_dict().items() if not torch.equal(before[k], v)]
    assert changed  # it did train
    assert hf_sparse.read_record(result.model).recovery["method"] == method


@pytest.mark.parametrize("method, sparsity", [("flap", 0.3), ("shortgpt", 0.25)])
@pytest.mark.parametrize("train", ["lora", "full"])
def test_structured_students_keep_shapes_and_reload_bit_identically(tmp_path, method, sparsity, train):
    student = structured_tiny(method, sparsity)
    shapes = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    teacher = tiny_llama(0, num_hidden_layers=4)
    result = recover(student, None, IDS, teacher_model=teacher, method=train, learning_rate=1e-2, hidden_weight=1.0,
                     output=str(tmp_path / "out"), **QUICK)
    state = result.model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == shapes
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    reloaded_state = reloaded.state_dict()
    assert reloaded_state.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(reloaded_state[key], value), key
    assert hf_sparse.read_record(reloaded).recovery["hidden_weight"] == 1.0


def test_lm_objective_needs_no_teacher_and_records_none():
    result = recover(pruned_tiny(), None, IDS, objective="lm", **QUICK)
    recovery = hf_sparse.read_record(result.model).recovery
    assert recovery["objective"] == "lm" and "teacher" not in recovery and "temperature" not in recovery
    assert result.perplexity_before and result.perplexity_after and len(result.losses) == 3


def test_same_seed_same_result():
    runs = [recover(pruned_tiny(), None, IDS, teacher_model=tiny_llama(0), **QUICK).model.state_dict()
            for _ in range(2)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_dense_control_trains_a_dense_model_and_refuses_a_pruned_one():
    result = recover(tiny_llama(0), None, IDS, objective="lm", dense_control=True, **QUICK)
    assert hf_sparse.read_record(result.model) is None and len(result.losses) == 3
    with pytest.raises(ValueError, match="dense_control=True is for a dense model"):
        recover(pruned_tiny(), None, IDS, objective="lm", dense_control=True, **QUICK)
    with pytest.raises(ValueError, match="recover\\(\\) needs a model pruned by hf_sparse"):
        recover(tiny_llama(0), None, IDS, objective="lm", **QUICK)


def test_teacher_correction_trains_exactly_the_dense_control_and_leaves_the_given_teacher_alone():
    """Minitron's teacher correction is the dense model given the students' training for the given steps (the
    adaptation control, bit for bit); a teacher the caller passed in is corrected on a copy."""
    from hf_sparse.recovery import Teacher, correct_teacher

    given = tiny_llama(0)
    untouched = {k: v.clone() for k, v in given.state_dict().items()}
    config = RecoveryConfig(teacher_correction_steps=3, steps=5, batch_size=4, sequence_length=16, logging_steps=1,
                            seed=2)
    corrected = correct_teacher(Teacher(model=given, name="dense", sha256=None), None, IDS, config, copy_first=True,
                                show_progress=False)
    control = recover(tiny_llama(0), None, IDS, config, objective="lm", dense_control=True, steps=3,
                      teacher_correction_steps=0, show_progress=False).model
    corrected_state, control_state = corrected.model.state_dict(), control.state_dict()
    assert all(torch.equal(corrected_state[k], control_state[k]) for k in control_state)
    assert any(not torch.equal(corrected_state[k], untouched[k]) for k in untouched)  # it did train
    assert all(torch.equal(given.state_dict()[k], untouched[k]) for k in untouched)
    assert not any(p.requires_grad for p in corrected.model.parameters()) and not corrected.model.training
    assert corrected.correction["steps"] == 3 and corrected.correction["tokens"] == 3 * 4 * 16
    assert corrected.correction["heldout_perplexity_after"] < corrected.correction["heldout_perplexity_before"]


def test_recovery_with_teacher_correction_records_it_and_distils_from_the_corrected_teacher(tmp_path):
    student = pruned_tiny()
    masks = hf_sparse.get_masks(student)
    plain = recover(copy.deepcopy(student), None, IDS, teacher_model=tiny_llama(0), **QUICK)
    corrected = recover(student, None, IDS, teacher_model=tiny_llama(0), teacher_correction_steps=2, **QUICK)
    assert_zeros_kept(corrected.model, masks)
    recovery = hf_sparse.read_record(corrected.model).recovery
    assert recovery["teacher_correction"]["steps"] == 2 and recovery["teacher_correction"]["objective"] == "lm"
    assert "teacher_correction" not in hf_sparse.read_record(plain.model).recovery
    assert plain.losses != corrected.losses  # another teacher, another loss
    card = hf_sparse.hub.save_with_model_card(corrected.model, None, tmp_path / "out").read_text(encoding="utf-8")
    assert "corrected first: 2 language-modelling steps on the same data" in card


def test_packed_text_data_is_deterministic_and_holds_out_distinct_sequences(demo_tokenizer):
    from hf_sparse.recovery.data import pack_training_data

    text = DEMO_CALIBRATION.read_text(encoding="utf-8")[:20000]
    a = pack_training_data([text], demo_tokenizer, 32, heldout_fraction=0.1, max_heldout=8, seed=3)
    b = pack_training_data([text], demo_tokenizer, 32, heldout_fraction=0.1, max_heldout=8, seed=3)
    assert torch.equal(a.train, b.train) and torch.equal(a.heldout, b.heldout)
    assert a.heldout.shape[0] == 8
    train_rows = {tuple(row.tolist()) for row in a.train}
    assert not any(tuple(row.tolist()) in train_rows for row in a.heldout)
    stream = demo_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert a.train.shape[0] + a.heldout.shape[0] == len(stream) // 32  # packed: every full sequence used once


# ---------------------------------------------------------------------------------------------------------------
# The real model


@pytest.mark.slow
def test_distillation_beats_lm_recovery_at_equal_tokens_on_the_7m_model(tokenizer):
    """SparseGPT 2:4 on the 7M model, the same 24 LoRA steps of 4 x 128 tokens from calibration.txt: distilling
    from the dense model ends lower on the test split than training on the LM loss, and keeps every zero."""
    from hf_sparse.evaluation import perplexity

    teacher = load_pretrained()
    pruned = load_pretrained()
    cfg = hf_sparse.SparsityConfig(method="sparsegpt", pattern="2:4", calibration=str(CALIBRATION_TXT),
                                   num_samples=16, sequence_length=128, seed=0)
    hf_sparse.prune(pruned, cfg, tokenizer=tokenizer, show_progress=False)
    masks = hf_sparse.get_masks(pruned)
    test_text = TEST_TXT.read_text(encoding="utf-8")

    def ppl(model):
        return perplexity(model, tokenizer, test_text, sequence_length=256, max_windows=24, show_progress=False)

    options = dict(steps=24, batch_size=4, sequence_length=128, learning_rate=2e-3, rank=8, seed=0,
                   show_progress=False, max_heldout=4, temperature=1.0)
    before = ppl(pruned)
    lm = recover(copy.deepcopy(pruned), tokenizer, str(CALIBRATION_TXT), objective="lm", **options)
    kd = recover(copy.deepcopy(pruned), tokenizer, str(CALIBRATION_TXT), teacher_model=teacher, **options)
    after_lm, after_kd = ppl(lm.model), ppl(kd.model)
    assert after_kd < after_lm < before, (before, after_lm, after_kd)
    assert_zeros_kept(kd.model, masks)
    assert MODEL_DIR.name in hf_sparse.read_record(kd.model).recovery["teacher"]


# ---------------------------------------------------------------------------------------------------------------
# The command


def test_recover_help_shows_the_defaults(capsys):
    from hf_sparse.cli import main

    with pytest.raises(SystemExit):
        main(["recover", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: distill+lm)", "(default: base)", "(default: 1.0)", "(default: lora)", "(default: 200)",
                    "(default: 8)", "(default: 256)", "(default: masked)"):
        assert default in text, default


@pytest.mark.parametrize("arguments, message", [
    (["--temperature", "0"], "temperature must be a positive number, got 0"),
    (["--kd-weight", "-1"], "kd_weight must be a number >= 0, got -1"),
    (["--control"], "--control compares test perplexities: give --eval-data too"),
    (["--teacher-correction", "-2"], "teacher_correction_steps must be an integer >= 0, got -2"),
    (["--objective", "lm", "--teacher-correction", "3"], "teacher_correction_steps=3 corrects a teacher"),
])
def test_recover_command_refuses_bad_options_before_loading(tmp_path, capsys, arguments, message):
    from hf_sparse.cli import main

    code = main(["recover", str(tmp_path / "not-loaded"), "--data", str(DEMO_CALIBRATION), "--output",
                 str(tmp_path / "out"), *arguments])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_recover_command_distils_from_the_recorded_base_model(tmp_path, capsys):
    """Prune the demo model, then ``hf-sparse recover --teacher <the demo folder>`` (hash-checked: same name as the
    record's base model): a summary table, a checkpoint with the same zeros, a record naming teacher and objective."""
    from hf_sparse.cli import main

    assert main(["prune", str(DEMO_MODEL), "--method", "magnitude", "--pattern", "2:4", "--output",
                 str(tmp_path / "pruned"), "--no-eval", "-q"]) == 0
    capsys.readouterr()
    masks = hf_sparse.get_masks(AutoModelForCausalLM.from_pretrained(tmp_path / "pruned"))
    assert main(["recover", str(tmp_path / "pruned"), "--data", str(DEMO_CALIBRATION), "--teacher", str(DEMO_MODEL),
                 "--steps", "2", "--batch-size", "2", "--sequence-length", "32", "--output", str(tmp_path / "out"),
                 "--eval-data", str(DEMO_HELDOUT), "--eval-sequence-length", "64", "--max-windows", "2", "--control",
                 "--teacher-correction", "1", "-q"]) == 0
    out = capsys.readouterr().out
    assert f"objective            distill+lm (teacher {DEMO_MODEL.name}, corrected for 1 step)" in out
    assert re.search(r"^dense control\s+dense \d+\.\d\d, dense \+ same training \d+\.\d\d$", out, re.M), out
    assert re.search(r"^test perplexity\s+pruned \d+\.\d\d -> recovered \d+\.\d\d$", out, re.M), out
    assert out.strip().splitlines()[-1].split() == ["saved", "to", str(tmp_path / "out")]
    recovered = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert_zeros_kept(recovered, masks)
    recovery = hf_sparse.read_record(recovered).recovery
    assert recovery["teacher"] == DEMO_MODEL.name and recovery["teacher_sha256"] == \
        hf_sparse.read_record(recovered).base_model_sha256
    assert recovery["control_perplexity"] > 0
    assert hf_sparse.read_record(recovered).evaluation["dense_perplexity"] > 0


def test_recover_command_reuses_a_teacher_corrected_for_all_steps_as_the_control(tmp_path, capsys, monkeypatch):
    """With ``--teacher-correction`` equal to ``--steps`` the corrected teacher is the dense control: the command
    measures it instead of training the dense model a second time, and the number is the same as the separate run
    (``--teacher-dtype float32`` is the student's dtype but turns the reuse off)."""
    import hf_sparse.recovery
    from hf_sparse.cli import main

    assert main(["prune", str(DEMO_MODEL), "--method", "magnitude", "--pattern", "2:4", "--output",
                 str(tmp_path / "pruned"), "--no-eval", "-q"]) == 0
    calls = []
    real = hf_sparse.recovery.recover
    monkeypatch.setattr(hf_sparse.recovery, "recover", lambda *a, **k: calls.append(k) or real(*a, **k))
    controls = {}
    for extra in ([], ["--teacher-dtype", "float32"]):
        calls.clear()
        assert main(["recover", str(tmp_path / "pruned"), "--data", str(DEMO_CALIBRATION), "--teacher",
                     str(DEMO_MODEL), "--steps", "2", "--batch-size", "2", "--sequence-length", "32", "--output",
                     str(tmp_path / f"out{len(extra)}"), "--eval-data", str(DEMO_HELDOUT), "--eval-sequence-length",
                     "64", "--max-windows", "2", "--control", "--teacher-correction", "2", "-q", *extra]) == 0
        controls[len(extra)] = hf_sparse.read_record(
            AutoModelForCausalLM.from_pretrained(tmp_path / f"out{len(extra)}")).recovery["control_perplexity"]
        assert [k.get("dense_control", False) for k in calls] == ([False] if not extra else [False, True])
    capsys.readouterr()
    assert controls[0] == controls[2]


def test_a_mix_of_sources_is_packed_by_share(demo_tokenizer):
    from hf_sparse.recovery.data import pack_training_data

    text = DEMO_CALIBRATION.read_text(encoding="utf-8")
    data = pack_training_data([[text[:20000]], [text[20000:40000]]], demo_tokenizer, 32, heldout_fraction=0.0,
                              weights=[1, 3], num_sequences=40)
    assert data.train.shape == (40, 32) and data.heldout.shape[0] == 0


def test_teacher_in_lower_precision_and_the_card_says_distillation(tmp_path):
    dense_dir, student = _pruned_from_folder(tmp_path)
    result = recover(student, None, IDS, teacher="base", teacher_dtype="bfloat16", **QUICK)
    card = hf_sparse.hub.save_with_model_card(result.model, None, tmp_path / "out")
    text = card.read_text(encoding="utf-8")
    assert "distillation" in text and "teacher `dense-tiny`" in text and "tokens seen 192" in text
    assert f"held-out perplexity {result.perplexity_before:.2f} → {result.perplexity_after:.2f}" in text


@pytest.mark.slow
def test_flap_student_of_the_7m_model_keeps_its_shapes_and_reloads_bit_identically(tmp_path, tokenizer):
    """FLAP 30% of the real model, distilled from the dense folder (teacher='base', hash-checked) with LoRA and the
    hidden-state loss for 3 steps: same shapes, saved and reloaded bit for bit, the record names the teacher."""
    student = load_pretrained()
    hf_sparse.prune(student, hf_sparse.SparsityConfig(method="flap", pattern="structured", sparsity=0.3,
                                                      calibration=str(CALIBRATION_TXT), num_samples=8,
                                                      sequence_length=128, seed=0),
                    tokenizer=tokenizer, show_progress=False)
    shapes = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    result = recover(student, tokenizer, str(CALIBRATION_TXT), teacher=str(MODEL_DIR), hidden_weight=1.0, steps=3,
                     batch_size=2, sequence_length=128, max_heldout=2, show_progress=False,
                     output=str(tmp_path / "out"))
    state = result.model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == shapes
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    assert reloaded.keys() == state.keys() and all(torch.equal(reloaded[k], v) for k, v in state.items())
    recovery = hf_sparse.read_record(result.model).recovery
    assert recovery["teacher"] == MODEL_DIR.name and recovery["teacher_sha256"] == \
        hf_sparse.read_record(result.model).base_model_sha256
