"""The stages, declared once: their order, what each needs, and where each is implemented.

Every command derives its plan from `REGISTRY`: `train` runs every stage, `<stage>` runs the
stages it needs (transitively, in registry order) and then itself. `rundir.STAGES` (the stage
records), `config.COMMANDS` (the command words), `status`, the report and the crash harness
read the names from here.

A stage's module implements it with two functions of one `Context`:

    is_done(ctx) -> str | None       a one-line note when the stage is finished and is skipped
                                     ("" skips it silently), else None
    run(ctx) -> dict | None          do the work; the record to keep in stages/<name>.json,
                                     or None to leave the record as it is

The module is imported only when its stage is reached (fit, evaluate and export import
TensorFlow); this module imports nothing heavy, so `status` and the harness can use it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

if TYPE_CHECKING:
    from pipeline.checkpoint import Checkpoint
    from pipeline.config import Config
    from pipeline.data import Prepared
    from pipeline.distribute import ScaleOut
    from pipeline.models import Pixels
    from pipeline.rundir import RunDir


@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, ...]  # the stages whose in-memory results (in the Context) it uses
    module: str  # implements is_done(ctx) and run(ctx)
    command: bool = True  # `python -m pipeline <name>` runs it (with what it needs)
    every_worker: bool = False  # under a multi-worker strategy non-chief workers run it too
    tensorflow: bool = True  # its module imports TensorFlow (the entry point starts it quietly)

    def implementation(self) -> StageModule:
        return cast(StageModule, importlib.import_module(self.module))


REGISTRY = (
    Stage("data", (), "pipeline.data", every_worker=True, tensorflow=False),
    # The model stage records the architecture (model_summary.txt); fit builds its own.
    Stage("model", ("data",), "pipeline.models", command=False),
    # Every worker of a strategy trains: the training step holds collectives.
    Stage("fit", ("data", "model"), "pipeline.fit", every_worker=True),
    Stage("evaluate", ("data",), "pipeline.evaluate"),
    # A version always carries its test metrics.
    Stage("export", ("data", "evaluate"), "pipeline.export"),
)
NAMES = tuple(stage.name for stage in REGISTRY)
TRAIN = "train"  # the command that runs every stage
COMMANDS = (TRAIN, *(stage.name for stage in REGISTRY if stage.command))


def _check(registry: tuple[Stage, ...]) -> None:
    seen: list[str] = []
    for stage in registry:
        if stage.name in seen or stage.name == TRAIN:
            raise ValueError(f"stage {stage.name!r} is registered twice or named like a command")
        later = [need for need in stage.needs if need not in seen]
        if later:
            raise ValueError(f"stage {stage.name!r} needs {later}, not registered before it")
        seen.append(stage.name)


_check(REGISTRY)


def get(name: str) -> Stage:
    for stage in REGISTRY:
        if stage.name == name:
            return stage
    raise KeyError(f"no stage {name!r}; the stages are {', '.join(NAMES)}")


def plan(command: str) -> tuple[Stage, ...]:
    """The stages `command` runs, in order: every stage for `train`; else the closure of the
    stage's needs, then the stage itself. Finished stages are skipped when the plan runs."""
    if command == TRAIN:
        return REGISTRY
    wanted: set[str] = set()
    todo = [get(command).name]
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo.extend(get(name).needs)
    return tuple(stage for stage in REGISTRY if stage.name in wanted)


def needs_tensorflow(command: str) -> bool:
    return any(stage.tensorflow for stage in plan(command))


class StopFlag(Protocol):
    """What a stage sees of cli.StopFlag: calling it says whether a signal asked to stop; while
    `graceful` is set (fit), a first signal only sets the flag instead of interrupting."""

    graceful: bool

    def __call__(self) -> bool: ...


@dataclass
class Context:
    """What the stages of one command share and pass along."""

    cfg: Config
    run: RunDir
    stop: StopFlag
    scale: ScaleOut | None = None  # under strategy=mirrored|multi_worker
    prepared: Prepared | None = None  # set by the data stage
    checkpoint: Checkpoint | None = None  # evaluate's is_done chose it for its run

    def data(self) -> Prepared:
        """The prepared data; every stage after data needs it (so `data` always runs)."""
        if self.prepared is None:
            raise RuntimeError("the data stage has not run: it comes first in every plan")
        return self.prepared

    def pixels(self) -> Pixels:
        return self.data().pixels(self.cfg.data.normalize)


class StageModule(Protocol):
    def is_done(self, ctx: Context) -> str | None: ...

    def run(self, ctx: Context) -> dict[str, Any] | None: ...
