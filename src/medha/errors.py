"""The exception hierarchy: every error medha raises on purpose is a MedhaError.

Errors about a request's input subclass ValueError too, so callers that already catch
ValueError for bad input keep working. This module is pure Python (the scheduler uses it).
"""

from __future__ import annotations


class MedhaError(Exception):
    """Base class of every error medha raises deliberately."""


class ModelLoadError(MedhaError):
    """A model file is missing, corrupt or does not match its config.

    The message names the file and the problem.
    """

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class UnsupportedModelError(ModelLoadError):
    """The checkpoint is of an architecture medha does not implement."""


class InvalidRequestError(MedhaError, ValueError):
    """A request is malformed; raised before anything is queued."""


class InvalidSamplingParamsError(InvalidRequestError):
    """A sampling parameter is out of range (temperature < 0, top_p outside (0, 1], ...)."""


class PromptTooLongError(InvalidRequestError):
    """The prompt (plus the tokens it may generate) does not fit the model's context."""


class RequestTooLargeError(InvalidRequestError):
    """The request can never fit in the KV cache, however long it waits."""


class EngineClosedError(MedhaError):
    """The engine is not running (not started yet, or already closed)."""


class EngineFailedError(MedhaError):
    """The engine died (a worker crashed); every open stream raises this."""


class GrammarViolationError(MedhaError, RuntimeError):
    """A sampled token that the request's structured output does not allow: a bug (the sampler
    applies the grammar's mask) or a limit of the grammar engine hit mid-request (whose mask
    then allows only eos); it ends that request alone."""


class WrongEventLoopError(MedhaError, RuntimeError):
    """An Engine was used from an event loop other than the one it was started on."""


class InvalidConfigError(MedhaError, ValueError):
    """The EngineConfig does not fit the model or this machine; raised when the engine starts.

    EngineConfig itself checks only what needs no I/O (pydantic's ValidationError); what needs
    the model or the device (its context, memory, attention backends) is checked here.
    """


class DeviceUnavailableError(InvalidConfigError):
    """The configured device does not exist, or this torch build or machine cannot use it."""


class KVCacheTooLargeError(InvalidConfigError):
    """The KV cache asked for (kv_cache_gib or num_blocks) does not fit the device's memory."""
