"""Pictures of a run: numpy in, PNG bytes out. No files, no TensorFlow, no global state.

Figures are drawn with matplotlib's object API on an Agg canvas (no display, no pyplot state)
and saved as RGB PNGs through Pillow, so the same arrays give the same bytes and the pixel size
is exactly `figsize * DPI`.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from PIL import Image

CLASSES = 10
DPI = 100
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_BLUES = ("#f7fbff", "#08306b")  # diagonal: right answers
_REDS = ("#fff5f0", "#a50f15")  # off the diagonal: mistakes
_TRAIN, _VAL = "#1f77b4", "#d62728"


# ---------------------------------------------------------------- numbers


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def confusion_matrix(
    labels: np.ndarray, predicted: np.ndarray, classes: int = CLASSES
) -> np.ndarray:
    """counts[true, predicted] as int64."""
    labels = np.asarray(labels, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    if labels.shape != predicted.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predicted.shape} differ")
    flat = np.bincount(labels * classes + predicted, minlength=classes * classes)
    return flat[: classes * classes].reshape(classes, classes)


def per_class_metrics(counts: np.ndarray) -> list[dict[str, Any]]:
    """One row per class: support (true count), predicted count, correct, precision, recall,
    f1. A ratio with a zero denominator is None (undefined), not 0."""
    counts = np.asarray(counts)
    rows = []
    for c in range(counts.shape[0]):
        correct = int(counts[c, c])
        support = int(counts[c].sum())
        predicted = int(counts[:, c].sum())
        precision = correct / predicted if predicted else None
        recall = correct / support if support else None
        if precision is None or recall is None:
            f1 = None
        else:
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append(
            {
                "class": c,
                "support": support,
                "predicted": predicted,
                "correct": correct,
                "precision": precision,
                "recall": recall,
                "f1": f1,
            }
        )
    return rows


def worst_mistakes(labels: np.ndarray, probabilities: np.ndarray, k: int = 16) -> np.ndarray:
    """Indices of the `k` wrong predictions made with the highest confidence, most confident
    first (ties: lower index first)."""
    probabilities = np.asarray(probabilities)
    predicted = probabilities.argmax(axis=-1)
    wrong = np.flatnonzero(predicted != np.asarray(labels))
    confidence = probabilities[wrong, predicted[wrong]]
    order = np.lexsort((wrong, -confidence))
    return wrong[order][:k]


def caption(true: int, predicted: int, confidence: float) -> str:
    return f"true {true} / pred {predicted} ({confidence:.2f})"


# ---------------------------------------------------------------- PNG plumbing


def _png(fig: Figure) -> bytes:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    out = io.BytesIO()
    Image.fromarray(rgba[..., :3].copy()).save(out, format="PNG", optimize=True)
    return out.getvalue()


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; ValueError if `png` is not a PNG."""
    if png[:8] != PNG_SIGNATURE or png[12:16] != b"IHDR":
        raise ValueError("not a PNG image")
    width, height = struct.unpack(">II", png[16:24])
    return width, height


def _mix(low: str, high: str, t: float) -> tuple[float, ...]:
    a, b = np.array(to_rgba(low)), np.array(to_rgba(high))
    return tuple(a + (b - a) * float(np.clip(t, 0.0, 1.0)))


# ---------------------------------------------------------------- figures


def confusion_matrix_png(counts: np.ndarray, title: str = "Confusion matrix") -> bytes:
    """Counts in every cell. Right answers (the diagonal) are shaded blue by recall, mistakes
    red relative to the largest mistake, so a handful of errors still stands out next to
    a diagonal of hundreds."""
    counts = np.asarray(counts)
    n = counts.shape[0]
    rows = np.maximum(counts.sum(axis=1, keepdims=True), 1)
    off = counts * (1 - np.eye(n, dtype=counts.dtype))
    worst = max(int(off.max()), 1)
    colors = np.ones((n, n, 4))
    for t in range(n):
        for p in range(n):
            if t == p:
                colors[t, p] = _mix(*_BLUES, 0.15 + 0.85 * counts[t, p] / rows[t, 0])
            elif counts[t, p]:
                colors[t, p] = _mix(*_REDS, 0.2 + 0.8 * counts[t, p] / worst)
    fig = Figure(figsize=(5.6, 5.2), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(colors, interpolation="nearest")
    for t in range(n):
        for p in range(n):
            value = int(counts[t, p])
            dark = (t == p and counts[t, p] / rows[t, 0] > 0.45) or (t != p and value / worst > 0.5)
            ax.text(
                p,
                t,
                str(value),
                ha="center",
                va="center",
                fontsize=10 if value < 1000 else 8,
                color="white" if dark else ("#bbbbbb" if value == 0 else "black"),
            )
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xlabel("predicted", fontsize=12)
    ax.set_ylabel("true", fontsize=12)
    ax.xaxis.set_label_position("top")
    ax.xaxis.tick_top()
    ax.set_xticks(np.arange(-0.5, n), minor=True)
    ax.set_yticks(np.arange(-0.5, n), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    total = int(counts.sum())
    accuracy = np.trace(counts) / total if total else 0.0
    ax.set_title(
        f"{title}\n{total} test images, accuracy {100 * accuracy:.2f}%", fontsize=12, pad=10
    )
    return _png(fig)


def mistakes_grid_png(
    images: np.ndarray,
    labels: Sequence[int],
    probabilities: np.ndarray,
    title: str = "Most confident mistakes",
    columns: int = 8,
) -> bytes:
    """A grid of digits (uint8 N×28×28, or N×784), each captioned "true 7 / pred 2 (0.98)"
    with the probability the model gave its (wrong) prediction."""
    images = np.asarray(images).reshape(-1, 28, 28)
    count = len(images)
    probabilities = np.asarray(probabilities).reshape(count, -1) if count else probabilities
    cols = max(1, min(columns, count))
    rows = max(1, -(-count // cols))
    fig = Figure(figsize=(1.45 * max(cols, 4), 1.6 * rows + 0.6), dpi=DPI, layout="constrained")
    fig.suptitle(title, fontsize=12)
    if count == 0:
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, "no mistakes on the test set", ha="center", va="center", fontsize=11)
        return _png(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= count:
            ax.axis("off")
            continue
        predicted = int(np.argmax(probabilities[i]))
        ax.imshow(images[i], cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(
            caption(int(labels[i]), predicted, float(probabilities[i, predicted])),
            fontsize=8.5,
            color=_VAL,
        )
        for spine in ax.spines.values():
            spine.set_color("#999999")
    return _png(fig)


def learning_curves_png(
    history: Sequence[dict[str, Any]],
    step_scalars: dict[str, Sequence[tuple[int, float]]] | None = None,
    resumes: Sequence[int] = (),
    title: str = "Learning curves",
) -> bytes:
    """Loss and accuracy against the global step: per-epoch train and validation values from
    the loop history (one row per epoch: step, loss, accuracy, val_loss, val_accuracy),
    optionally the logged per-step training values (`train/batch_loss`,
    `train/batch_accuracy`, as `tblog.scalars` keys them), and a
    dashed line at each step a session resumed from."""
    step_scalars = step_scalars or {}
    fig = Figure(figsize=(10.8, 4.4), dpi=DPI, layout="constrained")
    fig.suptitle(title, fontsize=13)
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], "loss", "loss"), (axes[1], "accuracy", "accuracy")):
        logged = list(step_scalars.get(f"train/batch_{key}", ()))
        if logged:
            ax.plot(
                [s for s, _ in logged],
                [v for _, v in logged],
                color=_TRAIN,
                alpha=0.35,
                linewidth=1,
                label=f"train (running mean in epoch, every {_every(logged)} steps)",
            )
        rows = [r for r in history if key in r]
        if rows:
            ax.plot(
                [r["step"] for r in rows],
                [r[key] for r in rows],
                "o-",
                color=_TRAIN,
                linewidth=2,
                markersize=5,
                label="train (epoch)",
            )
        rows = [r for r in history if f"val_{key}" in r]
        if rows:
            ax.plot(
                [r["step"] for r in rows],
                [r[f"val_{key}"] for r in rows],
                "s-",
                color=_VAL,
                linewidth=2,
                markersize=5,
                label="validation (epoch end)",
            )
        for i, step in enumerate(resumes):
            ax.axvline(
                step,
                color="#555555",
                linestyle="--",
                linewidth=1,
                label="resumed" if i == 0 else None,
            )
        ax.set_xlabel("step", fontsize=11)
        ax.set_ylabel(label, fontsize=11)
        ax.set_title(label.capitalize(), fontsize=11)
        ax.grid(True, alpha=0.3)
        if key == "accuracy":
            ax.yaxis.set_major_formatter(lambda v, _: f"{100 * v:.0f}%")
        if not ax.has_data():
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(
            handles,
            labels,
            loc="outside lower center",
            ncols=len(handles),
            fontsize=10,
            frameon=False,
        )
    return _png(fig)


def _every(points: Sequence[tuple[int, float]]) -> int:
    steps = [s for s, _ in points]
    gaps = np.diff(steps) if len(steps) > 1 else np.array([1])
    return int(np.median(gaps)) if len(gaps) else 1
