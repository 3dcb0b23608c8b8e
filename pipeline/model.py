"""The model stage: build the network a config describes. Outputs are logits."""

from __future__ import annotations

import keras
import tensorflow as tf

from pipeline.config import ModelConfig
from pipeline.data import INPUT_SHAPES


def build_model(cfg: ModelConfig) -> keras.Model:
    # Every computation of every stage starts from a built model, so this is where a process
    # commits to deterministic kernels: without it, an evaluate resumed in a fresh process
    # scored the same weights with other reduction orders than the process that ran fit.
    tf.config.experimental.enable_op_determinism()
    inputs = keras.Input(shape=INPUT_SHAPES[cfg.name], name="image")
    if cfg.name == "mlp":
        x = keras.layers.Dense(cfg.hidden_units, activation="relu", name="hidden")(inputs)
        x = keras.layers.Dropout(cfg.dropout, name="dropout")(x)
    else:
        x = inputs
        for i, filters in enumerate(cfg.filters):
            for j in range(cfg.convs_per_block):
                # Single-conv blocks keep the names conv0, conv1, ... of older runs.
                name = f"{i}" if cfg.convs_per_block == 1 else f"{i}_{j}"
                x = keras.layers.Conv2D(
                    filters, 3, padding=cfg.padding, use_bias=not cfg.batch_norm, name=f"conv{name}"
                )(x)
                if cfg.batch_norm:
                    # momentum 0.9: moving statistics usable after a few hundred steps.
                    x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{name}")(x)
                x = keras.layers.Activation("relu", name=f"relu{name}")(x)
            x = keras.layers.MaxPooling2D(name=f"pool{i}")(x)
        x = keras.layers.Flatten(name="flatten")(x)
        if cfg.dense_units:
            x = keras.layers.Dense(cfg.dense_units, activation="relu", name="dense")(x)
        x = keras.layers.Dropout(cfg.dropout, name="dropout")(x)
    outputs = keras.layers.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs, name=cfg.name)


def inference_function(model: keras.Model) -> tf.types.experimental.PolymorphicFunction:
    """The model's logits in inference mode, traced once for any batch size: the same graph
    (and kernels) in fit's validation, evaluate and export, whatever batch comes first."""
    return tf.function(
        lambda x: model(x, training=False),
        input_signature=[tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)],
    )


def summary_text(model: keras.Model) -> str:
    lines: list[str] = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line))
    return "\n".join(lines) + "\n"
