"""medha: long-context LLM serving that stays responsive for short requests.

    import medha
    async with medha.Engine(medha.EngineConfig(model="smollm2-135m")) as engine:
        async for ev in engine.stream("Hello", deadline=2.0):
            print(ev.text, end="")

Public names live here. Those that need torch (Engine, LLM) load on first use, so that
`import medha.scheduler` and `import medha.errors` stay free of torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from medha.errors import (
    DeviceUnavailableError,
    EngineClosedError,
    EngineFailedError,
    GrammarViolationError,
    InvalidConfigError,
    InvalidRequestError,
    InvalidSamplingParamsError,
    KVCacheTooLargeError,
    MedhaError,
    ModelLoadError,
    PromptTooLongError,
    RequestTooLargeError,
    UnsupportedModelError,
    WrongEventLoopError,
)
from medha.sampling import SamplingParams
from medha.structured_outputs import StructuredOutputsParams, Thinking

if TYPE_CHECKING:
    from medha.config import EngineConfig, ParallelConfig
    from medha.engine import Engine
    from medha.engine_stats import EngineStats
    from medha.llm import LLM
    from medha.request import Completion, RequestMetrics, TokenEvent, TokenLogprob

__version__ = "0.1.0"

_LAZY = {
    "Engine": "medha.engine",
    "EngineStats": "medha.engine_stats",
    "EngineConfig": "medha.config",
    "ParallelConfig": "medha.config",
    "LLM": "medha.llm",
    "Completion": "medha.request",
    "RequestMetrics": "medha.request",
    "TokenEvent": "medha.request",
    "TokenLogprob": "medha.request",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'medha' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "LLM",
    "Completion",
    "DeviceUnavailableError",
    "Engine",
    "EngineClosedError",
    "EngineConfig",
    "EngineFailedError",
    "EngineStats",
    "GrammarViolationError",
    "InvalidConfigError",
    "InvalidRequestError",
    "InvalidSamplingParamsError",
    "KVCacheTooLargeError",
    "MedhaError",
    "ModelLoadError",
    "ParallelConfig",
    "PromptTooLongError",
    "RequestMetrics",
    "RequestTooLargeError",
    "SamplingParams",
    "StructuredOutputsParams",
    "Thinking",
    "TokenEvent",
    "TokenLogprob",
    "UnsupportedModelError",
    "WrongEventLoopError",
    "__version__",
]
