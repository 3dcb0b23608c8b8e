"""`python -m pipeline tune [--trials N] [--study NAME] [--seed S] [--prune] <space> <overrides>`:
a resumable hyperparameter search with Optuna (the `[tune]` extra).

The search space is written in Hydra's override syntax, parsed by Hydra's own parser:

    'optimizer.learning_rate=tag(log, interval(1e-4, 1e-1))'   a float, on a log scale
    'model.dropout=interval(0, 0.5)'                            a float
    'model.hidden_units=interval(64, 512)'                      an int (the key is an int)
    'fit.batch_size=choice(32, 64, 128)', 'model=mlp,cnn'       categorical
    'fit.batch_size=range(32, 160, 32)'                         an int with a step

Every other override is fixed, shared by every trial. Each trial is an ordinary run,
`python -m pipeline train <fixed> <param>=<value> ...`, in the run directory those overrides
name, started as a child process; its objective is the run's best validation accuracy (from
its fit record). The study lives in `<run.outputs>/.tune/<study>.db` (SQLite), beside a summary
`<study>.json` that `status` reads without Optuna.

Kill the search at any moment and run the same command again: finished trials are kept, the
trial that was running resumes its run from its newest checkpoint (it is neither restarted nor
asked for again), and the study goes on to `--trials`. What a restarted search proposes is what
an uninterrupted one would have: each new trial's parameters come from a sampler seeded with
(study seed + trial number) that sees the study's finished trials, and they are written in one
step (an enqueued trial) before the trial starts.

`--prune` reports each epoch's validation accuracy (read from the run's checkpoints as they
appear) to Optuna's MedianPruner; a pruned trial's run is stopped (SIGTERM: it saves a
checkpoint), and is left there, interrupted: its weights are not a result.

A command of its own, not a Hydra sweeper: the search owns each trial's process (to resume it,
forward Ctrl-C to it, read its epochs), and Hydra's Optuna sweeper plugin pins optuna<3.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import durable, rundir
from pipeline.config import is_identity_key, override_key, safe_name, safe_name_rule
from pipeline.errors import ConfigError, Interrupted, PipelineError, RunLocked
from pipeline.rundir import RunDir
from pipeline.status import best_trials_first

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution

HELP = """\
usage: python -m pipeline tune [--trials N] [--study NAME] [--seed S] [--prune]
                               [--config-dir DIR] <search space> [key=value ...]

A resumable hyperparameter search (Optuna): each trial is an ordinary run of
`python -m pipeline train` with the fixed overrides and the trial's parameters. Objective: the
run's best validation accuracy. Kill it at any moment and run the same command again to resume.

search space (Hydra's sweep syntax; quote it for the shell):
  'optimizer.learning_rate=tag(log, interval(1e-4, 1e-1))'   float, log scale
  'model.dropout=interval(0, 0.5)'                            float (int for an int key)
  'fit.batch_size=choice(32, 64, 128)'  'model=mlp,cnn'       categorical
  'fit.batch_size=range(32, 160, 32)'                         int with a step

options:
  --trials N         trials in the study (default 20); rerun with a larger N to extend it
  --study NAME       the study's name (default: tune-<hash of space, overrides, seed, --prune>)
  --seed S           seed of the sampler (default 0)
  --prune            stop trials whose per-epoch validation accuracy is below the median
                     (Optuna's MedianPruner, after 5 finished trials); a pruned trial's run
                     is left interrupted
  --config-dir DIR   also search DIR for configs (your presets), as for train

The study: <run.outputs>/.tune/<NAME>.db. `python -m pipeline status --study NAME` lists its
trials best first; `status` shows which study each run belongs to.
Example:
  python -m pipeline tune --trials 8 'optimizer.learning_rate=tag(log, interval(1e-4, 1e-1))' \\
      'model.dropout=interval(0, 0.5)' model=mlp fit.epochs=3
"""

DEFAULT_TRIALS = 20
# Trials proposed at random (seeded) before TPE models the finished ones; Optuna's default.
STARTUP_TRIALS = 10
FORMAT = 1  # of the study's attributes and summary
LOCK_WAIT_S = 60.0  # for the run of a trial a killed search left: its child dies with it

# Exit codes of `python -m pipeline train` that are the trial's own outcome, with its one
# "error: ..." line (a config the space allows but validation refuses, a run that diverged):
# the trial fails, the study goes on. Anything else (interrupted, locked, killed, a traceback)
# stops the search and leaves the trial running, to be resumed by the next search.
TRIAL_FAILED_CODES = (1, 2)


@dataclass(frozen=True)
class Param:
    key: str
    text: str  # the override as written
    distribution: BaseDistribution


@dataclass
class Options:
    trials: int = DEFAULT_TRIALS
    study: str | None = None
    seed: int = 0
    prune: bool = False
    config_dir: str | None = None  # --config-dir DIR: the user's presets, as for train
    space: list[str] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- the command line


def _int_option(name: str, value: str, low: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{name} takes a whole number, not {value!r}") from None
    if number < low:
        raise ConfigError(f"{name} must be at least {low}, not {number}")
    return number


def parse_args(args: list[str]) -> Options:
    """Options, search-space overrides and fixed overrides; raises ConfigError."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    opts = Options()
    overrides: list[str] = []
    items = iter(args)
    for arg in items:
        name, eq, value = arg.partition("=")
        if name in ("--trials", "--study", "--seed"):
            if not eq:
                value = next(items, "")
            if not value:
                raise ConfigError(f"{name} needs a value: {name} VALUE")
            if name == "--trials":
                opts.trials = _int_option(name, value, 1)
            elif name == "--seed":
                opts.seed = _int_option(name, value, 0)
            else:
                if not safe_name(value):
                    raise ConfigError(f"--study {value!r}: a study name is {safe_name_rule()}")
                opts.study = value
        elif arg == "--prune":
            opts.prune = True
        elif name in ("--config-dir", "-cd"):
            if not eq:
                value = next(items, "")
            if not value or not os.path.isdir(value):
                raise ConfigError(f"{name} {value}: no such directory")
            opts.config_dir = os.path.abspath(value)
        elif arg.startswith("-") or "=" not in arg:
            raise ConfigError(
                f"tune takes --trials N, --study NAME, --seed S, --prune, --config-dir DIR and "
                "key=value "
                f"overrides, not {arg!r} (see: python -m pipeline tune --help)"
            )
        else:
            overrides.append(arg)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError(str(exc).splitlines()[0]) from exc
    for line, override in zip(overrides, parsed, strict=True):
        (opts.space if override.is_sweep_override() else opts.fixed).append(line)
    if not opts.space:
        raise ConfigError(
            "no search space: give at least one override such as "
            "'optimizer.learning_rate=tag(log, interval(1e-4, 1e-1))'"
        )
    for line in opts.fixed:
        key = override_key(line)
        if key in ("run.name", "run.restart", "command") or key.startswith("hydra"):
            raise ConfigError(
                f"{line}: tune names each trial's run from its overrides and resumes it; "
                f"leave {key} out"
            )
    return opts


def compose(overrides: list[str], config_dir: str | None = None) -> Any:
    """The composed config (a DictConfig) of `train` with `overrides`; raises ConfigError."""
    from hydra import compose as hydra_compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from pipeline.configcheck import explain, initialize

    try:
        with initialize(config_dir):
            return hydra_compose("config", overrides=["command=train", *overrides])
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(explain(exc)) from exc


def parse_space(space: list[str], base: Any) -> list[Param]:
    """Optuna distributions of the sweep overrides; `base` (the composed fixed config) says
    whether an interval's key is an int. Raises ConfigError."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from omegaconf import DictConfig, OmegaConf
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    params: list[Param] = []
    for line, override in zip(space, OverridesParser.create().parse_overrides(space), strict=True):
        key = override.get_key_element().lstrip("+~")
        value: Any = override.value()
        if not is_identity_key(override_key(key)):
            raise ConfigError(
                f"{line}: {key} does not name the run (runs differing only in it share one "
                "directory), so it cannot be searched; fix it for every trial instead"
            )
        if any(p.key == key for p in params):
            raise ConfigError(f"{line}: {key} is searched twice")
        current = OmegaConf.select(base, key, default=None)
        is_group = isinstance(current, DictConfig)
        is_int = "int" in value.tags or (isinstance(current, int) and not isinstance(current, bool))
        dist: BaseDistribution
        if isinstance(value, ChoiceSweep):
            choices: list[Any] = [
                getattr(v, "text", v) for v in value.list
            ]  # QuotedString: its text
            if not choices or any(isinstance(v, (list, dict)) for v in choices):
                raise ConfigError(f"{line}: choose among plain values")
            if len(set(map(repr, choices))) != len(choices):
                raise ConfigError(f"{line}: a choice is listed twice")
            dist = CategoricalDistribution(choices)
        elif is_group:
            raise ConfigError(f"{line}: {key} is a config group; search it with choice(...)")
        elif isinstance(value, IntervalSweep):
            low, high, log = value.start, value.end, "log" in value.tags
            if not (isinstance(low, (int, float)) and isinstance(high, (int, float))):
                raise ConfigError(f"{line}: an interval of numbers")
            if not low < high or (log and low <= 0):
                raise ConfigError(f"{line}: needs low < high (and low > 0 on a log scale)")
            if is_int:
                if low != int(low) or high != int(high):
                    raise ConfigError(f"{line}: {key} is an int; give whole-number ends")
                dist = IntDistribution(int(low), int(high), log=log)
            else:
                dist = FloatDistribution(float(low), float(high), log=log)
        elif isinstance(value, RangeSweep):
            start, stop, step = value.start, value.stop, value.step
            if start is None or stop is None or step is None or step <= 0 or not start < stop:
                raise ConfigError(f"{line}: range(start, stop, step) with start < stop, step > 0")
            last = start + step * math.ceil((stop - start) / step - 1)
            if all(float(v).is_integer() for v in (start, step)) and is_int:
                dist = IntDistribution(int(start), int(last), step=int(step))
            else:
                dist = FloatDistribution(float(start), float(last), step=float(step))
        else:
            raise ConfigError(f"{line}: use interval(...), choice(...) or range(...)")
        params.append(Param(key, line, dist))
    return params


def override_value(value: Any) -> str:
    """A parameter as an override's value, read back by Hydra as the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # the shortest text that reads back as the same float
    text = str(value)
    if isinstance(value, str) and not re.fullmatch(r"[A-Za-z_][\w./-]*", text):
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return text


def trial_overrides(fixed: list[str], params: dict[str, Any], space: list[Param]) -> list[str]:
    return [*fixed, *(f"{p.key}={override_value(params[p.key])}" for p in space)]


def default_study_name(opts: Options) -> str:
    """Named by what makes the study: its space, fixed overrides, seed and pruning (not its
    trial count: rerun with a larger --trials to extend it)."""
    text = json.dumps([sorted(opts.space), sorted(opts.fixed), opts.seed, opts.prune])
    return "tune-" + hashlib.sha256(text.encode()).hexdigest()[:10]


# ---------------------------------------------------------------- proposals


def propose(
    study: optuna.Study, space: list[Param], seed: int, startup: int = STARTUP_TRIALS
) -> dict[str, Any]:
    """The next trial's parameters, a function of the seed, the trial number and the finished
    trials only: a fresh TPE sampler, seeded with seed + number, on an in-memory copy of the
    finished trials (Optuna keeps no sampler state in its storage)."""
    import optuna
    from optuna.samplers import TPESampler
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    unfinished = [t.number for t in trials if not t.state.is_finished()]
    if unfinished:
        raise RuntimeError(f"trials {unfinished} are not finished; finish them first")
    number = len(trials)
    sampler = TPESampler(seed=seed + number, n_startup_trials=startup)
    scratch = optuna.create_study(direction="maximize", sampler=sampler)
    scratch.add_trials([t for t in trials if t.state != TrialState.WAITING])
    # Sampled in the order of the keys (the sampler's draws follow it), not as typed.
    trial = scratch.ask({p.key: p.distribution for p in sorted(space, key=lambda p: p.key)})
    return dict(trial.params)


def suggest(trial: optuna.Trial, param: Param) -> Any:
    """The trial's value of `param` (its enqueued one, if any), through Optuna's public API."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    d = param.distribution
    if isinstance(d, CategoricalDistribution):
        return trial.suggest_categorical(param.key, d.choices)
    if isinstance(d, FloatDistribution):
        return trial.suggest_float(param.key, d.low, d.high, step=d.step, log=d.log)
    assert isinstance(d, IntDistribution)
    return trial.suggest_int(param.key, d.low, d.high, step=d.step, log=d.log)


# ---------------------------------------------------------------- a trial's child process

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """In the child (Linux): SIGKILL when the search dies, as if killed with it (it is in its
    own session, so a Ctrl-C reaches it once, forwarded by the search)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the search died before prctl
        os._exit(137)


class Child:
    """The one running trial process; SIGINT/SIGTERM of the search are forwarded to it (it
    saves a checkpoint and stops) and the search then stops."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.signum: int | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Our SIGINT/SIGTERM handlers while the search runs; the previous ones after."""
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        first = self.signum is None
        self.signum = signum
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signum)
            if first:
                print(
                    f"\n{signal.Signals(signum).name}: stopping the trial (it saves a checkpoint); "
                    "run the same command again to resume the search",
                    file=sys.stderr,
                    flush=True,
                )
            return
        raise Interrupted(
            f"Interrupted by {signal.Signals(signum).name}; run the same command again to "
            "resume the search."
        )

    def start(self, overrides: list[str], config_dir: str | None) -> subprocess.Popen[bytes]:
        if self.signum is not None:
            raise Interrupted("Interrupted; run the same command again to resume the search.")
        parent = os.getpid()
        linux = sys.platform.startswith("linux")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline",
                "train",
                *(["--config-dir", config_dir] if config_dir else []),
                *overrides,
            ],
            stderr=subprocess.PIPE,
            start_new_session=linux,
            preexec_fn=(lambda: _die_with_parent(parent)) if linux else None,
        )
        return self.proc

    def stop(self) -> None:
        """Stop the trial gracefully (pruned): SIGTERM, it saves a checkpoint."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)


# ---------------------------------------------------------------- the search


class Search:
    def __init__(self, opts: Options, space: list[Param], outputs: Path, name: str) -> None:
        import optuna

        self.opts, self.space, self.outputs, self.name = opts, space, outputs, name
        self.dir = rundir.studies(outputs)
        durable.make_dirs(self.dir)
        self.db = self.dir / f"{name}.db"
        self.summary_path = self.dir / f"{name}.json"
        pruner = optuna.pruners.MedianPruner() if opts.prune else optuna.pruners.NopPruner()
        self.study = optuna.create_study(
            storage=f"sqlite:///{self.db.absolute()}",
            study_name=name,
            direction="maximize",
            # Every parameter is fixed (enqueued) before a trial is asked for: see propose().
            sampler=optuna.samplers.RandomSampler(seed=0),
            pruner=pruner,
            load_if_exists=True,
        )
        self.child = Child()
        self.run_names: dict[int, str] = {}

    # -- the study's identity

    def attrs(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "space": sorted(self.opts.space),
            "fixed": sorted(self.opts.fixed),
            "seed": self.opts.seed,
            "prune": self.opts.prune,
        }

    def check_identity(self) -> None:
        stored = self.study.user_attrs.get("tune")
        if stored is None:
            self.study.set_user_attr("tune", self.attrs())
            return
        if stored != self.attrs():
            diffs = [k for k in self.attrs() if stored.get(k) != self.attrs()[k]]
            raise ConfigError(
                f"study {self.name} ({self.db}) was made with another {', '.join(diffs)} "
                f"({', '.join(f'{k}={stored.get(k)!r}' for k in diffs)}). Run it with the same "
                "command line, or name a new study with --study NAME."
            )

    # -- the summary status reads

    def write_summary(self) -> None:
        trials = []
        for t in self.study.get_trials(deepcopy=False):
            trials.append(
                {
                    "number": t.number,
                    "state": t.state.name,
                    "value": t.value,
                    "params": t.params or t.system_attrs.get("fixed_params", {}),
                    "run": t.user_attrs.get("run") or self.run_names.get(t.number),
                    "intermediate": sorted(t.intermediate_values.items()),
                    "message": t.user_attrs.get("message"),
                }
            )
        durable.write_record(
            self.summary_path,
            {
                **self.attrs(),
                "study": self.name,
                "storage": str(self.db),
                "direction": "maximize",
                "objective": "best validation accuracy",
                "trials_wanted": self.opts.trials,
                "trials": best_trials_first(trials),
            },
        )

    # -- trials

    def run_of(self, overrides: list[str]) -> str:
        """The run directory name of a trial: the one `train` with its overrides uses."""
        from pipeline.configcheck import compose_and_check

        return compose_and_check(["command=train", *overrides], self.opts.config_dir).name

    def open_trial(self, number: int) -> optuna.Trial:
        """A Trial object of a trial in the storage, its parameters complete (a search killed
        while asking left it with its enqueued parameters only in its system attributes)."""
        import optuna

        frozen = self.study.get_trials(deepcopy=False)[number]
        trial = optuna.Trial(self.study, frozen._trial_id)
        for p in self.space:
            suggest(trial, p)
        return trial

    def tell(self, number: int, state: Any, value: float | None = None) -> None:
        self.study.tell(number, value, state=state)
        self.write_summary()

    def run_trial(self, trial: optuna.Trial) -> None:
        """Run (or resume) the trial's run to its end, then tell the study its outcome."""
        from optuna.trial import TrialState

        params = trial.params
        overrides = trial_overrides(self.opts.fixed, params, self.space)
        try:
            run_name = self.run_names.get(trial.number) or self.run_of(overrides)
        except ConfigError as exc:  # a point of the space that validation refuses
            trial.set_user_attr("message", str(exc))
            self.tell(trial.number, TrialState.FAIL)
            print(f"[tune {self.name}] trial {trial.number}: failed: {exc}", flush=True)
            return
        self.run_names[trial.number] = run_name
        trial.set_user_attr("run", run_name)
        config_dir = ["--config-dir", self.opts.config_dir] if self.opts.config_dir else []
        words = [*config_dir, *overrides]
        trial.set_user_attr("command", "python -m pipeline train " + shlex.join(words))
        self.write_summary()
        run = RunDir(self.outputs / run_name)
        print(
            f"[tune {self.name}] trial {trial.number}: {run.root} "
            + " ".join(f"{k}={override_value(v)}" for k, v in params.items()),
            flush=True,
        )
        if self.opts.prune and self.pruned(trial, []):  # decided before a kill
            self.tell(trial.number, TrialState.PRUNED)
            return
        self.wait_for_run_lock(run)
        proc = self.child.start(overrides, self.opts.config_dir)
        assert proc.stderr is not None
        os.set_blocking(proc.stderr.fileno(), False)
        err = bytearray()
        pruned = False
        while True:
            code = proc.poll()
            chunk = proc.stderr.read()
            if chunk:
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
                err += chunk
            if self.opts.prune and not pruned:
                try:  # the newest checkpoint's manifest, as status reads it
                    latest = run.latest_checkpoint_meta() if run.root.is_dir() else None
                except OSError:  # one retired while read: the next poll sees the newer one
                    latest = None
                history = latest[1].get("loop", {}).get("history", []) if latest else []
                if self.pruned(trial, history):
                    pruned = True
                    self.child.stop()
            if code is not None:
                break
            time.sleep(0.2)
        self.child.proc = None
        if self.child.signum is not None:
            raise Interrupted(
                f"The search was interrupted during trial {trial.number}; its run keeps its "
                "checkpoint. Run the same command again to resume the search."
            )
        if code == 0 or pruned:
            record = run.read_stage("fit") or {}
            if self.opts.prune and (pruned or self.pruned(trial, record.get("history", []))):
                self.tell(trial.number, TrialState.PRUNED)
                last = max(self.study.trials[trial.number].intermediate_values, default=0)
                print(
                    f"[tune {self.name}] trial {trial.number}: pruned after epoch {last} (its "
                    "run is left interrupted)",
                    flush=True,
                )
                return
            value = record.get("best_val_accuracy")
            if code == 0 and isinstance(value, (int, float)) and math.isfinite(value):
                self.tell(trial.number, TrialState.COMPLETE, float(value))
                print(f"[tune {self.name}] trial {trial.number}: {value:.4f}", flush=True)
                return
            message = f"the run finished without a best validation accuracy ({run.root})"
        else:
            lines = [x for x in err.decode(errors="replace").splitlines() if x.strip()]
            message = next((x for x in reversed(lines) if x.startswith("error:")), "")
            if code not in TRIAL_FAILED_CODES or not message:
                # Interrupted, locked, killed, or a traceback: not the trial's own outcome.
                detail = f": {lines[-1]}" if lines else ""
                raise PipelineError(
                    f"trial {trial.number} (run {run.root}) stopped with exit code {code}"
                    f"{detail}. It stays running in the study: run the same command again "
                    "to resume it."
                )
            message = message.removeprefix("error:").strip()
        trial.set_user_attr("message", message)
        self.tell(trial.number, TrialState.FAIL)
        print(f"[tune {self.name}] trial {trial.number}: failed: {message}", flush=True)

    def pruned(self, trial: optuna.Trial, history: list[dict[str, Any]]) -> bool:
        """Report the epochs of `history` not reported yet, one at a time, asking the pruner
        after each: the decision depends on the epochs' values, never on when they are seen.
        With no history, ask about the last reported epoch (a search killed between reporting
        it and asking)."""
        frozen = self.study.get_trials(deepcopy=False)[trial.number]
        reported = frozen.intermediate_values
        if not history:
            return bool(reported) and trial.should_prune()
        for row in history:
            epoch, value = int(row["epoch"]), row.get("val_accuracy")
            if epoch in reported or not isinstance(value, (int, float)):
                continue
            trial.report(float(value), epoch)
            if trial.should_prune():
                return True
        return False

    def wait_for_run_lock(self, run: RunDir) -> None:
        """The run of a trial a killed search left may still be held by its dying child."""
        from pipeline.rundir import is_running

        deadline = time.monotonic() + LOCK_WAIT_S
        while run.lock.exists() and is_running(run) and time.monotonic() < deadline:
            time.sleep(0.2)

    def run(self) -> None:
        from optuna.trial import TrialState

        self.check_identity()
        self.write_summary()
        for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            print(f"[tune {self.name}] resuming trial {frozen.number}", flush=True)
            self.run_trial(self.open_trial(frozen.number))
        while True:
            trials = self.study.get_trials(deepcopy=False)
            started = [t for t in trials if t.state != TrialState.WAITING]
            if len(started) >= self.opts.trials:
                break
            if not any(t.state == TrialState.WAITING for t in trials):
                self.study.enqueue_trial(propose(self.study, self.space, self.opts.seed))
            trial = self.study.ask({p.key: p.distribution for p in self.space})
            self.run_trial(trial)
        self.write_summary()


# ---------------------------------------------------------------- the study lock


@contextlib.contextmanager
def study_lock(path: Path) -> Iterator[None]:
    """One search per study at a time (the kernel drops the lock of a killed one)."""
    durable.make_dirs(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "?"
            raise RunLocked(
                f"study {path.stem} is being searched by pid {holder}; wait for it or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def main(args: list[str]) -> int:
    if "--help" in args or "-h" in args:
        print(HELP, end="")
        return 0
    try:
        import optuna
    except ImportError:
        print("error: tune needs Optuna: pip install 'pipeline[tune]'", file=sys.stderr, flush=True)
        return 2
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from pipeline.configcheck import compose_and_check

    child = None
    try:
        opts = parse_args(args)
        base = compose(opts.fixed, opts.config_dir)
        space = parse_space(opts.space, base)
        # Every key and the fixed overrides are checked once, on the space's first point.
        first = {p.key: _first_point(p.distribution) for p in space}
        compose_and_check(
            ["command=train", *trial_overrides(opts.fixed, first, space)], opts.config_dir
        )
        outputs = Path(str(base.run.outputs))
        name = opts.study or default_study_name(opts)
        with study_lock(rundir.studies(outputs) / f"{name}.lock"):
            search = Search(opts, space, outputs, name)
            child = search.child
            with child.installed():
                search.run()
            print_leaderboard(search.summary_path)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        if isinstance(exc, Interrupted) and child is not None and child.signum is not None:
            return 128 + child.signum
        return exc.exit_code
    except OSError as exc:
        error = durable.disk_error(exc)
        print(f"error: {error}", file=sys.stderr, flush=True)
        return error.exit_code
    except KeyboardInterrupt:  # before the search started: nothing to stop
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130
    return 0


def _first_point(dist: BaseDistribution) -> Any:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return dist.choices[0]
    assert isinstance(dist, (FloatDistribution, IntDistribution))
    return dist.low


def print_leaderboard(summary_path: Path) -> None:
    from pipeline.status import study_table

    summary = durable.read_record(summary_path)
    print(f"\nstudy {summary['study']} ({summary['storage']}), best first:")
    print(study_table(summary))
