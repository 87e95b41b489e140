"""fileio: outputs get the umask's mode, are written atomically, and one run's outputs land together or not at all."""

from __future__ import annotations

import os
import signal
import stat
import threading
from pathlib import Path

import pytest

from egp_export.errors import OutputError
from egp_export.io import fileio
from egp_export.io.fileio import atomic_path, check_writable, new_file_mode, run_transaction, write_text_atomic


@pytest.fixture(params=[0o022, 0o077], ids=["umask-022", "umask-077"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_new_file_mode_follows_the_umask(umask):
    assert new_file_mode() == 0o666 & ~umask
    assert os.umask(umask) == umask  # reading it put it back


def test_atomic_write_gets_the_umask_mode(tmp_path, umask):
    path = write_text_atomic(tmp_path / "a.txt", "x", force=False)
    assert _mode(path) == 0o666 & ~umask  # mkstemp alone gives 0600


def test_force_does_not_tighten_an_existing_file(tmp_path):
    previous = os.umask(0o022)
    try:
        path = tmp_path / "a.txt"
        path.write_text("old")
        path.chmod(0o644)
        write_text_atomic(path, "new", force=True)
        assert path.read_text() == "new" and _mode(path) == 0o644
    finally:
        os.umask(previous)


def test_atomic_path_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path, force=True) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert _snapshot(tmp_path) == {"a.txt": b"old"}


def test_check_writable_refuses_existing_files_and_folders(tmp_path):
    (tmp_path / "a").write_text("x")
    with pytest.raises(OutputError, match="already exists.*--force"):
        check_writable(tmp_path / "a", force=False)
    with pytest.raises(OutputError, match="is a directory"):
        check_writable(tmp_path, force=True)


def test_transaction_moves_every_output_into_place(tmp_path, umask):
    out = tmp_path / "out"
    with run_transaction(out, ["a.txt", "b.txt"], folders=["sub"], force=False) as staging:
        assert staging.parent == out and staging.name.startswith(fileio.STAGING_PREFIX)
        write_text_atomic(staging / "a.txt", "A", force=False)
        write_text_atomic(staging / "b.txt", "B", force=False)
        write_text_atomic(staging / "sub" / "c.txt", "C", force=False)
        assert not (out / "a.txt").exists()  # nothing is visible before the end
    assert _snapshot(out) == {"a.txt": b"A", "b.txt": b"B", "sub/c.txt": b"C"}
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.txt", "sub"]  # no staging folder left
    assert all(_mode(out / name) == 0o666 & ~umask for name in ("a.txt", "b.txt", "sub/c.txt"))


@pytest.mark.parametrize("interruption", [RuntimeError("stage failed"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_interrupted_run_leaves_nothing(tmp_path, interruption):
    out = tmp_path / "out"
    with pytest.raises(type(interruption)), run_transaction(out, ["a.txt", "b.txt"], force=False) as staging:
        write_text_atomic(staging / "a.txt", "A", force=False)
        raise interruption  # between the first and the second file
    assert not out.exists()  # the transaction created the folder and removed it again


def test_interrupted_forced_run_keeps_the_previous_outputs(tmp_path):
    (tmp_path / "a.txt").write_text("old A")
    (tmp_path / "keep.txt").write_text("unrelated")
    with pytest.raises(KeyboardInterrupt), run_transaction(tmp_path, ["a.txt", "b.txt"], force=True) as staging:
        write_text_atomic(staging / "a.txt", "new A", force=False)
        raise KeyboardInterrupt
    assert _snapshot(tmp_path) == {"a.txt": b"old A", "keep.txt": b"unrelated"}


def test_existing_output_is_refused_before_the_run(tmp_path):
    (tmp_path / "b.txt").write_text("old")
    ran = []
    with pytest.raises(OutputError, match="b.txt already exists"), run_transaction(tmp_path, ["a.txt", "b.txt"], force=False):
        ran.append(True)
    assert not ran
    (tmp_path / "sub").mkdir()
    with pytest.raises(OutputError, match="sub already exists"), run_transaction(tmp_path, [], folders=["sub"], force=False):
        ran.append(True)
    assert not ran
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a folder"), run_transaction(tmp_path, [], folders=["file"], force=True):
        ran.append(True)
    assert not ran


def test_force_replaces_files_and_whole_folders(tmp_path):
    (tmp_path / "a.txt").write_text("old")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "stale.txt").write_text("stale")
    with run_transaction(tmp_path, ["a.txt"], folders=["sub"], force=True) as staging:
        write_text_atomic(staging / "a.txt", "new", force=False)
        write_text_atomic(staging / "sub" / "fresh.txt", "fresh", force=False)
    assert _snapshot(tmp_path) == {"a.txt": b"new", "sub/fresh.txt": b"fresh"}


def test_output_appearing_during_the_run_is_not_overwritten(tmp_path):
    transaction = run_transaction(tmp_path, ["a.txt", "b.txt"], force=False)
    with pytest.raises(OutputError, match="appeared while running"), transaction as staging:
        write_text_atomic(staging / "a.txt", "A", force=False)
        write_text_atomic(staging / "b.txt", "B", force=False)
        (tmp_path / "b.txt").write_text("someone else's")
    assert _snapshot(tmp_path) == {"b.txt": b"someone else's"}  # a.txt was moved back out


def test_failed_move_puts_back_what_was_moved(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("old A")
    (tmp_path / "b.txt").write_text("old B")
    real_replace = os.replace

    def replace_failing_on_b(source, target):
        if str(target) == str(tmp_path / "b.txt") and "staging" in str(source):
            raise OSError(28, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(fileio.os, "replace", replace_failing_on_b)
    with pytest.raises(OSError, match="No space"), run_transaction(tmp_path, ["a.txt", "b.txt"], force=True) as staging:
        write_text_atomic(staging / "a.txt", "new A", force=False)
        write_text_atomic(staging / "b.txt", "new B", force=False)
    assert _snapshot(tmp_path) == {"a.txt": b"old A", "b.txt": b"old B"}


def test_ctrl_c_during_the_moves_waits_until_they_are_done(tmp_path, monkeypatch):
    real_replace = os.replace
    interrupted = []

    def replace_then_interrupt(source, target):
        real_replace(source, target)
        if Path(target).parent == tmp_path and not interrupted:
            interrupted.append(True)
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C after the first move

    monkeypatch.setattr(fileio.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt), run_transaction(tmp_path, ["a.txt", "b.txt"], force=False) as staging:
        write_text_atomic(staging / "a.txt", "A", force=False)
        write_text_atomic(staging / "b.txt", "B", force=False)
    assert interrupted
    assert _snapshot(tmp_path) == {"a.txt": b"A", "b.txt": b"B"}  # both landed, then the interrupt was raised
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_transaction_commits_from_another_thread(tmp_path):
    # Only the main thread may install signal handlers; elsewhere the moves run without holding Ctrl-C back.
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with run_transaction(tmp_path, ["a.txt"], force=False) as staging:
                write_text_atomic(staging / "a.txt", "A", force=False)
        except BaseException as error:  # noqa: BLE001 - reported to the test thread
            errors.append(error)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert errors == [] and _snapshot(tmp_path) == {"a.txt": b"A"}
