"""What TF Serving and TFLite users expect beside the model: the warm-up file in every SavedModel
version (replayed here with TensorFlow and tensorflow-serving-api alone), and quantized TFLite
models (`export.tflite_quantize`) reported in the model card and held to `export.min_accuracy`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, only_run_dir

from pipeline import durable
from pipeline.rundir import RunDir

# A tiny MLP run with every format, TFLite (float) included: about 60% on its 200 test images.
ARGS = [
    "data=sample",
    "model=mlp",
    "data.train_size=600",
    "data.val_fraction=0.2",
    "data.test_size=200",
    "fit.batch_size=50",
    "fit.epochs=1",
    "fit.log_every_steps=2",
    "checkpoint.every_steps=0",
]
WARMUP = "assets.extra/tf_serving_warmup_requests"

# Run as `python -c` with TensorFlow and tensorflow-serving-api only (no code of this package):
# what TF Serving does with the file when it loads the version. Prints one JSON line per request
# and saves its input and output class ids as .npy files in argv[2].
REPLAY = """
import json, sys
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

version, out = Path(sys.argv[1]), Path(sys.argv[2])
signatures = tf.saved_model.load(str(version)).signatures
path = version / "assets.extra" / "tf_serving_warmup_requests"
for i, raw in enumerate(tf.data.TFRecordDataset(str(path))):
    log = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
    request = log.predict_log.request
    inputs = {name: tf.make_ndarray(proto) for name, proto in request.inputs.items()}
    result = signatures[request.model_spec.signature_name](
        **{name: tf.constant(value) for name, value in inputs.items()}
    )
    np.save(out / f"image_{i}.npy", inputs["image"])
    np.save(out / f"class_id_{i}.npy", result["class_id"].numpy())
    print(json.dumps({
        "kind": log.WhichOneof("log_type"),
        "model": request.model_spec.name,
        "signature": request.model_spec.signature_name,
        "inputs": sorted(inputs),
        "dtype": str(inputs["image"].dtype),
        "shape": list(inputs["image"].shape),
        "probability_sums": result["probabilities"].numpy().sum(-1).tolist(),
        "pipeline_imported": any(m.split(".")[0] == "pipeline" for m in sys.modules),
    }))
"""

# Loaded by Python at start-up (through PYTHONPATH) in the export process, per TEST_SERVING_HOOK:
# `no_serving` makes tensorflow-serving-api unimportable (as without the [serving] extra);
# `blank_calibration` calibrates the int8 model on black images, so its activation ranges are
# wrong and it classifies badly (the float model is unchanged).
HOOKS = """
import os
import sys

import numpy as np

HOOK = os.environ["TEST_SERVING_HOOK"]
if HOOK == "no_serving":
    sys.modules["tensorflow_serving"] = None
elif HOOK == "blank_calibration":
    from pipeline import export

    export.calibration_images = lambda data: np.zeros((50, 28, 28), np.uint8)
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("serving")
    result = cli(["train", *ARGS], cwd)
    assert result.returncode == 0, result.stderr
    return only_run_dir(cwd / "outputs")


def card(version: Path) -> dict:
    return json.loads((version / "model_card.json").read_text())


def export_copy(
    run_dir: Path, cwd: Path, overrides: list[str], hook: str | None = None
) -> tuple[subprocess.CompletedProcess, Path]:
    """`python -m pipeline export` on a copy of `run_dir` without its export (in `cwd`)."""
    target = cwd / "outputs" / run_dir.name
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("export"))
    (target / "stages" / "export.json").unlink()
    env = None
    if hook:
        hooks = cwd / "hooks"
        hooks.mkdir()
        (hooks / "sitecustomize.py").write_text(HOOKS)
        python_path = os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))
        env = {"PYTHONPATH": python_path, "TEST_SERVING_HOOK": hook}
    return cli(["export", *ARGS, *overrides], cwd, env=env), target


def tflite_accuracy(path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    import tensorflow as tf

    runner = tf.lite.Interpreter(model_path=str(path)).get_signature_runner("serving_default")
    assert runner.get_input_details()["image"]["dtype"] == np.uint8  # raw pixels, as the model
    class_id = np.concatenate(
        [runner(image=images[i : i + 50])["class_id"] for i in range(0, len(images), 50)]
    )
    return float(np.mean(class_id == labels))


def test_warmup_file_replays_through_the_saved_model(trained: Path, tmp_path: Path) -> None:
    import keras

    version = trained / "export" / "mnist" / "1"
    durable.verify_dir(version)  # the warm-up file is in the manifest: checked like the rest
    manifest = json.loads((version / durable.MANIFEST).read_text())
    assert WARMUP in manifest["data"]["files"]
    assert card(version)["files"][WARMUP] == durable.sha256_file(version / WARMUP)
    assert card(version)["serving_warmup"] == {
        "file": WARMUP,
        "requests": 3,
        "batch_sizes": [1, 8, 32],
    }

    replay = subprocess.run(
        [sys.executable, "-c", REPLAY, str(version), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert replay.returncode == 0, replay.stderr[-3000:]
    requests = [json.loads(line) for line in replay.stdout.splitlines() if line.startswith("{")]
    assert [r["shape"] for r in requests] == [[1, 28, 28], [8, 28, 28], [32, 28, 28]]
    for r in requests:
        assert r["kind"] == "predict_log" and r["model"] == "mnist", r
        assert (r["signature"], r["inputs"], r["dtype"]) == ("serving_default", ["image"], "uint8")
        assert np.allclose(r["probability_sums"], 1.0, atol=1e-5)
        assert not r["pipeline_imported"]
    # Real test images, answered as the model answers them.
    x_test = RunDir(trained).prepared_data("x_test")["x_test"]
    model = keras.models.load_model(version / "model.keras", compile=False)
    for i, r in enumerate(requests):
        n = r["shape"][0]
        assert np.array_equal(np.load(tmp_path / f"image_{i}.npy"), x_test[:n])
        expected = np.argmax(np.asarray(model(x_test[:n], training=False)), -1)
        assert np.array_equal(np.load(tmp_path / f"class_id_{i}.npy"), expected)


def test_float_tflite_is_reported_in_the_model_card(trained: Path) -> None:
    version = trained / "export" / "mnist" / "1"
    report = card(version)["tflite"]
    metrics = json.loads((trained / "metrics.json").read_text())
    assert report["quantize"] == "none" and report["test_images"] == 200
    assert report["bytes"] == (version / "model.tflite").stat().st_size
    assert report["max_abs_diff_vs_model"] <= 1e-4
    assert report["test_accuracy"] == pytest.approx(metrics["test_accuracy"], abs=0.011)
    assert "tflite" in card(version)["max_probability_difference"]  # checked to 1e-4 as before


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
@pytest.mark.parametrize("quantize", ["dynamic", "int8"])
def test_quantized_tflite_is_smaller_and_scored(
    trained: Path, tmp_path: Path, quantize: str
) -> None:
    float_report = card(trained / "export" / "mnist" / "1")["tflite"]
    result, run_dir = export_copy(
        trained, tmp_path, [f"export.tflite_quantize={quantize}", "export.min_accuracy=0.3"]
    )
    assert result.returncode == 0, result.stderr
    assert f"model.tflite (quantize={quantize})" in result.stdout
    version = run_dir / "export" / "mnist" / "1"
    durable.verify_dir(version)
    report = card(version)["tflite"]
    size = (version / "model.tflite").stat().st_size
    assert report["quantize"] == quantize and report["bytes"] == size
    assert size < float_report["bytes"] / 2, (size, float_report["bytes"])  # about 4x smaller
    assert 0 < report["max_abs_diff_vs_model"] < 0.2
    assert abs(report["test_accuracy"] - float_report["test_accuracy"]) <= 0.05
    # The reported accuracy is the file's own, measured here with the TFLite interpreter alone.
    test = RunDir(run_dir).prepared_data("x_test", "y_test")
    got = tflite_accuracy(version / "model.tflite", test["x_test"], test["y_test"])
    assert got == pytest.approx(report["test_accuracy"])
    # Quantized, it is not held to the float tolerance: its test accuracy is its check.
    assert "tflite" not in card(version)["max_probability_difference"]


def test_quantized_model_below_min_accuracy_is_not_published(trained: Path, tmp_path: Path) -> None:
    # export.min_accuracy at the float model's own accuracy: the float check passes, the badly
    # calibrated int8 model (about 10%) does not.
    accuracy = json.loads((trained / "metrics.json").read_text())["test_accuracy"]
    overrides = ["export.tflite_quantize=int8", f"export.min_accuracy={accuracy}"]
    result, run_dir = export_copy(trained, tmp_path, overrides, hook="blank_calibration")
    assert result.returncode == 1, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: Not exported: the int8-quantized TFLite model's"), message
    assert f"export.min_accuracy={accuracy}" in message and "Nothing was published" in message
    assert "Traceback" not in result.stderr
    model_root = run_dir / "export" / "mnist"
    assert not model_root.exists() or not list(model_root.iterdir())  # no version, no temp
    assert not list(run_dir.rglob(f"*{durable.TMP_MARK}*"))
    # Calibrated on training images, and with a threshold it meets, it publishes version 1.
    result = cli(
        ["export", *ARGS, "export.tflite_quantize=int8", "export.min_accuracy=0.3"], tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in model_root.iterdir()) == ["1"]
    assert card(model_root / "1")["tflite"]["test_accuracy"] >= accuracy - 0.05


def test_without_tensorflow_serving_api_export_says_so_once(trained: Path, tmp_path: Path) -> None:
    result, run_dir = export_copy(trained, tmp_path, [], hook="no_serving")
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stdout.splitlines() if "no TF Serving warm-up file" in line]
    assert len(said) == 1, result.stdout
    assert "pip install 'pipeline[serving]'" in said[0]
    version = run_dir / "export" / "mnist" / "1"
    durable.verify_dir(version)
    assert not (version / "assets.extra").exists()
    assert card(version)["serving_warmup"] is None


def test_every_quantize_choice_has_a_converter() -> None:
    from pipeline import export
    from pipeline.config import TFLiteQuantize

    assert set(export.QUANTIZERS) == set(TFLiteQuantize)


def test_quantize_needs_tflite(tmp_path: Path) -> None:
    result = cli(["train", *ARGS, "export.tflite=false", "export.tflite_quantize=int8"], tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "error: export.tflite_quantize='int8' is not allowed: none when export.tflite=false "
        "(a quantized model is a .tflite file)"
    )
    result = cli(["train", *ARGS, "export.tflite_quantize=int4"], tmp_path)
    assert result.returncode != 0
    assert "one of none, dynamic, int8" in result.stderr
    assert not (tmp_path / "outputs").exists()
