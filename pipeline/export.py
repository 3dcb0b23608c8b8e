"""The export stage: every deployable format from one checkpoint, verified, then published.

Layout (TensorFlow Serving's): `export/<model_name>/<version>/` is a SavedModel directory, with
`model.keras`, `model.h5`, `model.tflite` and `model_card.json` beside `saved_model.pb`, and
TF Serving's warm-up requests in `assets.extra/tf_serving_warmup_requests`. The version is
written into a temporary directory, each format is reloaded from disk and checked against the
in-memory model on real test images, and only then is the directory renamed into place. A
half-written version never carries a version number.

The warm-up file (PredictRequests for `serving_default` built from real test images with
`tensorflow-serving-api`, the `[serving]` extra) is replayed through the SavedModel before the
version is published: TF Serving refuses to load a version whose warm-up fails. Without the
extra, export says once that no warm-up file was written, and goes on.

`export.tflite_quantize=dynamic|int8` makes `model.tflite` a quantized model (same interface:
uint8 image in, float32 probabilities out). It cannot match the model to 1e-4, so it is checked
by its accuracy on all test images instead, against `export.min_accuracy`; the model card's
`tflite` entry records its size, test accuracy and largest probability difference.

Every format holds the same Keras model, raw pixels (uint8 [N, 28, 28]) to probabilities: the
trained model owns its preprocessing, and `models.with_probabilities` adds the softmax, so each
file stands alone (no code of this package is needed to feed it).
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging as absl_logging

from pipeline import checkpoint, durable, tfstart, versions
from pipeline.config import Config, TFLiteQuantize
from pipeline.data import Prepared
from pipeline.errors import PipelineError
from pipeline.evaluate import choose_checkpoint
from pipeline.fit import make_optimizer, restore_model, restore_optimizer
from pipeline.models import Pixels, build_model, with_probabilities
from pipeline.rundir import RunDir

if TYPE_CHECKING:
    from pipeline.stages import Context

log = logging.getLogger(__name__)
# The TFLite interpreter still ships with TF 2.21; its deprecation notice is noise for users.
warnings.filterwarnings("ignore", message=r".*tf\.lite\.Interpreter is deprecated")
# Keras logs a "legacy format" notice through absl for every .h5 save; HDF5 is asked for here.
absl_logging.set_verbosity(absl_logging.ERROR)
VERIFY_IMAGES = 256
TOLERANCE = {"saved_model": 1e-5, "keras": 1e-5, "h5": 1e-5, "tflite": 1e-4}
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"  # where TF Serving looks for it
# One request per batch size, of the first test images: TF Serving replays each record when it
# loads the version, before serving it, so the first real requests are not the slow ones.
WARMUP_BATCHES = (1, 8, 32)
SERVING_EXTRA = "pip install 'pipeline[serving]'"
CALIBRATION_IMAGES = 200  # training images that set the int8 model's activation ranges
SCORE_BATCH = 256  # images per call when a .tflite model is scored on the test set
_said_no_warmup = False


class ExportVerificationError(PipelineError):
    pass


def published_for_step(run: RunDir, model_name: str, step: int) -> Path | None:
    """An existing version exported from checkpoint `step` that still verifies."""
    for version in reversed(run.export_versions(model_name)):
        path = run.export_version(model_name, version)
        try:
            meta = durable.verify_dir(path)
        except durable.CorruptArtifact as exc:
            log.warning("Export %s failed verification (%s); set aside", path, exc)
            durable.set_aside(path)
            continue
        if meta.get("checkpoint_step") == step:
            return path
    return None


def serving_functions(model: keras.Model) -> dict:
    """Signatures of a raw-pixels-to-probabilities `model` for TF Serving."""

    def classify(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        probabilities = model(pixels, training=False)
        return {
            "probabilities": probabilities,
            "class_id": tf.argmax(probabilities, axis=-1, output_type=tf.int64),
        }

    def as_image(values: tf.Tensor) -> tf.Tensor:
        """Float pixel values 0-255 (flat 784) as the model's raw uint8 [N, 28, 28]."""
        pixels = tf.clip_by_value(tf.round(values), 0.0, 255.0)
        return tf.cast(tf.reshape(pixels, (-1, 28, 28)), tf.uint8)

    def serve(image: tf.Tensor) -> dict[str, tf.Tensor]:
        return classify(image)

    def serve_flat(image: tf.Tensor) -> dict[str, tf.Tensor]:
        return classify(as_image(image))

    def serve_examples(examples: tf.Tensor) -> dict[str, tf.Tensor]:
        parsed = tf.io.parse_example(examples, {"image": tf.io.FixedLenFeature([784], tf.float32)})
        return classify(as_image(parsed["image"]))

    return {
        "serving_default": (serve, [tf.TensorSpec([None, 28, 28], tf.uint8, name="image")]),
        "serve_flat": (serve_flat, [tf.TensorSpec([None, 784], tf.float32, name="image")]),
        "serve_examples": (serve_examples, [tf.TensorSpec([None], tf.string, name="examples")]),
    }


def write_saved_model(model: keras.Model, path: Path) -> None:
    archive = keras.export.ExportArchive()
    for name, (fn, signature) in serving_functions(model).items():
        archive.add_endpoint(name=name, fn=fn, input_signature=signature)
    try:
        archive.write_out(str(path), verbose=False)
    except tf.errors.OpError as exc:
        # TensorFlow's C++ file layer reports a full disk as a status message, not an errno.
        for text, code in (("No space left", errno.ENOSPC), ("File too large", errno.EFBIG)):
            if text in str(exc):
                raise OSError(code, text) from exc
        raise


def _float(converter: Any, calibration: np.ndarray | None) -> None:
    """No quantization: float32 weights and arithmetic, the model's own numbers."""


def _dynamic(converter: Any, calibration: np.ndarray | None) -> None:
    """Dynamic-range quantization: int8 weights, float activations; no calibration data."""
    converter.optimizations = [tf.lite.Optimize.DEFAULT]


def _int8(converter: Any, calibration: np.ndarray | None) -> None:
    """Full-integer quantization: int8 weights and activations, whose ranges are measured on
    `calibration` (raw training images). Only int8 kernels are allowed, so an op without one
    fails the conversion instead of silently staying float. The interface does not change: the
    input stays the raw uint8 image and the outputs float32 probabilities and int64 class ids
    (the model quantizes and dequantizes inside), so callers feed it as the float model."""
    if calibration is None or not len(calibration):
        raise ValueError("int8 quantization needs calibration images")
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: (
        {"image": calibration[i : i + 1]} for i in range(len(calibration))
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]


# export.tflite_quantize -> converter settings (a test checks every choice has an entry).
QUANTIZERS: dict[TFLiteQuantize, Callable[[Any, np.ndarray | None], None]] = {
    TFLiteQuantize.none: _float,
    TFLiteQuantize.dynamic: _dynamic,
    TFLiteQuantize.int8: _int8,
}


def calibration_images(data: Prepared) -> np.ndarray:
    """The representative dataset of int8 quantization: the first training images, raw."""
    return data.arrays["x_train"][:CALIBRATION_IMAGES]


def write_tflite(
    saved_model: Path,
    path: Path,
    quantize: TFLiteQuantize = TFLiteQuantize.none,
    calibration: np.ndarray | None = None,
) -> None:
    converter = tf.lite.TFLiteConverter.from_saved_model(
        str(saved_model), signature_keys=["serving_default"]
    )
    QUANTIZERS[TFLiteQuantize(quantize)](converter, calibration)
    with tfstart.quiet_native():  # native notes to fd 2 (tfstart.CHATTER) are dropped
        content = converter.convert()
    path.write_bytes(content)


def save_h5(model: keras.Model, path: Path) -> None:
    """HDF5 crashes the process (SIGSEGV, found by --disk-faults) when its own writes fail, so
    it never touches the run's disk: it writes in the system's temporary directory, and the
    bytes are copied with plain Python I/O, which raises a clear error on a failing disk."""
    with tempfile.TemporaryDirectory() as scratch:
        staged = Path(scratch) / path.name
        model.save(staged)
        with durable.naming(path):
            path.write_bytes(staged.read_bytes())


def reload_predictions(fmt: str, path: Path, images: np.ndarray) -> np.ndarray:
    """Probabilities for `images` (uint8 N×28×28) from the exported file at `path`."""
    if fmt == "saved_model":
        loaded = tf.saved_model.load(str(path))
        out = loaded.signatures["serving_default"](image=tf.constant(images))
        return out["probabilities"].numpy()
    if fmt == "tflite":
        # From bytes, not the path: the interpreter mmaps a path, and a disk error on a mapped
        # page kills the process with SIGBUS instead of raising (found by --disk-faults).
        with durable.naming(path):
            content = path.read_bytes()
        with tfstart.quiet_native():  # "Created TensorFlow Lite XNNPACK delegate for CPU"
            interpreter = tf.lite.Interpreter(model_content=content)
            runner = interpreter.get_signature_runner("serving_default")
            return np.concatenate(
                [runner(image=images[i : i + 1])["probabilities"] for i in range(len(images))]
            )
    if fmt == "h5":  # read with Python, loaded from a copy: HDF5 never reads the run's disk
        with durable.naming(path):
            content = path.read_bytes()
        with tempfile.TemporaryDirectory() as scratch:
            staged = Path(scratch) / path.name
            staged.write_bytes(content)
            model = keras.models.load_model(staged, compile=False)
    else:
        model = keras.models.load_model(path, compile=False)
    return np.asarray(model(images, training=False))


def verify(fmt: str, path: Path, images: np.ndarray, expected: np.ndarray) -> float:
    got = reload_predictions(fmt, path, images)
    max_diff = float(np.max(np.abs(got - expected)))
    same_class = np.array_equal(np.argmax(got, -1), np.argmax(expected, -1))
    if not same_class or max_diff > TOLERANCE[fmt]:
        raise ExportVerificationError(
            f"Export check failed for {fmt} ({path.name}): class ids "
            f"{'match' if same_class else 'differ'}, max probability difference {max_diff:.2e} "
            f"(allowed {TOLERANCE[fmt]:.0e}). Nothing was published."
        )
    return max_diff


def tflite_predictions(content: bytes, images: np.ndarray) -> np.ndarray:
    """Probabilities for `images` from the .tflite model `content`, SCORE_BATCH at a time."""
    with tfstart.quiet_native():
        interpreter = tf.lite.Interpreter(model_content=content)
        runner = interpreter.get_signature_runner("serving_default")
        return np.concatenate(
            [
                runner(image=images[i : i + SCORE_BATCH])["probabilities"]
                for i in range(0, len(images), SCORE_BATCH)
            ]
        )


def score_tflite(
    path: Path,
    quantize: TFLiteQuantize,
    images: np.ndarray,
    labels: np.ndarray,
    expected: np.ndarray,
) -> dict[str, Any]:
    """The model card's `tflite` entry: size, test accuracy and the largest probability
    difference from the in-memory model (`expected`), over all test images."""
    with durable.naming(path):
        content = path.read_bytes()
    got = tflite_predictions(content, images)
    return {
        "quantize": str(quantize),
        "bytes": len(content),
        "test_images": len(labels),
        "test_accuracy": float(np.mean(np.argmax(got, -1) == labels)),
        "max_abs_diff_vs_model": float(np.max(np.abs(got - expected))),
    }


def _say_no_warmup() -> None:
    global _said_no_warmup
    if not _said_no_warmup:
        _said_no_warmup = True
        log.info(
            "Export: no TF Serving warm-up file (%s) is written: tensorflow-serving-api is not "
            "installed (%s)",
            WARMUP_FILE,
            SERVING_EXTRA,
        )


def write_warmup(path: Path, batches: list[np.ndarray], model_name: str, spec: Any) -> bool:
    """TF Serving's warm-up file at `path`: a TFRecord file of PredictionLog records, one
    PredictRequest for `serving_default` (input `spec`) per batch. False, said once per process,
    without tensorflow-serving-api. Written in the system's temporary directory and copied with
    plain Python I/O (as .h5), so a failing disk raises a clear OSError."""
    try:
        from tensorflow_serving.apis import predict_pb2, prediction_log_pb2
    except ImportError:
        _say_no_warmup()
        return False
    with tempfile.TemporaryDirectory() as scratch:
        staged = Path(scratch) / path.name
        with tf.io.TFRecordWriter(str(staged)) as writer:
            for batch in batches:
                request = predict_pb2.PredictRequest()
                request.model_spec.name = model_name
                request.model_spec.signature_name = "serving_default"
                request.inputs[spec.name].CopyFrom(
                    tf.make_tensor_proto(batch.astype(spec.dtype.as_numpy_dtype))
                )
                record = prediction_log_pb2.PredictionLog(
                    predict_log=prediction_log_pb2.PredictLog(request=request)
                )
                writer.write(record.SerializeToString())
        content = staged.read_bytes()
    path.parent.mkdir(exist_ok=True)
    with durable.naming(path):
        path.write_bytes(content)
    return True


def verify_warmup(saved_model: Path, path: Path, expected: np.ndarray) -> int:
    """Replay the warm-up file at `path` as TF Serving does when it loads the version (which it
    refuses to do if a request fails): each request through its signature of the SavedModel,
    whose probabilities must be those of the first `expected` rows. Returns the request count."""
    from google.protobuf.message import DecodeError
    from tensorflow_serving.apis import prediction_log_pb2

    with durable.naming(path):
        content = path.read_bytes()
    with tempfile.TemporaryDirectory() as scratch:
        staged = Path(scratch) / path.name
        staged.write_bytes(content)
        try:
            records = [r.numpy() for r in tf.data.TFRecordDataset(str(staged))]
        except tf.errors.OpError as exc:
            raise ExportVerificationError(
                f"Export check failed for the warm-up file ({WARMUP_FILE}): {exc.message}. "
                "Nothing was published."
            ) from exc
    loaded = tf.saved_model.load(str(saved_model))
    for raw in records:
        try:
            request = prediction_log_pb2.PredictionLog.FromString(raw).predict_log.request
            signature = loaded.signatures[request.model_spec.signature_name]
            inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
            got = signature(**inputs)["probabilities"].numpy()
        except (DecodeError, KeyError, TypeError, ValueError, tf.errors.OpError) as exc:
            raise ExportVerificationError(
                f"Export check failed for the warm-up file ({WARMUP_FILE}): a request does not "
                f"run on the SavedModel ({exc!r}). Nothing was published."
            ) from exc
        max_diff = float(np.max(np.abs(got - expected[: len(got)])))
        if max_diff > TOLERANCE["saved_model"]:
            raise ExportVerificationError(
                f"Export check failed for the warm-up file ({WARMUP_FILE}): a request's "
                f"probabilities differ by {max_diff:.2e}. Nothing was published."
            )
    if not records:
        raise ExportVerificationError(
            f"Export check failed: the warm-up file ({WARMUP_FILE}) holds no request. "
            "Nothing was published."
        )
    return len(records)


def git_commit() -> str | None:
    """The source commit (with `-dirty` for uncommitted changes), if this package runs from
    its own git checkout; None for an installed copy."""
    checkout = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=checkout, timeout=5, check=True
        ).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != checkout:
            return None
        return git("describe", "--always", "--dirty", "--abbrev=40")
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------- the stage


def is_done(ctx: Context) -> str | None:
    """Never skipped as a stage: `run_export` itself finds a version already published for the
    chosen checkpoint (and verifies it) instead of exporting again."""
    return None


def run(ctx: Context) -> dict[str, Any] | None:
    """Export the checkpoint `evaluate.checkpoint` names, with its test metrics (those of the
    evaluate record, when they are of that checkpoint)."""
    ckpt = choose_checkpoint(ctx.run.checkpoints, ctx.cfg.evaluate.checkpoint)
    metrics = ctx.run.read_stage("evaluate", owner=True)
    if metrics and metrics["checkpoint_step"] != ckpt.step:
        metrics = None
    result = run_export(ctx.cfg, ctx.pixels(), ctx.data(), ckpt, ctx.run, metrics)
    done = ctx.run.read_stage("export", owner=True)
    if done is None or done["checkpoint_step"] != ckpt.step:
        # Also when the version was already published and only this record was lost.
        return result
    return None


def run_export(
    cfg: Config,
    pixels: Pixels,
    data: Prepared,
    ckpt: checkpoint.Checkpoint,
    run: RunDir,
    metrics: dict[str, Any] | None,
) -> dict[str, Any]:
    """Publish a new verified version for `ckpt`, or return the one already published."""
    model_name = cfg.export.model_name
    existing = published_for_step(run, model_name, ckpt.step)
    if existing is not None:
        log.info("Export: %s already holds checkpoint step %d", existing, ckpt.step)
        return {"path": str(existing), "checkpoint_step": ckpt.step, "skipped": True}
    accuracy = (metrics or {}).get("test_accuracy")
    if cfg.export.min_accuracy is not None:
        if accuracy is None:
            raise ExportVerificationError(
                f"Not exported: checkpoint step {ckpt.step} has no test metrics to compare with "
                f"export.min_accuracy={cfg.export.min_accuracy}; run the evaluate stage first."
            )
        if accuracy < cfg.export.min_accuracy:
            raise ExportVerificationError(
                f"Not exported: test accuracy {accuracy:.4f} is below export.min_accuracy="
                f"{cfg.export.min_accuracy}. Train longer or lower the threshold."
            )
    steps_per_epoch = -(-len(data.arrays["y_train"]) // cfg.fit.batch_size)
    trained = build_model(cfg.model, pixels)
    restore_model(trained, ckpt.arrays)
    optimizer = make_optimizer(cfg.optimizer, steps_per_epoch, cfg.fit.epochs)
    restore_optimizer(trained, optimizer, ckpt.arrays)
    model = with_probabilities(trained)
    # Compiled with the checkpoint's optimizer state: model.fit(raw_images, labels) on the
    # loaded .keras file continues training where the run stopped.
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=["accuracy"],
    )
    images = data.arrays["x_test"][:VERIFY_IMAGES]
    expected = np.asarray(model(images, training=False))
    quantize = TFLiteQuantize(cfg.export.tflite_quantize)
    diffs: dict[str, float] = {}

    def fill(tmp: Path) -> None:
        write_saved_model(model, tmp)
        diffs["saved_model"] = verify("saved_model", tmp, images, expected)
        warmup = None
        spec = serving_functions(model)["serving_default"][1][0]
        batches = sorted({min(n, len(images)) for n in WARMUP_BATCHES})
        if write_warmup(tmp / WARMUP_FILE, [images[:n] for n in batches], model_name, spec):
            requests = verify_warmup(tmp, tmp / WARMUP_FILE, expected)
            warmup = {"file": WARMUP_FILE, "requests": requests, "batch_sizes": batches}
        files = {"keras": tmp / "model.keras"}
        model.save(files["keras"])
        if cfg.export.h5:
            files["h5"] = tmp / "model.h5"
            save_h5(model, files["h5"])
        tflite = None
        if cfg.export.tflite:
            files["tflite"] = tmp / "model.tflite"
            write_tflite(tmp, files["tflite"], quantize, calibration_images(data))
        for fmt, path in files.items():
            if fmt == "tflite" and quantize != TFLiteQuantize.none:
                continue  # cannot match to 1e-4: checked by its test accuracy below
            diffs[fmt] = verify(fmt, path, images, expected)
        if cfg.export.tflite:
            x_test, y_test = data.arrays["x_test"], data.arrays["y_test"]
            reference = np.concatenate(
                [
                    np.asarray(model(x_test[i : i + SCORE_BATCH], training=False))
                    for i in range(0, len(x_test), SCORE_BATCH)
                ]
            )
            tflite = score_tflite(files["tflite"], quantize, x_test, y_test, reference)
            # Said on the console only for a quantized model: a float one matches the model
            # (its difference is in the "published" line), so the line would repeat facts.
            log.log(
                logging.DEBUG if quantize == TFLiteQuantize.none else logging.INFO,
                "Export: model.tflite (quantize=%s) %d bytes, test accuracy %.4f, max "
                "probability difference from the model %.1e",
                quantize,
                tflite["bytes"],
                tflite["test_accuracy"],
                tflite["max_abs_diff_vs_model"],
            )
            floor = cfg.export.min_accuracy
            if quantize != TFLiteQuantize.none and floor is not None:
                if tflite["test_accuracy"] < floor:
                    raise ExportVerificationError(
                        f"Not exported: the {quantize}-quantized TFLite model's test accuracy "
                        f"{tflite['test_accuracy']:.4f} is below export.min_accuracy={floor} "
                        f"(the model's: {accuracy:.4f}). Nothing was published. Try another "
                        "export.tflite_quantize (none keeps the float model), or lower the "
                        "threshold."
                    )
        card = {
            "model_name": cfg.export.model_name,
            "checkpoint_step": ckpt.step,
            "config": _plain(cfg),
            "data_fingerprint": data.fingerprint,
            "data_source": data.source,
            "test_metrics": metrics,
            "keras_h5_tflite": "image uint8[N,28,28] raw pixels -> probabilities float32[N,10]",
            "signatures": {
                "serving_default": "image uint8[N,28,28] raw pixels -> probabilities "
                "float32[N,10], class_id int64[N]",
                "serve_flat": "image float32[N,784] raw pixels 0-255 (rounded) -> same outputs",
                "serve_examples": "examples: serialized tf.train.Example with float feature "
                "'image' (784 raw pixels 0-255) -> same outputs",
            },
            "max_probability_difference": diffs,
            "tflite": tflite,
            "serving_warmup": warmup,
            "commit": git_commit(),
            "versions": versions.current(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "files": {
                str(p.relative_to(tmp)): durable.sha256_file(p)
                for p in sorted(tmp.rglob("*"))
                if p.is_file()
            },
        }
        (tmp / "model_card.json").write_text(json.dumps(card, indent=2, sort_keys=True))
        durable.failpoint("export_before_publish")

    version = (run.export_versions(model_name) or [0])[-1] + 1
    final = run.export_version(model_name, version)
    durable.write_dir(final, fill, {"checkpoint_step": ckpt.step, "diffs": diffs})
    log.info(
        "Export: published %s (max probability differences %s)",
        final,
        ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()),
    )
    return {
        "path": str(final),
        "version": version,
        "checkpoint_step": ckpt.step,
        "max_probability_difference": diffs,
    }


def _plain(cfg: Config) -> dict[str, Any]:
    from pipeline.config import as_dict

    return as_dict(cfg)
