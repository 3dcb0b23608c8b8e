"""Errors that reach the user as one clear line and a non-zero exit code, never a traceback."""


class PipelineError(Exception):
    """Something the user can fix; the message says what is wrong and what to do."""

    exit_code = 1


class ConfigError(PipelineError):
    """A wrong override or config value."""

    exit_code = 2


class RunLocked(PipelineError):
    """Another process is working on the same run."""

    exit_code = 3


class Interrupted(PipelineError):
    """SIGINT/SIGTERM: the state was saved and the run can be resumed."""

    exit_code = 130
