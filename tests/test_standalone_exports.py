"""Every export stands alone: each format, loaded in a Python process that never imports
`pipeline`, takes raw uint8 pixels, returns probabilities and scores the test digits exactly as
the evaluate stage did; the README's snippets run as printed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, cli

from pipeline.rundir import PREPARED, RunDir

RUN = [
    "data=sample",
    "data.train_size=2000",
    "data.test_size=1000",
    "fit.epochs=2",
    "checkpoint.every_steps=0",
    "run.name=default",
]
FRESH_ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ""}

SCORE_EVERY_FORMAT = r"""
import json, sys
import keras, numpy as np, tensorflow as tf
version, data = sys.argv[1], sys.argv[2]
with np.load(data) as npz:
    x, y = npz["x_test"], npz["y_test"]
scores = {}
def score(name, probabilities):
    probabilities = np.asarray(probabilities)
    assert probabilities.shape == (len(x), 10), (name, probabilities.shape)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4), name
    classes = probabilities.argmax(axis=1)
    scores[name] = {"correct": int((classes == y).sum()), "classes": classes.tolist()}
for fmt in ("model.keras", "model.h5"):
    score(fmt, keras.models.load_model(f"{version}/{fmt}").predict(x, verbose=0))
serve = tf.saved_model.load(version).signatures["serving_default"]
score("saved_model", serve(image=tf.constant(x))["probabilities"])
runner = tf.lite.Interpreter(model_path=f"{version}/model.tflite").get_signature_runner(
    "serving_default")
score("tflite", np.concatenate([runner(image=x[i:i + 1])["probabilities"] for i in range(len(x))]))
# Training continues from the .keras file: compiled, with the run's optimizer state.
model = keras.models.load_model(f"{version}/model.keras")
before = int(model.optimizer.iterations.numpy())
model.fit(x[:64], y[:64], batch_size=32, epochs=1, verbose=0)
scores["keras_training"] = {"before": before, "after": int(model.optimizer.iterations.numpy())}
assert "pipeline" not in sys.modules, "a standalone load imported pipeline"
print(json.dumps(scores))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained and exported run at <tmp>/outputs/default, its first version at export/mnist/1."""
    cwd = tmp_path_factory.mktemp("standalone")
    result = cli(["train", *RUN], cwd)
    assert result.returncode == 0, result.stderr
    return cwd


def run_fresh(code: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    # Not from the checkout (the package would be importable from the current directory).
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env=FRESH_ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_every_format_scores_like_the_evaluate_stage_in_a_fresh_process(exported: Path) -> None:
    run_dir = exported / "outputs" / "default"
    result = run_fresh(
        SCORE_EVERY_FORMAT,
        exported,
        str(run_dir / "export" / "mnist" / "1"),
        str(RunDir(run_dir).data / PREPARED),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test_images"] == 1000
    for fmt in ("model.keras", "model.h5", "saved_model", "tflite"):
        # Accuracy equal to the evaluate stage's, to the last image.
        assert scores[fmt]["correct"] == round(metrics["test_accuracy"] * 1000), fmt
        assert scores[fmt]["classes"] == scores["saved_model"]["classes"], fmt
    step = metrics["checkpoint_step"]
    assert scores["keras_training"] == {"before": step, "after": step + 2}


def readme_snippets() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Using the exported model", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_snippets_run_as_printed(exported: Path) -> None:
    snippets = readme_snippets()
    assert len(snippets) == 5, "the README's export snippets changed: update this test"
    with np.load(RunDir(exported / "outputs" / "default").data / PREPARED) as npz:
        np.save(exported / "digits.npy", npz["x_test"][:3])
    for code in snippets[:4]:  # the four formats: no pipeline import allowed
        checked = code + '\nimport sys\nassert "pipeline" not in sys.modules\n'
        result = run_fresh(checked, exported)
        assert result.returncode == 0, f"{code}\n{result.stderr[-2000:]}"
    request = json.loads((exported / "request.json").read_text())
    assert np.asarray(request["instances"]).shape == (3, 28, 28)
    # The notebook snippet loads a checkpoint through the package, which must be importable.
    notebook = snippets[4] + (
        "\nimport keras, numpy as np\n"
        "x = np.load('digits.npy')\n"
        "exported = keras.models.load_model('outputs/default/export/mnist/1/model.keras')\n"
        "assert np.array_equal(model.predict(x), exported.predict(x))\n"
    )
    env = {**FRESH_ENV, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", notebook], cwd=exported, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_evaluate_a_chosen_checkpoint_step(exported: Path, tmp_path: Path) -> None:
    from pipeline import checkpoint

    run_dir = exported / "outputs" / "default"
    steps = checkpoint.committed_steps(run_dir / "checkpoints")
    assert len(steps) == 2  # one per epoch (checkpoint.every_steps=0)
    result = cli(["evaluate", *RUN, f"evaluate.checkpoint={steps[0]}"], exported)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["checkpoint"], metrics["checkpoint_step"]) == (str(steps[0]), steps[0])
    result = cli(["evaluate", *RUN, "evaluate.checkpoint=7"], exported)
    assert result.returncode == 1
    assert f"Checkpoint step 7 (7) is missing or damaged in {run_dir / 'checkpoints'}" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
