"""One exception family: each failure kind carries the message the user sees and its exit code."""


class LocalGPTError(Exception):
    """A failure the user can act on. str(error) is the one line printed after 'Error: '."""

    exit_code = 1


class UsageError(LocalGPTError):
    """Bad flags or values, caught before any model is loaded."""

    exit_code = 2


class ModelError(LocalGPTError):
    """A model folder or checkpoint that cannot be used (missing, malformed, unsupported)."""


class TokenizerError(LocalGPTError):
    """A missing or broken tokenizer or chat template."""


class PromptError(LocalGPTError):
    """A prompt that cannot be run: empty, or longer than the model's context."""


class Interrupted(LocalGPTError):
    """Ctrl-C."""

    exit_code = 130


class ReaderGone(LocalGPTError):
    """stdout's reader went away (`| head`): the command stops quietly, exit 141 as for SIGPIPE."""

    exit_code = 141
