"""The stage registry (pipeline/stages.py): every command's plan derives from it, every list of
stage names is its list, and every registered module implements its stage."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline import cli, config, rundir, stages

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"

PLANS = {
    "train": ["data", "model", "fit", "evaluate", "export"],
    "data": ["data"],
    "fit": ["data", "model", "fit"],
    "evaluate": ["data", "evaluate"],
    "export": ["data", "evaluate", "export"],  # a version always carries its test metrics
}


def names(plan: tuple[stages.Stage, ...]) -> list[str]:
    return [stage.name for stage in plan]


def test_every_command_plans_the_closure_of_its_needs_in_order() -> None:
    assert set(config.COMMANDS) == set(PLANS)
    for command, expected in PLANS.items():
        assert names(stages.plan(command)) == expected, command
        assert names(cli.plan(command, None)) == expected, command


def test_a_non_chief_worker_only_prepares_data_and_trains() -> None:
    def scale(chief: bool) -> SimpleNamespace:
        return SimpleNamespace(worker=SimpleNamespace(is_chief=chief))

    for command, expected in PLANS.items():
        assert names(cli.plan(command, scale(True))) == expected, command
        worker = [s for s in expected if s in ("data", "fit")]
        assert names(cli.plan(command, scale(False))) == worker, command


def test_the_names_elsewhere_are_the_registrys() -> None:
    assert stages.NAMES == ("data", "model", "fit", "evaluate", "export")
    assert rundir.STAGES == stages.NAMES
    assert config.COMMANDS == ("train", "data", "fit", "evaluate", "export")
    assert config.COMMANDS == stages.COMMANDS
    spec = importlib.util.spec_from_file_location("crash_test", SCRIPTS / "crash_test.py")
    assert spec is not None and spec.loader is not None
    harness = importlib.util.module_from_spec(spec)
    sys.modules["crash_test"] = harness  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(harness)
    finally:
        del sys.modules["crash_test"]
    assert harness.STAGE_ORDER == list(stages.NAMES)


def test_every_registered_module_implements_its_stage() -> None:
    for stage in stages.REGISTRY:
        module = stage.implementation()
        assert module.__name__ == stage.module
        for function in ("is_done", "run"):
            assert callable(getattr(module, function, None)), f"{stage.module}.{function}"


def test_a_need_must_be_registered_before_the_stage() -> None:
    with pytest.raises(ValueError, match="needs"):
        stages._check((stages.Stage("fit", ("data",), "pipeline.fit"),))
    with pytest.raises(ValueError, match="twice"):
        stages._check((stages.Stage("data", (), "x"), stages.Stage("data", (), "y")))
    with pytest.raises(KeyError):
        stages.plan("model.name")


def test_the_registry_and_the_readers_import_no_tensorflow() -> None:
    """status, the report and the crash harness read the registry without TensorFlow."""
    code = (
        "import sys, pipeline.stages, pipeline.rundir, pipeline.status, pipeline.report\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]
    code = "import sys, pipeline.stages\nprint('numpy' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split() == ["False"], result.stderr
