"""Writing outputs without losing anything: refuse to overwrite, write atomically."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from egp_export.errors import OutputError


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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create the folder {path.parent}: {error.strerror}; choose another output location.") from None
    if not os.access(path.parent, os.W_OK):
        raise OutputError(f"the folder {path.parent} is not writable; choose another output location.")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, force: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only on success.

    A failure inside the block leaves any existing file at ``path`` untouched
    and removes the temporary file.
    """
    target = check_writable(path, force=force)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
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
