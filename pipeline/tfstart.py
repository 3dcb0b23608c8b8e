"""Start TensorFlow without its C++ start-up chatter on the terminal.

TensorFlow 2.21's shared libraries print notes to file descriptor 2 while they load, before any
logging setting applies (`TF_CPP_MIN_LOG_LEVEL` does not reach them): "All log messages before
absl::InitializeLog() is called are written to STDERR", "oneDNN custom operations are on",
"Could not find cuda drivers", "failed call to cuInit", each printed twice. `start()` imports
TensorFlow with fd 2 captured, drops exactly those known lines and passes anything else on, so
a real problem while loading still shows.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

CHATTER = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|oneDNN custom operations are on"
    r"|Could not find cuda drivers"
    r"|failed call to cuInit"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|TF-TRT Warning: Could not find TensorRT"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|To enable the following instructions: .* rebuild TensorFlow"
    r"|computation placer already registered"
    r"|Created TensorFlow Lite XNNPACK delegate for CPU"
)
# The notes dropped so far, for the log file (cli.py writes them at DEBUG).
DROPPED: list[str] = []


@contextlib.contextmanager
def quiet_native() -> Iterator[None]:
    """Capture what native code writes to fd 2 meanwhile; drop the known notes, pass the rest."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode(errors="replace").splitlines()
            DROPPED.extend(line for line in lines if CHATTER.search(line))
            kept = [line for line in lines if line.strip() and not CHATTER.search(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)


def start() -> None:
    """Import TensorFlow once and let it probe its devices (where the CUDA notes come from),
    quietly (see the module docstring)."""
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with quiet_native():
        import tensorflow as tf

        tf.config.list_physical_devices()
