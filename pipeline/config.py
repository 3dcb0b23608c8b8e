"""The typed configuration schema, and the one place that validates a composed config.

Hydra composes YAML from `conf/` on top of these dataclasses (registered in Hydra's ConfigStore),
so an unknown key or a wrong type already fails during composition. `validate` adds the range
checks a type cannot express. Nothing here imports TensorFlow: a bad override must fail fast.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from pipeline import models
from pipeline.errors import ConfigError
from pipeline.models import ModelConfig
from pipeline.stages import COMMANDS  # the command words, from the stage registry


@dataclass
class RunConfig:
    name: str | None = None  # None: derived from the command-line overrides (see README)
    restart: bool = False
    outputs: str = "outputs"
    # A later session under other library versions than the run's first: refuse (exit 2)
    # instead of continuing with a warning (pipeline/versions.py). Not part of the identity.
    strict_versions: bool = False


# Choices are Enums: Hydra refuses any other value while composing, naming the allowed ones, and
# the code that implements each choice keys its table by the same Enum (a test checks every
# member has an entry), so no list of names is kept by hand.
class Choice(str, Enum):
    """A named choice; prints as its name (in messages, run.json, directory names)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Dataset(Choice):
    mnist = "mnist"  # Keras' download (or cache); offline, the bundled sample with a warning
    fashion_mnist = "fashion_mnist"
    sample = "sample"  # the real-MNIST sample shipped inside the package


class Normalize(Choice):
    scale = "scale"  # x / 255
    standardize = "standardize"  # (x / 255 - mean) / std over the training slice


class OptimizerName(Choice):
    adam = "adam"
    sgd = "sgd"


class ProgressMode(Choice):
    auto = "auto"  # the live bar on a terminal, plain lines otherwise (files, Slurm, CI, tee)
    bar = "bar"  # Keras' live progress bar (control codes: for terminals)
    line = "line"  # one plain line every fit.log_every_steps steps
    off = "off"  # epoch summaries only


class Schedule(Choice):
    constant = "constant"
    cosine = "cosine"
    onecycle = "onecycle"
    restarts = "restarts"


@dataclass
class DataConfig:
    name: Dataset = MISSING
    path: str | None = None  # a Keras-layout .npz, or a directory of IDX files
    train_size: int | None = None  # first N training images; None: all
    test_size: int | None = None  # first N test images; None: all
    val_fraction: float = 0.1  # held out from the end of the training slice; 0: none
    normalize: Normalize = Normalize.scale  # done by the model's own layers


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.adam
    learning_rate: float = 1e-3
    momentum: float = 0.9  # sgd only
    schedule: Schedule = Schedule.constant
    warmup_epochs: float = 0.0
    cycle_epochs: float = 3.0  # restarts: length of the first cosine cycle; each next is 2x


@dataclass
class FitConfig:
    epochs: int = 5
    batch_size: int = 128
    log_every_steps: int = 50
    early_stopping_patience: int = 0  # epochs without improvement; 0: off
    augment_shift: int = 0  # random shifts of training images by up to N pixels; 0: off
    label_smoothing: float = 0.0  # training targets (1 - e) one-hot + e / classes; 0: off
    # BatchNorm layers train with TensorFlow's fused kernel (models.fuse_batch_norm); false:
    # Keras' own ops, ~1.5x the default's step time on a CPU. Saved models are Keras' layer.
    fused_batch_norm: bool = True
    progress: ProgressMode = ProgressMode.auto
    # [first, last] global steps traced by TensorFlow's profiler into tensorboard/train/
    # (TensorBoard's Profile tab: pip install 'pipeline[profile]'); None: off.
    profile_steps: list[int] | None = None


@dataclass
class CheckpointConfig:
    every_steps: int = 150  # 0: off
    every_seconds: float = 0.0  # 0: off
    keep: int = 3


@dataclass
class EvaluateConfig:
    checkpoint: str = "latest"  # latest | best | a step number (also for export)


class TFLiteQuantize(Choice):
    """What `model.tflite` holds (export.tflite_quantize); its interface is the same in every
    case: uint8 image [N, 28, 28] in, float32 probabilities and int64 class_id out."""

    none = "none"  # float32: the model's own numbers (checked to 1e-4)
    dynamic = "dynamic"  # int8 weights, float activations (no calibration)
    int8 = "int8"  # full integer: int8 weights and activations, calibrated on training images


@dataclass
class ExportConfig:
    model_name: str = "mnist"
    min_accuracy: float | None = None  # refuse to publish below this test accuracy
    tflite: bool = True
    # A quantized model.tflite is checked by its own test accuracy against min_accuracy.
    tflite_quantize: TFLiteQuantize = TFLiteQuantize.none
    h5: bool = True


@dataclass
class StrategyConfig:
    name: str = "default"  # default | mirrored | multi_worker (README: Scaling out)
    cluster: str = "auto"  # multi_worker: auto | tf_config | slurm


@dataclass
class Config:
    command: str = "train"
    seed: int = 0
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # One of the registered architectures' configs (pipeline/models), chosen with model=<name>.
    model: Any = MISSING
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)


# The identity rule, declared once. Keys a user may change on an existing run without starting a
# new one, because they do not change what has been trained so far; every other key (a prefix
# covers its sub-keys, so a new `export.*` key is compatible too) is the run's identity: it names
# the run directory (`run_name`), is recorded in run.json and checked on every resume
# (`identity`). `SHOWN_AS_HPARAMS`: compatible keys still shown in TensorBoard's HParams table.
COMPATIBLE_KEYS = (
    "command",
    "run",
    "data.path",
    "fit.epochs",
    "fit.log_every_steps",
    "fit.progress",
    "fit.profile_steps",
    "fit.early_stopping_patience",
    "checkpoint",
    "evaluate",
    "export",
    "strategy",
)
SHOWN_AS_HPARAMS = ("fit.epochs", "fit.early_stopping_patience", "evaluate.checkpoint", "strategy")


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == k or key.startswith(k + ".") for k in prefixes)


def is_identity_key(key: str) -> bool:
    return not _under(key, COMPATIBLE_KEYS)


def is_hparam(key: str) -> bool:
    return is_identity_key(key) or _under(key, SHOWN_AS_HPARAMS)


def hparam_values(
    config: dict[str, Any], epochs: int, checkpoint: str
) -> dict[str, bool | int | float | str]:
    """TensorBoard HParams of a run: its config as created (run.json), with the values a
    compatible change may have moved since (`fit.epochs`, which checkpoint is evaluated). None
    becomes "null", lists their JSON form."""
    flat = flatten(config)
    flat["fit.epochs"] = epochs
    flat["evaluate.checkpoint"] = checkpoint
    values: dict[str, bool | int | float | str] = {}
    for key, value in sorted(flat.items()):
        if not is_hparam(key):
            continue
        if value is None:
            values[key] = "null"
        elif isinstance(value, (bool, int, float, str)):
            values[key] = value
        else:
            values[key] = json.dumps(value)
    return values


def register_schema() -> None:
    ConfigStore.instance().store(name="schema", node=Config)


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", run_name)


def run_name(explicit: str | None, task_overrides: Any) -> str:
    """The run directory name: `run.name` if given, else the command line's identity overrides
    (sorted, `,`-joined, as Hydra's override_dirname), else `default`.

    The same command line always maps to the same directory, which is what makes a rerun resume.
    """
    if explicit:
        name = explicit
    else:
        lines = sorted(str(o) for o in task_overrides or () if is_identity_key(override_key(o)))
        name = ",".join(lines) or "default"
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", str(name))
    if len(name) > 120:
        digest = hashlib.sha256(name.encode()).hexdigest()[:10]
        name = f"{name[:100]}-{digest}"
    return name


def override_key(line: str) -> str:
    """The key an override sets: `+model.args.k=3` -> `model.args.k`, `model@x=mlp` -> `model`."""
    key = str(line).split("=", 1)[0].lstrip("+~")
    return key.split("@", 1)[0]


def safe_name_rule(extra: str = "") -> str:
    return f"1 to 100 of letters, digits and {' '.join('._-' + extra)}, not starting with '.'"


def safe_name(name: str, extra: str = "") -> bool:
    """A name that is one path component inside its parent: no separators, no '.' or '..', no
    hidden or control characters, not over-long (so nothing typed escapes the run directory)."""
    allowed = "A-Za-z0-9._" + re.escape(extra) + "-"
    return bool(re.fullmatch(f"[{allowed}]{{1,100}}", name)) and not name.startswith(".")


def _check(errors: list[str], ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        errors.append(f"{key}={value!r} is not allowed: {allowed}")


def validate(cfg: Config) -> None:
    """Range and choice checks that types cannot express. Raises ConfigError naming the key."""
    e: list[str] = []
    _check(e, cfg.command in COMMANDS, "command", cfg.command, f"one of {', '.join(COMMANDS)}")
    _check(e, cfg.seed >= 0, "seed", cfg.seed, "an integer >= 0")
    _check(
        e,
        cfg.run.name is None or safe_name(cfg.run.name, "=,+"),
        "run.name",
        cfg.run.name,
        f"a plain name: {safe_name_rule('=,+')}",
    )
    d = cfg.data
    _check(
        e,
        d.train_size is None or d.train_size >= 1,
        "data.train_size",
        d.train_size,
        "an integer >= 1, or null for all",
    )
    _check(
        e,
        d.test_size is None or d.test_size >= 1,
        "data.test_size",
        d.test_size,
        "an integer >= 1, or null for all",
    )
    _check(
        e, 0.0 <= d.val_fraction < 1.0, "data.val_fraction", d.val_fraction, "a number in [0, 1)"
    )
    m = cfg.model
    if not isinstance(m, ModelConfig) or m.name not in models.names():
        e.append(
            f"model.name={getattr(m, 'name', m)!r} has no registered builder; available: "
            f"{', '.join(models.names())} (choose with model=...)"
        )
    else:
        e.extend(m.problems())
    o = cfg.optimizer
    _check(e, o.learning_rate > 0, "optimizer.learning_rate", o.learning_rate, "a number > 0")
    _check(e, 0.0 <= o.momentum < 1.0, "optimizer.momentum", o.momentum, "a number in [0, 1)")
    _check(e, o.cycle_epochs > 0, "optimizer.cycle_epochs", o.cycle_epochs, "a number > 0")
    _check(e, o.warmup_epochs >= 0, "optimizer.warmup_epochs", o.warmup_epochs, "a number >= 0")
    if o.warmup_epochs and o.schedule == Schedule.restarts:
        # Keras' CosineDecayRestarts has no warm-up, and a schedule of our own would make
        # model.keras unloadable without this package: refused, not silently ignored.
        e.append(
            "optimizer.warmup_epochs applies to the constant, cosine and onecycle schedules, "
            "not to optimizer.schedule=restarts: set optimizer.warmup_epochs=0 or choose "
            "another schedule"
        )
    f = cfg.fit
    _check(e, f.epochs >= 1, "fit.epochs", f.epochs, "an integer >= 1")
    _check(e, f.batch_size >= 1, "fit.batch_size", f.batch_size, "an integer >= 1")
    _check(e, f.log_every_steps >= 1, "fit.log_every_steps", f.log_every_steps, "an integer >= 1")
    _check(
        e,
        0 <= f.augment_shift <= 8,
        "fit.augment_shift",
        f.augment_shift,
        "an integer from 0 to 8 (pixels)",
    )
    _check(
        e,
        0.0 <= f.label_smoothing < 1.0,
        "fit.label_smoothing",
        f.label_smoothing,
        "a number in [0, 1)",
    )
    _check(
        e,
        f.early_stopping_patience >= 0,
        "fit.early_stopping_patience",
        f.early_stopping_patience,
        "an integer >= 0 (0 turns it off)",
    )
    steps = f.profile_steps
    _check(
        e,
        steps is None or (len(steps) == 2 and 1 <= steps[0] <= steps[1]),
        "fit.profile_steps",
        steps,
        "[first, last] global steps with 1 <= first <= last, e.g. fit.profile_steps=[100,110]",
    )
    c = cfg.checkpoint
    _check(
        e,
        c.every_steps >= 0,
        "checkpoint.every_steps",
        c.every_steps,
        "an integer >= 0 (0 turns step checkpoints off)",
    )
    _check(
        e,
        c.every_seconds >= 0,
        "checkpoint.every_seconds",
        c.every_seconds,
        "a number >= 0 (0 turns timed checkpoints off)",
    )
    _check(e, c.keep >= 1, "checkpoint.keep", c.keep, "an integer >= 1")
    _check(
        e,
        str(cfg.evaluate.checkpoint) in ("latest", "best")
        or str(cfg.evaluate.checkpoint).isdigit(),
        "evaluate.checkpoint",
        cfg.evaluate.checkpoint,
        "latest, best or a checkpoint's step number",
    )
    x = cfg.export
    _check(
        e,
        safe_name(x.model_name),
        "export.model_name",
        x.model_name,
        f"a plain name: {safe_name_rule()}",
    )
    _check(
        e,
        x.min_accuracy is None or 0.0 <= x.min_accuracy <= 1.0,
        "export.min_accuracy",
        x.min_accuracy,
        "a number in [0, 1], or null for off",
    )
    _check(
        e,
        x.tflite or x.tflite_quantize == TFLiteQuantize.none,
        "export.tflite_quantize",
        str(x.tflite_quantize),
        "none when export.tflite=false (a quantized model is a .tflite file)",
    )
    s = cfg.strategy
    _check(
        e,
        s.name in ("default", "mirrored", "multi_worker"),
        "strategy.name",
        s.name,
        "default, mirrored or multi_worker (choose with strategy=...)",
    )
    _check(
        e,
        s.cluster in ("auto", "tf_config", "slurm"),
        "strategy.cluster",
        s.cluster,
        "auto, tf_config or slurm",
    )
    if e:
        raise ConfigError(e[0])


def to_config(cfg: DictConfig) -> Config:
    """Turn Hydra's composed DictConfig (without its `hydra` node) into the typed Config."""
    if "hydra" in cfg:
        cfg = copy.deepcopy(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
    unknown = sorted(str(k) for k in set(cfg.keys()) - {f.name for f in fields(Config)})
    if unknown:
        raise ConfigError(
            f"{unknown[0]} is not a config key. See: python -m pipeline train --cfg job"
        )
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, Config), type(obj)
    return obj


def as_dict(cfg: Config) -> dict[str, Any]:
    """Plain JSON-able values (Enums as their names)."""
    return OmegaConf.to_container(  # type: ignore[return-value]
        OmegaConf.structured(cfg), resolve=True, enum_to_str=True
    )


def identity(cfg: Config) -> dict[str, Any]:
    """The part of the config that defines what a run trains; it must not change on resume."""
    flat = flatten(as_dict(cfg))
    ident = {key: value for key, value in flat.items() if is_identity_key(key)}
    if cfg.optimizer.schedule in ("cosine", "onecycle"):
        # These schedules are stretched over all epochs: more epochs, other learning rates.
        ident["fit.epochs"] = cfg.fit.epochs
    return ident


def schema_defaults(cfg: Config) -> dict[str, Any]:
    """Every key's default in the schema of `cfg` (its model's included), flattened
    (`model.dropout` -> 0.2)."""
    tree = OmegaConf.to_container(OmegaConf.structured(Config), enum_to_str=True)
    tree["model"] = OmegaConf.to_container(  # type: ignore[index,call-overload]
        OmegaConf.structured(type(cfg.model)), enum_to_str=True
    )
    return flatten(tree)  # type: ignore[arg-type]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys: {"model": {"dropout": 0.2}} -> {"model.dropout": 0.2}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


register_schema()
_register_resolvers()
