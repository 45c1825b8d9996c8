"""Checkpoints are written completely or not at all (hf_sparse.saving): refusal rules, failures before and during the
write, and real processes killed mid-save (SIGKILL, SIGTERM, SIGINT) and between the two renames of a swap."""

from __future__ import annotations

import importlib.util

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import hf_sparse
from conftest import tiny_llama
from hf_sparse.integrations import hub
from hf_sparse.saving import atomic_directory, check_destination, finish_interrupted_save, save_checkpoint

WORKER = Path(__file__).with_name("crash_worker.py")


@pytest.fixture
def pruned():
    model = tiny_llama()
    hf_sparse.prune(model, hf_sparse.SparsityConfig(method="magnitude", pattern="2:4"), show_progress=False)
    return model


def _old_checkpoint(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "llama", "run": "old"}')
    (path / "model.safetensors").write_bytes(b"old weights")
    return path


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_existing_folder_is_refused_without_overwrite(pruned, tmp_path):
    existing = _old_checkpoint(tmp_path / "out")
    with pytest.raises(ValueError, match=r"already exists; choose a new folder or pass overwrite=True"):
        hub.save_with_model_card(pruned, None, existing)
    with pytest.raises(ValueError, match=r"already exists"):
        save_checkpoint(pruned, None, existing)
    assert (existing / "config.json").read_text() == '{"model_type": "llama", "run": "old"}'
    assert _names(tmp_path) == ["out"]
    card = hub.save_with_model_card(pruned, None, existing, overwrite=True)
    assert card == existing / "README.md" and "sparsity_config" in json.loads((existing / "config.json").read_text())
    assert _names(tmp_path) == ["out"]  # no temporary or backup folder left


def test_overwrite_never_replaces_a_folder_that_is_not_a_checkpoint(pruned, tmp_path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text(r"\documentclass{book}")
    with pytest.raises(ValueError, match=r"is not a checkpoint folder \(no config.json\), so it is never replaced"):
        save_checkpoint(pruned, None, thesis, overwrite=True)
    (tmp_path / "notes.txt").write_text("a file")
    with pytest.raises(ValueError, match="is not a checkpoint folder"):
        hub.save_with_model_card(pruned, None, tmp_path / "notes.txt", overwrite=True)
    assert _names(thesis) == ["thesis.tex"] and _names(tmp_path) == ["notes.txt", "thesis"]


def test_a_card_that_fails_to_render_leaves_nothing(pruned, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("record field 'evaluation' is not renderable (simulated)")

    monkeypatch.setattr(hub, "render_model_card", broken)
    with pytest.raises(ValueError, match="not renderable"):
        hub.save_with_model_card(pruned, None, tmp_path / "out")
    assert _names(tmp_path) == []


def test_a_failing_write_leaves_nothing_and_keeps_the_old_checkpoint(pruned, tmp_path, monkeypatch):
    old = _old_checkpoint(tmp_path / "out")

    class FullDisk:
        def save_pretrained(self, folder):
            (Path(folder) / "config.json").write_text("{}")
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(FullDisk(), None, old, overwrite=True)
    assert _names(tmp_path) == ["out"] and (old / "config.json").read_text() == '{"model_type": "llama", "run": "old"}'


def test_push_to_hub_saves_through_the_atomic_path(pruned, monkeypatch):
    seen = []
    monkeypatch.setattr(hub, "upload_folder", lambda folder, repo_id, **kw: seen.append(sorted(
        p.name for p in Path(folder).iterdir())))
    hub.push_to_hub(pruned, "me/tiny", license="mit")
    # With the plots extra the card carries its sparsity picture, uploaded in the same commit.
    pictures = ["sparsity.png"] if importlib.util.find_spec("matplotlib") else []
    assert seen == [sorted(["README.md", "config.json", "generation_config.json", "model.safetensors", *pictures])]


def _start(tmp_path: Path, phase: str, pause: float = 600.0) -> tuple[subprocess.Popen, Path, Path]:
    output, ready = _old_checkpoint(tmp_path / "out"), tmp_path / "ready"
    process = subprocess.Popen([sys.executable, str(WORKER), str(output), str(ready), phase, str(pause)])
    deadline = time.monotonic() + 300
    while not ready.exists():
        assert process.poll() is None, f"the worker ended early with {process.returncode}"
        assert time.monotonic() < deadline, "the worker never reached the point where it is killed"
        time.sleep(0.05)
    return process, output, ready


def _hidden(tmp_path: Path) -> list[str]:
    return sorted(p.name.split("-")[0] for p in tmp_path.glob(".out.*"))


def test_sigkill_mid_write_keeps_the_old_checkpoint_and_the_next_save_cleans_up(tmp_path):
    process, output, ready = _start(tmp_path, "write")
    process.kill()
    assert process.wait() == -signal.SIGKILL
    assert json.loads((output / "config.json").read_text()) == {"model_type": "llama", "run": "old"}
    assert _hidden(tmp_path) == [".out.tmp"]  # a SIGKILL cannot be caught: its half-written copy stays
    check_destination(output, overwrite=True)  # what every save does first: the dead writer's copy goes
    assert _hidden(tmp_path) == [] and (output / "model.safetensors").read_bytes() == b"old weights"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_sigint_mid_write_removes_the_temporary_folder(tmp_path, signum):
    process, output, ready = _start(tmp_path, "write")
    assert Path(ready.read_text()).exists()
    process.send_signal(signum)
    assert process.wait(timeout=120) != 0
    assert _names(tmp_path) == ["out", "ready"] and _hidden(tmp_path) == []
    assert json.loads((output / "config.json").read_text()) == {"model_type": "llama", "run": "old"}


def test_sigkill_between_the_renames_is_finished_by_the_next_run(tmp_path):
    process, output, _ = _start(tmp_path, "swap")
    process.kill()
    process.wait()
    assert not output.exists() and _hidden(tmp_path) == [".out.new", ".out.old"]
    assert finish_interrupted_save(output) == output  # the new copy was complete: it is moved into place
    assert json.loads((output / "config.json").read_text()) == {"run": "new"} and _hidden(tmp_path) == []


def test_an_interrupted_swap_without_the_new_copy_restores_the_old_one(tmp_path):
    process, output, _ = _start(tmp_path, "swap")
    process.kill()
    process.wait()
    for new in tmp_path.glob(".out.new-*"):  # say the new copy was removed by hand
        for path in new.iterdir():
            path.unlink()
        new.rmdir()
    with pytest.raises(ValueError, match="already exists"):  # the old checkpoint is back, so it is refused
        check_destination(output)
    assert json.loads((output / "config.json").read_text()) == {"model_type": "llama", "run": "old"}
    assert _hidden(tmp_path) == []


def test_sigterm_during_the_swap_waits_for_the_swap_to_finish(tmp_path):
    process, output, _ = _start(tmp_path, "swap", pause=1.0)
    process.send_signal(signal.SIGTERM)  # held back while the renames run, delivered right after
    assert process.wait(timeout=120) == -signal.SIGTERM
    assert json.loads((output / "config.json").read_text()) == {"run": "new"}
    finish_interrupted_save(output)
    assert _hidden(tmp_path) == []


def test_atomic_directory_on_success_fsyncs_and_replaces(tmp_path, monkeypatch):
    import os

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    old = _old_checkpoint(tmp_path / "out")
    with atomic_directory(old, overwrite=True) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "weights.bin").write_bytes(torch.zeros(4).numpy().tobytes())
    assert _names(old) == ["config.json", "weights.bin"] and _names(tmp_path) == ["out"]
    assert len(synced) >= 4  # two files, the folder, the parent after each rename


# ----------------------------------------------------------------------------------------------------------------
# Data loss: only a real checkpoint is replaced, only our own temporaries are removed


@pytest.mark.parametrize("config", ["{}", "[1]", "not json", '{"architectures": ["X"]}'])
def test_overwrite_refuses_a_config_that_is_not_a_model_configuration(pruned, tmp_path, config):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "config.json").write_text(config)
    (folder / "thesis.tex").write_text(r"\documentclass{book}")
    with pytest.raises(ValueError, match=r"is not a checkpoint folder \(.*\), so it is never replaced"):
        save_checkpoint(pruned, None, folder, overwrite=True)
    assert _names(folder) == ["config.json", "thesis.tex"]


def test_overwrite_refuses_a_checkpoint_holding_a_users_file_or_folder(pruned, tmp_path):
    folder = _old_checkpoint(tmp_path / "out")
    (folder / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match=r"it holds 'thesis.tex', which a checkpoint does not"):
        save_checkpoint(pruned, None, folder, overwrite=True)
    (folder / "thesis.tex").unlink()
    (folder / "data").mkdir()
    with pytest.raises(ValueError, match=r"it holds 'data'"):
        save_checkpoint(pruned, None, folder, overwrite=True)
    (folder / "data").rmdir()
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no weights"):
        save_checkpoint(pruned, None, folder, overwrite=True)


def test_empty_output_and_the_current_folder_are_refused(pruned, tmp_path, monkeypatch):
    checkpoint = _old_checkpoint(tmp_path / "out")
    monkeypatch.chdir(checkpoint)
    for output in ("", " ", ".", str(checkpoint), str(tmp_path)):
        with pytest.raises(ValueError, match=r"is empty|is the current folder or one of its parents"):
            save_checkpoint(pruned, None, output, overwrite=True)
    assert _names(checkpoint) == ["config.json", "model.safetensors"]


def test_a_folder_that_only_looks_like_a_leftover_is_never_removed(pruned, tmp_path):
    lookalikes = [tmp_path / ".out.tmp-1-abc", tmp_path / ".out.old-99999999-x", tmp_path / ".out.new-1-y"]
    for folder in lookalikes:
        folder.mkdir()
        (folder / "notes.txt").write_text("mine")
    save_checkpoint(pruned, None, tmp_path / "out")
    save_checkpoint(pruned, None, tmp_path / "out", overwrite=True)
    finish_interrupted_save(tmp_path / "out")
    assert all((folder / "notes.txt").read_text() == "mine" for folder in lookalikes)
    assert sorted(_names(tmp_path)) == sorted(["out"] + [f.name for f in lookalikes])
    assert ".hf_sparse-save.json" not in _names(tmp_path / "out")


def test_files_get_the_users_permissions(pruned, tmp_path):
    import os

    old = os.umask(0o022)
    try:
        output = save_checkpoint(pruned, None, tmp_path / "out")
    finally:
        os.umask(old)
    modes = {path.name: path.stat().st_mode & 0o777 for path in output.iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


@pytest.mark.parametrize("input_is", ["same", "symlink", "relative", "inside", "parent"])
def test_output_that_is_the_input_is_refused(tmp_path, monkeypatch, input_is):
    from hf_sparse.saving import check_not_the_input

    model = _old_checkpoint(tmp_path / "model")
    (tmp_path / "link").symlink_to(model)
    monkeypatch.chdir(tmp_path)
    output = {"same": str(model), "symlink": "link", "relative": "./model/../model", "inside": "model/sub",
              "parent": str(tmp_path)}[input_is]
    with pytest.raises(ValueError, match=r"is the input|is inside the input|holds the input"):
        check_not_the_input(output, str(model))
    check_not_the_input(tmp_path / "other", model)  # a new folder beside it is fine


def test_safetensors_full_disk_becomes_one_oserror(pruned, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                              'left on device" })')

    monkeypatch.setattr(type(pruned), "save_pretrained", full)
    with pytest.raises(OSError, match=r"^\[Errno 28\] No space left on device \(while writing the weights\)$"):
        save_checkpoint(pruned, None, tmp_path / "out")
    assert _names(tmp_path) == []


def test_overwrite_never_follows_a_link_to_a_checkpoint(pruned, tmp_path):
    real = _old_checkpoint(tmp_path / "real")
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(ValueError, match=r"is not a checkpoint folder \(it is a symbolic link\)"):
        save_checkpoint(pruned, None, tmp_path / "link", overwrite=True)
    assert (real / "config.json").read_text() == '{"model_type": "llama", "run": "old"}'
    assert (tmp_path / "link").is_symlink()
