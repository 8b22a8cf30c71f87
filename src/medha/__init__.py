"""medha: long-context LLM serving that stays responsive for short requests.

Public names live here; everything else is an implementation detail.
"""

from __future__ import annotations

from medha.errors import (
    EngineClosedError,
    EngineFailedError,
    InvalidRequestError,
    InvalidSamplingParamsError,
    MedhaError,
    ModelLoadError,
    PromptTooLongError,
    RequestTooLargeError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

__all__ = [
    "EngineClosedError",
    "EngineFailedError",
    "InvalidRequestError",
    "InvalidSamplingParamsError",
    "MedhaError",
    "ModelLoadError",
    "PromptTooLongError",
    "RequestTooLargeError",
    "UnsupportedModelError",
    "__version__",
]
