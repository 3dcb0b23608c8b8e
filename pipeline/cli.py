"""The Hydra entry point: one validated Config in, stages run in order on one locked run dir."""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig

from pipeline import durable, rundir, stages
from pipeline.config import Config, as_dict, identity, schema_defaults, to_config, validate
from pipeline.configcheck import CONF_DIR
from pipeline.errors import Interrupted, PipelineError

log = logging.getLogger("pipeline")


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


def plan(command: str, scale: Any) -> tuple[stages.Stage, ...]:
    """The stages to run (pipeline/stages.py); a non-chief worker of a strategy runs only those
    every worker runs (it prepares data and trains, in its scratch)."""
    planned = stages.plan(command)
    if scale is None or scale.worker.is_chief:
        return planned
    return tuple(s for s in planned if s.every_worker)


def run_stages(ctx: stages.Context, planned: tuple[stages.Stage, ...]) -> None:
    """Run `planned` in order: skip a finished stage (logging its note), else run it and keep
    its record."""
    for stage in planned:
        if ctx.stop():
            raise Interrupted(
                f"Interrupted before the {stage.name} stage; run the same "
                "command again to continue."
            )
        implementation = stage.implementation()
        note = implementation.is_done(ctx)
        if note is not None:
            if note:
                log.info("%s", note)
            continue
        record = implementation.run(ctx)
        if record is not None:
            rundir.finish_stage(ctx.run, stage.name, record)


def run_command(cfg: Config, run_dir: Path, stop: StopFlag, scale: Any = None) -> None:
    run = rundir.RunDir(run_dir)
    with rundir.RunLock(run):
        # The run directory may come from a plain mkdir (Hydra's): make its name durable before
        # anything is committed inside it, or a power cut could take it with all its commits.
        durable.sync_ancestors(run_dir)
        rundir.check_ours(run)  # again here: sweep jobs' directories skip the pre-check
        from pipeline.tfstart import DROPPED

        for note in DROPPED:  # kept off the terminal by the entry point, kept in the log
            log.debug("TensorFlow start-up: %s", note)
        removed = durable.remove_temps(run_dir)
        if removed:
            log.info("Removed %d temporary file(s) left by an interrupted write", len(removed))
        if cfg.run.restart:
            log.info("run.restart=true: discarding the previous state of %s", run_dir)
            rundir.restart(run)
        rundir.check_identity(run, identity(cfg), as_dict(cfg), schema_defaults(cfg))
        run.start_session(cfg.command)
        log.info("Run directory: %s", run_dir)
        planned = plan(cfg.command, scale)
        try:
            run_stages(stages.Context(cfg, run, stop, scale), planned)
        except Interrupted as exc:
            run.update_session(state="interrupted", message=str(exc))
            raise
        except PipelineError as exc:
            run.update_session(state="failed", message=str(exc))
            raise
        run.update_session(state="done" if cfg.command == "train" else "stage-done")
        if any(stage.name == "evaluate" for stage in planned):
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
