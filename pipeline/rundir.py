"""A run directory: its lock (one writer at a time), its identity, and its stage records.

outputs/<run name>/
  .lock                  flock'ed by the process working on the run (pid, host, start)
  run.json               identity config + session history (a checksummed record)
  stages/<stage>.json    written when a stage finishes; a finished stage is skipped
  data/                  prepared data cache (committed directory with manifest)
  checkpoints/step-N/    training checkpoints (committed directories)
  tensorboard/           event files
  metrics.json           test metrics of the evaluated checkpoint
  export/<model>/<ver>/  SavedModel (TF Serving layout) + .keras, .h5, .tflite, model card
  pipeline.log           the log of every session (Hydra's job log)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from pipeline import durable
from pipeline.errors import ConfigError, PipelineError, RunLocked

STAGES = ("data", "model", "fit", "evaluate", "export")
# What run.restart=true removes; Hydra's .hydra/ and the log stay, so history is not lost.
ARTIFACTS = (
    "run.json",
    "stages",
    "data",
    "checkpoints",
    "tensorboard",
    "metrics.json",
    "export",
    "model_summary.txt",
    "predictions.npz",
    "report.html",
)


# flock() errors of a filesystem without locking (NFS without a lock manager, some FUSE ones).
NO_LOCKING = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunLock:
    """An exclusive flock on `<run>/.lock`. The kernel drops it when the holder dies, so a lock
    left by a killed process is simply free: no stale-lock heuristics are needed."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        durable.make_dirs(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = lock_holder(self.path) or {}
            raise RunLocked(
                f"Run {self.path.parent} is in use by pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')} since {holder.get('started', '?')}. Wait for it to "
                "finish, stop it, or use another run.name=..."
            ) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in NO_LOCKING:
                raise PipelineError(
                    f"The filesystem of {self.path.parent} does not support file locking "
                    f"(flock: {exc.strerror}), which keeps a second process off a run; it is "
                    "often a network filesystem. Put run.outputs on a local disk, e.g. "
                    "run.outputs=/tmp/outputs (or mount it with locking enabled)."
                ) from None
            raise
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError as exc:  # name the file (a call on a descriptor names none)
            os.close(fd)
            raise OSError(exc.errno, exc.strerror, str(self.path)) from exc
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError as exc:  # name the file (a call on a descriptor names none)
                with contextlib.suppress(OSError):
                    os.close(fd)  # closing drops the lock anyway
                raise OSError(exc.errno, exc.strerror, str(self.path)) from exc
            try:
                os.close(fd)
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, str(self.path)) from exc

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def select_runs(command: str, args: list[str], flags: tuple[str, ...] = ()) -> list[Path]:
    """The run directories a read-only command (`status`, `report`) is about: the one named by
    `run.name=`, else every run under `run.outputs=` (default `outputs`)."""
    options = dict(a.split("=", 1) for a in args if "=" in a)
    unknown = [a for a in args if "=" not in a and a not in flags]
    unknown += [k for k in options if k not in ("run.name", "run.outputs")]
    if unknown:
        allowed = ["run.name=NAME", "run.outputs=DIR", *flags]
        raise ConfigError(
            f"{command} takes {', '.join(allowed[:-1])} and {allowed[-1]}, not {unknown[0]}"
        )
    outputs = Path(options.get("run.outputs", "outputs"))
    if "run.name" not in options:
        return sorted(p.parent for p in outputs.glob("*/run.json"))
    run_dir = outputs / options["run.name"]
    if not (run_dir / "run.json").exists():
        raise ConfigError(f"no run at {run_dir}")
    return [run_dir]


def lock_holder(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None


def is_running(run_dir: Path) -> bool:
    path = run_dir / ".lock"
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    except OSError as exc:
        if exc.errno in NO_LOCKING:
            return False  # no locking here: nobody can hold the run, `status` reads the record
        raise
    finally:
        os.close(fd)


# What a run directory holds before its run.json exists (Hydra writes .hydra/ and the log first).
BEFORE_RECORD = frozenset({".hydra", "pipeline.log", ".lock", "session.json"})


def check_ours(run_dir: Path) -> None:
    """Refuse a run directory that exists and is not a run of this pipeline (a user's own
    folder reached by run.name/run.outputs): nothing is written or deleted in it."""
    if not run_dir.exists() and not run_dir.is_symlink():
        return
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a directory: choose another run.name or run.outputs")
    if run_record_state(run_dir) != "foreign":
        return
    names = sorted(n for n in os.listdir(run_dir) if durable.TMP_MARK not in n)
    strange = [n for n in names if n not in BEFORE_RECORD]
    if strange:
        holds = (
            "a run.json that is not a run record of ours"
            if "run.json" in names
            else (f"{strange[0]!r} and no run.json")
        )
        raise ConfigError(
            f"{run_dir} is not a run directory of this pipeline (it holds {holds}), so nothing "
            "was written or deleted there. Choose another run.name=... or run.outputs=..."
        )


def restart(run_dir: Path) -> None:
    """Delete the run's artifacts (run.restart=true), only in a run directory of ours.
    Symlinks are removed, never followed."""
    check_ours(run_dir)
    for name in ARTIFACTS:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)  # does not follow symlinks inside the tree either
        elif os.path.lexists(path):
            path.unlink()


def run_record_state(run_dir: Path) -> str:
    """ "ours" (a verified run record with an identity), "damaged" (a checksummed record of
    ours that does not verify or lacks the identity) or "foreign" (no record of this pipeline)."""
    path = run_dir / "run.json"
    try:
        record = durable.read_record(path)
        if isinstance(record, dict) and isinstance(record.get("identity"), dict):
            return "ours"
        return "damaged"
    except FileNotFoundError:
        return "foreign"
    except durable.CorruptArtifact:
        try:
            outer = json.loads(path.read_bytes())
            return "damaged" if {"data", "sha256"} <= set(outer) else "foreign"
        except (ValueError, TypeError):
            return "foreign"


# The version of what a run directory holds (checkpoint variables, layout). A run written in
# another format is refused, never half-loaded. Format 2: models take raw pixels and own their
# preprocessing (format 1, pipeline 0.1.x, normalized the data outside the model).
RUN_FORMAT = 2
LAST_RELEASE_OF_FORMAT = {1: "pipeline 0.1.x"}


def check_identity(
    run_dir: Path,
    identity: dict[str, Any],
    full_config: dict[str, Any],
    defaults: dict[str, Any] | None = None,
) -> None:
    """Record the run's identity on first use; refuse a different one later.

    A key the run's record does not have (added to the schema since) matches its default value.
    """
    record_path = run_dir / "run.json"
    if not record_path.exists():
        durable.write_record(
            record_path,
            {
                "format": RUN_FORMAT,
                "identity": identity,
                "config": full_config,
                "created": time.time(),
            },
        )
        return
    try:
        record = durable.read_record(record_path)
        stored = record["identity"]
    except (durable.CorruptArtifact, KeyError, TypeError) as exc:
        if run_record_state(run_dir) == "foreign":  # not even recognisably ours any more
            hint = f"delete {run_dir} to start over (run.restart=true deletes only runs it knows)"
        else:
            hint = "start over with run.restart=true"
        raise PipelineError(
            f"{record_path} is damaged ({exc}), so this run's config cannot be "
            f"checked. Restore it, or {hint}"
        ) from exc
    found = record.get("format", 1)
    if found != RUN_FORMAT:
        reader = LAST_RELEASE_OF_FORMAT.get(found, "a newer pipeline")
        raise ConfigError(
            f"Run {run_dir} was written in run format {found}; this pipeline reads format "
            f"{RUN_FORMAT} only. Start it over with run.restart=true, or continue it with "
            f"{reader}."
        )
    stored = {**{k: v for k, v in (defaults or {}).items() if k in identity}, **stored}
    diffs = [
        f"{key}: {stored.get(key, '<unset>')!r} -> {identity.get(key, '<unset>')!r}"
        for key in sorted(set(stored) | set(identity))
        if stored.get(key) != identity.get(key)
    ]
    if diffs:
        raise ConfigError(
            f"Run {run_dir} was made with a different config ({'; '.join(diffs)})."
            " Use run.name=<new name> for a new run, or run.restart=true to "
            "discard this one and start over."
        )


def stage_record(run_dir: Path, stage: str) -> dict[str, Any] | None:
    """The record a finished stage left, or None (missing or damaged: redo the stage)."""
    path = run_dir / "stages" / f"{stage}.json"
    if not path.exists():
        return None
    try:
        return durable.read_record(path)
    except durable.CorruptArtifact:
        durable.set_aside(path)
        return None


def finish_stage(run_dir: Path, stage: str, record: dict[str, Any]) -> None:
    durable.write_record(run_dir / "stages" / f"{stage}.json", {**record, "finished": time.time()})


def clear_stage(run_dir: Path, stage: str) -> None:
    (run_dir / "stages" / f"{stage}.json").unlink(missing_ok=True)
