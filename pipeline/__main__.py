"""`python -m pipeline <command> [key=value ...]`.

Hydra has no subcommands, so the command word is taken off here and passed on as the override
`command=<word>`. Before Hydra (and TensorFlow) start, the overrides are composed and validated
once, so a mistake costs a fraction of a second and prints one line (exit code 2).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

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
  Hydra's options work after the command word, anywhere among the overrides:
  -m (sweep: a,b  range()  choice()  glob()  tag()  sort()  shuffle()), -cn NAME, -cp DIR,
  --cfg job|hydra|all [--resolve], --info [WHAT], -sc install=bash|zsh|fish, --hydra-help
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


INFO_CHOICES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


def hydra_args(args: list[str]) -> argparse.Namespace:
    """Parse the arguments after the command word with Hydra's own argument parser (options may
    come before, between or after the overrides). A mistake is a ConfigError: one line."""
    from hydra._internal.utils import get_args_parser

    from pipeline.errors import ConfigError

    parser = get_args_parser()

    def error(message: str) -> NoReturn:
        raise ConfigError(f"{message}. See: python -m pipeline train --hydra-help")

    parser.error = error  # type: ignore[method-assign]
    # `--info` takes an optional value: `--info model=mlp` means --info=all, then an override.
    normalized = []
    for index, arg in enumerate(args):
        following = args[index + 1] if index + 1 < len(args) else None
        if arg in ("--info", "-i") and following not in INFO_CHOICES:
            arg = "--info=all"
        normalized.append(arg)
    ns = parser.parse_intermixed_args(normalized)
    # Hydra's own rules (hydra/_internal/utils.py, _run_hydra), checked before anything starts.
    if not (ns.help or ns.hydra_help):
        modes = [
            name
            for name, on in (
                ("--run", ns.run),
                ("--multirun", ns.multirun),
                ("--cfg", ns.cfg is not None),
                ("--info", ns.info is not None),
                ("--shell-completion", ns.shell_completion),
            )
            if on
        ]
        if len(modes) > 1:
            raise ConfigError(f"{' and '.join(modes)} cannot be combined: use one of them")
        if ns.resolve and ns.cfg is None:
            raise ConfigError("--resolve only works with --cfg job|hydra|all (or --help)")
    return ns


def hydra_argv(ns: argparse.Namespace, config_dir: str | None, command: str) -> list[str]:
    """The arguments for hydra.main: its options first (as its argparse wants them), then
    `command=<word>` and the overrides."""
    options = [
        flag
        for flag, on in (
            ("--help", ns.help),
            ("--hydra-help", ns.hydra_help),
            ("--resolve", ns.resolve),
            ("--run", ns.run),
            ("--multirun", ns.multirun),
            ("--shell-completion", ns.shell_completion),
        )
        if on
    ]
    for flag, value in (
        ("--cfg", ns.cfg),
        ("--package", ns.package),
        ("--config-path", ns.config_path),
        ("--config-name", ns.config_name),
        ("--experimental-rerun", ns.experimental_rerun),
        ("--info", ns.info),
        ("--config-dir", config_dir),
    ):
        if value is not None:
            options.append(f"{flag}={value}")
    if ns.hydra_help:  # Hydra's help composes Hydra's config alone: no job keys in it
        return [*options, *(o for o in ns.overrides if o.lstrip("+~").startswith("hydra"))]
    return [*options, f"command={command}", *ns.overrides]


def precheck(command: str, ns: argparse.Namespace, config_dir: str | None = None) -> Path | None:
    """Compose and validate the config of every job this command line would run (a sweep key by
    key: configcheck.check_sweep); return the run directory of a single run. `config_dir`: the
    user's --config-dir; -cn/-cp (config_name, config_path) choose the primary config as for
    Hydra. With --cfg only the config is checked: nothing is written, no run is needed."""
    from pipeline.configcheck import check_sweep, compose_and_check
    from pipeline.rundir import RunDir, check_ours

    overrides = [f"command={command}", *ns.overrides]
    if ns.multirun:
        check_sweep(overrides, config_dir, ns.config_name, ns.config_path)
        return None
    run_dir = compose_and_check(overrides, config_dir, ns.config_name, ns.config_path)
    if ns.cfg is not None:
        return None
    if command in STAGE_COMMANDS and not RunDir(run_dir).run_record.exists():
        fail(
            f"no run at {run_dir}. Start it with: python -m pipeline train "
            f"{' '.join(ns.overrides)}".rstrip()
        )
    check_ours(run_dir)  # before Hydra writes .hydra/ and the log into it
    check_writable(run_dir)
    return run_dir


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


def output_closed() -> NoReturn:
    """Whoever read our output stopped (`pipeline status | head -3`): stop quietly with the
    shell's code for it (128 + SIGPIPE), not with a disk error. Python ignores SIGPIPE, so the
    write raised BrokenPipeError; stdout goes to /dev/null so the exit does not raise again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError:
        pass
    sys.exit(141)


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
    except BrokenPipeError:
        output_closed()
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
    if args[0] in ("-sc", "--shell-completion"):
        shell_completion(args)
        return
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
    run_dir = None
    try:
        ns = hydra_args(rest)
        # Help, --info, shell completion (`-sc install=bash`: its words are not overrides) and
        # --experimental-rerun (the config comes from its pickle) go to Hydra unchecked.
        hydra_only = (
            ns.help
            or ns.hydra_help
            or ns.info is not None
            or ns.shell_completion
            or ns.experimental_rerun is not None
        )
        if not hydra_only:
            run_dir = precheck(command, ns, config_dir)
    except PipelineError as exc:
        fail(str(exc), exc.exit_code)
    except OSError as exc:  # reading the run directory on a failing disk (found by --disk-faults)
        from pipeline.durable import disk_error

        fail(str(disk_error(exc)), 1)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.argv = [program_name(), *hydra_argv(ns, config_dir, command)]
    from pipeline import stages, tfstart

    if not hydra_only and ns.cfg is None and stages.needs_tensorflow(command):
        tfstart.start()  # here, before Hydra: its C++ start-up notes never reach the terminal
    run_hydra(run_dir)


def program_name() -> str:
    """argv[0] for Hydra: the console script's name (shell completion installs itself for it)."""
    return str(Path(sys.argv[0]).with_name("pipeline"))


def shell_completion(args: list[str]) -> None:
    """`pipeline -sc query=bash`, as the script `pipeline train -sc install=bash` printed runs
    it: Hydra completes the overrides of the line, so the command word is taken out of it."""
    from pipeline.config import COMMANDS

    line = os.environ.get("COMP_LINE")
    if line is not None:
        words = line.split(" ")
        if len(words) > 1 and words[1] in COMMANDS:
            os.environ["COMP_LINE"] = " ".join([words[0], *words[2:]])
    sys.argv = [program_name(), *args]
    run_hydra(None)


def run_hydra(run_dir: Path | None) -> None:
    """Hydra's main on sys.argv; any error of Hydra's is one line and exit code 2."""
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    from pipeline import durable
    from pipeline.cli import JobFailed, hydra_main
    from pipeline.configcheck import explain
    from pipeline.durable import disk_error

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
    except JobFailed as exc:  # one line, as Hydra prints it: a failed job of a multirun
        if full_error:
            raise
        print(exc, file=sys.stderr, flush=True)
        if isinstance(exc.__cause__, OmegaConfBaseException):
            print(exc.__cause__, file=sys.stderr, flush=True)
        sys.exit(1)
    except BrokenPipeError:
        output_closed()
    except (HydraException, OmegaConfBaseException, OSError, ValueError) as exc:
        if full_error:
            raise
        # Hydra's own job setup wraps a failing disk: opening pipeline.log on it is
        # "ValueError: Unable to configure handler 'file'" caused by the OSError.
        cause = None if isinstance(exc, MissingConfigException) else durable.os_error_in(exc)
        if cause is None and isinstance(exc, OSError) and not isinstance(exc, HydraException):
            cause = exc
        if cause is not None:
            fail(str(disk_error(cause, cause.filename or run_dir)), 1)
        fail(explain(exc))  # a config or usage error Hydra found: exit code 2


if __name__ == "__main__":
    main()
