"""The export seen from outside: TensorFlow's own `saved_model_cli`, the TFLite interpreter, the
model card, the `.keras` file, and the rules for publishing versions."""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL, cli, only_run_dir

from pipeline import durable
from pipeline.rundir import RunDir

SAVED_MODEL_CLI = Path(sys.executable).with_name("saved_model_cli")
# A small run that classifies well (about 96% on its 300 test images), with every export format
# (TFLite included). Trained once per session and shared with test_predict.py.
# Keras' plain Adam and no augmentation: the default recipe is tuned for 13 epochs of full MNIST.
GOOD = [
    "data=sample",
    "data.train_size=3000",
    "data.test_size=300",
    "fit.batch_size=50",
    "fit.epochs=2",
    "checkpoint.every_steps=0",
    "optimizer=adam",
    "fit.augment_shift=0",
]


def good_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.getbasetemp() / "good_run"
    runs = list((cwd / "outputs").glob("*/export/mnist/1/MANIFEST.json"))
    if not runs:
        cwd.mkdir(exist_ok=True)
        result = cli(["train", *GOOD], cwd)
        assert result.returncode == 0, result.stderr
    return only_run_dir(cwd / "outputs")


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return good_run(tmp_path_factory)


def held_out(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The run's own test images and labels, from its data cache."""
    test = RunDir(run_dir).prepared_data("x_test", "y_test")
    return test["x_test"], test["y_test"]


def saved_model_cli(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(SAVED_MODEL_CLI), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def printed_outputs(
    stdout: str, keys: tuple[str, ...] = ("class_id", "probabilities")
) -> dict[str, np.ndarray]:
    """Parse `saved_model_cli run`'s "Result for output key K:\\n<numpy print>" blocks."""
    parts = re.split(r"^Result for output key (\w+):\n", stdout, flags=re.M)
    outputs = {}
    for key, text in zip(parts[1::2], parts[2::2], strict=True):
        if key not in keys:
            continue
        lines = text.splitlines()
        ends = [i for i, line in enumerate(lines) if not line.startswith(("[", " "))]
        text = "\n".join(lines[: ends[0]] if ends else lines)  # e.g. "Output K is saved to"
        assert "..." not in text, "numpy summarized the output; use fewer images"
        rows = text.count("[") - 1 if text.lstrip().startswith("[[") else 0
        values = np.array(text.replace("[", " ").replace("]", " ").split(), dtype=np.float64)
        outputs[key] = values.reshape(rows, -1) if rows else values
    return outputs


def run_cli(export: Path, signature: str, *inputs: str) -> dict[str, np.ndarray]:
    result = saved_model_cli(
        "run", "--dir", str(export), "--tag_set", "serve", "--signature_def", signature, *inputs
    )
    return printed_outputs(result.stdout)


@pytest.fixture(scope="module")
def reference_export(reference_run: tuple[Path, str]) -> Path:
    return reference_run[0] / "export" / "mnist" / "1"


@pytest.fixture(scope="module")
def scored(
    reference_run: tuple[Path, str],
    reference_export: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, np.ndarray]:
    """saved_model_cli's class ids and probabilities for the reference run's whole test set
    (given as an .npy file), with the indices of the first images it classifies correctly."""
    x, y = held_out(reference_run[0])
    tmp = tmp_path_factory.mktemp("saved_model_cli")
    np.save(tmp / "x_test.npy", x)
    result = saved_model_cli(
        "run",
        "--dir",
        str(reference_export),
        "--tag_set",
        "serve",
        "--signature_def",
        "serving_default",
        "--inputs",
        f"image={tmp / 'x_test.npy'}",
        "--outdir",
        str(tmp),
    )
    class_id = printed_outputs(result.stdout, ("class_id",))["class_id"].astype(np.int64)
    probabilities = np.load(tmp / "probabilities.npy")
    correct = np.flatnonzero(class_id == y)
    return {"class_id": class_id, "probabilities": probabilities, "correct": correct[:4]}


def test_show_lists_the_serving_signatures(reference_export: Path) -> None:
    out = saved_model_cli("show", "--dir", str(reference_export), "--all").stdout
    blocks = dict(
        re.findall(
            r"^signature_def\['(\w+)'\]:\n(.*?)(?=^signature_def|\Z)", out, flags=re.M | re.S
        )
    )
    assert {"serving_default", "serve_flat", "serve_examples"} <= set(blocks)
    default = blocks["serving_default"]
    assert re.search(
        r"inputs\['image'\] tensor_info:\n\s+dtype: DT_UINT8\n"
        r"\s+shape: \(-1, 28, 28\)",
        default,
    ), default
    assert re.search(
        r"outputs\['probabilities'\] tensor_info:\n\s+dtype: DT_FLOAT\n"
        r"\s+shape: \(-1, 10\)",
        default,
    ), default
    assert re.search(
        r"outputs\['class_id'\] tensor_info:\n\s+dtype: DT_INT64\n"
        r"\s+shape: \(-1\)",
        default,
    ), default
    assert "tensorflow/serving/predict" in default
    assert re.search(
        r"inputs\['image'\] tensor_info:\n\s+dtype: DT_FLOAT\n\s+shape: \(-1, 784\)",
        blocks["serve_flat"],
    )
    assert re.search(
        r"inputs\['examples'\] tensor_info:\n\s+dtype: DT_STRING\n\s+shape: \(-1\)",
        blocks["serve_examples"],
    )


def test_run_with_npy_file_matches_evaluation(
    reference_run: tuple[Path, str], scored: dict[str, np.ndarray]
) -> None:
    # Through `--inputs image=x_test.npy`: the test accuracy saved_model_cli sees is the one
    # the evaluate stage measured from the checkpoint.
    x, y = held_out(reference_run[0])
    metrics = json.loads((reference_run[0] / "metrics.json").read_text())
    assert scored["class_id"].shape == (len(y),)
    assert float(np.mean(scored["class_id"] == y)) == pytest.approx(metrics["test_accuracy"])
    assert np.array_equal(np.argmax(scored["probabilities"], -1), scored["class_id"])
    assert np.allclose(scored["probabilities"].sum(-1), 1.0, atol=1e-5)
    assert len(scored["correct"]) == 4


def test_run_with_input_exprs(
    reference_run: tuple[Path, str], reference_export: Path, scored: dict[str, np.ndarray]
) -> None:
    x, y = held_out(reference_run[0])
    pick = scored["correct"]
    out = run_cli(reference_export, "serving_default", "--input_exprs", f"image={x[pick].tolist()}")
    assert out["class_id"].astype(int).tolist() == y[pick].tolist()
    assert np.allclose(out["probabilities"], scored["probabilities"][pick], rtol=1e-5, atol=1e-7)
    # serve_flat takes the same raw pixels as floats, flat.
    flat = x[pick].reshape(len(pick), 784).astype(float).tolist()
    out = run_cli(reference_export, "serve_flat", "--input_exprs", f"image={flat}")
    assert out["class_id"].astype(int).tolist() == y[pick].tolist()


def test_run_with_input_examples(
    reference_run: tuple[Path, str], reference_export: Path, scored: dict[str, np.ndarray]
) -> None:
    x, y = held_out(reference_run[0])
    pick = scored["correct"]
    examples = [{"image": x[i].reshape(784).astype(float).tolist()} for i in pick]
    out = run_cli(reference_export, "serve_examples", "--input_examples", f"examples={examples}")
    assert out["class_id"].astype(int).tolist() == y[pick].tolist()
    assert np.allclose(out["probabilities"], scored["probabilities"][pick], rtol=1e-5, atol=1e-7)


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
def test_tflite_matches_saved_model(good: Path) -> None:
    import tensorflow as tf

    version = good / "export" / "mnist" / "1"
    x, y = held_out(good)
    images = x[:64]
    saved = tf.saved_model.load(str(version)).signatures["serving_default"]
    expected = saved(image=tf.constant(images))
    interpreter = tf.lite.Interpreter(model_path=str(version / "model.tflite"))
    runner = interpreter.get_signature_runner("serving_default")
    assert runner.get_input_details()["image"]["dtype"] == np.uint8
    got = [runner(image=images[i : i + 1]) for i in range(len(images))]
    probabilities = np.concatenate([g["probabilities"] for g in got])
    class_id = np.concatenate([g["class_id"] for g in got])
    assert float(np.max(np.abs(probabilities - expected["probabilities"].numpy()))) < 1e-4
    assert np.array_equal(class_id, expected["class_id"].numpy())
    assert float(np.mean(class_id == y[:64])) > 0.85  # a real model on real digits


def test_model_card(reference_run: tuple[Path, str], reference_export: Path) -> None:
    run_dir = reference_run[0]
    card = json.loads((reference_export / "model_card.json").read_text())
    assert card["config"]["model"]["name"] == "cnn"
    assert card["config"]["data"]["train_size"] == 600
    assert (
        card["data_fingerprint"]
        == durable.read_record(run_dir / "stages" / "data.json")["fingerprint"]
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert card["test_metrics"]["test_accuracy"] == metrics["test_accuracy"]
    assert card["checkpoint_step"] == metrics["checkpoint_step"] == 30
    assert set(card["signatures"]) == {"serving_default", "serve_flat", "serve_examples"}
    # The checkout's commit, marked -dirty when it has uncommitted changes.
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", card["commit"] or ""), card["commit"]
    date = datetime.datetime.fromisoformat(card["date"])
    age = datetime.datetime.now(datetime.timezone.utc) - date
    assert datetime.timedelta(0) <= age < datetime.timedelta(days=1)
    on_disk = {
        str(p.relative_to(reference_export)) for p in reference_export.rglob("*") if p.is_file()
    } - {"model_card.json", durable.MANIFEST}
    assert {"saved_model.pb", "model.keras", "model.h5", "variables/variables.index"} <= on_disk
    assert set(card["files"]) == on_disk
    for name, digest in card["files"].items():
        assert durable.sha256_file(reference_export / name) == digest, name


def test_keras_and_h5_files_give_the_saved_model_probabilities(good: Path) -> None:
    # Every format is the same model: raw uint8 pixels [N, 28, 28] -> probabilities. Loaded with
    # Keras alone, `.keras` and `.h5` must classify real test images as the SavedModel does.
    import keras
    import tensorflow as tf

    version = good / "export" / "mnist" / "1"
    x, y = held_out(good)
    served = tf.saved_model.load(str(version)).signatures["serving_default"](image=tf.constant(x))
    expected, expected_class = served["probabilities"].numpy(), served["class_id"].numpy()
    assert float(np.mean(expected_class == y)) > 0.85  # a real model on real digits
    for name in ("model.keras", "model.h5"):
        model = keras.models.load_model(version / name, compile=False)
        assert (str(model.inputs[0].dtype), model.input_shape) == ("uint8", (None, 28, 28)), name
        probabilities = np.asarray(model(x, training=False))
        assert np.array_equal(np.argmax(probabilities, -1), expected_class), name
        assert float(np.max(np.abs(probabilities - expected))) <= 1e-5, name


def test_keras_file_reloads_with_optimizer_state(
    reference_run: tuple[Path, str], reference_export: Path
) -> None:
    import keras

    step = json.loads((reference_export / "model_card.json").read_text())["checkpoint_step"]
    model = keras.models.load_model(reference_export / "model.keras")
    assert int(model.optimizer.iterations.numpy()) == step == 30
    moments = [v for v in model.optimizer.variables if "momentum" in v.path]
    assert moments and any(np.any(v.numpy() != 0) for v in moments)
    # Training continues from there: one more step on real images counts as step 31.
    train = RunDir(reference_run[0]).prepared_data("x_train", "y_train")
    x, y = train["x_train"][:50], train["y_train"][:50]
    model.train_on_batch(x, y)  # raw pixels: the model owns its preprocessing
    assert int(model.optimizer.iterations.numpy()) == 31


def copy_run(run_dir: Path, cwd: Path, with_export: bool = True) -> Path:
    ignore = None if with_export else shutil.ignore_patterns("export")
    target = cwd / "outputs" / run_dir.name
    shutil.copytree(run_dir, target, ignore=ignore)
    return target


def test_min_accuracy_refuses_to_publish(tmp_path: Path, reference_run: tuple[Path, str]) -> None:
    run_dir = copy_run(reference_run[0], tmp_path, with_export=False)
    accuracy = json.loads((run_dir / "metrics.json").read_text())["test_accuracy"]
    assert accuracy < 0.999
    result = cli(["export", *SMALL, "export.min_accuracy=0.999"], tmp_path)
    assert result.returncode == 1, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and str(accuracy) in message and "0.999" in message
    assert "Traceback" not in result.stderr
    assert not (run_dir / "export" / "mnist" / "1").exists()


def test_export_is_idempotent_and_more_training_adds_a_version(tmp_path: Path) -> None:
    # Cosine restarts: a raised fit.epochs continues the run (the default's one cosine decay is
    # stretched over fit.epochs, so raising it there is a new run).
    args = [*SMALL, "optimizer=adam_restarts"]
    assert cli(["train", *args], tmp_path).returncode == 0
    run_dir = only_run_dir(tmp_path / "outputs")
    model_root = run_dir / "export" / "mnist"
    manifest = (model_root / "1" / durable.MANIFEST).read_bytes()
    result = cli(["export", *args], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "already holds checkpoint step 30" in result.stdout
    assert sorted(p.name for p in model_root.iterdir()) == ["1"]
    assert (model_root / "1" / durable.MANIFEST).read_bytes() == manifest
    result = cli(["train", *args, "fit.epochs=4"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in model_root.iterdir()) == ["1", "2"]
    assert (model_root / "1" / durable.MANIFEST).read_bytes() == manifest
    card = json.loads((model_root / "2" / "model_card.json").read_text())
    assert card["checkpoint_step"] == 40
    assert durable.verify_dir(model_root / "2")["checkpoint_step"] == 40


# Loaded by Python at start-up (through PYTHONPATH) in the export process: the format named by
# TEST_BREAK_EXPORT is written from a copy of the model whose weights are 0.1% off, the way a
# faulty converter would. Only the export check can tell.
BREAK_ONE_FORMAT = """
import os

import keras
import numpy as np

from pipeline import export

FORMAT = os.environ["TEST_BREAK_EXPORT"]


def perturbed(model):
    clone = keras.models.clone_model(model)
    clone.set_weights(
        [w * np.float32(1.001) if w.dtype.kind == "f" else w for w in model.get_weights()]
    )
    return clone


if FORMAT == "saved_model":
    write_saved_model = export.write_saved_model
    export.write_saved_model = lambda model, *args: write_saved_model(perturbed(model), *args)
else:
    save = keras.Model.save

    def save_one_wrong(self, filepath, *args, **kwargs):
        model = perturbed(self) if str(filepath).endswith("." + FORMAT) else self
        return save(model, filepath, *args, **kwargs)

    keras.Model.save = save_one_wrong
"""


@pytest.mark.parametrize("fmt", ["saved_model", "h5"])  # the first format checked, and a later one
def test_an_export_that_fails_its_check_is_not_published(
    tmp_path: Path, reference_run: tuple[Path, str], fmt: str
) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(BREAK_ONE_FORMAT)
    run_dir = copy_run(reference_run[0], tmp_path, with_export=False)
    (run_dir / "stages" / "export.json").unlink()
    model_root = run_dir / "export" / "mnist"
    python_path = os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))
    env = {"PYTHONPATH": python_path, "TEST_BREAK_EXPORT": fmt}
    result = cli(["export", *SMALL], tmp_path, env=env)
    assert result.returncode == 1, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: Export check failed for {fmt} ("), message
    assert "max probability difference" in message and "Nothing was published." in message
    assert "Traceback" not in result.stderr
    assert not model_root.exists() or not list(model_root.iterdir())  # no version, no temp
    assert not list(run_dir.rglob(f"*{durable.TMP_MARK}*"))
    assert not (run_dir / "stages" / "export.json").exists()
    assert durable.read_record(run_dir / "session.json")["state"] == "failed"
    # The same command with a sound writer publishes version 1: the number was not used up.
    result = cli(["export", *SMALL], tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in model_root.iterdir()) == ["1"]
    assert durable.verify_dir(model_root / "1")["checkpoint_step"] == 30
    assert not list(run_dir.rglob(f"*{durable.TMP_MARK}*"))
    card = json.loads((model_root / "1" / "model_card.json").read_text())
    assert card["max_probability_difference"][fmt] <= 1e-5
