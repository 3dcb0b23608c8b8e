"""The library versions a run's results depend on, recorded with what the run writes.

Bit-identical resume holds for one build of Python, TensorFlow, Keras and numpy (and of this
package): `current()` is what this process runs, recorded in run.json (the run's first
session), in every checkpoint's manifest and in the model card; `differences()` says what
changed since a record was written. Nothing here imports TensorFlow: the versions are read
from the installed packages' metadata.

A record written before versions were recorded has no `versions` key: its versions are
unknown, and `differences()` reports nothing for it (there is nothing to compare against, and
guessing would only alarm). Likewise a name one side lacks is left out of the comparison.
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
from typing import Any

# Name in the record -> the importable top-level module whose distribution is looked up.
LIBRARIES = {"tensorflow": "tensorflow", "keras": "keras", "numpy": "numpy"}
NAMES = ("python", *LIBRARIES, "pipeline")
UNKNOWN = "unknown"


def current() -> dict[str, str]:
    """This process's versions: {"python", "tensorflow", "keras", "numpy", "pipeline"} ->
    version string ("unknown" for a library whose metadata is missing)."""
    return dict(_current())


@functools.cache
def _current() -> tuple[tuple[str, str], ...]:
    from pipeline import __version__

    found = {"python": platform.python_version()}
    found.update((name, _installed(module)) for name, module in LIBRARIES.items())
    found["pipeline"] = __version__
    return tuple((name, found[name]) for name in NAMES)


def _installed(module: str) -> str:
    """The version of the distribution that provides `module` (tensorflow may be installed as
    tensorflow-cpu, tf-nightly, ...), from its metadata, without importing it."""
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        pass
    for dist in sorted(importlib.metadata.packages_distributions().get(module, [])):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return UNKNOWN


def recorded(record: dict[str, Any]) -> dict[str, str] | None:
    """The versions a record (run.json, a checkpoint's meta, a model card) holds; None when
    it predates version records (or holds no readable ones)."""
    found = record.get("versions")
    if not isinstance(found, dict):
        return None
    return {str(name): str(version) for name, version in found.items()}


def differences(record: dict[str, Any]) -> list[str]:
    """What differs between the versions `record` holds and this process's, one
    "<name> <recorded> -> <current>" per library (e.g. "tensorflow 2.20.0 -> 2.21.0"), in the
    order of NAMES. Empty when nothing differs, or when the record has no versions (unknown:
    see the module's docstring)."""
    then = recorded(record)
    if then is None:
        return []
    now = current()
    return [
        f"{name} {then[name]} -> {now[name]}"
        for name in NAMES
        if name in then and then[name] != now[name]
    ]
