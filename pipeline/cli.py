"""The Hydra entry point: one validated Config in, stages run in order on one locked run dir."""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig

from pipeline import durable, rundir
from pipeline.config import Config, as_dict, identity, schema_defaults, to_config, validate
from pipeline.configcheck import CONF_DIR
from pipeline.errors import Interrupted, PipelineError

log = logging.getLogger("pipeline")
# The stages each command runs, in order; finished ones are skipped.
PLAN = {
    "train": ("data", "model", "fit", "evaluate", "export"),
    "data": ("data",),
    "fit": ("data", "model", "fit"),
    "evaluate": ("data", "evaluate"),
    "export": ("data", "evaluate", "export"),  # a version always carries its test metrics
}


class JobFailed(CompactHydraException):
    """A failed job of a multirun. Raised (not sys.exit) so Hydra finishes the other jobs of the
    sweep first; Hydra then prints this one line and exits with code 1."""


class StopFlag:
    """SIGINT/SIGTERM handling. While fit runs (`graceful`), the first signal only sets the flag:
    fit finishes its step, saves a checkpoint and stops. Elsewhere, and on a second signal, the
    process stops at once; every write is atomic, so nothing committed is lost either way."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.graceful = False
        self.requeue: dict[int, Any] = {}  # submitit's handlers, when running under it

    def __call__(self) -> bool:
        return self.signum is not None

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)
        # submitit (hydra/launcher=submitit_*) signals SIGUSR2 (or SUBMITIT_PREEMPT_SIGNAL,
        # e.g. USR1) before the time limit: save a checkpoint first, then let submitit requeue
        # the job (see hand_over).
        for signum in (signal.SIGUSR1, signal.SIGUSR2):
            previous = signal.getsignal(signum)
            if callable(previous):
                self.requeue[signum] = previous
                signal.signal(signum, self._handle)

    def hand_over(self) -> None:
        """After a graceful stop on submitit's signal, call its handler: it requeues the job."""
        if self.signum in self.requeue:
            self.requeue[self.signum](self.signum, None)

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None or not self.graceful:
            self.signum = signum
            raise Interrupted(
                f"Interrupted by {name}; every committed file is intact. Run the "
                "same command again to resume."
            )
        self.signum = signum
        print(
            f"\n{name}: finishing this step and saving a checkpoint (press Ctrl-C again to "
            "quit at once)",
            file=sys.stderr,
            flush=True,
        )


class LogFileGuard:
    """The log file (Hydra's pipeline.log) on a failing disk. Left alone, logging prints a
    traceback to stderr for every record it cannot write. Instead the file handler is detached
    at its first failed write, the command finishes its work (which does not depend on the
    log), and then ends with one error line naming the file."""

    def __init__(self) -> None:
        self.failure: OSError | None = None
        self.path: str | None = None

    def install(self) -> None:
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handleError = functools.partial(self._failed, handler)  # type: ignore[method-assign]

    def _failed(self, handler: logging.FileHandler, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            logging.Handler.handleError(handler, record)  # a formatting bug: logging's report
            return
        logging.getLogger().removeHandler(handler)
        with contextlib.suppress(Exception):
            handler.close()
        if self.failure is None:
            self.failure, self.path = exc, handler.baseFilename

    def check(self) -> None:
        """Close the log file (a disk can fail that too) and fail if it could not be written."""
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler) and self.failure is None:
                try:
                    handler.close()  # reopened by the next record, if any
                except OSError as exc:
                    logging.getLogger().removeHandler(handler)
                    self.failure, self.path = exc, handler.baseFilename
        if self.failure is not None:
            raise durable.disk_error(self.failure, self.path) from self.failure


class _NoTraceback(logging.Formatter):
    """The console's formatter without tracebacks: libraries log handled exceptions with them
    (TensorFlow: "Fingerprint was found, but there was an error ... loading will continue"),
    and tracebacks belong in pipeline.log, not on the screen."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def quiet_console_tracebacks() -> None:
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler and not isinstance(
            handler.formatter, _NoTraceback
        ):
            handler.setFormatter(_NoTraceback(handler.formatter))
    # "Exception ignored in ..." (e.g. h5py closing objects after a failed write) goes to the
    # log file with its traceback, not to stderr.
    sys.unraisablehook = _log_unraisable


def _log_unraisable(unraisable: Any) -> None:
    log.debug(
        "%s: %r",
        unraisable.err_msg or "Exception ignored in",
        unraisable.object,
        exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback),
    )


def write_session(run: rundir.RunDir, state: str, **extra: Any) -> None:
    durable.write_record(run.session, {"state": state, "time": time.time(), **extra})


class Stages:
    """Runs the stages of one command on one run directory, passing plain values along."""

    def __init__(self, cfg: Config, run: rundir.RunDir, stop: StopFlag, scale: Any = None) -> None:
        self.cfg, self.run, self.stop = cfg, run, stop
        self.scale = scale  # distribute.ScaleOut under strategy=mirrored|multi_worker
        self.prepared: Any = None

    def data(self) -> None:
        from pipeline.data import check_same_source, prepare_run_data

        done = self.run.read_stage("data", owner=True)
        prepared = prepare_run_data(self.cfg.data, rundir.data_cache(Path(self.cfg.run.outputs)))
        check_same_source(done, prepared)
        self.prepared = prepared
        record = {
            "fingerprint": prepared.fingerprint,
            "source": prepared.source,
            "source_sha256": prepared.source_sha256,
            "cache": rundir.relative_to_run(self.run, prepared.directory),
        }
        if done is None or any(done.get(k) != v for k, v in record.items()):
            rundir.finish_stage(self.run, "data", record)

    def model(self) -> None:
        if self.run.read_stage("model", owner=True):
            return
        from pipeline.models import build_model, summary_text

        model = build_model(self.cfg.model, self.pixels())
        durable.write_bytes(self.run.model_summary, summary_text(model).encode())
        rundir.finish_stage(self.run, "model", {"parameters": model.count_params()})

    def pixels(self) -> Any:
        return self.prepared.pixels(self.cfg.data.normalize)

    def fit(self) -> None:
        done = self.run.read_stage("fit", owner=True)
        # Under a strategy every worker enters fit (it holds collectives), even when done.
        if (
            done
            and self.scale is None
            and done["epochs"] >= self.cfg.fit.epochs
            and self._final_checkpoint_ok(done)
        ):
            log.info("fit: done (%d epochs, step %d); skipped", done["epochs"], done["global_step"])
            return
        from pipeline.fit import run_fit

        # Fit cuts TensorBoard events written after the checkpoint it resumes from, evaluate's
        # included: an earlier evaluation no longer stands, even of the same final step.
        rundir.clear_stage(self.run, "evaluate")
        c = self.cfg
        started = time.monotonic()
        self.stop.graceful = True
        try:
            summary = run_fit(
                c.model,
                c.optimizer,
                c.fit,
                c.checkpoint,
                c.seed,
                self.prepared,
                self.pixels(),
                self.run,
                self.stop,
                self.scale,
            )
        finally:
            self.stop.graceful = False
        rundir.finish_stage(
            self.run,
            "fit",
            {
                "epochs": c.fit.epochs,
                "global_step": summary["global_step"],
                "seconds_this_session": time.monotonic() - started,
                **summary,
            },
        )

    def _final_checkpoint_ok(self, done: dict[str, Any]) -> bool:
        """A finished fit counts only while its last checkpoint verifies; if that one was
        damaged, fit resumes from the newest good one and recomputes the rest exactly."""
        from pipeline import checkpoint

        latest = checkpoint.load_latest(self.run.checkpoints)
        return latest is not None and latest.step == done["global_step"]

    def evaluate(self) -> None:
        from pipeline.evaluate import choose_checkpoint, run_evaluate

        which = self.cfg.evaluate.checkpoint
        ckpt = choose_checkpoint(self.run.checkpoints, which)
        done = self.run.read_stage("evaluate", owner=True)
        if done and done["checkpoint_step"] == ckpt.step and done["checkpoint"] == which:
            log.info(
                "evaluate: done (step %d, test accuracy %.2f%%); skipped",
                ckpt.step,
                100 * done["test_accuracy"],
            )
            return
        metrics = run_evaluate(self.cfg.model, self.pixels(), self.prepared, ckpt, self.run, which)
        rundir.finish_stage(self.run, "evaluate", metrics)

    def export(self) -> None:
        from pipeline.evaluate import choose_checkpoint
        from pipeline.export import run_export

        ckpt = choose_checkpoint(self.run.checkpoints, self.cfg.evaluate.checkpoint)
        metrics = self.run.read_stage("evaluate", owner=True)
        if metrics and metrics["checkpoint_step"] != ckpt.step:
            metrics = None
        result = run_export(self.cfg, self.pixels(), self.prepared, ckpt, self.run, metrics)
        done = self.run.read_stage("export", owner=True)
        if done is None or done["checkpoint_step"] != ckpt.step:
            # Also when the version was already published and only this record was lost.
            rundir.finish_stage(self.run, "export", result)


def write_report(run: rundir.RunDir) -> None:
    """Keep report.html current. A report that cannot be made is a warning, but a disk that
    fails (full, I/O errors) fails the command like any other write: the user must hear of
    it. Rerunning the command then only rewrites the report."""
    from pipeline.report import write_report as write

    try:
        log.info("Report: %s", write(run))
    except (OSError, durable.DiskFullError, durable.DiskError):
        raise
    except PipelineError as exc:
        log.warning("Could not write the run report: %s", exc)


def plan(command: str, scale: Any) -> tuple[str, ...]:
    """The stages to run; a non-chief worker only prepares data and trains (in its scratch)."""
    if scale is None or scale.worker.is_chief:
        return PLAN[command]
    return tuple(s for s in PLAN[command] if s in ("data", "fit"))


def run_command(cfg: Config, run_dir: Path, stop: StopFlag, scale: Any = None) -> None:
    run = rundir.RunDir(run_dir)
    with rundir.RunLock(run):
        # The run directory may come from a plain mkdir (Hydra's): make its name durable before
        # anything is committed inside it, or a power cut could take it with all its commits.
        durable.sync_ancestors(run_dir)
        rundir.check_ours(run)  # again here: sweep jobs' directories skip the pre-check
        removed = durable.remove_temps(run_dir)
        if removed:
            log.info("Removed %d temporary file(s) left by an interrupted write", len(removed))
        if cfg.run.restart:
            log.info("run.restart=true: discarding the previous state of %s", run_dir)
            rundir.restart(run)
        rundir.check_identity(run, identity(cfg), as_dict(cfg), schema_defaults(cfg))
        write_session(run, "running", command=cfg.command)
        log.info("Run directory: %s", run_dir)
        stages = Stages(cfg, run, stop, scale)
        try:
            for stage in plan(cfg.command, scale):
                if stop():
                    raise Interrupted(
                        f"Interrupted before the {stage} stage; run the same "
                        "command again to continue."
                    )
                getattr(stages, stage)()
        except Interrupted as exc:
            write_session(run, "interrupted", command=cfg.command, message=str(exc))
            raise
        except PipelineError as exc:
            write_session(run, "failed", command=cfg.command, message=str(exc))
            raise
        write_session(run, "done" if cfg.command == "train" else "stage-done", command=cfg.command)
        if cfg.command in ("train", "evaluate", "export") and "evaluate" in plan(
            cfg.command, scale
        ):
            write_report(run)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(dict_cfg: DictConfig) -> None:
    cfg = to_config(dict_cfg)
    validate(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    stop = StopFlag()
    stop.install()
    log_guard = LogFileGuard()
    log_guard.install()
    quiet_console_tracebacks()
    scale = None
    try:
        scale = set_up_strategy(cfg, run_dir)
        if scale is not None:
            # MultiWorkerMirroredStrategy installs TensorFlow's own SIGTERM handler (its
            # preemption notifier); ours must get SIGTERM, or a worker ignores it.
            signal.signal(signal.SIGTERM, stop._handle)
        run_command(cfg, scale.work_dir if scale else run_dir, stop, scale)
        log_guard.check()
    except PipelineError as exc:
        log.debug("failed", exc_info=True)
        print(f"error: {exc}", file=sys.stderr, flush=True)
        if isinstance(exc, Interrupted):
            stop.hand_over()
            sys.exit(128 + stop.signum if stop.signum is not None else exc.exit_code)
        fail_job(run_dir, multirun, str(exc), exc.exit_code)
    except OSError as exc:  # the disk failed outside durable's writes (e.g. Hydra's, the log's)
        error = durable.disk_error(exc, exc.filename or run_dir)
        print(f"error: {error}", file=sys.stderr, flush=True)
        log.debug("disk error", exc_info=True)
        fail_job(run_dir, multirun, str(error), error.exit_code)
    except Exception as exc:  # a bug, not a user mistake: keep the traceback in the log file
        cause = durable.os_error_in(exc)
        if cause is not None:  # a library's own error for a failing disk (e.g. TensorFlow's)
            error = durable.disk_error(cause, cause.filename or run_dir)
            print(f"error: {error}", file=sys.stderr, flush=True)
            log.debug("disk error", exc_info=True)
            fail_job(run_dir, multirun, str(error), error.exit_code)
        log.debug("unexpected error", exc_info=True)
        print(
            f"error: unexpected {type(exc).__name__}: {exc}\nThe traceback is in "
            f"{rundir.RunDir(run_dir).log}; committed state is intact. Please report it.",
            file=sys.stderr,
            flush=True,
        )
        fail_job(run_dir, multirun, f"unexpected {type(exc).__name__}: {exc}", 1)
    finally:
        if scale is not None:
            scale.cleanup()


def set_up_strategy(cfg: Config, run_dir: Path) -> Any:
    """None for strategy=default (the single-device loop, untouched); else a ScaleOut."""
    if cfg.strategy.name == "default":
        return None
    from pipeline import distribute

    return distribute.setup(cfg.strategy.name, cfg.strategy.cluster, run_dir)


def fail_job(run_dir: Path, multirun: bool, message: str, code: int) -> None:
    """Exit with `code`; in a multirun, raise instead so the sweep's other jobs still run."""
    if multirun:
        raise JobFailed(f"error: run {run_dir} failed: {message}")
    sys.exit(code)
