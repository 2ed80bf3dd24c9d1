"""Run folders: one run per folder, never clobbered, locked while in use.

A *run folder* holds one run's files (:data:`RUN_FILES` and the figures).
:func:`open_run` is how the training loop takes one:

1. an exclusive lock file, :data:`LOCK`, is created in the folder (the
   folder too, if it does not exist) with ``O_CREAT | O_EXCL``, naming the
   owner's host and pid. A lock whose owner is a dead process on this host is
   stale and taken over; a live owner, or an owner on another host (whose
   processes cannot be checked from here), is a :class:`RunFolderError`;
2. a folder that already holds a run is refused unless the run continues it
   (``resume``) or replaces it (``overwrite``);
3. the caller then makes every other check (data, model, checkpoint) *before*
   writing anything, and calls :meth:`RunFolder.start` to clear what a
   replaced run or a killed process left behind;
4. on leaving the ``with`` block the lock is removed, and so is the folder
   when this run created it and wrote nothing into it.

Under ``torchrun`` rank 0 alone takes the lock, and every rank learns
whether it got it, so that all of them stop alike.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import threading

from pyrovae import checkpoint, distributed

LOCK = ".pyrovae-lock"
RUN_FILES = ("config.json", "metrics.csv", checkpoint.CHECKPOINT, "model.pt")


class RunFolderError(ValueError):
    """A run folder that cannot be used: in use by another run, or holding a
    run that was neither resumed nor overwritten."""


def holds_run(folder: str) -> bool:
    """Whether ``folder`` holds any of a run's files."""
    return any(os.path.exists(os.path.join(folder, name)) for name in RUN_FILES)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _read_lock(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _take_lock(folder: str) -> None:
    """Create ``folder/LOCK`` exclusively, taking over a stale lock of a dead
    process on this host once; raise :class:`RunFolderError` for a held lock."""
    path = os.path.join(folder, LOCK)
    host = socket.gethostname()
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read_lock(path)
            pid, owner_host = owner.get("pid"), owner.get("host")
            if owner_host == host and isinstance(pid, int) and not _alive(pid):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # stale: its process is gone
                continue
            if owner_host == host:
                raise RunFolderError(
                    f"run folder {folder!r} is in use by process {pid} on this host (lock file {path}); wait for that run to end or choose another --out"
                ) from None
            raise RunFolderError(
                f"run folder {folder!r} is locked by process {pid} on host {owner_host!r} (lock file {path}); "
                "pyrovae cannot tell from here whether that run is still going: if it is not, delete the lock file"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump({"host": host, "pid": os.getpid()}, f)
        return
    raise RunFolderError(
        f"run folder {folder!r}: another process took the lock {path} as this one cleared a stale one; try again"
    )


class TrainingInterrupted(Exception):
    """Ctrl-C stopped a run cleanly after a finished step; the message says
    which checkpoint is kept and how to continue."""


class RunFolder:
    """A locked run folder (see the module docstring); ``path`` is the folder."""

    def __init__(self, path: str, overwrite: bool):
        self.path = path
        self.overwrite = overwrite
        self._interrupted = False
        self._previous_handlers = {}

    def catch_interrupts(self) -> None:
        """From now until the run ends, Ctrl-C (SIGINT) or SIGTERM asks the
        loop to stop after the current step (:meth:`stop_requested`); a second
        one acts at once, as usual. SIGTERM too, because that is what
        ``torchrun`` sends its workers when it gets Ctrl-C itself (and what a
        cluster's scheduler sends before it kills a job)."""
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread

        def handler(signum, frame):
            self._interrupted = True
            signal.signal(signum, self._previous_handlers[signum])

        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[signum] = signal.signal(signum, handler)

    def restore_interrupts(self) -> None:
        for signum, previous in self._previous_handlers.items():
            signal.signal(signum, previous)
        self._previous_handlers = {}

    def stop_requested(self) -> bool:
        """Whether Ctrl-C was pressed, on any process: under ``torchrun`` the
        processes agree, so that every rank stops after the same step."""
        if distributed.world_size() == 1:
            return self._interrupted
        return any(distributed.all_gather(self._interrupted))

    def interrupted(self, model: str, step: int, epoch: int) -> TrainingInterrupted:
        """The error that ends a run stopped by Ctrl-C during ``epoch``."""
        path = os.path.join(self.path, checkpoint.CHECKPOINT)
        if epoch > 1:
            kept = f"the checkpoint of epoch {epoch - 1}, {path}, is kept; continue with: pyrovae train {model} --resume {self.path}"
        else:
            kept = "no epoch had finished, so there is no checkpoint to resume"
        return TrainingInterrupted(f"interrupted after step {step} (epoch {epoch}): {kept}")

    def start(self) -> None:
        """Every check has passed: remove the replaced run's files (with
        ``overwrite``) and the temporaries a killed process left behind.
        Call it on rank 0 only, before the run's first write."""
        if self.overwrite:
            for name in RUN_FILES:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.path, name))
        checkpoint.remove_stale_temporaries(self.path)


def _claim(out: str, resumes_here: bool, overwrite: bool) -> tuple[RunFolder, bool]:
    """Rank 0's half of :func:`open_run`: the folder (created if need be) and
    its lock; returns the folder and whether this call created it."""
    created = not os.path.exists(out)
    try:
        os.makedirs(out, exist_ok=True)
        _take_lock(out)
    except RunFolderError:
        raise
    except OSError as err:
        if created and err.errno != errno.EEXIST:
            with contextlib.suppress(OSError):
                os.rmdir(out)
        raise ValueError(f"output folder {out!r} is not writable: {err}") from err
    if holds_run(out) and not (resumes_here or overwrite):
        _release(out, created)
        raise RunFolderError(
            f"run folder {out!r} already holds a run; continue it with --resume {out}, replace it with --overwrite, or choose another --out"
        )
    return RunFolder(out, overwrite), created


def _release(out: str, created: bool) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(out, LOCK))
    if created:
        with contextlib.suppress(OSError):  # not empty: the run wrote its files
            os.rmdir(out)


@contextlib.contextmanager
def open_run(out: str, resume: str | None = None, overwrite: bool = False):
    """Lock the run folder ``out`` for one run; yield a :class:`RunFolder`.

    :param resume: the run folder or checkpoint being resumed, if any: a
        run in ``out`` is then the one being continued when it is that run.
    :param overwrite: replace a run that ``out`` holds.
    :raises RunFolderError: the folder is locked or holds another run.
    :raises ValueError: the folder cannot be created or written.
    """
    resumes_here = resume is not None and os.path.realpath(
        os.path.dirname(checkpoint.checkpoint_path(resume))
    ) == os.path.realpath(out)
    error, folder, created = None, RunFolder(out, overwrite), False
    if distributed.rank() == 0:
        try:
            folder, created = _claim(out, resumes_here, overwrite)
        except ValueError as err:
            error = err
    # Every rank stops if rank 0 did not get the folder.
    failed = distributed.all_gather(error is not None)[0]
    if error is not None:
        raise error
    if failed:
        raise RunFolderError(f"rank 0 could not take the run folder {out!r}")
    try:
        yield folder
    finally:
        folder.restore_interrupts()
        if distributed.rank() == 0:
            _release(out, created)
