"""The model stage: build the network a config describes. Outputs are logits."""

from __future__ import annotations

import keras

from pipeline.config import ModelConfig
from pipeline.data import INPUT_SHAPES


def build_model(cfg: ModelConfig) -> keras.Model:
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


def summary_text(model: keras.Model) -> str:
    lines: list[str] = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line))
    return "\n".join(lines) + "\n"
