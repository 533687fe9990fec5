"""Durable files of a run directory: atomic writes, fsynced metric lines and a lock per run.

* :func:`write_bytes` / :func:`write_text` / :func:`write_json`: a temporary file in the same
  directory, written, flushed and fsynced, then ``os.replace``-d over the target (and the
  directory fsynced), so that a reader (or a run killed at any moment) sees the old file or the
  new one, never part of one.  An ``OSError`` names the file it was writing.
* :func:`append_line`: one whole line appended and fsynced (``metrics.jsonl``);
  :func:`keep_lines` cuts a line file back to its first ``n`` lines, atomically.
* :class:`RunLock`: an OS file lock (``fcntl.flock``, non-blocking) on ``<run dir>/run.lock``;
  a second process on the same run gets :class:`RunLockedError` at once, naming the directory
  and the holder's PID and host.  The OS drops the lock when its process ends, however it ends.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import tempfile
from pathlib import Path

__all__ = ["LOCK_NAME", "RunLock", "RunLockedError", "held_run_dir", "append_line", "keep_lines", "read_json", "write_bytes",
           "write_json", "write_text"]

LOCK_NAME = "run.lock"
_TMP_SUFFIX = ".tmp"


PATH_FIELDS = ("out_dir", "data_dir")


def portable_path(path: str | os.PathLike | None) -> str | None:
    """``path`` as a run file records it: relative to the working directory when it lies under
    it, as given otherwise (a relative path is kept as given). Runs started from the repository
    root into its own folders thus record no absolute path of the machine; paths outside it
    (a scratch folder, the shared data sets) stay absolute and are rewritten by
    ``scripts/relative_result_paths.py`` before results are committed."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    try:
        return p.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:  # not under the working directory
        return p.as_posix()


def recorded(config: dict) -> dict:
    """A configuration dict with its path fields (``PATH_FIELDS``) made portable."""
    return {k: portable_path(v) if k in PATH_FIELDS and v is not None else v for k, v in config.items()}


def _named(e: OSError, path) -> OSError:
    """``e`` with ``filename`` set to ``path`` where the OS left it out (``write`` and ``fsync``)."""
    if e.filename is None:
        return type(e)(e.errno, e.strerror or os.strerror(e.errno or 0), str(path))
    return e


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace ``path`` by ``data`` atomically (temporary file in its folder, fsync, ``os.replace``)."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise _named(e, path) from None
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise _named(e, path) from None
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`write_bytes` of ``text`` in UTF-8."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> Path:
    """:func:`write_text` of ``json.dumps(obj)``."""
    return write_text(path, json.dumps(obj, indent=indent))


def read_json(path: str | os.PathLike):
    """``json.loads`` of a file; an unreadable or damaged file is a ``ValueError`` naming it."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise _named(e, path) from None
    try:
        return json.loads(text)
    except ValueError as e:
        raise ValueError(f"{path} is damaged ({e}); delete it (or its run directory) and run again") from None


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append ``line`` and a newline in one write, then fsync: a line is there whole or not at all
    (a cut line at the end is dropped by :func:`keep_lines` on resume)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:
        raise _named(e, path) from None
    try:
        _write_all(fd, (line.rstrip("\n") + "\n").encode("utf-8"))
        os.fsync(fd)
    except OSError as e:
        raise _named(e, path) from None
    finally:
        os.close(fd)


def keep_lines(path: str | os.PathLike, n: int) -> None:
    """Keep the first ``n`` whole lines of ``path`` (atomically; nothing to do if it has no more)."""
    path = Path(path)
    if not path.exists():
        return
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    whole = lines[:-1]  # the part after the last newline is a cut line (or empty)
    if len(whole) <= n and not lines[-1]:
        return
    write_bytes(path, b"".join(line + b"\n" for line in whole[:n]))


def _remove(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Delete the temporary files a killed writer left in ``folder`` (call it holding the lock)."""
    for p in Path(folder).glob(f".*{_TMP_SUFFIX}"):
        _remove(p)


class RunLockedError(RuntimeError):
    """Another process holds the lock of the run directory."""


class RunLock:
    """Exclusive lock on one run directory: ``with RunLock(path): ...``.

    ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``<path>/run.lock``, which then holds ``<pid> <host>``.
    Raises :class:`RunLockedError` naming the directory and the holder if another process (or
    another ``RunLock`` of this one) holds it.  On systems without ``fcntl`` no lock is taken.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.file = self.path / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover  (Windows)
            return self
        for _ in range(10):
            try:
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise _named(e, self.file) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd)
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise _named(e, self.file) from None
                raise RunLockedError(
                    f"run directory {self.path} is in use by {holder or 'another process'} (lock {self.file}); "
                    "wait for that run to finish, or stop it, then run the same command again") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.file).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the file was removed while we waited for it: lock the new one
                os.close(fd)
                continue
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"process {os.getpid()} on host {socket.gethostname()}\n".encode())
            except OSError as e:
                os.close(fd)
                raise _named(e, self.file) from None
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return self
        raise RunLockedError(f"run directory {self.path}: could not take its lock {self.file}")

    def release(self, *, remove: bool = False) -> None:
        """Drop the lock; ``remove``: delete the lock file first (a run that left nothing else)."""
        if self._fd is None:
            return
        if remove:
            _remove(self.file)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def held_run_dir(path: str | os.PathLike):
    """Create the run directory ``path`` and hold its :class:`RunLock` for the block (temporaries a
    killed writer left are removed first); if the block leaves nothing in folders it created (a
    failed start), they go again, so the corrected command finds no trace of it."""
    path = Path(path)
    created = []
    p = path
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:  # a file where a folder should be
        raise NotADirectoryError(e.errno, "a file is in the way of the run directory", e.filename) from None
    lock = RunLock(path).acquire()
    remove_stale_temporaries(path)
    try:
        yield lock
    finally:
        empty = not any(q.name != LOCK_NAME for q in path.iterdir())
        lock.release(remove=empty)
        for d in created if empty else ():
            with contextlib.suppress(OSError):
                d.rmdir()


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 200).decode(errors="replace").strip()
    except OSError:
        return ""
