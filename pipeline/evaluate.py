"""The evaluate stage: restore a checkpoint into a freshly built model and score the test set.

Besides metrics.json it records the evaluation (`record_evaluation`): the test predictions
(`predictions.npz`, which report.html draws from) and TensorBoard summaries through
`tblog.EventLog` (confusion matrix and worst mistakes as images, the test metrics, the HParams
plugin's session info and the model graph), replacing what an earlier evaluation of the same
step wrote.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from pipeline import checkpoint, durable, tblog
from pipeline.config import flatten
from pipeline.config import hparam_values as hparam_values_of
from pipeline.data import Prepared
from pipeline.errors import PipelineError
from pipeline.fit import evaluate_logits, restore_model
from pipeline.models import ModelConfig, Pixels, build_model, inference_function
from pipeline.rundir import RunDir

if TYPE_CHECKING:
    from pipeline.stages import Context

log = logging.getLogger(__name__)

# What record_evaluation writes to TensorBoard (tests and tools read them by these tags).
WORST = 16  # the most confident mistakes kept in predictions.npz and shown
TAG_CONFUSION = "evaluate/confusion_matrix"
TAG_MISTAKES = "evaluate/worst_mistakes"
TAG_ACCURACY = "evaluate/test_accuracy"
TAG_LOSS = "evaluate/test_loss"
EVALUATE_TAGS = frozenset({TAG_CONFUSION, TAG_MISTAKES, TAG_ACCURACY, TAG_LOSS})
HPARAMS_TAGS = tblog.HPARAMS_TAGS


# ---------------------------------------------------------------- the stage


def is_done(ctx: Context) -> str | None:
    """Done when the evaluate record is of the checkpoint `evaluate.checkpoint` names now."""
    which = ctx.cfg.evaluate.checkpoint
    ckpt = choose_checkpoint(ctx.run.checkpoints, which)
    done = ctx.run.read_stage("evaluate", owner=True)
    if done and done["checkpoint_step"] == ckpt.step and done["checkpoint"] == which:
        accuracy = 100 * done["test_accuracy"]
        return f"evaluate: done (step {ckpt.step}, test accuracy {accuracy:.2f}%); skipped"
    ctx.checkpoint = ckpt  # for run: loaded and verified once
    return None


def run(ctx: Context) -> dict[str, Any]:
    """Score the checkpoint is_done chose; keep metrics.json, predictions.npz and summaries."""
    which = ctx.cfg.evaluate.checkpoint
    ckpt = ctx.checkpoint or choose_checkpoint(ctx.run.checkpoints, which)
    ctx.checkpoint = None
    return run_evaluate(ctx.cfg.model, ctx.pixels(), ctx.data(), ckpt, ctx.run, which)


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
    metrics = {
        "test_loss": loss,
        "test_accuracy": accuracy,
        "checkpoint": which,
        "checkpoint_step": ckpt.step,
        "test_images": int(len(data.arrays["y_test"])),
        "data_fingerprint": data.fingerprint,
    }
    # --- run visuals: predictions.npz and TensorBoard images, hparams, graph
    record_evaluation(
        run,
        ckpt.step,
        which,
        data.arrays["y_test"],
        np.concatenate(batches) if batches else np.zeros((0, 10), np.float32),
        data.arrays["x_test"],
        metrics,
        graph_def=model_graph_def(model),
    )
    durable.write_bytes(run.metrics, _json(metrics))
    # The tutorial's words, then what it leaves out: one line, each fact once.
    log.info(
        "Restored model, accuracy: %5.2f%% (step %d, %s checkpoint; test loss %.4f)",
        100 * accuracy,
        ckpt.step,
        which,
        loss,
    )
    return metrics


# ---------------------------------------------------------------- recording the evaluation


def hparam_values(run: RunDir, which: str) -> dict[str, bool | int | float | str]:
    """The run's hyperparameters (config.hparam_values) with the epochs its fit reached."""
    fit = run.read_stage("fit", owner=True)  # called by the evaluate stage, which holds the lock
    config = run.read_run_record().get("config", {})
    epochs = fit["epochs"] if fit and "epochs" in fit else flatten(config).get("fit.epochs", 0)
    return hparam_values_of(config, epochs, which)


def model_graph_def(model: Any) -> bytes:
    """The serialized GraphDef of the model's inference function (one cheap trace)."""
    concrete = inference_function(model).get_concrete_function()
    return concrete.graph.as_graph_def().SerializeToString()


def record_evaluation(
    run: RunDir,
    step: int,
    which: str,
    labels: np.ndarray,
    logits: np.ndarray,
    images: np.ndarray,
    metrics: dict[str, Any],
    graph_def: bytes | None = None,
) -> None:
    """Save the test predictions and write the evaluation's TensorBoard summaries at `step`.

    Idempotent: summaries an earlier evaluation wrote for the same step (and the run's
    previous hparams and graph, which TensorBoard would otherwise keep the first of) are
    dropped first, so evaluating again never duplicates them."""
    from pipeline import visuals  # matplotlib: only when an evaluation is recorded

    labels = np.asarray(labels, dtype=np.int64)
    probabilities = visuals.softmax(logits).astype(np.float32)
    worst = visuals.worst_mistakes(labels, probabilities, WORST)
    worst_images = np.asarray(images)[worst].reshape(-1, 28, 28).astype(np.uint8)
    durable.write_file(
        run.predictions,
        lambda tmp: np.savez_compressed(
            tmp,
            labels=labels,
            probabilities=probabilities,
            checkpoint_step=np.int64(step),
            worst_index=worst.astype(np.int64),
            worst_images=worst_images,
        ),
    )

    counts = visuals.confusion_matrix(labels, probabilities.argmax(axis=-1))
    title = f"Confusion matrix, checkpoint step {step} ({which})"
    confusion_png = visuals.confusion_matrix_png(counts, title)
    mistakes_png = visuals.mistakes_grid_png(
        worst_images,
        labels[worst],
        probabilities[worst],
        f"Most confident mistakes, checkpoint step {step}",
    )

    tb_dir = run.tensorboard

    def stale(event: Any) -> bool:
        if event.graph_def:
            return graph_def is not None
        tags = {value.tag for value in event.summary.value}
        return bool(tags) and (
            tags <= HPARAMS_TAGS or (event.step == step and tags <= EVALUATE_TAGS)
        )

    tb_dir.mkdir(parents=True, exist_ok=True)
    tblog.drop_events(tb_dir, stale)
    events = tblog.EventLog(tb_dir)
    try:
        events.image(TAG_CONFUSION, confusion_png, step, *visuals.png_size(confusion_png))
        events.image(TAG_MISTAKES, mistakes_png, step, *visuals.png_size(mistakes_png))
        events.scalar(TAG_ACCURACY, metrics["test_accuracy"], step)
        events.scalar(TAG_LOSS, metrics["test_loss"], step)
        created = run.read_run_record().get("created")
        events.hparams(hparam_values(run, which), group_name=run.name, start_time=created)
        if graph_def is not None:
            events.graph(graph_def, step)
    finally:
        events.close()


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
