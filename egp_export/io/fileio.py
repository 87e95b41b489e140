"""Writing outputs without losing anything: refuse to overwrite, write atomically, commit a run's outputs together.

Every file is created with the mode any tool gives a new file, ``0o666 & ~umask``
(``tempfile.mkstemp`` alone would make it 0600, and ``--force`` would then turn
a 0644 file into 0600).

A command that writes several outputs stages them in a hidden folder inside its
output folder (:func:`run_transaction`) and moves them into place together
once all are written: an error or Ctrl-C before that leaves the output folder
as it was, so a rerun is not refused because of half a run's files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from egp_export.errors import OutputError

STAGING_PREFIX = ".egp-export-staging."
REPLACED_PREFIX = ".egp-export-replaced."


def check_writable(path: str | os.PathLike, *, force: bool) -> Path:
    """Return ``path`` as a Path after checking it may be (over)written.

    Raises OutputError when it exists and ``force`` is false, when it is a
    directory, or when its parent cannot be created or written.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give a file path for this output.")
    if path.exists() and not force:
        raise OutputError(f"{path} already exists; pass --force (force=True) to overwrite it.")
    _make_writable_folder(path.parent)
    return path


def _make_writable_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create the folder {folder}: {error.strerror}; choose another output location.") from None
    if not os.access(folder, os.W_OK):
        raise OutputError(f"the folder {folder} is not writable; choose another output location.")


def new_file_mode() -> int:
    """The mode a new file gets from open(2): 0o666 less the process's umask."""
    # The umask can only be read by setting it; it is put back at once.
    umask = os.umask(0o077)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, force: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only on success.

    A failure inside the block leaves any existing file at ``path`` untouched
    and removes the temporary file. The file gets the mode of a new file
    (:func:`new_file_mode`), also when it replaces one.
    """
    target = check_writable(path, force=force)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, new_file_mode())
        yield tmp
        if target.exists() and not force:
            raise OutputError(f"{target} appeared while writing; pass --force (force=True) to overwrite it.")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str, *, force: bool) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, force=force) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def save_torch_atomic(obj, path: str | os.PathLike, *, force: bool = True) -> Path:
    """``torch.save`` to ``path`` atomically: a crash leaves the previous file intact."""
    import torch  # here, not at the top: the CLI imports this module for --help

    with atomic_path(path, force=force) as tmp:
        torch.save(obj, tmp)
    return Path(path)


@contextlib.contextmanager
def run_transaction(
    out_dir: str | os.PathLike, files: Iterable[str], *, folders: Iterable[str] = (), force: bool
) -> Iterator[Path]:
    """Stage one run's outputs and move them into ``out_dir`` together, or not at all.

    Checks first (before any work) that every ``out_dir/name`` of ``files``
    and ``folders`` may be written, then yields an empty staging folder inside
    ``out_dir``: write each output to ``staging / name``. When the block ends
    normally, every entry of the staging folder replaces ``out_dir/name``
    (existing ones only with ``force``); the moves are renames within one file
    system, with Ctrl-C held back until they are done, and a failed move puts
    back what was already moved. When the block raises (Ctrl-C included),
    nothing in ``out_dir`` changes, and a folder the transaction created is
    removed again if it is still empty.
    """
    out = Path(out_dir)
    created = not out.exists()
    for name in files:
        check_writable(out / name, force=force)
    for name in folders:
        _check_folder_writable(out / name, force=force)
    _make_writable_folder(out)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    try:
        yield staging
        _commit(staging, out, force=force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):  # not empty: something else was written there meanwhile
                out.rmdir()


def _check_folder_writable(path: Path, *, force: bool) -> None:
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path} exists and is not a folder; remove it or choose another output location.")
    if path.exists() and not force:
        raise OutputError(f"{path} already exists; pass --force (force=True) to replace it.")


def _commit(staging: Path, out: Path, *, force: bool) -> None:
    entries = sorted(entry.name for entry in staging.iterdir())
    replaced_dir = Path(tempfile.mkdtemp(prefix=REPLACED_PREFIX, dir=out))
    moved: list[str] = []
    replaced: list[str] = []
    try:
        with _interrupts_held_back():
            try:
                for name in entries:
                    target = out / name
                    if target.exists() or target.is_symlink():
                        if not force:
                            raise OutputError(f"{target} appeared while running; pass --force (force=True) to overwrite it.")
                        os.replace(target, replaced_dir / name)
                        replaced.append(name)
                    os.replace(staging / name, target)
                    moved.append(name)
            except BaseException:
                for name in reversed(moved):
                    os.replace(out / name, staging / name)
                for name in replaced:
                    os.replace(replaced_dir / name, out / name)
                raise
    finally:
        shutil.rmtree(replaced_dir, ignore_errors=True)


@contextlib.contextmanager
def _interrupts_held_back() -> Iterator[None]:
    """Defer Ctrl-C (SIGINT) until the block is done, then raise KeyboardInterrupt as usual."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        # getsignal gives None for a handler installed outside Python; the default is the closest.
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
    if received:
        raise KeyboardInterrupt


def check_outputs(out_dir: str | os.PathLike, names: tuple[str, ...], *, force: bool) -> dict[str, Path]:
    """Check that every output ``out_dir/name`` may be written, before any expensive work.

    Creates ``out_dir`` if needed. Raises OutputError naming the first file
    that exists (without ``force``) or cannot be written.
    """
    return {name: check_writable(Path(out_dir) / name, force=force) for name in names}
