"""Compose a command line's config with Hydra's compose API and check it, without TensorFlow.

Hydra's own errors are long and multi-line; users get one line naming the key and what is
allowed instead (ConfigError, exit code 2).
"""

from __future__ import annotations

import re
from dataclasses import fields, is_dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException, MissingConfigException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from pipeline.config import Config, to_config, validate
from pipeline.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def _keys_of(path: str) -> list[str]:
    """The keys beside `path` in the schema (for "did you mean" hints)."""
    node: object = Config()
    for part in path.split(".")[:-1]:
        node = getattr(node, part, None)
    return [f.name for f in fields(node)] if is_dataclass(node) else []


def explain(exc: Exception) -> str:
    """One line from Hydra's or OmegaConf's exception chain."""
    cause = exc.__cause__ or exc
    if isinstance(exc, MissingConfigException):
        group = re.search(r"Could not find '([^/']+)/([^']+)'", str(exc))
        # Schemas registered for the YAML files to extend are not choices of their own.
        options = [
            o for o in re.findall(r"^\t(\S+)$", str(exc), flags=re.M) if not o.endswith("_schema")
        ]
        if group:
            return (
                f"{group.group(1)}={group.group(2)} is not a config option; available: "
                f"{', '.join(options)}"
            )
        return str(exc).splitlines()[0]
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        key = getattr(cause, "full_key", None) or "?"
        known = _keys_of(key)
        hint = f" (known keys there: {', '.join(known)})" if known else ""
        return f"{key} is not a config key{hint}. See: python -m pipeline train --cfg job"
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None) or "?"
        first = str(cause).splitlines()[0]
        choice = re.search(r"Invalid value '(.*)', expected one of \[(.*)\]", first)
        if choice:
            return f"{key}={choice.group(1)!r} is not allowed: one of {choice.group(2)}"
        wanted = re.search(r"Value '(.*)' of type .* could not be converted to (\w+)", first)
        if wanted:
            return f"{key}={wanted.group(1)!r} is not allowed: expected {wanted.group(2).lower()}"
        return f"{key}: {first}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def compose_and_check(overrides: list[str]) -> Path:
    """Compose, type-check and range-check; return the run directory the command maps to."""
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            composed = compose("config", overrides=overrides, return_hydra_config=True)
            run_dir = Path(str(composed.hydra.run.dir))
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(explain(exc)) from exc
    try:
        cfg = to_config(composed)
    except OmegaConfBaseException as exc:
        raise ConfigError(explain(exc)) from exc
    except TypeError as exc:  # a key added with +key=... that the schema does not have
        raise ConfigError(
            f"unknown config key ({exc}). See: python -m pipeline train --cfg job"
        ) from exc
    validate(cfg)
    return run_dir
