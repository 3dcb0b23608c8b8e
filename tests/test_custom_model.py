"""Bring your own model: a builder outside the package trains, resumes bit-identically after
kills, evaluates and exports like a built-in one; a bad builder fails before training."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from conftest import SMALL, assert_runs_identical, cli, only_run_dir

from pipeline import durable

BUILDERS = """
import keras

def build(width=32):
    image = keras.Input((28, 28), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1 / 255)(image)
    x = keras.layers.Reshape((28, 28, 1))(x)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(width, activation="relu")(x)
    x = keras.layers.Dropout(0.3)(x)
    return keras.Model(image, keras.layers.Dense(10)(x))

def not_a_model():
    return "a string"

def three_classes():
    image = keras.Input((28, 28), dtype="uint8")
    return keras.Model(image, keras.layers.Dense(3)(keras.layers.Flatten()(image)))
"""
CUSTOM = ["model=custom", "model.builder=my_models:build", "+model.args.width=16"]


@pytest.fixture
def user_code(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "my_models.py").write_text(BUILDERS)
    return {"PYTHONPATH": str(tmp_path / "code")}


def test_custom_builder_resumes_bit_identical_after_kills(
    tmp_path: Path, user_code: dict[str, str]
) -> None:
    args = [*SMALL, *CUSTOM]
    (tmp_path / "reference").mkdir()
    result = cli(["train", *args], tmp_path / "reference", env=user_code)
    assert result.returncode == 0, result.stderr
    for failpoint in ("dir_after_rename@4", "dir_before_manifest@3"):
        env = {**user_code, "PIPELINE_FAILPOINT": failpoint}
        assert cli(["train", *args], tmp_path, env=env).returncode == -signal.SIGKILL
    result = cli(["train", *args], tmp_path, env=user_code)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path / "outputs")
    assert durable.read_record(run_dir / "run.json")["config"]["model"] == {
        "name": "custom",
        "builder": "my_models:build",
        "args": {"width": 16},
    }
    assert_runs_identical(only_run_dir(tmp_path / "reference" / "outputs"), run_dir)


@pytest.mark.parametrize(
    ("builder", "message"),
    [
        ("nowhere:build", "error: model.builder=nowhere:build: cannot import nowhere"),
        ("my_models:missing", "error: model.builder=my_models:missing: my_models has no function"),
        ("my_models:not_a_model", "error: model=custom returned str, not a keras.Model"),
        ("my_models:three_classes", "error: model=custom returns outputs of shape [(None, 3)]"),
        ("my_models", "error: model.builder='my_models' is not allowed: package.module:function"),
    ],
)
def test_a_bad_builder_fails_before_training_in_one_line(
    tmp_path: Path, user_code: dict[str, str], builder: str, message: str
) -> None:
    result = cli(["train", *SMALL, "model=custom", f"model.builder={builder}"], tmp_path, user_code)
    assert result.returncode == 2, result.stderr
    # One line (TensorFlow's own start-up lines aside, which it prints before any of ours).
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("outputs/*/checkpoints/step-*"))


def test_a_run_of_an_older_format_is_refused(tmp_path: Path) -> None:
    args = [*SMALL, "model=mlp", "fit.epochs=1"]
    assert cli(["train", *args], tmp_path).returncode == 0
    run_dir = only_run_dir(tmp_path / "outputs")
    record = durable.read_record(run_dir / "run.json")
    del record["format"]  # as pipeline 0.1 wrote it
    durable.write_record(run_dir / "run.json", record)
    result = cli(["train", *args, "fit.epochs=2"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: Run {run_dir} was written in run format 1; this pipeline reads format 2 only. "
        "Start it over with run.restart=true, or continue it with pipeline 0.1.x."
    )
    assert cli(["train", *args, "run.restart=true"], tmp_path).returncode == 0
