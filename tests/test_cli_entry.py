"""The ``hf-sparse`` command as a new user meets it: every subcommand through the real entry point
(``hf_sparse.cli.main``, and ``python -m hf_sparse`` in a subprocess), on the vendored demo model (float16)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import DEMO_CALIBRATION as CALIBRATION
from conftest import DEMO_HELDOUT as HELDOUT
from conftest import DEMO_MODEL, REPO, run_without_hf_sparse, save_tiny_with_demo_tokenizer
from hf_sparse import cli

CALIB = ["--calibration", CALIBRATION, "--num-samples", 4, "--sequence-length", 64]
EVAL = ["--eval-data", HELDOUT, "--eval-sequence-length", 128, "--max-windows", 2]


def run(argv: list, quiet: bool = True) -> int:
    """``main`` as the console script runs it: argparse errors surface as SystemExit codes."""
    try:
        return cli.main([str(a) for a in argv] + ["--quiet"] * (quiet and bool(argv) and argv[0] in cli.COMMANDS))
    except SystemExit as exit_:
        return exit_.code


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error:" in line]


def _dtypes(folder: Path) -> set[torch.dtype]:
    return {tensor.dtype for tensor in _weights(folder).values() if tensor.is_floating_point()}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as reader:
        return {key: reader.get_tensor(key) for key in reader.keys()}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_with_demo_tokenizer(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="module")
def flap_dir(tmp_path_factory) -> Path:
    """The demo model (float16) after FLAP at 30% through the CLI."""
    output = tmp_path_factory.mktemp("flap") / "flap"
    assert run(["prune", DEMO_MODEL, "--method", "flap", "--pattern", "structured", "--sparsity", 0.3, *CALIB,
                "--output", output]) == 0
    return output


@pytest.fixture(scope="module")
def compact_dir(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("compact") / "compact"
    assert run(["prune", DEMO_MODEL, "--method", "magnitude", "--pattern", "2:4", "--compressed",
                "--output", output]) == 0
    return output


# ---------------------------------------------------------------------------------------------------------------
# Every subcommand through the entry point


def test_sweep_runs_through_the_cli(tmp_path, capsys):
    """`hf-sparse sweep` crashed on every call (the Namespace had no calibration_weights)."""
    output = tmp_path / "sweep"
    assert run(["sweep", DEMO_MODEL, "--methods", "magnitude,wanda", "--sparsities", 0.5, *CALIB,
                "--eval-data", HELDOUT, "--eval-sequence-length", 128, "--max-windows", 2, "--no-plot",
                "--output", output]) == 0
    out = capsys.readouterr().out
    assert "| magnitude | unstructured |" in out and "| wanda | unstructured |" in out
    rows = (output / "results.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("method")  # header, dense, magnitude, wanda


def test_bench_runs_through_the_cli(capsys):
    assert run(["bench", DEMO_MODEL, "--prompt-length", 8, "--new-tokens", 2, "--runs", 1, "--warmup", 0,
                "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["dtype"] == "float16" and list(report["results"]) == ["llama-7m-books-fp16"]


def test_recover_runs_through_the_cli(tiny_dir, tmp_path):
    pruned, recovered = tmp_path / "pruned", tmp_path / "recovered"
    assert run(["prune", tiny_dir, "--method", "magnitude", "--pattern", "2:4", "--output", pruned]) == 0
    assert run(["recover", pruned, "--teacher", tiny_dir, "--data", CALIBRATION, "--steps", 1, "--batch-size", 1,
                "--sequence-length", 16, "--rank", 2, "--output", recovered]) == 0
    record = json.loads((recovered / "config.json").read_text())["sparsity_config"]
    assert record["overall_sparsity"] == 0.5 and record["recovery"]


def test_compress_and_decompress_run_through_the_cli(compact_dir, tmp_path, capsys):
    dense = tmp_path / "dense"
    assert run(["decompress", compact_dir, dense]) == 0
    assert run(["compress", dense, tmp_path / "again"]) == 0
    assert "tensors (stored)" in capsys.readouterr().out
    assert json.loads((dense / "config.json").read_text())["model_type"] == "llama"


def test_every_subcommand_is_tested_through_the_entry_point():
    """A new subcommand gets a test through cli.main (here, in test_cli.py, or in a test file of its own)."""
    source = "\n".join(path.read_text() for path in Path(__file__).parent.glob("test_*.py"))
    for name in cli.COMMANDS:
        assert f'["{name}"' in source or f"[\"{name}\", " in source, f"no test runs `hf-sparse {name}`"


# ---------------------------------------------------------------------------------------------------------------
# dtype: the checkpoint's own, unless --dtype says otherwise


def test_a_float16_checkpoint_stays_float16_and_flap_makes_it_smaller(flap_dir, tmp_path):
    nm = tmp_path / "2of4"
    assert run(["prune", DEMO_MODEL, "--method", "wanda", "--pattern", "2:4", *CALIB, "--output", nm]) == 0
    assert _dtypes(nm) == _dtypes(flap_dir) == {torch.float16}
    size = (DEMO_MODEL / "model.safetensors").stat().st_size
    assert (nm / "model.safetensors").stat().st_size <= size * 1.01  # same dtype: about the same bytes
    assert (flap_dir / "model.safetensors").stat().st_size < 0.85 * size
    assert json.loads((flap_dir / "config.json").read_text())["dtype"] == "float16"


def test_recover_trains_in_float32_and_saves_a_float16_checkpoint_as_float16(tmp_path):
    pruned, recovered = tmp_path / "2of4", tmp_path / "recovered"
    assert run(["prune", DEMO_MODEL, "--method", "magnitude", "--pattern", "2:4", "--output", pruned]) == 0
    assert run(["recover", pruned, "--teacher", DEMO_MODEL, "--data", CALIBRATION, "--steps", 1, "--batch-size", 1,
                "--sequence-length", 16, "--rank", 2, "--output", recovered]) == 0
    assert _dtypes(recovered) == {torch.float16}
    stored, before = _weights(recovered), _weights(pruned)
    assert all((stored[k][before[k] == 0] == 0).all() for k in before if k.endswith("proj.weight"))  # zeros kept
    assert run(["recover", pruned, "--teacher", DEMO_MODEL, "--data", CALIBRATION, "--steps", 1, "--batch-size", 1,
                "--sequence-length", 16, "--rank", 2, "--save-dtype", "float32", "--output", tmp_path / "r32"]) == 0
    assert _dtypes(tmp_path / "r32") == {torch.float32}


def test_dtype_option_overrides_the_checkpoints(tmp_path):
    output = tmp_path / "fp32"
    assert run(["prune", DEMO_MODEL, "--method", "magnitude", "--dtype", "float32", "--output", output]) == 0
    assert _dtypes(output) == {torch.float32}


# ---------------------------------------------------------------------------------------------------------------
# Start-up: --help and argument errors import neither torch nor transformers


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["prune", "--help"], ["prune", "--no-such-option"], ["eval"],
                                  ["sweep", "M", "--sparsities", "2", "--eval-data", "x", "--output", "o"]])
def test_help_and_argument_errors_do_not_import_torch(argv):
    # `python -X importtime -m hf_sparse ...` lists every module it imported: the real start of the command.
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "hf_sparse", *argv], capture_output=True,
                          text=True, env=_env(), timeout=300)
    assert done.returncode in (0, 2), done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time")}
    assert "argparse" in imported and not imported & {"torch", "transformers", "safetensors"}, sorted(imported)[:50]


def test_the_complete_parser_is_there_for_documentation():
    """main() adds a subcommand's options only when it is used; build_parser() gives every one (docs, completion)."""
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert sorted(commands) == sorted(cli.COMMANDS)
    options = {name: {s for action in sub._actions for s in action.option_strings} for name, sub in commands.items()}
    assert {"--max-windows", "--calibration", "--dtype", "--threads", "--quiet"} <= options["prune"]
    assert {"--rank", "--threads"} <= options["recover"] and "--overwrite" in options["decompress"]


def test_the_command_in_a_subprocess_prunes_and_keeps_float16(tmp_path):
    output = tmp_path / "pruned"
    done = subprocess.run([sys.executable, "-m", "hf_sparse", "prune", str(DEMO_MODEL), "--method", "magnitude",
                           "--pattern", "2:4", "--output", str(output), "--quiet"], capture_output=True, text=True,
                          env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "saved to" in done.stdout and _dtypes(output) == {torch.float16}
    assert "license" not in done.stderr  # a local save: no warning about the card's license


def test_recover_in_a_subprocess_distils_from_a_corrected_teacher_and_reports_the_control(tmp_path):
    """``python -m hf_sparse recover --control --teacher-correction N`` with N = --steps: the corrected teacher is the
    dense control, measured and recorded (the command does not train the dense model twice)."""
    pruned, recovered = tmp_path / "2of4", tmp_path / "recovered"
    assert run(["prune", DEMO_MODEL, "--method", "magnitude", "--pattern", "2:4", "--output", pruned, "--no-eval"]) == 0
    done = subprocess.run([sys.executable, "-m", "hf_sparse", "recover", str(pruned), "--teacher", str(DEMO_MODEL),
                           "--data", str(CALIBRATION), "--steps", "2", "--batch-size", "2", "--sequence-length", "32",
                           "--teacher-correction", "2", "--control", *map(str, EVAL), "--output", str(recovered),
                           "--quiet"], capture_output=True, text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "corrected for 2 steps" in done.stdout and "dense + same training" in done.stdout, done.stdout
    recovery = json.loads((recovered / "config.json").read_text())["sparsity_config"]["recovery"]
    assert recovery["teacher_correction"]["steps"] == 2 and recovery["control_perplexity"] > 0


# ---------------------------------------------------------------------------------------------------------------
# Wording and options a new user meets


def test_missing_calibration_names_the_flag(tmp_path, capsys):
    for argv in (["prune", DEMO_MODEL, "--method", "wanda", "--output", tmp_path / "o"],
                 ["sweep", DEMO_MODEL, "--methods", "wanda", "--eval-data", HELDOUT, "--output", tmp_path / "s"]):
        assert run(argv) == 2
        lines = _error_lines(capsys.readouterr().err)
        assert len(lines) == 1 and "give --calibration" in lines[0] and "SparsityConfig" not in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_prune_takes_max_windows_and_the_old_spelling_still_works(tmp_path, capsys):
    for flag in ("--max-windows", "--eval-max-windows"):
        output = tmp_path / flag.strip("-")
        assert run(["prune", DEMO_MODEL, "--method", "magnitude", "--eval-data", HELDOUT, "--eval-sequence-length",
                    128, flag, 2, "--output", output]) == 0
        assert json.loads((output / "config.json").read_text())["sparsity_config"]["evaluation"]["eval_windows"] == 2
        err = capsys.readouterr().err
        assert ("--eval-max-windows is deprecated; use --max-windows" in err) == (flag == "--eval-max-windows")
    assert run(["prune", "--help"]) == 0
    assert "--eval-max-windows" not in capsys.readouterr().out  # hidden


def test_license_warning_only_when_the_card_is_published(tmp_path, monkeypatch, caplog):
    from hf_sparse.integrations import hub

    uploads = []
    monkeypatch.setattr(hub, "upload_folder", lambda folder, repo, **kw: uploads.append(repo))
    assert run(["prune", DEMO_MODEL, "--method", "magnitude", "--output", tmp_path / "local"], quiet=False) == 0
    assert "no license" not in caplog.text
    assert run(["prune", DEMO_MODEL, "--method", "magnitude", "--output", tmp_path / "pushed",
                "--push-to-hub", "me/pruned"], quiet=False) == 0
    assert "no license" in caplog.text and uploads == ["me/pruned"]


@pytest.mark.parametrize("command", ["prune", "eval", "sweep", "bench", "recover", "compress"])
def test_every_help_shows_the_defaults(command, capsys):
    assert run([command, "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: " in out or "(default " in out
    expected = {"prune": "(default: auto, the checkpoint's own", "eval": "(default: auto",
                "sweep": "(default: auto", "bench": "(default: auto", "recover": "(default: ",
                "compress": "show this help message"}[command]
    assert expected in out


def test_model_safetensors_gets_the_same_mode_as_the_other_files(tmp_path):
    output = tmp_path / "pruned"
    previous = os.umask(0o022)
    try:
        assert run(["prune", DEMO_MODEL, "--method", "magnitude", "--output", output]) == 0
    finally:
        os.umask(previous)
    modes = {path.name: path.stat().st_mode & 0o777 for path in output.iterdir()}
    assert set(modes.values()) == {0o644}, modes


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints only hf_sparse loads: a model type of its own


def test_plain_transformers_refuses_a_structured_checkpoint_naming_its_type(flap_dir):
    script = """
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained(sys.argv[1])
        except Exception as error:
            print(type(error).__name__ + ": " + " ".join(str(error).split()))
        else:
            print("LOADED")
    """
    done = run_without_hf_sparse(script, str(flap_dir))
    message = done.stdout.strip().splitlines()[-1]
    assert message.startswith("ValueError: The checkpoint you are trying to load has model type "
                              "`hf_sparse_structured` but Transformers does not recognize this architecture")


def test_with_hf_sparse_a_structured_checkpoint_reloads_bit_identical(flap_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(flap_dir)
    assert model.config.model_type == "llama" and type(model).__name__ == "LlamaForCausalLM"
    stored = _weights(flap_dir)
    assert all(torch.equal(stored[key], value) for key, value in model.state_dict().items() if key in stored)
    model.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["model_type"] == "hf_sparse_structured"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert again.config.model_type == "llama"


def test_a_checkpoint_with_the_first_guard_still_loads(flap_dir, tmp_path):
    """Checkpoints written with the id2label guard (before the model type) load as before."""
    from transformers import AutoModelForCausalLM

    old = tmp_path / "old-format"
    shutil.copytree(flap_dir, old)
    config = json.loads((old / "config.json").read_text())
    config["model_type"] = config.pop("hf_sparse_original_model_type")
    config["id2label"] = {"This checkpoint needs hf_sparse to load (blocks of different shapes, hf_sparse_structured)"
                          ": pip install hf-sparse and import hf_sparse before from_pretrained": "hf_sparse"}
    (old / "config.json").write_text(json.dumps(config))
    model, expected = AutoModelForCausalLM.from_pretrained(old), AutoModelForCausalLM.from_pretrained(flap_dir)
    assert model.config.model_type == "llama" and "This checkpoint" not in str(model.config.id2label)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))


def test_flap_on_a_gguf_file_saves_a_loadable_checkpoint(tmp_path):
    pytest.importorskip("gguf", reason="writing a GGUF file needs the gguf package")
    from tiny_gguf import write_tiny_gguf
    from transformers import AutoModelForCausalLM

    (tmp_path / "gguf").mkdir()
    write_tiny_gguf(tmp_path / "gguf" / "tiny.gguf")
    text = tmp_path / "calib.txt"
    text.write_text("a b c d e f g h i j k l m n o p q r s t u v w x y z " * 200)
    output = tmp_path / "flap"
    assert run(["prune", tmp_path / "gguf", "--gguf-file", "tiny.gguf", "--method", "flap", "--pattern", "structured",
                "--sparsity", 0.3, "--calibration", text, "--num-samples", 4, "--sequence-length", 32,
                "--no-model-card", "--output", output]) == 0
    config = json.loads((output / "config.json").read_text())
    # Blocks of unequal shapes need hf_sparse's loader (the marker); equal ones are written as a stock config.
    stock = config["sparsity_config"]["structure"]["loading"] == "config"
    assert stock or config["quantization_config"] == {"quant_method": "hf_sparse_structured"}
    model = AutoModelForCausalLM.from_pretrained(output)
    stored = _weights(output)
    assert all(torch.equal(stored[key], value) for key, value in model.state_dict().items() if key in stored)
    assert model(torch.tensor([[1, 5, 7]])).logits.isfinite().all()


# ---------------------------------------------------------------------------------------------------------------
# Data loss


@pytest.mark.parametrize("how", ["same", "symlink", "relative", "inside", "parent"])
def test_output_that_is_the_input_model_is_refused(tmp_path, monkeypatch, capsys, how):
    model = tmp_path / "model"
    shutil.copytree(DEMO_MODEL, model)
    (tmp_path / "link").symlink_to(model)
    monkeypatch.chdir(tmp_path)
    output = {"same": model, "symlink": "link", "relative": "model/../model", "inside": "model/sub",
              "parent": tmp_path}[how]
    before = _weights(model)
    assert run(["prune", "model", "--method", "magnitude", "--output", output, "--overwrite"]) == 2
    assert "input model" in _error_lines(capsys.readouterr().err)[0]
    after = _weights(model)
    assert all(torch.equal(before[key], after[key]) for key in before)


@pytest.mark.parametrize("argv", [["prune", "MODEL", "--method", "magnitude", "--output", ""],
                                  ["sweep", "MODEL", "--methods", "magnitude", "--eval-data", HELDOUT, "--output", ""],
                                  ["compress", "MODEL", ""], ["decompress", "COMPACT", ""]])
def test_empty_output_is_refused(compact_dir, tmp_path, monkeypatch, capsys, argv):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(compact_dir if "COMPACT" in argv else DEMO_MODEL, checkpoint)
    monkeypatch.chdir(checkpoint)  # "" would be the current folder: the checkpoint itself
    argv = [str(checkpoint) if part in ("MODEL", "COMPACT") else part for part in argv]
    assert run([*argv, "--overwrite"] if argv[0] != "sweep" else argv) == 2
    assert "is empty" in _error_lines(capsys.readouterr().err)[0]
    assert (checkpoint / "model.safetensors").exists() and not (checkpoint / "results.csv").exists()


def test_overwrite_refuses_a_folder_with_an_empty_config_and_a_thesis(tmp_path, capsys):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "thesis.tex").write_text("years of work")
    assert run(["prune", DEMO_MODEL, "--method", "magnitude", "--output", folder, "--overwrite"]) == 2
    assert "is not a checkpoint folder (its config.json is not a model configuration" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "thesis.tex"]


# ---------------------------------------------------------------------------------------------------------------
# Other silently wrong results


def test_eval_refuses_windows_longer_than_the_context(capsys):
    assert run(["eval", DEMO_MODEL, "--data", HELDOUT, "--sequence-length", 5000]) == 2
    assert _error_lines(capsys.readouterr().err) == [
        "hf-sparse eval: error: --sequence-length 5000 is longer than the model's context of 1024 tokens; "
        "allowed: 2..1024"]


def test_perplexity_refuses_windows_longer_than_the_context(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_sparse.evaluation import perplexity

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)
    context = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=rf"sequence_length {context + 1} is longer than the model's context"):
        perplexity(model, tokenizer, HELDOUT.read_text(), sequence_length=context + 1, show_progress=False)
    for bad in ({"sequence_length": 1}, {"batch_size": 0}, {"max_windows": 0}, {"stride": -1}):
        with pytest.raises(ValueError, match="is not allowed"):
            perplexity(model, tokenizer, HELDOUT.read_text(), **{"sequence_length": 16, **bad}, show_progress=False)


def test_eval_update_card_keeps_a_compact_checkpoint_compact(compact_dir, tmp_path):
    folder = tmp_path / "compact"
    shutil.copytree(compact_dir, folder)
    before = json.loads((folder / "config.json").read_text())
    assert run(["eval", folder, "--data", HELDOUT, "--sequence-length", 128, "--max-windows", 2,
                "--update-card"]) == 0
    after = json.loads((folder / "config.json").read_text())
    assert after["quantization_config"] == before["quantization_config"]
    assert after["model_type"] == "hf_sparse_compact"
    assert after["sparsity_config"]["storage"] == before["sparsity_config"]["storage"]
    assert after["sparsity_config"]["evaluation"]["pruned_perplexity"] > 0
    assert (folder / "model.safetensors").stat().st_size == (compact_dir / "model.safetensors").stat().st_size


@pytest.mark.parametrize("output", ["IN/sub", "IN", "IN/."])
def test_compress_refuses_an_output_inside_or_equal_to_its_input(compact_dir, tmp_path, capsys, output):
    dense = tmp_path / "dense"
    assert run(["decompress", compact_dir, dense]) == 0
    names = sorted(p.name for p in dense.iterdir())
    assert run(["compress", dense, output.replace("IN", str(dense))]) == 2
    assert "the input" in _error_lines(capsys.readouterr().err)[0]
    assert sorted(p.name for p in dense.iterdir()) == names


# ---------------------------------------------------------------------------------------------------------------
# Unclear errors: one line


def test_a_full_disk_in_safetensors_is_one_line(tmp_path, monkeypatch, capsys):
    import transformers.modeling_utils
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                              'space left on device" })')

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    assert run(["prune", DEMO_MODEL, "--method", "magnitude", "--output", tmp_path / "out"]) == 2
    err = capsys.readouterr().err
    assert _error_lines(err) == ["hf-sparse prune: error: OSError: [Errno 28] No space left on device (while writing "
                                 "the weights)"]
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_a_full_disk_while_compressing_is_one_line(compact_dir, tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    from hf_sparse.formats import checkpoint

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                              'space left on device" })')

    monkeypatch.setattr(checkpoint, "save_file", full)
    assert run(["decompress", compact_dir, tmp_path / "dense"]) == 2
    assert _error_lines(capsys.readouterr().err) == [
        "hf-sparse decompress: error: OSError: [Errno 28] No space left on device (while writing the weights)"]
    assert list(tmp_path.iterdir()) == []


def test_any_safetensors_error_is_one_line(compact_dir, tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    from hf_sparse.formats import checkpoint

    def broken(*args, **kwargs):
        raise SafetensorError("Error while deserializing header: HeaderTooLarge\nsecond line")

    monkeypatch.setattr(checkpoint, "safe_open", broken)
    assert run(["decompress", compact_dir, tmp_path / "dense"]) == 2
    assert _error_lines(capsys.readouterr().err) == [
        "hf-sparse decompress: error: SafetensorError: Error while deserializing header: HeaderTooLarge"]


def test_a_huge_value_is_not_echoed_whole(tmp_path, capsys):
    huge = "x" * 100_000
    assert run(["prune", DEMO_MODEL, "--method", "magnitude", "--target-data", huge, "--output", tmp_path / "o"]) == 2
    line = _error_lines(capsys.readouterr().err)[0]
    assert len(line) < 600 and "characters)" in line  # paths are cut at errors.PATH_SHOWN (300)


# ---------------------------------------------------------------------------------------------------------------
# Bad input a new user tries


def test_ctrl_c_exits_130_with_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    import hf_sparse

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_sparse, "prune", interrupted)
    assert run(["prune", DEMO_MODEL, "--method", "magnitude", "--output", tmp_path / "o"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, fragment", [
    (["prune", "MODEL", "--method", "magnitude", "--num-workers", 2], "--num-workers 2 needs --parallel"),
    (["prune", "MODEL", "--method", "flap", "--pattern", "structured", "--compressed", "--calibration", CALIBRATION],
     "--compressed stores the zeros of pruned linears"),
    (["prune", "MODEL", "--method", "magnitude", "--sparsity-profile", "missing.json"], "is not a JSON file"),
    (["eval", "MODEL", "--data", "EMPTYDIR"], "evaluation data: folder"),
    (["eval", "MODEL", "--data", HELDOUT, "--sequence-length", 1], "--sequence-length 1 is too short"),
    (["compress", "AFILE", "OUT"], "does not exist: a checkpoint folder with config.json is needed"),
    (["sweep", "MODEL", "--methods", "magnitude", "--eval-data", HELDOUT, "--output", "AFILE"], "is a file"),
    (["prune", "AFILE", "--method", "magnitude"], "is a file; give the checkpoint folder"),
    (["eval", "AFILE", "--data", HELDOUT], "is a file; give the checkpoint folder"),
    (["eval", "MODEL", "--data", HELDOUT, "--gguf-file", "x.gguf"], "--gguf-file 'x.gguf' is not a file in"),
])
def test_bad_input_is_refused_before_loading_in_one_line(tmp_path, monkeypatch, capsys, argv, fragment):
    from transformers import PreTrainedModel

    def refuse(*args, **kwargs):
        raise AssertionError("the model was being loaded: the error should have come first")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("not a checkpoint")
    places = {"MODEL": DEMO_MODEL, "EMPTYDIR": tmp_path / "empty", "AFILE": tmp_path / "file.txt",
              "OUT": tmp_path / "out"}
    argv = [places.get(part, part) if isinstance(part, str) else part for part in argv]
    if argv[0] in ("prune",):
        argv += ["--output", tmp_path / "pruned"]
    assert run(argv) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and fragment in lines[0], lines


def test_calibration_length_defaults_to_the_models_context(tmp_path):
    """--sequence-length defaulted to 2048: every calibrated prune of the 1024-context demo model failed."""
    output = tmp_path / "wanda"
    assert run(["prune", DEMO_MODEL, "--method", "wanda", "--calibration", CALIBRATION, "--num-samples", 2,
                "--output", output]) == 0
    record = json.loads((output / "config.json").read_text())["sparsity_config"]
    assert record["calibration"]["sequence_length"] == 1024


def test_a_failed_push_keeps_the_saved_copy_and_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    from hf_sparse.integrations import hub

    def offline(folder, repo, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(hub, "upload_folder", offline)
    output = tmp_path / "pruned"
    assert run(["prune", DEMO_MODEL, "--method", "magnitude", "--push-to-hub", "me/pruned", "--output", output]) == 2
    err = capsys.readouterr().err
    assert _error_lines(err) == [f"hf-sparse prune: error: OSError: saved to {output}, but pushing it to 'me/pruned' "
                                 "failed (ConnectionError: '[Errno -2] Name or service not known'); push the folder "
                                 "again with huggingface-cli upload"]
    assert "Traceback" not in err and (output / "model.safetensors").exists()
