"""Shared helpers: run the real CLI as a subprocess on small slices of real MNIST."""

from __future__ import annotations

import importlib.util
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist.npz"
# A small, fast run: 500 training images of the bundled real-MNIST sample, 10 steps an epoch.
SMALL = [
    "data=sample",
    "data.train_size=600",
    "data.val_fraction=0.2",
    "data.test_size=200",
    "fit.batch_size=50",
    "fit.epochs=3",
    "checkpoint.every_steps=3",
    "fit.log_every_steps=2",
    "export.tflite=false",
]

# Smaller still, for runs that are launched many times (sweep jobs, search trials): 240
# training images, 5 steps an epoch; a job is a few seconds after TensorFlow starts.
TINY = [
    "data=sample",
    "data.train_size=300",
    "data.val_fraction=0.2",
    "data.test_size=100",
    "fit.batch_size=50",
    "fit.epochs=2",
    "checkpoint.every_steps=2",
    "fit.log_every_steps=2",
    "export.tflite=false",
    "export.h5=false",
]


def composed(overrides: list[str]) -> Any:
    """The config Hydra composes for `overrides`, after the entry point's own checks pass."""
    from hydra import compose, initialize_config_dir

    from pipeline.configcheck import CONF_DIR, compose_and_check

    compose_and_check(overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def load_faultfs() -> Any:
    """scripts/faultfs.py (a script, not part of the package) as the module `faultfs`."""
    if "faultfs" not in sys.modules:
        spec = importlib.util.spec_from_file_location("faultfs", ROOT / "scripts" / "faultfs.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["faultfs"] = module  # before exec: its dataclasses look the module up
        spec.loader.exec_module(module)
    return sys.modules["faultfs"]


faultfs = load_faultfs()


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[Any]:
    """A faultfs mount (strict power-cut model) over a backing directory in tmp_path. Without
    fuse3 and mfusepy the test fails, it does not skip: CI must run it."""
    missing = faultfs.missing_prerequisites()
    assert not missing, f"faultfs needs {', '.join(missing)}: {faultfs.INSTALL_HINT}"
    with faultfs.FaultFS(tmp_path / "backing", tmp_path / "mnt") as mounted:
        yield mounted


def shared_mnist() -> Path:
    """The full MNIST beside the checkout (../shared/data/mnist.npz). CI always provides it, so
    under CI=true its absence fails the test; elsewhere the test is skipped, saying why."""
    if SHARED_MNIST.is_file():
        return SHARED_MNIST
    reason = f"{SHARED_MNIST} is missing (CI always has it beside the checkout)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def cli(
    args: list[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    max_file_bytes: int | None = None,
) -> subprocess.CompletedProcess:
    """Run `python -m pipeline ...` in `cwd` (so outputs/ lands there) and capture output.

    `max_file_bytes` sets RLIMIT_FSIZE in the child: a write past it fails with EFBIG, the way
    a full disk fails with ENOSPC.
    """
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}

    def limit() -> None:
        assert max_file_bytes is not None
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit if max_file_bytes else None,
    )


def start(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def only_run_dir(outputs: Path) -> Path:
    from pipeline.rundir import run_dirs_under

    runs = run_dirs_under(outputs)
    assert len(runs) == 1, runs
    return runs[0]


def final_state(run_dir: Path) -> dict[str, np.ndarray]:
    """Every array of the newest checkpoint, read through the verified loader."""
    from pipeline import checkpoint
    from pipeline.rundir import RunDir

    latest = checkpoint.load_latest(RunDir(run_dir).checkpoints)
    assert latest is not None, f"no checkpoint verifies in {run_dir}"
    return latest.arrays


def assert_runs_identical(reference: Path, run: Path, predictions: bool = True) -> None:
    """The project's one exactness check (pipeline/exactness.py): checkpoints with their loop
    state, TensorBoard values, test metrics and (when exported) predictions."""
    from pipeline import exactness

    comparison = exactness.compare_runs(reference, run, predictions=predictions)
    assert comparison.identical, "\n".join(comparison.differences[:10])
    assert comparison.checkpoints, "no checkpoint was compared"


def assert_same_state(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    differing = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not differing, f"not bit-identical: {differing[:5]}"


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One uninterrupted small CNN run that the crash tests compare against: (run dir, stdout)."""
    cwd = tmp_path_factory.mktemp("reference")
    result = cli(["train", *SMALL], cwd)
    assert result.returncode == 0, result.stderr
    return only_run_dir(cwd / "outputs"), result.stdout


def scalar_steps(run_dir: Path, key: str) -> list[int]:
    """Steps of a scalar as TensorBoard's own loader sees them; `key` "<run>/<tag>", e.g.
    "train/batch_loss" (pipeline.tblog.scalars)."""
    from pipeline import tblog
    from pipeline.rundir import RunDir

    return [step for step, _ in tblog.scalars(RunDir(run_dir).tensorboard).get(key, [])]
