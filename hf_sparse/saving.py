"""The one way hf_sparse writes a checkpoint folder: complete or not at all.

Every writer (``hf-sparse prune/recover --output``, :func:`hf_sparse.hub.save_with_model_card`,
:func:`hf_sparse.hub.push_to_hub`) goes through :func:`save_checkpoint`, which writes into a hidden temporary sibling
of the destination, fsyncs every file and folder, and only then renames it into place. So:

* a crash, a kill, a full disk or a model card that fails to render never leaves a half-written folder at the
  destination (the card is rendered before anything is written);
* an existing destination is refused unless ``overwrite=True``, and even then only a *checkpoint* (a folder holding
  ``config.json``) is ever replaced — never a folder of someone's files;
* replacing is a two-rename swap. The new folder is first renamed to ``.NAME.new-*`` (it is complete from then on),
  then the old checkpoint to ``.NAME.old-*`` and the new one to ``NAME``. A process killed between those renames
  leaves ``NAME`` missing; the next save to (or CLI load of) ``NAME`` finishes the swap, or run
  :func:`finish_interrupted_save` by hand;
* SIGTERM (and SIGINT, as ``KeyboardInterrupt``) while writing remove the temporary folder before the process ends;
  a SIGKILL cannot be caught, so its temporary folder is removed by the next save to the same destination (the
  process id in the name says whether its writer is still alive).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: a folder holding this file is a checkpoint, the only kind of folder ``overwrite=True`` replaces
CHECKPOINT_MARKER = "config.json"
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


def _sibling(output: Path, kind: str) -> Path:
    """A fresh hidden sibling name ``.NAME.<kind>-<pid>-<random>`` (same file system, so renames are atomic)."""
    path = Path(tempfile.mkdtemp(prefix=f".{output.name}.{kind}-{os.getpid()}-", dir=output.parent))
    if kind != _TMP:
        path.rmdir()  # only the name is wanted: a rename moves a folder onto it
    else:
        # mkdtemp makes the folder private (0700); a checkpoint gets the permissions of any folder the user creates.
        umask = os.umask(0)
        os.umask(umask)
        path.chmod(0o777 & ~umask)
    return path


def _siblings(output: Path, kind: str) -> list[Path]:
    pattern = f".{glob.escape(output.name)}.{kind}-*"
    return sorted(output.parent.glob(pattern), key=lambda p: p.stat().st_mtime if p.exists() else 0.0)


def _writer_alive(path: Path) -> bool:
    """Whether the process that created ``path`` (its id is in the name) still runs."""
    try:
        pid = int(path.name.rsplit("-", 2)[-2])
    except (IndexError, ValueError):
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
    for leftover in dead[_TMP] + dead[_NEW] + dead[_OLD]:
        logger.info("removing %s, left by an interrupted save", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
    return restored


def check_destination(output: str | os.PathLike, overwrite: bool = False, *, label: str = "output",
                      overwrite_hint: str = "pass overwrite=True") -> Path:
    """Raise ``ValueError`` unless a checkpoint may be written to ``output``; returns it as an absolute path.

    It may if it does not exist, or if ``overwrite`` and it is a checkpoint folder (holds ``config.json``). Leftovers
    of an interrupted save to ``output`` are repaired first (:func:`finish_interrupted_save`).

    >>> check_destination("pruned", overwrite=True)  # doctest: +SKIP
    PosixPath('/home/me/pruned')
    """
    output = Path(output).expanduser().absolute()
    finish_interrupted_save(output)
    if not (output.exists() or output.is_symlink()):
        return output
    if not overwrite:
        raise ValueError(f"{label} {str(output)!r} already exists; choose a new folder or {overwrite_hint}")
    if output.is_symlink() or not output.is_dir() or not (output / CHECKPOINT_MARKER).is_file():
        raise ValueError(f"{label} {str(output)!r} is not a checkpoint folder (no {CHECKPOINT_MARKER}), so it is never "
                         "replaced; remove it yourself or choose another folder")
    return output


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


def _move_into_place(tmp: Path, output: Path) -> None:
    with _signals_blocked():
        if not output.exists():
            os.rename(tmp, output)
            _fsync_dir(output.parent)
            return
        new = _sibling(output, _NEW)
        os.rename(tmp, new)  # complete from here on: an interrupted swap is finished, not undone
        _fsync_dir(output.parent)
        old = _sibling(output, _OLD)
        os.rename(output, old)
        os.rename(new, output)
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
    if folder is not None and folder.exists():
        shutil.rmtree(folder, ignore_errors=True)


def atomic_write_file(path: str | os.PathLike, content: str | bytes) -> Path:
    """Write one file so that readers see the old content or the new, never a part: into a temporary sibling,
    fsynced, then renamed over ``path`` (sweep results, pictures).

    >>> atomic_write_file("results.csv", "method,perplexity\\n")  # doctest: +SKIP
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_TMP}-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content.encode("utf-8") if isinstance(content, str) else content)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; a result file is as readable as any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
    with atomic_directory(output, overwrite) as tmp:
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


__all__ = ["CHECKPOINT_MARKER", "atomic_directory", "atomic_write_file", "check_destination", "finish_interrupted_save",
           "save_checkpoint"]
