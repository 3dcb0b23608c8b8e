"""The export stage: every deployable format from one checkpoint, verified, then published.

Layout (TensorFlow Serving's): `export/<model_name>/<version>/` is a SavedModel directory, with
`model.keras`, `model.h5`, `model.tflite` and `model_card.json` beside `saved_model.pb`. The
version is written into a temporary directory, each format is reloaded from disk and checked
against the in-memory model on real test images, and only then is the directory renamed into
place. A half-written version never carries a version number.

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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging as absl_logging

from pipeline import checkpoint, durable, tfstart, versions
from pipeline.config import Config
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


def write_tflite(saved_model: Path, path: Path) -> None:
    converter = tf.lite.TFLiteConverter.from_saved_model(
        str(saved_model), signature_keys=["serving_default"]
    )
    path.write_bytes(converter.convert())


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
    diffs: dict[str, float] = {}

    def fill(tmp: Path) -> None:
        write_saved_model(model, tmp)
        diffs["saved_model"] = verify("saved_model", tmp, images, expected)
        files = {"keras": tmp / "model.keras"}
        model.save(files["keras"])
        if cfg.export.h5:
            files["h5"] = tmp / "model.h5"
            save_h5(model, files["h5"])
        if cfg.export.tflite:
            files["tflite"] = tmp / "model.tflite"
            write_tflite(tmp, files["tflite"])
        for fmt, path in files.items():
            diffs[fmt] = verify(fmt, path, images, expected)
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
