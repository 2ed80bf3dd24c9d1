"""Run folders: one run per folder, never clobbered, locked while in use.

A *run folder* holds one run's files (:data:`RUN_FILES` and the figures).
:func:`open_run` is how the training loop takes one:

1. an exclusive lock file, :data:`LOCK`, is created in the folder (the
   folder too, if it does not exist) with ``O_CREAT | O_EXCL``, naming the
   owner's host and pid. A lock whose owner is a dead process on this host is
   stale and taken over; a live owner, or an owner on another host (whose
   processes cannot be checked from here), is a :class:`RunFolderError`;
2. a folder that already holds a run is refused unless the run continues it
   (``resume``) or replaces it (``overwrite``); a folder holding other files
   (the user's own: images, notes, other runs) is refused always, so that a
   run's files are never mixed into them (hidden files are not counted);
3. the caller then makes every other check (data, model, checkpoint) *before*
   writing anything, and calls :meth:`RunFolder.start` to clear what a
   replaced run or a killed process left behind;
4. on leaving the ``with`` block the lock is removed, and so is the folder
   when this run created it and wrote nothing into it. A new run that fails
   before its first checkpoint removes what it wrote (``config.json``,
   ``metrics.csv``, TensorBoard's events), so that the same command can use
   the folder again.

``config.json`` is a record of the run's settings, not an input: the
checkpoint holds the settings a run uses. :func:`config_text` says so in the
file (its ``"_note"``), and :func:`config_edits` names a hand edit, so that
``--resume``, ``sample`` and ``evaluate`` never ignore one silently, and a
resume keeps the edited file (as ``config-edited.json``) instead of
overwriting it.

Under ``torchrun`` rank 0 alone takes the lock, and every rank learns
whether it got it, so that all of them stop alike.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import socket
import threading
import warnings

from pyrovae import checkpoint, distributed

LOCK = ".pyrovae-lock"
CONFIG = "config.json"
RUN_FILES = (CONFIG, "metrics.csv", checkpoint.CHECKPOINT, "model.pt", checkpoint.TEST_SPLIT)
# Everything else a run and its evaluations write: no other command writes under these names.
RUN_FIGURES = ("loss.png", "samples.png", "reconstructions.png", "terms.png", "schedule.png")
_RUN_OUTPUTS = re.compile(
    r"^(evaluate(-\d+)?\.(json|png)|samples-\d+\.(png|npy)|(config|metrics)-edited(-\d+)?\.(json|csv)"
    r"|events\.out\.tfevents\..*)$"
)


class RunFolderError(ValueError):
    """A run folder that cannot be used: in use by another run, or holding a
    run that was neither resumed nor overwritten."""


def holds_run(folder: str) -> bool:
    """Whether ``folder`` holds any of a run's files."""
    return any(os.path.exists(os.path.join(folder, name)) for name in RUN_FILES)


def is_run_file(name: str) -> bool:
    """Whether ``name`` is the name of a file a run or its evaluation writes in its folder."""
    return name in RUN_FILES or name in RUN_FIGURES or bool(_RUN_OUTPUTS.match(name))


def foreign_files(folder: str) -> list[str]:
    """The visible entries of ``folder`` that are not a run's: the lock, our
    temporaries and hidden files (``.DS_Store``, a ``.git``) are not counted."""
    return sorted(n for n in os.listdir(folder) if not n.startswith(".") and not is_run_file(n))


def resume_flags() -> str:
    """The flags that ``--resume`` accepts, as the command line spells them."""
    from pyrovae.config import RESUMABLE_FIELDS

    names = [n for n in RESUMABLE_FIELDS if n not in ("resume", "overwrite")]
    return ", ".join("--no-validate" if n == "validate" else "--" + n.replace("_", "-") for n in names)


def config_note() -> str:
    return (
        "a record of this run's settings, written by pyrovae; editing it changes nothing: the checkpoint "
        f"holds the settings the run uses. Change a setting when you continue the run with --resume and its "
        f"flag ({resume_flags()}); any other setting needs a new run"
    )


def config_text(cfg) -> str:
    """``config.json``'s text: the note that it is a record, then the config's fields."""
    return json.dumps({"_note": config_note(), **cfg.to_dict()}, indent=2)


def config_edits(folder: str, saved: dict) -> str | None:
    """What a hand edit changed in ``folder/config.json`` against ``saved`` (the
    checkpoint's config), as ``"lr: config.json 0.5, the run's checkpoint 0.001"``
    items; ``None`` when they agree or there is no config.json. Only the fields
    config.json holds are compared: one written before a field existed lacks it."""
    from pyrovae.config import TrainConfig, convert_legacy

    path = os.path.join(folder, CONFIG)
    try:
        with open(path) as f:
            recorded = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        return f"{path} is not valid JSON ({err})"
    if not isinstance(recorded, dict):
        return f"{path} is not valid JSON (a {type(recorded).__name__}, not an object)"
    recorded = convert_legacy({k: v for k, v in recorded.items() if not k.startswith("_")})
    # as JSON writes them, so that a tuple and a list, or 1 and 1.0, are alike
    used = json.loads(json.dumps(TrainConfig.from_dict(saved).to_dict()))
    missing = object()
    differ = [
        f"{name}: config.json {recorded.get(name, missing)!r}, the run's checkpoint {used.get(name, missing)!r}"
        for name in sorted(recorded)
        if recorded[name] != used.get(name, missing)
    ]
    return "; ".join(differ).replace(repr(missing), "(absent)") or None


def warn_config_edits(folder: str, saved: dict, what: str, kept: str | None = None) -> str | None:
    """Warn (one line) that ``folder``'s config.json disagrees with the settings
    ``what`` uses (the checkpoint's); ``kept`` says where the edited file is kept."""
    edits = config_edits(folder, saved)
    if edits is not None:
        path = os.path.join(folder, CONFIG)
        keep = f"; the edited file is kept as {kept}" if kept else ""
        warnings.warn(
            f"{path} differs from the run's checkpoint, whose settings {what} uses: {edits}. config.json is a "
            f"record, not an input{keep}; change a setting on --resume with its flag ({resume_flags()}), any "
            "other setting needs a new run",
            UserWarning,
            stacklevel=3,
        )
    return edits


def edited_config_path(folder: str) -> str:
    """Where :func:`keep_edited_config` keeps an edited config.json: the first
    free name of ``config-edited.json``, ``config-edited-2.json``, ..."""
    n, target = 1, os.path.join(folder, "config-edited.json")
    while os.path.exists(target):
        n += 1
        target = os.path.join(folder, f"config-edited-{n}.json")
    return target


def keep_edited_config(folder: str) -> str:
    """Move a hand-edited ``folder/config.json`` aside (:func:`edited_config_path`); return where."""
    target = edited_config_path(folder)
    os.replace(os.path.join(folder, CONFIG), target)
    return target


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
            if not isinstance(pid, int) or not isinstance(owner_host, str):
                # being written this instant by a run taking the folder, or not one of ours
                raise RunFolderError(
                    f"run folder {folder!r} has a lock file that names no process (lock file {path}, "
                    f"{os.path.getsize(path) if os.path.exists(path) else 0} bytes): another run may be starting "
                    "there; if none is, delete the lock file"
                ) from None
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

    def __init__(self, path: str, overwrite: bool, fresh: bool = False):
        self.path = path
        self.overwrite = overwrite
        self.fresh = fresh  # no run's files in the folder before this run (or replaced by it)
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

    def discard_unfinished(self) -> None:
        """A new run stopped before its first checkpoint: remove what it wrote,
        so that the same command can use the folder again."""
        if not self.fresh or os.path.exists(os.path.join(self.path, checkpoint.CHECKPOINT)):
            return
        for name in os.listdir(self.path):
            if name in RUN_FILES or name.startswith("events.out.tfevents."):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.path, name))


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
    held = holds_run(out)
    if held and not (resumes_here or overwrite):
        _release(out, created)
        raise RunFolderError(
            f"run folder {out!r} already holds a run; continue it with --resume {out}, replace it with --overwrite, or choose another --out"
        )
    foreign = [] if held else foreign_files(out)
    if foreign:
        _release(out, created)
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise RunFolderError(
            f"--out {out!r} holds files that are not a pyrovae run's ({shown}); a run would write its checkpoint "
            "and figures among them: choose a new or empty folder for --out"
        )
    return RunFolder(out, overwrite, fresh=overwrite or not held), created


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
    except BaseException:
        if distributed.rank() == 0:
            folder.discard_unfinished()
        raise
    finally:
        folder.restore_interrupts()
        if distributed.rank() == 0:
            _release(out, created)
