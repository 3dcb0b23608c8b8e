"""A run directory: its layout (`RunDir`, the one place that names its files), its lock (one
writer at a time), its identity, and its stage records.

outputs/<run name>/
  .lock                  flock'ed by the process working on the run (pid, host, start)
  run.json               identity, config, library versions of its first session (checksummed)
  session.json           the last session's state (a checksummed record)
  stages/<stage>.json    written when a stage finishes; a finished stage is skipped
  data/                  prepared data cache (committed directory with manifest)
  model_summary.txt      the model's layers
  checkpoints/step-N/    training checkpoints (committed directories)
  tensorboard/           event files
  metrics.json           test metrics of the evaluated checkpoint
  predictions.npz        test labels + probabilities of the evaluated checkpoint
  report.html            the run at a glance
  export/<model>/<ver>/  SavedModel (TF Serving layout) + .keras, .h5, .tflite, model card
  pipeline.log           the log of every session (Hydra's job log)
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import durable, stages, versions
from pipeline.errors import ConfigError, PipelineError, RunLocked

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

STAGES = stages.NAMES  # each leaves stages/<name>.json when it finishes

# The names inside a run directory, each spelled here only; everything else reaches them
# through RunDir (data.py names its cache file with PREPARED, as it fills any directory).
LOCK = ".lock"
RUN_RECORD = "run.json"
SESSION = "session.json"
STAGES_DIR = "stages"
DATA = "data"
PREPARED = "prepared.npz"
MODEL_SUMMARY = "model_summary.txt"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
METRICS = "metrics.json"
PREDICTIONS = "predictions.npz"
REPORT = "report.html"
EXPORT = "export"
LOG = "pipeline.log"
HYDRA = ".hydra"  # written by Hydra, not by the pipeline
CACHE = ".cache"  # beside the run directories, in run.outputs (see data_cache)
STUDIES = ".tune"  # beside the run directories, in run.outputs (see studies)

# What run.restart=true removes; Hydra's .hydra/ and the log stay, so history is not lost.
ARTIFACTS = (
    RUN_RECORD,
    STAGES_DIR,
    DATA,
    CHECKPOINTS,
    TENSORBOARD,
    METRICS,
    EXPORT,
    MODEL_SUMMARY,
    PREDICTIONS,
    REPORT,
)


def _record(path: Path) -> dict[str, Any] | None:
    """A checksummed record holding an object, or None if there is none (also one deleted
    while read: a running process replaces its records). Raises durable.CorruptArtifact."""
    try:
        record = durable.read_record(path)
    except FileNotFoundError:
        return None
    if not isinstance(record, dict):
        raise durable.CorruptArtifact(f"{path}: not a record of this pipeline")
    return record


@dataclass(frozen=True)
class RunDir:
    """One run directory: the path of everything in it, and readers that verify what they
    read. It never writes; writers put their files at the paths it gives (through durable.py).

    Readers never modify the run, with one exception made explicit: `read_stage(...,
    owner=True)`, for the process holding the run's lock, sets a damaged record aside."""

    root: Path

    @classmethod
    def of(cls, run: RunDir | Path | str) -> RunDir:
        return run if isinstance(run, RunDir) else cls(Path(run))

    def __str__(self) -> str:  # messages name the directory, as they did with a Path
        return str(self.root)

    # ------------------------------------------------------------ the layout

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    @property
    def run_record(self) -> Path:
        return self.root / RUN_RECORD

    @property
    def session(self) -> Path:
        return self.root / SESSION

    @property
    def stages_dir(self) -> Path:
        return self.root / STAGES_DIR

    def stage(self, name: str) -> Path:
        return self.stages_dir / f"{name}.json"

    @property
    def data(self) -> Path:
        """The run's prepared data: the shared entry its data record names (runs of the same
        data share one copy, see data_cache), or the run's own data/ (runs made before)."""
        record = self.read_stage("data")
        if record and isinstance(record.get("cache"), str):
            return Path(os.path.normpath(self.root / record["cache"]))
        return self.root / DATA

    @property
    def model_summary(self) -> Path:
        return self.root / MODEL_SUMMARY

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def predictions(self) -> Path:
        return self.root / PREDICTIONS

    @property
    def report(self) -> Path:
        return self.root / REPORT

    @property
    def export_dir(self) -> Path:
        return self.root / EXPORT

    def export_root(self, model_name: str) -> Path:
        return self.export_dir / model_name

    def export_version(self, model_name: str, version: int) -> Path:
        return self.export_root(model_name) / str(version)

    @property
    def log(self) -> Path:
        return self.root / LOG

    # ------------------------------------------------------------ readers

    def read_run_record(self) -> dict[str, Any]:
        """The run's record: its identity (a dict), config, format, creation time.
        Raises FileNotFoundError (no run here) or durable.CorruptArtifact."""
        record = _record(self.run_record)
        if record is None:
            raise FileNotFoundError(errno.ENOENT, "no run record", str(self.run_record))
        if not isinstance(record.get("identity"), dict):
            raise durable.CorruptArtifact(f"{self.run_record}: no identity")
        return record

    def read_session(self) -> dict[str, Any] | None:
        """The last session's record; None when there is none or it is damaged (the next
        session rewrites it)."""
        try:
            return _record(self.session)
        except durable.CorruptArtifact:
            return None

    def start_session(self, command: str) -> None:
        """A new session's record (state "running", with this session's library versions)
        replaces the last session's."""
        now = time.time()
        record = {
            "state": "running",
            "command": command,
            "pid": os.getpid(),
            "started": now,
            "versions": versions.current(),
        }
        durable.write_record(self.session, {**record, "time": now})

    def update_session(self, **facts: Any) -> None:
        """Add facts to this session's record: its state at the end, and what fit did (the
        step it resumed from, the steps redone, when its first step was done). Tools read
        these, not the log's wording."""
        durable.write_record(
            self.session, {**(self.read_session() or {}), **facts, "time": time.time()}
        )

    def read_stage(self, name: str, owner: bool = False) -> dict[str, Any] | None:
        """The record stage `name` left when it finished; None when missing or damaged (the
        stage is then redone). Only the owner of the run (holding its lock) sets a damaged
        record aside, so the next read finds none; readers (status, report) leave it."""
        path = self.stage(name)
        try:
            return _record(path)
        except durable.CorruptArtifact:
            if owner:
                durable.set_aside(path)
            return None

    def latest_checkpoint_meta(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest committed checkpoint and its manifest's meta ({} if unreadable), or None.
        Only the manifest is read, not verified against the state: cheap enough for status on
        a live run, and nothing is set aside."""
        from pipeline import checkpoint  # numpy: kept off the command line's fast path

        steps = checkpoint.committed_steps(self.checkpoints)
        if not steps:
            return None
        path = checkpoint.path_for(self.checkpoints, steps[-1])
        try:
            manifest = _record(path / durable.MANIFEST) or {}
        except durable.CorruptArtifact:
            manifest = {}
        meta = manifest.get("meta")
        return path, meta if isinstance(meta, dict) else {}

    def checkpoint_dirs(self) -> list[Path]:
        """Every checkpoint directory by name, committed and set aside (`step-N.corrupt`)."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(
            p for p in self.checkpoints.iterdir() if p.is_dir() and p.name.startswith("step-")
        )

    def read_metrics(self) -> dict[str, Any]:
        """The test metrics (plain JSON, for any tool to read). Raises OSError
        (FileNotFoundError: not evaluated yet) or ValueError (not a JSON object)."""
        metrics = json.loads(self.metrics.read_text())
        if not isinstance(metrics, dict):
            raise ValueError(f"{self.metrics}: not a JSON object")
        return metrics

    def export_models(self) -> list[str]:
        if not self.export_dir.is_dir():
            return []
        return sorted(p.name for p in self.export_dir.iterdir() if p.is_dir())

    def export_versions(self, model_name: str) -> list[int]:
        """The published versions of `model_name`, oldest first (whether they verify is the
        caller's question)."""
        root = self.export_root(model_name)
        if not root.is_dir():
            return []
        return sorted(
            int(p.name) for p in root.iterdir() if p.name.isdecimal() and p.name.isascii()
        )

    def export_dirs(self) -> list[Path]:
        """Every version directory of every model: published ones oldest first, then the ones
        set aside (`<N>.corrupt`); temporaries (dot names) left out."""
        found: list[Path] = []
        for model in self.export_models():
            root = self.export_root(model)
            found += [self.export_version(model, v) for v in self.export_versions(model)]
            found += sorted(
                p
                for p in root.iterdir()
                if p.is_dir() and not p.name.startswith(".") and not p.name.isdigit()
            )
        return found

    def prepared_data(self, *names: str) -> dict[str, np.ndarray]:
        """The prepared arrays (all, or `names`), read only once the data directory verifies
        against its manifest. Raises FileNotFoundError (no prepared data),
        durable.CorruptArtifact, or KeyError (no such array)."""
        import numpy as np

        data = self.data  # read from the data record: once
        if not data.is_dir():
            raise FileNotFoundError(errno.ENOENT, "no prepared data", str(data))
        durable.verify_dir(data)
        path = data / PREPARED
        with durable.naming(path), np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in names or npz.files}


def studies(outputs: Path) -> Path:
    """Where `python -m pipeline tune` keeps its studies (Optuna's SQLite file, the summary
    status reads, the lock): `<outputs>/.tune/`. Hidden, so it is never a run."""
    return outputs / STUDIES


def data_cache(outputs: Path) -> Path:
    """Prepared data, once per content, shared by the runs under `outputs` (a sweep of 100 runs
    keeps one copy): `<outputs>/.cache/data/<fingerprint>/`. Hidden, so it is never a run."""
    return outputs / CACHE / DATA


def relative_to_run(run: RunDir, path: Path) -> str:
    """`path` as the run's records keep it: relative to the run directory, so a moved or
    copied outputs folder keeps working."""
    return os.path.relpath(path.absolute(), run.root.absolute())


def run_dirs_under(outputs: Path) -> list[Path]:
    """The run directories directly under `outputs` (those with a run record), by name."""
    return sorted(p.parent for p in outputs.glob(f"*/{RUN_RECORD}"))


# flock() errors of a filesystem without locking (NFS without a lock manager, some FUSE ones).
NO_LOCKING = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunLock:
    """An exclusive flock on `<run>/.lock`. The kernel drops it when the holder dies, so a lock
    left by a killed process is simply free: no stale-lock heuristics are needed."""

    def __init__(self, run_dir: RunDir | Path) -> None:
        self.path = RunDir.of(run_dir).lock
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
            with durable.naming(self.path):  # a call on a descriptor names no file
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError:
            os.close(fd)
            raise
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            with durable.naming(self.path):  # a call on a descriptor names no file
                try:
                    os.ftruncate(fd, 0)
                    fcntl.flock(fd, fcntl.LOCK_UN)
                finally:
                    os.close(fd)  # closing drops the lock anyway

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
        return run_dirs_under(outputs)
    run_dir = outputs / options["run.name"]
    if not RunDir(run_dir).run_record.exists():
        raise ConfigError(f"no run at {run_dir}")
    return [run_dir]


def lock_holder(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None


def is_running(run_dir: RunDir | Path) -> bool:
    path = RunDir.of(run_dir).lock
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
BEFORE_RECORD = frozenset({HYDRA, LOG, LOCK, SESSION})
# ...and the logs of non-chief workers of a multi-worker run (README: Several workers).
WORKER_LOG = re.compile(r"pipeline\.worker\d+\.log")


def check_ours(run_dir: RunDir | Path) -> None:
    """Refuse a run directory that exists and is not a run of this pipeline (a user's own
    folder reached by run.name/run.outputs): nothing is written or deleted in it."""
    run_dir = RunDir.of(run_dir).root
    if not run_dir.exists() and not run_dir.is_symlink():
        return
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a directory: choose another run.name or run.outputs")
    if run_record_state(run_dir) != "foreign":
        return
    names = sorted(n for n in os.listdir(run_dir) if durable.TMP_MARK not in n)
    strange = [n for n in names if n not in BEFORE_RECORD and not WORKER_LOG.fullmatch(n)]
    if strange:
        holds = (
            "a run.json that is not a run record of ours"
            if RUN_RECORD in names
            else (f"{strange[0]!r} and no run.json")
        )
        raise ConfigError(
            f"{run_dir} is not a run directory of this pipeline (it holds {holds}), so nothing "
            "was written or deleted there. Choose another run.name=... or run.outputs=..."
        )


def restart(run_dir: RunDir | Path) -> None:
    """Delete the run's artifacts (run.restart=true), only in a run directory of ours.
    Symlinks are removed, never followed."""
    check_ours(run_dir)
    root = RunDir.of(run_dir).root
    for name in ARTIFACTS:
        path = root / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)  # does not follow symlinks inside the tree either
        elif os.path.lexists(path):
            path.unlink()


def run_record_state(run_dir: RunDir | Path) -> str:
    """ "ours" (a verified run record with an identity), "damaged" (a checksummed record of
    ours that does not verify or lacks the identity) or "foreign" (no record of this pipeline)."""
    run = RunDir.of(run_dir)
    path = run.run_record
    try:
        run.read_run_record()
        return "ours"
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
    run_dir: RunDir | Path,
    identity: dict[str, Any],
    full_config: dict[str, Any],
    defaults: dict[str, Any] | None = None,
) -> None:
    """Record the run's identity (and this session's library versions) on first use; refuse a
    different identity later, and say when the versions differ (see check_versions).

    A key the run's record does not have (added to the schema since) matches its default value.
    """
    run = RunDir.of(run_dir)
    run_dir, record_path = run.root, run.run_record
    if not record_path.exists():
        durable.write_record(
            record_path,
            {
                "format": RUN_FORMAT,
                "identity": identity,
                "config": full_config,
                "versions": versions.current(),
                "created": time.time(),
            },
        )
        return
    try:
        record = run.read_run_record()
        stored = record["identity"]
    except durable.CorruptArtifact as exc:
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
    run_options = full_config.get("run")
    strict = isinstance(run_options, dict) and bool(run_options.get("strict_versions"))
    check_versions(run, record, strict)


def check_versions(run: RunDir, record: dict[str, Any], strict: bool) -> None:
    """A later session of a run under other library versions than its first one: one line
    saying the continuation is not bit-identical to an uninterrupted run, or (`strict`,
    run.strict_versions=true) a refusal. run.json keeps the first session's versions; a run
    recorded before versions were has none, and nothing is said (pipeline/versions.py)."""
    diffs = versions.differences(record)
    if not diffs:
        if versions.recorded(record) is None:
            log.debug("%s records no library versions (made before they were)", run.run_record)
        return
    changed = ", ".join(diffs)
    if strict:
        first = versions.recorded(record) or {}
        wanted = ", ".join(f"{name} {first[name]}" for name in versions.NAMES if name in first)
        raise ConfigError(
            f"Run {run.root} was made under other library versions ({changed}), and "
            "run.strict_versions=true refuses to continue it: the result would not be "
            f"bit-identical to an uninterrupted run. Continue it under its versions ({wanted}), "
            "or use run.restart=true to start it over, or run.name=<new name> for a new run."
        )
    log.info(
        "Versions differ from the run's first session (%s): the run continues, but not "
        "bit-identical to an uninterrupted run. run.strict_versions=true refuses instead.",
        changed,
    )


def finish_stage(run_dir: RunDir | Path, stage: str, record: dict[str, Any]) -> None:
    durable.write_record(RunDir.of(run_dir).stage(stage), {**record, "finished": time.time()})


def clear_stage(run_dir: RunDir | Path, stage: str) -> None:
    RunDir.of(run_dir).stage(stage).unlink(missing_ok=True)
