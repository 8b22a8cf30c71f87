"""medha's OpenAI-compatible HTTP API (`medha serve`, or `create_app(engine)` in a service).

Needs the `serve` extra (`pip install 'medha[serve]' -c constraints.txt`): FastAPI and uvicorn.
"""

from __future__ import annotations

from medha.server.app import create_app

__all__ = ["create_app"]
