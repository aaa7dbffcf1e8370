"""Writing files so that a reader never sees half of one: atomic files, atomic run
directories, directory locks, JSON in and out.

Every file mipp writes (checkpoints, sidecars, reports, a sweep's run records) goes through
:func:`atomic_write_bytes`: the bytes land in a temporary file in the same directory, are
flushed to disk, and the file is renamed into place, so an interrupted write leaves either
the old file or the new one, never a mixture. Files get the usual permissions,
``0o666 & ~umask`` (not the ``0600`` of a bare :func:`tempfile.mkstemp`).

A command's whole output directory (``mipp prune|train|finetune --out DIR``) is built by
:func:`run_directory`: under a hidden temporary sibling ``.DIR.tmp-XXXXXXXX`` that is swapped
into place at the end, so a reader sees the old directory or the new one, complete, and no
stale file of an older run survives. See :class:`RunDirectory` for the details.

:func:`lock_directory` holds an exclusive ``flock`` on a lock file inside a directory
(a sweep's), so that a second process using the same directory fails at once.

Test hook: when the environment variable ``MIPP_TEST_KILL_AFTER=N`` is set, the process
kills itself with SIGKILL at the N-th *crash point* of a run directory: after each file
written inside a run directory being built and after each rename of the final swap. It
exists only so that tests can check what a reader sees after a crash at every point.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from mipp.errors import MippError

try:  # POSIX only; without it there is no locking (and no stale-temporary cleanup)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LOCK_NAME",
    "DirectoryLockedError",
    "RunDirectory",
    "RunDirectoryError",
    "atomic_write_bytes",
    "file_mode",
    "lock_directory",
    "read_json",
    "run_directory",
    "write_json",
]

#: The lock file :func:`lock_directory` creates inside the directory it locks.
LOCK_NAME = ".mipp.lock"

#: Environment variable of the crash test hook (see the module docstring).
KILL_AFTER_ENV = "MIPP_TEST_KILL_AFTER"


class RunDirectoryError(MippError):
    """An output directory cannot be used: it holds a run (no ``force``), it contains an
    input of the command, or it is not a directory."""


class DirectoryLockedError(MippError):
    """Another process holds the lock of a directory (:func:`lock_directory`)."""


# ----------------------------------------------------------------------------- permissions

_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask, read without changing it where the system allows (Linux
    ``/proc/self/status``); elsewhere set and restored at once under a lock, through a
    restrictive value so that a file another thread creates meanwhile is never too open."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def file_mode(*, directory: bool = False) -> int:
    """Permission bits of a new file (``0o666 & ~umask``) or directory (``0o777 & ~umask``).

    >>> old = os.umask(0o022); modes = oct(file_mode()), oct(file_mode(directory=True))
    >>> _ = os.umask(old); modes
    ('0o644', '0o755')
    """
    return (0o777 if directory else 0o666) & ~_umask()


# ----------------------------------------------------------------------------- crash test hook

#: temporary run directories being built by this process (where writes are crash points)
_BUILDING: list[Path] = []
_points = 0


def _crash_point() -> None:
    """Count a crash point; SIGKILL this process at the N-th when ``MIPP_TEST_KILL_AFTER=N``."""
    global _points
    limit = os.environ.get(KILL_AFTER_ENV)
    if not limit:
        return
    _points += 1
    if _points == int(limit):
        os.kill(os.getpid(), signal.SIGKILL)


def _in_building(path: Path) -> bool:
    path = Path(os.path.abspath(path))
    return any(path.is_relative_to(d) for d in _BUILDING)


# ----------------------------------------------------------------------------- files


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a flushed temporary file and an atomic rename.

    The file's permissions are ``0o666 & ~umask``, as for a file opened normally.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "sub" / "a.txt"
    >>> atomic_write_bytes(p, b"hello"); p.read_bytes(), sorted(x.name for x in p.parent.iterdir())
    (b'hello', ['a.txt'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # POSIX (mkstemp creates 0600)
                os.fchmod(f.fileno(), file_mode())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if _BUILDING and _in_building(path):
        _crash_point()


def write_json(
    path: str | os.PathLike[str], obj: Any, *, indent: int = 1, allow_nan: bool = True
) -> None:
    """Write ``obj`` as JSON (with a trailing newline) to ``path`` atomically.

    ``allow_nan=False`` refuses NaN / Inf (strict JSON); by default they are written as
    Python's ``json`` module does (``NaN``), which it reads back.
    """
    text = json.dumps(obj, indent=indent, allow_nan=allow_nan) + "\n"
    atomic_write_bytes(path, text.encode())


def read_json(path: str | os.PathLike[str]) -> Any:
    """The JSON value in ``path``, or None when the file is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------- locks


def _try_lock(fd: int) -> bool:
    """Take an exclusive flock on ``fd`` without waiting; False when another holds it."""
    if fcntl is None:  # pragma: no cover - Windows
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return False
    return True


@contextlib.contextmanager
def lock_directory(
    path: str | os.PathLike[str],
    *,
    what: str = "directory",
    wait: bool = False,
    on_wait: Callable[[], None] | None = None,
) -> Iterator[Path]:
    """Hold an exclusive lock on directory ``path`` (created if missing) for the block.

    The lock is an ``flock`` on the file :data:`LOCK_NAME` inside it. By default a second
    holder (another process, or another call in this one) fails at once with
    :class:`DirectoryLockedError`; with ``wait=True`` it blocks until the holder lets go,
    calling ``on_wait()`` once first (to say why nothing happens). The kernel releases the
    lock when the process ends, even by SIGKILL, so a crash never leaves it held; the file
    itself stays (it is empty). ``what`` names the directory's kind in the error ("sweep
    directory").
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lock = path / LOCK_NAME
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        if not _try_lock(fd):
            if not wait:
                raise DirectoryLockedError(
                    f"{what} {path} is in use by another mipp process (it holds {lock}); "
                    f"wait for that one to finish or choose another directory"
                )
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)  # (fcntl is there: _try_lock said False)
        yield path
    finally:
        os.close(fd)  # releases the lock


# ----------------------------------------------------------------------------- run directories

AT_FDCWD = -100
RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap the directories ``a`` and ``b`` atomically (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``); False where the system or the file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without renameat2
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


class RunDirectory:
    """A command's output directory, built whole under a temporary name and swapped in.

    Made by :func:`run_directory`. Constructing it checks the target at once (so a command
    refuses before any work): ``path`` must not contain any of ``inputs`` (refused even with
    ``force``: replacing the directory would destroy the command's own input), must not be a
    file, and, unless ``force``, must be missing or empty. Construction also cleans up after
    an earlier process on the same ``path`` that was killed (see below).

    ``with rd as tmp:`` creates the hidden sibling ``.NAME.tmp-XXXXXXXX`` (mode
    ``0o777 & ~umask``) and yields it; the block writes the run's files there. When the block
    ends normally the temporary directory is swapped into place:

    - ``path`` missing or empty: one ``rename`` (atomic; it replaces an empty directory);
    - ``path`` holding files (only with ``force``; a non-empty ``path`` that appeared while
      the block ran is refused without it): on Linux one ``renameat2(RENAME_EXCHANGE)``
      swaps the two directories atomically, so ``path`` always exists and holds the old run
      or the new one; the old run, now under the temporary name, is then deleted. Where
      ``RENAME_EXCHANGE`` is not available (another system, a file system without it) two
      renames are used: old → ``.NAME.old-XXXXXXXX``, new → ``path``; between them (two
      system calls) ``path`` does not exist.

    When the block raises (an error, Ctrl-C) the temporary directory is deleted and
    ``path`` is untouched. After SIGKILL the temporary directory stays behind as a hidden
    sibling; the next :func:`run_directory` on the same ``path`` deletes it (each builder
    holds a ``flock`` on its temporary directory, so only those of dead processes are
    touched), and, should ``path`` be missing with an old run left aside by a kill between
    the two fallback renames, puts that old run back first.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        force: bool = False,
        inputs: Iterable[str | os.PathLike[str] | None] = (),
    ) -> None:
        self.path = Path(path)
        self.force = force
        self.target = Path(os.path.realpath(self.path))  # a symlinked --out: its target
        if self.target.parent == self.target:
            raise RunDirectoryError(f"cannot use the root directory {self.path} as a run directory")
        # replacing a run directory deletes what it held: never the working directory, one
        # of its ancestors or the home directory, whatever --force says
        cwd = Path(os.path.realpath(os.getcwd()))
        home = Path(os.path.realpath(os.path.expanduser("~")))
        if cwd.is_relative_to(self.target) or self.target == home:
            raise RunDirectoryError(
                f"output directory {self.path} is the working directory, one of its parents "
                f"or the home directory; choose a run directory inside it (e.g. --out runs/x)"
            )
        for item in inputs:
            if item is None:
                continue
            for p in {Path(os.path.abspath(item)), Path(os.path.realpath(item))}:
                if p.is_relative_to(self.target):
                    raise RunDirectoryError(
                        f"output directory {self.path} contains {item}, an input of this "
                        f"command; choose another --out (--force does not apply to inputs)"
                    )
        self._recover()
        self.check()
        self._tmp: Path | None = None
        self._fd: int | None = None

    # the swap's names: .NAME.tmp-XXXXXXXX and .NAME.old-XXXXXXXX beside the target
    def _siblings(self, kind: str) -> list[Path]:
        parent = self.target.parent
        if not parent.is_dir():
            return []
        prefix = f".{self.target.name}.{kind}-"
        return sorted(p for p in parent.iterdir() if p.name.startswith(prefix))

    def _recover(self) -> None:
        """Put back an old run left aside by a kill between the two fallback renames (when
        ``path`` is missing) and delete the temporary directories of dead processes."""
        if fcntl is None:  # pragma: no cover - no way to tell a live builder from a dead one
            return
        for kind in ("old", "tmp"):
            for p in self._siblings(kind):
                if p.is_symlink() or not p.is_dir():
                    continue
                try:
                    fd = os.open(p, os.O_RDONLY)
                except OSError:
                    continue
                try:
                    if not _try_lock(fd):
                        continue  # a live process is building or swapping it
                    if kind == "old" and not os.path.lexists(self.target):
                        os.rename(p, self.target)
                    else:
                        shutil.rmtree(p, ignore_errors=True)
                finally:
                    os.close(fd)

    def _non_empty(self) -> bool:
        if os.path.lexists(self.target) and not self.target.is_dir():
            raise RunDirectoryError(f"output directory {self.path} is a file, not a directory")
        return self.target.is_dir() and any(self.target.iterdir())

    def check(self) -> None:
        """Refuse a non-empty ``path`` without ``force`` (and a file in its place)."""
        if self._non_empty() and not self.force:
            raise RunDirectoryError(
                f"output directory {self.path} already holds files; choose another --out, "
                f"or pass --force to replace it"
            )

    def __enter__(self) -> Path:
        parent = self.target.parent
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=parent))
        try:
            os.chmod(tmp, file_mode(directory=True))  # mkdtemp creates 0700
            self._fd = os.open(tmp, os.O_RDONLY)
            _try_lock(self._fd)  # a fresh name: nobody else can hold it
        except BaseException:
            self._release()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._tmp = tmp
        _BUILDING.append(tmp)
        return tmp

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        tmp = self._tmp
        assert tmp is not None, "RunDirectory used without entering it"
        _BUILDING.remove(tmp)
        self._tmp = None
        try:
            if exc_type is None:
                _fsync_dir(tmp)
                self._swap(tmp)
                _fsync_dir(self.target.parent)
        finally:
            if tmp.exists():  # the failed build, or the old run after an exchange
                shutil.rmtree(tmp, ignore_errors=True)
            self._release()

    def _swap(self, tmp: Path) -> None:
        target = self.target
        try:
            os.rename(tmp, target)  # missing or empty target: atomic
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        else:
            _crash_point()
            return
        self.check()  # a run that appeared meanwhile needs --force too
        if target.is_symlink() or not target.is_dir():
            raise RunDirectoryError(f"output directory {self.path} is a file, not a directory")
        if _exchange(tmp, target):
            _crash_point()
            return  # tmp now holds the old run; __exit__ deletes it
        aside = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
        fd = os.open(target, os.O_RDONLY)  # locked: no other process's cleanup restores it
        try:
            _try_lock(fd)
            os.rename(target, aside)
            _crash_point()
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(aside, target)
                raise
            _crash_point()
            shutil.rmtree(aside, ignore_errors=True)
        finally:
            os.close(fd)


def run_directory(
    path: str | os.PathLike[str],
    *,
    force: bool = False,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
) -> RunDirectory:
    """The output directory ``path`` of a command, checked now and built atomically later.

    Refuses at once (:class:`RunDirectoryError`) a ``path`` that contains one of ``inputs``
    (None entries are skipped), even with ``force``, and a non-empty one without ``force``
    (the command's ``--force``). Use it as ``with run_directory(...) as tmp:`` and write
    every file under ``tmp``; at the end of the block ``path`` is replaced by it in one step
    (details: :class:`RunDirectory`).

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()) / "run"
    >>> with run_directory(d) as tmp:
    ...     write_json(tmp / "a.json", 1)
    >>> sorted(p.name for p in d.parent.iterdir()), read_json(d / "a.json")
    (['run'], 1)
    >>> run_directory(d)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    mipp._io.RunDirectoryError: output directory ... already holds files; choose another ...
    """
    return RunDirectory(path, force=force, inputs=inputs)
