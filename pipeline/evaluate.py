"""The evaluate stage: restore a checkpoint into a freshly built model and score the test set."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from pipeline import checkpoint, durable
from pipeline.data import Prepared
from pipeline.errors import PipelineError
from pipeline.fit import evaluate_logits, restore_model
from pipeline.models import ModelConfig, Pixels, build_model, inference_function
from pipeline.rundir import RunDir

log = logging.getLogger(__name__)


def choose_checkpoint(ckpt_root: Path, which: str, owner: bool = True) -> checkpoint.Checkpoint:
    """The latest good checkpoint; with which=best the best one it records; with a step number
    that step's. A reader that does not own the run (`owner=False`, e.g. a notebook) leaves
    damaged checkpoints where they are."""
    latest = checkpoint.load_latest(ckpt_root, owner=owner)
    if latest is None:
        raise PipelineError(
            f"No checkpoint to evaluate in {ckpt_root}. Run the fit stage first "
            "(python -m pipeline train ...)."
        )
    if which == "latest":
        return latest
    if which == "best":
        step = latest.meta["loop"].get("best_step")
        if step is None or step == latest.step:
            return latest
    else:
        step = int(which)
        if step == latest.step:
            return latest
    chosen = checkpoint.load_latest(ckpt_root, only_step=step, owner=owner)
    if chosen is None:
        kept = checkpoint.committed_steps(ckpt_root)
        raise PipelineError(
            f"Checkpoint step {step} ({which}) is missing or damaged in {ckpt_root}; the run "
            f"keeps steps {kept}. Use evaluate.checkpoint=latest, best or one of those."
        )
    return chosen


def run_evaluate(
    model_cfg: ModelConfig,
    pixels: Pixels,
    data: Prepared,
    ckpt: checkpoint.Checkpoint,
    run: RunDir,
    which: str,
) -> dict[str, Any]:
    model = build_model(model_cfg, pixels)
    restore_model(model, ckpt.arrays)
    logits = inference_function(model)
    # --- run visuals: keep each batch's logits (no second pass) for record_evaluation below.
    batches: list[np.ndarray] = []

    def kept_logits(x: tf.Tensor) -> tf.Tensor:
        out = logits(x)
        batches.append(out.numpy())
        return out

    loss, accuracy = evaluate_logits(kept_logits, data.arrays["x_test"], data.arrays["y_test"])
    print(f"Restored model, accuracy: {100 * accuracy:5.2f}%", flush=True)
    metrics = {
        "test_loss": loss,
        "test_accuracy": accuracy,
        "checkpoint": which,
        "checkpoint_step": ckpt.step,
        "test_images": int(len(data.arrays["y_test"])),
        "data_fingerprint": data.fingerprint,
    }
    # --- run visuals: predictions.npz and TensorBoard images, hparams, graph (pipeline/report.py)
    from pipeline import report

    report.record_evaluation(
        run,
        ckpt.step,
        which,
        data.arrays["y_test"],
        np.concatenate(batches) if batches else np.zeros((0, 10), np.float32),
        data.arrays["x_test"],
        metrics,
        graph_def=report.model_graph_def(model),
    )
    durable.write_bytes(run.metrics, _json(metrics))
    log.info(
        "Evaluate: step %d (%s), test loss %.4f, test accuracy %.4f",
        ckpt.step,
        which,
        loss,
        accuracy,
    )
    return metrics


def _json(obj: Any) -> bytes:
    import json

    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
