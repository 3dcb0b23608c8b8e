"""Errors that reach the user as one clear line and a non-zero exit code, never a traceback."""


class PipelineError(Exception):
    """Something the user can fix; the message says what is wrong and what to do."""

    exit_code = 1
    # Keras rebuilds an exception that passes through one of its calls with the call's arguments
    # and terminal bold codes around the message, unless the exception says it already carries
    # them. Ours can pass through Keras: a second Ctrl-C raises Interrupted from the signal
    # handler wherever the main thread is, e.g. inside a learning-rate schedule's cond. The
    # message must stay the one line we wrote (and session.json records it).
    _keras_call_info_injected = True


class ConfigError(PipelineError):
    """A wrong override or config value."""

    exit_code = 2


class RunLocked(PipelineError):
    """Another process is working on the same run."""

    exit_code = 3


class Interrupted(PipelineError):
    """SIGINT/SIGTERM: the state was saved and the run can be resumed."""

    exit_code = 130
