"""The ``hf-sparse`` command, run in-process on a tiny random Llama that uses the vendored demo tokenizer."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from conftest import DEMO_CALIBRATION as CALIBRATION
from conftest import DEMO_HELDOUT as HELDOUT
from conftest import save_tiny_with_demo_tokenizer
from hf_sparse import cli
from hf_sparse.cli.common import parse_method_option
from hf_sparse.saving import atomic_directory
from hf_sparse.evaluation import perplexity
from hf_sparse.methods import METHODS


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_with_demo_tokenizer(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def run(argv: list[str]) -> int:
    """``main`` as the console script runs it: argparse errors surface as SystemExit codes."""
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code


CALIB_ARGS = ["--calibration", CALIBRATION, "--num-samples", 4, "--sequence-length", 32]
EVAL_ARGS = ["--eval-data", HELDOUT, "--eval-sequence-length", 32, "--eval-max-windows", 6]


def _table(stdout: str) -> dict[str, str]:
    """The CLI's two-column table: label, two or more spaces, value."""
    return dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in stdout.splitlines())


def _saved_record(output: Path) -> dict:
    return json.loads((output / "config.json").read_text())["sparsity_config"]


def test_prune_prints_table_saves_checkpoint_and_records_evaluation(tiny_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = tmp_path / "pruned"
    assert run(["prune", tiny_dir, "--method", "wanda", "--pattern", "2:4", *CALIB_ARGS, *EVAL_ARGS,
                "--output", output]) == 0
    table = _table(capsys.readouterr().out)
    for label in ("dense perplexity", "pruned perplexity", "achieved sparsity", "prune wall time", "peak RSS"):
        assert label in table

    # The dense perplexity is the unpruned model's, measured the same way as hf_sparse.evaluate.perplexity.
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    dense = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    expected_dense = perplexity(dense, tokenizer, HELDOUT.read_text(), sequence_length=32, max_windows=6,
                                show_progress=False)
    record = _saved_record(output)
    assert record["evaluation"]["dense_perplexity"] == pytest.approx(expected_dense, abs=1e-4)
    assert float(table["dense perplexity"]) == pytest.approx(expected_dense, abs=0.006)
    assert record["evaluation"]["eval_data"] == "heldout-slice.txt"
    assert record["evaluation"]["eval_sequence_length"] == 32

    # The saved checkpoint is the pruned model: exact 2:4 in every pruned linear, the recorded pruned perplexity.
    pruned = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32)
    modules = dict(pruned.named_modules())
    assert len(record["modules"]) == 2 * 7  # 2 blocks x (q, k, v, o, gate, up, down)
    for name in record["modules"]:
        groups = (modules[name].weight != 0).reshape(-1, 4).sum(dim=1)
        assert int(groups.max()) <= 2 and float((modules[name].weight == 0).float().mean()) == 0.5
    assert record["overall_sparsity"] == 0.5 and table["achieved sparsity"].startswith("0.5000")
    assert record["evaluation"]["pruned_perplexity"] == pytest.approx(
        perplexity(pruned, tokenizer, HELDOUT.read_text(), sequence_length=32, max_windows=6, show_progress=False),
        abs=1e-4)
    assert record["evaluation"]["pruned_perplexity"] != pytest.approx(expected_dense, abs=1e-3)
    assert (output / "tokenizer.json").exists() and (output / "README.md").exists()
    assert not list(tmp_path.glob(".pruned.*"))  # no temporary folders left behind


def test_eval_prints_the_library_perplexity(tiny_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert run(["eval", tiny_dir, "--data", HELDOUT, "--sequence-length", 32, "--stride", 16,
                "--max-windows", 5]) == 0
    out = capsys.readouterr().out
    printed = float(next(line for line in out.splitlines() if line.startswith("perplexity")).split()[-1])
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    expected = perplexity(model, AutoTokenizer.from_pretrained(tiny_dir), HELDOUT.read_text(), sequence_length=32,
                          stride=16, max_windows=5, show_progress=False)
    assert printed == pytest.approx(expected, abs=0.006)
    assert "dense" in out  # an unpruned model has no sparsity record


def test_method_options_are_parsed_as_json_and_recorded(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    output = tmp_path / "magnitude"
    # magnitude needs no calibration; per_row=true (JSON) must arrive as the boolean True.
    assert run(["prune", tiny_dir, "--method", "magnitude", "--sparsity", 0.25, "--method-option", "per_row=true",
                "--exclude", r"\.mlp\.", "--no-model-card", "--output", output]) == 0
    record = _saved_record(output)
    assert record["method_options"] == {"per_row": True}
    assert record["evaluation"] == {}
    assert sorted({name.rsplit(".", 1)[-1] for name in record["modules"]}) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    model = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32)
    weight = model.model.layers[0].self_attn.q_proj.weight  # (64, 64): 16 zeros in every row
    assert (weight == 0).sum(dim=1).tolist() == [16] * 64
    assert not (output / "README.md").exists()


def test_parse_method_option():
    assert parse_method_option("block_size=64") == ("block_size", 64)
    assert parse_method_option("dampening=0.02") == ("dampening", 0.02)
    assert parse_method_option("init=wanda") == ("init", "wanda")
    assert parse_method_option("x=[1, 2]") == ("x", [1, 2])


def test_methods_lists_every_method_with_option_help(capsys):
    assert run(["methods"]) == 0
    out = capsys.readouterr().out
    for name in METHODS:
        assert f"\n{name}: " in "\n" + out
    assert "--method-option block_size=<int> (default 128): Columns processed (and masked) together." in out
    assert "magnitude: " in out and "no calibration" in out


@pytest.mark.parametrize("argv, fragment", [
    (["--sparsity", "1.5"], "sparsity must be in [0, 1), got 1.5"),
    (["--method", "nope"], "unknown pruning method 'nope'; registered methods: ["),
    (["--pattern", "2:4", "--sparsity", "0.3"], "contradicts pattern '2:4'"),
    (["--method-option", "block_size=-3", "--method", "sparsegpt"], "block_size must be a positive integer, got -3"),
    (["--method-option", "colour=red"], "unknown option(s) ['colour'] for method 'wanda'"),
    (["--calibration", "missing-file.txt"], "--calibration 'missing-file.txt' does not exist"),
    (["--eval-data", "missing-eval.txt"], "evaluation data 'missing-eval.txt' does not exist"),
])
def test_bad_prune_input_exits_2_with_one_line(tiny_dir, tmp_path, capsys, argv, fragment):
    output = tmp_path / "never"
    base = ["prune", tiny_dir, "--calibration", CALIBRATION, "--output", output]
    assert run(base + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hf-sparse prune: error: ") and fragment in err[0]
    assert not output.exists()


def test_argparse_errors_and_existing_output_exit_2(tiny_dir, tmp_path, capsys):
    assert run(["prune", tiny_dir, "--output", tmp_path / "o", "--method-option", "no-equals-sign"]) == 2
    assert "must look like key=value" in capsys.readouterr().err
    assert run(["prune", tiny_dir, "--output", tmp_path / "o", "--num-samples", "0"]) == 2
    assert "0 is not allowed; a positive integer is required" in capsys.readouterr().err
    assert run(["eval", tiny_dir, "--data", HELDOUT, "--dtype", "int8"]) == 2
    assert "invalid choice: 'int8'" in capsys.readouterr().err
    existing = tmp_path / "existing"
    existing.mkdir()
    assert run(["prune", tiny_dir, "--method", "magnitude", "--output", existing]) == 2
    assert f"--output {str(existing)!r} already exists; choose a new folder or pass --overwrite" in \
        capsys.readouterr().err
    assert run(["eval", tmp_path / "no-such-model", "--data", HELDOUT]) == 2
    assert "could not load model" in capsys.readouterr().err


@pytest.mark.parametrize("overwrite", [False, True])
def test_failed_save_leaves_no_output(tiny_dir, tmp_path, monkeypatch, overwrite):
    from transformers import PreTrainedTokenizerBase

    output = tmp_path / "out"
    if overwrite:
        output.mkdir()  # a previous checkpoint (only a model config plus weights is ever replaced)
        (output / "config.json").write_text('{"model_type": "llama"}')
        (output / "model.safetensors").write_bytes(b"previous weights")
        (output / "keep.txt").write_text("previous run")

    def fail(self, *args, **kwargs):  # the model's weights are written by now; the tokenizer save crashes
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", fail)
    argv = ["prune", tiny_dir, "--method", "magnitude", "--output", output] + (["--overwrite"] if overwrite else [])
    with pytest.raises(RuntimeError, match="disk full"):
        cli.main([str(a) for a in argv])
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if overwrite else [])
    if overwrite:
        assert sorted(p.name for p in output.iterdir()) == ["config.json", "keep.txt", "model.safetensors"]


def test_atomic_output_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".ckpt.tmp-")
        (tmp / "config.json").write_text('{"model_type": "llama"}')
        (tmp / "model.safetensors").write_bytes(b"1")
    assert (target / "model.safetensors").read_bytes() == b"1"
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_recover_command_is_wired(capsys):
    assert run(["recover", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--rank" in out and "--push-to-hub" in out


def test_no_eval_skips_perplexity(tiny_dir, tmp_path, capsys):
    # `--no-eval` skips evaluation even with --eval-data; the table shows '-' and the record has no numbers.
    output = tmp_path / "noeval"
    assert run(["prune", tiny_dir, "--method", "magnitude", "--pattern", "2:4", *EVAL_ARGS, "--no-eval",
                "--no-model-card", "--output", output]) == 0
    table = _table(capsys.readouterr().out)
    assert table["dense perplexity"] == table["pruned perplexity"] == "-"
    assert _saved_record(output)["evaluation"] == {}
    assert math.isclose(_saved_record(output)["overall_sparsity"], 0.5)


def test_full_disk_exits_2_with_one_line_and_leaves_nothing(tiny_dir, tmp_path, monkeypatch, capsys):
    import errno

    from transformers import PreTrainedTokenizerBase

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full)
    assert run(["prune", tiny_dir, "--method", "magnitude", "--output", tmp_path / "out"]) == 2
    err = capsys.readouterr().err  # progress bars go to stderr too; the error is one line, without a traceback
    assert [line for line in err.splitlines() if "error" in line] == [
        "hf-sparse prune: error: OSError: [Errno 28] No space left on device"]
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_overwrite_refuses_a_folder_that_is_not_a_checkpoint(tiny_dir, tmp_path, capsys):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text(r"\documentclass{book}")
    assert run(["prune", tiny_dir, "--method", "magnitude", "--output", thesis, "--overwrite"]) == 2
    assert "is not a checkpoint folder (no config.json), so it is never replaced" in capsys.readouterr().err
    assert sorted(p.name for p in thesis.iterdir()) == ["thesis.tex"]


def test_recover_refuses_an_existing_output_before_loading(tiny_dir, tmp_path, capsys):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "config.json").write_text("{}")
    assert run(["recover", tiny_dir, "--data", CALIBRATION, "--output", existing]) == 2
    assert f"--output {str(existing)!r} already exists; choose a new folder or pass --overwrite" in \
        capsys.readouterr().err
    assert (existing / "config.json").read_text() == "{}"


@pytest.mark.parametrize("command", [["methods"], ["eval", "MODEL", "--data", HELDOUT, "--max-windows", 1,
                                                   "--sequence-length", 16]])
def test_threads_option_sets_torchs_thread_count(tiny_dir, command, capsys):
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        argv = [tiny_dir if part == "MODEL" else part for part in command]
        assert run([*argv, "--threads", 1]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)
    assert run(["methods", "--threads", 0]) == 2
    assert "0 is not allowed; a positive integer is required" in capsys.readouterr().err


def test_default_thread_count_leaves_busy_cores_alone(monkeypatch):
    from hf_sparse import threads

    for name in threads.THREAD_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "available_cpus", lambda: 8)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (5.4, 0.0, 0.0))
    assert threads.default_num_threads() == 3
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (12.0, 0.0, 0.0))
    assert threads.default_num_threads() == 1
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert threads.default_num_threads() == 8
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.default_num_threads() == 2
    monkeypatch.setenv("HF_SPARSE_NUM_THREADS", "none")
    with pytest.raises(ValueError, match="HF_SPARSE_NUM_THREADS='none' is not a positive integer"):
        threads.default_num_threads()


@pytest.mark.parametrize("command", ["prune", "eval"])
def test_gguf_file_reaches_from_pretrained_for_model_and_tokenizer(tiny_dir, tmp_path, monkeypatch, command):
    """`--gguf-file F` loads MODEL/F: from_pretrained(MODEL, gguf_file=F) for the model and the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls = []
    real_model, real_tokenizer = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def spy(real, kind):
        def load(name, *args, gguf_file=None, **kwargs):
            calls.append((kind, str(name), gguf_file))
            return real(name, *args, **kwargs)  # the tiny folder stands in for the GGUF file's content
        return load

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy(real_model, "model"))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy(real_tokenizer, "tokenizer"))
    argv = (["prune", tiny_dir, "--method", "magnitude", "--no-model-card", "--output", tmp_path / "out"]
            if command == "prune" else ["eval", tiny_dir, "--data", HELDOUT, "--sequence-length", 16,
                                        "--max-windows", 1])
    (tiny_dir / "tiny.Q4_1.gguf").touch()  # the file must exist in a local folder; the spy never reads it
    try:
        assert run([*argv, "--gguf-file", "tiny.Q4_1.gguf", "--threads", 1]) == 0
    finally:
        (tiny_dir / "tiny.Q4_1.gguf").unlink()
    assert calls[:2] == [("model", str(tiny_dir), "tiny.Q4_1.gguf"), ("tokenizer", str(tiny_dir), "tiny.Q4_1.gguf")]


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> Path:
    pytest.importorskip("gguf", reason="writing a GGUF file needs the gguf package (pip install gguf)")
    from tiny_gguf import write_tiny_gguf

    folder = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(folder / "tiny.gguf")
    return folder


def test_eval_loads_a_real_gguf_file(gguf_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert run(["eval", gguf_dir, "--gguf-file", "tiny.gguf", "--data", HELDOUT, "--sequence-length", 32,
                "--max-windows", 3, "--threads", 1]) == 0
    table = _table(capsys.readouterr().out)
    assert table["model"] == f"{gguf_dir} (tiny.gguf)" and table["sparsity"] == "dense"
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="tiny.gguf", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file="tiny.gguf")
    expected = perplexity(model, tokenizer, HELDOUT.read_text(), sequence_length=32, max_windows=3,
                          show_progress=False)
    assert float(table["perplexity"]) == pytest.approx(expected, abs=0.006)


def test_prune_saves_a_gguf_loaded_model(gguf_dir, tmp_path):
    output = tmp_path / "pruned"
    assert run(["prune", gguf_dir, "--gguf-file", "tiny.gguf", "--method", "magnitude", "--pattern", "2:4",
                "--output", output, "--threads", 1]) == 0
    assert _saved_record(output)["overall_sparsity"] == 0.5
