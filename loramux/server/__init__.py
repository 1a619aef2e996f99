"""OpenAI-compatible HTTP server (FastAPI) around the engine."""

from loramux.server.app import create_app

__all__ = ["create_app"]
