"""The one way hf_sparse writes a checkpoint folder: complete or not at all.

Every writer (``hf-sparse prune/recover --output``, :func:`hf_sparse.hub.save_with_model_card`,
:func:`hf_sparse.hub.push_to_hub`) goes through :func:`save_checkpoint`, which writes into a hidden temporary sibling
of the destination, fsyncs every file and folder, and only then renames it into place. So:

* a crash, a kill, a full disk or a model card that fails to render never leaves a half-written folder at the
  destination (the card is rendered before anything is written);
* an existing destination is refused unless ``overwrite=True``, and even then only a *checkpoint* is ever replaced
  (:func:`is_checkpoint`: a model ``config.json`` plus weights, and only files a checkpoint has) — never a folder of
  someone's files; an empty name, the current folder and its parents are never a destination;
* replacing is a two-rename swap. The new folder is first renamed to ``.NAME.new-*`` (it is complete from then on),
  then the old checkpoint to ``.NAME.old-*`` and the new one to ``NAME``. A process killed between those renames
  leaves ``NAME`` missing; the next save to (or CLI load of) ``NAME`` finishes the swap, or run
  :func:`finish_interrupted_save` by hand;
* SIGTERM (and SIGINT, as ``KeyboardInterrupt``) while writing remove the temporary folder before the process ends;
  a SIGKILL cannot be caught, so its temporary folder is removed by the next save to the same destination (the
  process id in the name says whether its writer is still alive);
* only folders hf_sparse made are ever removed: each temporary folder holds a marker file (:data:`WRITER_MARKER`)
  naming the destination; a folder that merely looks like a leftover is left alone;
* files get the permissions of any file the user creates (``0666`` less the umask), whatever the writer used.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import shown

logger = logging.getLogger(__name__)

#: the model configuration every checkpoint holds (with weights: see :func:`is_checkpoint`)
CHECKPOINT_MARKER = "config.json"
#: the file that marks a folder as a temporary of hf_sparse's own (removed before the folder becomes the checkpoint)
WRITER_MARKER = ".hf_sparse-save.json"
#: weight files of a checkpoint written by transformers or hf_sparse
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
#: what else a checkpoint folder holds (configs, tokenizers, the card, its pictures, custom code, a chat template)
CHECKPOINT_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".md", ".png", ".txt", ".model", ".py", ".jinja",
                            ".tiktoken", ".gitattributes")
_TMP, _NEW, _OLD = "tmp", "new", "old"
# Signals that end a process by default and that a save turns into a clean-up first (SIGINT already raises
# KeyboardInterrupt, which the clean-up catches like any exception).
_CLEANUP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
_BLOCKED_DURING_SWAP = _CLEANUP_SIGNALS + (signal.SIGINT,)


class _SaveInterrupted(BaseException):
    """Raised inside a save by the SIGTERM/SIGHUP handler, so the ``finally`` clean-up runs."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _sibling(output: Path, kind: str) -> Path:
    """A fresh hidden sibling name ``.NAME.<kind>-<pid>-<random>`` (same file system, so renames are atomic); the
    temporary folder itself (``kind`` tmp) is created, with the marker that makes it ours."""
    path = Path(tempfile.mkdtemp(prefix=f".{output.name}.{kind}-{os.getpid()}-", dir=output.parent))
    if kind != _TMP:
        path.rmdir()  # only the name is wanted: a rename moves a folder onto it
    else:
        # mkdtemp makes the folder private (0700); a checkpoint gets the permissions of any folder the user creates.
        path.chmod(0o777 & ~_umask())
        _write_marker(path, output, _TMP)
    return path


def _write_marker(folder: Path, output: Path, kind: str) -> None:
    (folder / WRITER_MARKER).write_text(json.dumps({"writer": "hf_sparse", "destination": output.name, "kind": kind,
                                                    "pid": os.getpid()}), encoding="utf-8")


def _marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a temporary folder hf_sparse made, or ``None`` (not ours: never removed)."""
    try:
        marker = json.loads((folder / WRITER_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("writer") == "hf_sparse" else None


def _siblings(output: Path, kind: str) -> list[Path]:
    """The leftovers of saves to ``output`` of one kind: hidden siblings with the name *and* our marker naming
    ``output`` (a folder that merely looks like one is someone else's)."""
    pattern = f".{glob.escape(output.name)}.{kind}-*"
    found = [path for path in output.parent.glob(pattern)
             if path.is_dir() and not path.is_symlink() and (_marker(path) or {}).get("destination") == output.name]
    return sorted(found, key=lambda p: p.stat().st_mtime if p.exists() else 0.0)


def _writer_alive(path: Path) -> bool:
    """Whether the process that created ``path`` (its id is in the marker) still runs."""
    try:
        pid = int((_marker(path) or {})["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # platforms that cannot open folders (Windows): nothing to flush
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders; the files themselves were synced
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file, then every folder, of ``root`` to the disk (a full disk surfaces here as OSError)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def finish_interrupted_save(output: str | os.PathLike) -> Path | None:
    """Repair what a killed save left beside ``output``; returns ``output`` if it was put back, else ``None``.

    * ``output`` missing, a complete ``.NAME.new-*`` there: the swap was interrupted after the old checkpoint was
      moved away — the new one is moved into place and the old one removed;
    * ``output`` missing, only ``.NAME.old-*``: the old checkpoint is moved back;
    * otherwise leftovers of dead writers (``.NAME.tmp-*``, ``.NAME.new-*``, ``.NAME.old-*``) are removed; folders of a
      writer that is still running are left alone.

    >>> finish_interrupted_save("pruned")  # doctest: +SKIP
    PosixPath('pruned')
    """
    output = Path(output).expanduser().absolute()
    if not output.parent.is_dir():
        return None
    dead = {kind: [p for p in _siblings(output, kind) if not _writer_alive(p)] for kind in (_TMP, _NEW, _OLD)}
    restored = None
    if not output.exists() and not output.is_symlink():
        if dead[_NEW]:
            os.rename(dead[_NEW].pop(), output)
            logger.warning("finished an interrupted save: the new checkpoint is now at %s", output)
            restored = output
        elif dead[_OLD]:
            os.rename(dead[_OLD].pop(), output)
            logger.warning("an interrupted save was undone: the previous checkpoint is back at %s", output)
            restored = output
        if restored is not None:
            _fsync_dir(output.parent)
    stray = output / WRITER_MARKER  # a swap killed just before it removed the marker of the finished checkpoint
    if output.is_dir() and not output.is_symlink() and _marker(output) is not None and not _writer_alive(output):
        stray.unlink(missing_ok=True)
    for leftover in dead[_TMP] + dead[_NEW] + dead[_OLD]:
        logger.info("removing %s, left by an interrupted save", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
    return restored


def is_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a checkpoint that ``overwrite=True`` may replace: a real folder (not a link) with a
    model ``config.json`` (a JSON object naming its ``model_type``), weights (:data:`WEIGHT_FILES`, or safetensors
    shards), and nothing a checkpoint does not hold (no subfolders, only :data:`CHECKPOINT_FILE_SUFFIXES`).

    >>> is_checkpoint("thesis")  # doctest: +SKIP
    False
    """
    return _not_a_checkpoint(Path(folder)) is None


def _not_a_checkpoint(folder: Path) -> str | None:
    """Why ``folder`` is not a replaceable checkpoint, or ``None`` if it is one."""
    if folder.is_symlink():
        return "it is a symbolic link"
    if not folder.is_dir():
        return "it is a file"
    try:
        config = json.loads((folder / CHECKPOINT_MARKER).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {CHECKPOINT_MARKER}"
    except (OSError, ValueError):
        return f"its {CHECKPOINT_MARKER} is not JSON"
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        return f"its {CHECKPOINT_MARKER} is not a model configuration (no model_type)"
    names = [path.name for path in folder.iterdir() if path.name != WRITER_MARKER]
    if not any(name in WEIGHT_FILES or name.endswith(".safetensors") for name in names):
        return "no weights (model.safetensors or shards)"
    for path in sorted(folder.iterdir()):
        if path.name == WRITER_MARKER:
            continue
        if path.is_dir() or path.is_symlink():
            return f"it holds {shown(path.name)}, which a checkpoint does not"
        if not path.name.endswith(CHECKPOINT_FILE_SUFFIXES):
            return f"it holds {shown(path.name)}, which a checkpoint does not"
    return None


def check_destination(output: str | os.PathLike, overwrite: bool = False, *, label: str = "output",
                      overwrite_hint: str = "pass overwrite=True") -> Path:
    """Raise ``ValueError`` unless a checkpoint may be written to ``output``; returns it as an absolute path.

    It may if it does not exist, or if ``overwrite`` and it is a checkpoint (:func:`is_checkpoint`). An empty name,
    the current folder or one of its parents is never a destination. Leftovers of an interrupted save to ``output``
    are repaired first (:func:`finish_interrupted_save`).

    >>> check_destination("pruned", overwrite=True)  # doctest: +SKIP
    PosixPath('/home/me/pruned')
    """
    if not str(output).strip():
        raise ValueError(f"{label} is empty; give the folder to write the checkpoint to")
    output = Path(output).expanduser().absolute()
    if _is_same_or_inside(Path.cwd(), output):
        raise ValueError(f"{label} {shown(str(output))} is the current folder or one of its parents; choose a new "
                         "folder")
    finish_interrupted_save(output)
    if not (output.exists() or output.is_symlink()):
        return output
    if not overwrite:
        raise ValueError(f"{label} {shown(str(output))} already exists; choose a new folder or {overwrite_hint}")
    reason = _not_a_checkpoint(output)
    if reason is not None:
        raise ValueError(f"{label} {shown(str(output))} is not a checkpoint folder ({reason}), so it is never "
                         "replaced; remove it yourself or choose another folder")
    return output


def _is_same_or_inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or inside it, links and ``..`` resolved."""
    path, folder = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return path == folder or folder in path.parents


def check_not_the_input(output: str | os.PathLike, source: str | os.PathLike, *, label: str = "output",
                        source_label: str = "the input") -> None:
    """Refuse an output that is the input folder, inside it, or holds it (links and relative paths resolved): writing
    there would replace or nest into what is being read.

    >>> check_not_the_input("./", ".")
    Traceback (most recent call last):
    ...
    ValueError: output './' is the input '.' itself; choose another folder
    """
    if not str(output).strip() or not str(source).strip():
        return
    out, src = Path(output).expanduser(), Path(source).expanduser()
    if not src.exists():
        return  # a Hub id, or a path that does not exist: nothing local to protect
    if _is_same_or_inside(out, src) and _is_same_or_inside(src, out):
        raise ValueError(f"{label} {shown(str(output))} is {source_label} {shown(str(source))} itself; choose another "
                         "folder")
    if _is_same_or_inside(out, src):
        raise ValueError(f"{label} {shown(str(output))} is inside {source_label} {shown(str(source))}; choose a folder "
                         "outside it")
    if _is_same_or_inside(src, out):
        raise ValueError(f"{label} {shown(str(output))} holds {source_label} {shown(str(source))}; choose a folder "
                         "that does not contain it")


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into :class:`_SaveInterrupted` for the duration of a save (main thread only: Python
    delivers signals there), so the caller can clean up before the signal takes its usual effect."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise _SaveInterrupted(signum)

    previous = {}
    for signum in _CLEANUP_SIGNALS:
        if signal.getsignal(signum) in (signal.SIG_IGN, None):
            continue  # the process chose to ignore it; so does the save
        previous[signum] = signal.signal(signum, interrupt)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Hold back SIGTERM/SIGINT/SIGHUP during the renames (microseconds), so a signal never splits the swap."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED_DURING_SWAP)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _finish_files(tmp: Path) -> None:
    """Before the move: every file gets the permissions of a file the user creates (safetensors, like mkstemp,
    may write private ones)."""
    mode = 0o666 & ~_umask()
    for folder, _, files in os.walk(tmp):
        for name in files:
            if name != WRITER_MARKER:
                os.chmod(os.path.join(folder, name), mode)


def _move_into_place(tmp: Path, output: Path) -> None:
    with _signals_blocked():
        if not output.exists():
            os.rename(tmp, output)
            (output / WRITER_MARKER).unlink(missing_ok=True)
            _fsync_dir(output)
            _fsync_dir(output.parent)
            return
        new = _sibling(output, _NEW)
        os.rename(tmp, new)  # complete from here on: an interrupted swap is finished, not undone
        _write_marker(new, output, _NEW)
        _fsync_dir(output.parent)
        old = _sibling(output, _OLD)
        _write_marker(output, output, _OLD)  # the previous checkpoint, about to be moved away: ours to remove
        os.rename(output, old)
        os.rename(new, output)
        (output / WRITER_MARKER).unlink(missing_ok=True)
        _fsync_dir(output)
        _fsync_dir(output.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(output: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``output`` to write into; once the block ends without error, its content is
    fsynced and it replaces ``output`` (rules of :func:`check_destination`). On any error, or SIGTERM/SIGINT, the
    temporary folder is removed and ``output`` is untouched.

    >>> with atomic_directory("pruned") as tmp:  # doctest: +SKIP
    ...     model.save_pretrained(tmp)
    """
    output = check_destination(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        with _signals_interrupt():
            tmp = _sibling(output, _TMP)
            yield tmp
            _finish_files(tmp)
            _fsync_tree(tmp)
            # Checked again: another writer may have created it meanwhile (never replace a non-checkpoint).
            check_destination(output, overwrite)
            _move_into_place(tmp, output)
    except _SaveInterrupted as interrupted:
        _remove(tmp)
        # The previous handler is back: the default one ends the process with the usual status.
        signal.raise_signal(interrupted.signum)
        raise SystemExit(128 + interrupted.signum) from None  # the caller's own handler returned: still stop
    finally:
        _remove(tmp)


def _remove(folder: Path | None) -> None:
    if folder is not None and folder.exists() and _marker(folder) is not None:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write one file into; once the block ends without error it is fsynced,
    given the permissions of a file the user creates and renamed over ``path``, so readers see the old content or the
    new, never a part. On any error, SIGTERM/SIGHUP or Ctrl-C the temporary file is removed and ``path`` is untouched.

    >>> with atomic_file("model.gguf") as tmp:  # doctest: +SKIP
    ...     write_gguf(tmp)
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{_TMP}-{os.getpid()}-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        with _signals_interrupt():
            yield tmp
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; a result is as readable as any other
            os.replace(tmp, path)
    except _SaveInterrupted as interrupted:
        tmp.unlink(missing_ok=True)
        signal.raise_signal(interrupted.signum)  # the previous handler is back: the default one ends the process
        raise SystemExit(128 + interrupted.signum) from None  # the caller's own handler returned: still stop
    finally:
        tmp.unlink(missing_ok=True)  # gone already after the rename


def atomic_write_file(path: str | os.PathLike, content: str | bytes) -> Path:
    """Write one file atomically (:func:`atomic_file`): sweep results, pictures.

    >>> atomic_write_file("results.csv", "method,perplexity\\n")  # doctest: +SKIP
    """
    with atomic_file(path) as tmp:
        tmp.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return Path(path)


@contextlib.contextmanager
def disk_errors() -> Iterator[None]:
    """safetensors reports a failed write (a full disk) as its own ``SafetensorError`` with a Rust ``IoError`` in the
    text; inside this block it becomes the ``OSError`` it is, with the one line that matters.

    >>> with disk_errors():  # doctest: +SKIP
    ...     safetensors.torch.save_file(tensors, "model.safetensors")
    """
    try:
        yield
    except Exception as error:
        if not type(error).__module__.startswith("safetensors") or "IoError" not in str(error):
            raise
        text = str(error)
        code = errno.ENOSPC if ("StorageFull" in text or "No space left" in text or "code: 28" in text) else None
        if code is not None:
            raise OSError(code, f"{os.strerror(code)} (while writing the weights)") from error
        raise OSError(f"could not write the weights: {shown(text, 200)}") from error


def save_checkpoint(model: Any, tokenizer: Any, output: str | os.PathLike, *, overwrite: bool = False,
                    evaluation: Mapping[str, Any] | None = None,
                    extra_files: Callable[[], Mapping[str, str | bytes]] | None = None,
                    compressed: bool = False) -> Path:
    """Write ``model`` (+ ``tokenizer``, if not ``None``) to ``output`` atomically; returns ``output`` (absolute).

    ``evaluation`` is merged into the model's sparsity record first (:func:`hf_sparse.record.merge_evaluation`);
    ``extra_files`` is then called and its ``{file name: text or bytes}`` (e.g. the model card and its pictures)
    written beside the weights. ``compressed`` writes the pruned linears in compact storage
    (``save_pretrained(..., compressed=True)``).
    Everything that can fail without touching the disk (the destination rules, the card) fails before writing.

    >>> save_checkpoint(model, tokenizer, "pruned", evaluation={"pruned_perplexity": 62.1})  # doctest: +SKIP
    PosixPath('/home/me/pruned')
    """
    from .record import merge_evaluation

    output = check_destination(output, overwrite)
    if evaluation:
        merge_evaluation(model, evaluation)
    files = dict(extra_files()) if extra_files is not None else {}
    with atomic_directory(output, overwrite) as tmp, disk_errors():
        model.save_pretrained(tmp, **({"compressed": True} if compressed else {}))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, content in files.items():
            if isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(content, encoding="utf-8")
    logger.info("saved %s to %s", type(model).__name__, output)
    return output


__all__ = ["CHECKPOINT_MARKER", "WRITER_MARKER", "atomic_directory", "atomic_file", "atomic_write_file", "check_destination",
           "check_not_the_input", "disk_errors", "finish_interrupted_save", "is_checkpoint", "save_checkpoint"]
