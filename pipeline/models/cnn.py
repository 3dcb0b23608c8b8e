"""A small convnet: blocks of conv(3x3) [-BatchNorm] -ReLU (convs_per_block times) then 2x2
max-pool, a hidden dense layer, dropout, logits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.models import ModelConfig, Pixels, register

if TYPE_CHECKING:
    import keras


@dataclass
class CnnConfig(ModelConfig):
    name: str = "cnn"
    filters: list[int] = field(default_factory=lambda: [32, 64])
    dense_units: int = 128  # hidden dense layer width; 0: none
    dropout: float = 0.2
    batch_norm: bool = False
    padding: str = "same"  # same | valid
    convs_per_block: int = 1  # convolutions before each pooling

    def problems(self) -> list[str]:
        out = []
        if not self.filters or any(f < 1 for f in self.filters):
            out.append(
                f"model.filters={list(self.filters)!r} is not allowed: a non-empty list of "
                "integers >= 1"
            )
        if self.dense_units < 0:
            out.append(
                f"model.dense_units={self.dense_units!r} is not allowed: an integer >= 0 "
                "(0: no hidden dense layer)"
            )
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"model.dropout={self.dropout!r} is not allowed: a number in [0, 1)")
        if self.padding not in ("same", "valid"):
            out.append(f"model.padding={self.padding!r} is not allowed: same or valid")
        if self.convs_per_block not in (1, 2, 3):
            out.append(f"model.convs_per_block={self.convs_per_block!r} is not allowed: 1, 2 or 3")
        return out


@register("cnn", CnnConfig)
def build(cfg: CnnConfig, pixels: Pixels) -> keras.Model:
    import keras

    image = pixels.input()
    x = keras.layers.Reshape((28, 28, 1), name="channels")(pixels.scaled(image))
    for i, filters in enumerate(cfg.filters):
        for j in range(cfg.convs_per_block):
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
    logits = keras.layers.Dense(10, name="logits")(x)
    return keras.Model(image, logits, name="cnn")
