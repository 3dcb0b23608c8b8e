"""`python -m pipeline <command> [key=value ...]`.

Hydra has no subcommands, so the command word is taken off here and passed on as the override
`command=<word>`. Before Hydra (and TensorFlow) start, the overrides are composed and validated
once, so a mistake costs a fraction of a second and prints one line (exit code 2).
"""

from __future__ import annotations

import itertools
import os
import sys
import tempfile
from pathlib import Path

USAGE = """usage: pipeline <command> [key=value ...] [--config-dir DIR] [hydra options]
       pipeline --version
       (`python -m pipeline ...` is the same)

commands:
  train      data -> model -> fit -> evaluate -> export (finished stages are skipped)
  data       prepare and cache the data of a run
  fit        train an existing run further (resumes from its latest checkpoint)
  evaluate   score a checkpoint of an existing run on the test set
  export     export an existing run (SavedModel, .keras, .h5, .tflite)
  status     list runs and their stages (status [run.name=NAME] [--json])
  predict    classify PNGs, .npy arrays or test images with a run's newest export (--help)
  report     write a run's report.html (report [run.name=NAME] [run.outputs=DIR])
  tune       a resumable hyperparameter search with Optuna (the [tune] extra; tune --help)

examples:
  python -m pipeline train
  python -m pipeline train model=mlp fit.epochs=3 data.train_size=2000 seed=7
  python -m pipeline train experiment=tutorial
  python -m pipeline evaluate run.name=default evaluate.checkpoint=best
  python -m pipeline train --help        (Hydra's help: config groups and options)
  python -m pipeline train --config-dir my_conf experiment=mine   (my_conf/experiment/mine.yaml)

options:
  --config-dir DIR, -cd DIR   also search DIR for configs: your own presets beside the
                              package's (e.g. DIR/experiment/NAME.yaml), conf/ left as it is
  --version                   the versions of pipeline, TensorFlow, Keras and Hydra
"""
STAGE_COMMANDS = ("fit", "evaluate", "export")


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def versions() -> str:
    """Installed versions, read from package metadata (without importing TensorFlow: fast)."""
    from importlib.metadata import PackageNotFoundError, version

    lines = []
    for name, dist in (
        ("pipeline", "pipeline"),
        ("TensorFlow", "tensorflow"),
        ("Keras", "keras"),
        ("Hydra", "hydra-core"),
    ):
        try:
            lines.append(f"{name} {version(dist)}")
        except PackageNotFoundError:
            lines.append(f"{name} (not installed)")
    return "\n".join(lines)


def take_config_dir(args: list[str]) -> tuple[str | None, list[str]]:
    """Split off `--config-dir DIR` / `-cd DIR` (or `--config-dir=DIR`): the directory, made
    absolute, and the other arguments."""
    config_dir, rest = None, []
    items = iter(args)
    for arg in items:
        name, eq, value = arg.partition("=")
        if name not in ("--config-dir", "-cd"):
            rest.append(arg)
            continue
        if not eq:
            value = next(items, "")
        if not value:
            fail(f"{name} needs a directory: {name} DIR")
        config_dir = value
    if config_dir is not None:
        config_dir = os.path.abspath(config_dir)
        if not os.path.isdir(config_dir):
            fail(f"--config-dir {config_dir}: no such directory")
    return config_dir, rest


def overrides_of(args: list[str]) -> list[str]:
    return [a for a in args if "=" in a and not a.startswith("-")]


def expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """Every combination a multirun would launch (so each one is validated up front)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for override in parsed:
        if override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={v}" for v in override.sweep_string_iterator()])
        else:
            choices.append([str(override.input_line)])
    return [list(combo) for combo in itertools.product(*choices)]


def precheck(command: str, args: list[str], config_dir: str | None = None) -> Path | None:
    """Compose and validate the config of every job this command line would run; return the
    run directory of a single run. `config_dir`: the user's --config-dir."""
    from pipeline.configcheck import compose_and_check
    from pipeline.rundir import RunDir, check_ours

    overrides = overrides_of(args)
    multirun = "-m" in args or "--multirun" in args
    combos = expand_sweeps(overrides) if multirun else [overrides]
    run_dir = None
    for combo in combos[:256]:
        run_dir = compose_and_check([f"command={command}", *combo], config_dir)
        if command in STAGE_COMMANDS and not multirun and not RunDir(run_dir).run_record.exists():
            fail(
                f"no run at {run_dir}. Start it with: python -m pipeline train "
                f"{' '.join(combo)}".rstrip()
            )
        if not multirun:
            check_ours(run_dir)  # before Hydra writes .hydra/ and the log into it
            check_writable(run_dir)
    return None if multirun else run_dir


def check_writable(run_dir: Path) -> None:
    """Fail before Hydra starts writing into a directory that cannot take it."""
    from pipeline.durable import TMP_MARK
    from pipeline.errors import PipelineError

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # Named as a temporary of ours: if a failing disk refuses to delete it, the next start
        # removes it and never mistakes it for a user's file (found by --disk-faults).
        with tempfile.TemporaryFile(dir=run_dir, prefix=f".write-probe{TMP_MARK}"):
            pass
    except OSError as exc:
        raise PipelineError(
            f"Cannot write to the run directory {run_dir} ({exc.strerror}). "
            "Make it writable, or choose another place with "
            "run.outputs=<dir>."
        ) from exc


def read_command(command: str, rest: list[str]) -> int:
    """`status`, `predict` and `report`: a failing disk under the run ends in one line."""
    from pipeline.durable import disk_error

    try:
        if command == "status":
            from pipeline.status import main as status_main

            return status_main(rest)
        if command == "predict":
            from pipeline.predict import main as predict_main

            return predict_main(rest)
        from pipeline.report import main as report_main

        return report_main(rest)
    except OSError as exc:
        error = disk_error(exc)
        print(f"error: {error}", file=sys.stderr, flush=True)
        return error.exit_code


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if args else 2)
    if args[0] == "--version":
        print(versions())
        sys.exit(0)
    command, rest = args[0], args[1:]
    if command == "tune":
        from pipeline.tune import main as tune_main

        sys.exit(tune_main(rest))
    if command in ("status", "predict", "report"):
        sys.exit(read_command(command, rest))
    from pipeline.config import COMMANDS

    if command not in COMMANDS:
        fail(
            f"unknown command {command!r}; use one of {', '.join(COMMANDS)}, status, predict, "
            "report, tune. "
            "Example: python -m pipeline train fit.epochs=3"
        )
    from pipeline.errors import PipelineError

    config_dir, rest = take_config_dir(rest)
    help_only = any(a in ("--help", "-h", "--hydra-help", "--info", "-i") for a in rest)
    run_dir = None
    try:
        if not help_only:
            run_dir = precheck(command, rest, config_dir)
    except PipelineError as exc:
        fail(str(exc), exc.exit_code)
    except OSError as exc:  # reading the run directory on a failing disk (found by --disk-faults)
        from pipeline.durable import disk_error

        fail(str(disk_error(exc)), 1)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Hydra's argparse wants its options before the overrides.
    options = [a for a in rest if a not in overrides_of(rest)]
    sys.argv = [
        str(Path(sys.argv[0]).with_name("pipeline")),
        *options,
        *(["--config-dir", config_dir] if config_dir else []),
        f"command={command}",
        *overrides_of(rest),
    ]
    from hydra.errors import CompactHydraException
    from omegaconf.errors import OmegaConfBaseException

    from pipeline import durable, stages, tfstart
    from pipeline.cli import hydra_main
    from pipeline.durable import disk_error

    if not help_only and stages.needs_tensorflow(command):
        tfstart.start()  # here, before Hydra: its C++ start-up notes never reach the terminal

    # Hydra would print a traceback for an error in its own job setup (writing .hydra/ or
    # opening the log on a full or failing disk); with this it raises, and we print one line.
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra_main()
    except KeyboardInterrupt:
        fail(
            "interrupted at once; the last committed checkpoint is kept. Run the same "
            "command again to resume.",
            130,
        )
    except CompactHydraException as exc:  # one line, as Hydra prints it (e.g. a failed job)
        if full_error:
            raise
        print(exc, file=sys.stderr, flush=True)
        if isinstance(exc.__cause__, OmegaConfBaseException):
            print(exc.__cause__, file=sys.stderr, flush=True)
        sys.exit(1)
    except (OSError, ValueError) as exc:
        # Hydra's own job setup wraps a failing disk: opening pipeline.log on it is
        # "ValueError: Unable to configure handler 'file'" caused by the OSError.
        cause = exc if isinstance(exc, OSError) else durable.os_error_in(exc)
        if full_error or cause is None:
            raise
        fail(str(disk_error(cause, cause.filename or run_dir)), 1)


if __name__ == "__main__":
    main()
