"""The OpenAI-compatible HTTP server: ``create_app(llm)`` (app.py), the single-model Scheduler (scheduler.py) and
request validation (schemas.py). ``run_server`` runs it under uvicorn (``edgert serve`` does)."""
from .app import create_app, run_server
from .scheduler import QueueFullError, Scheduler, ShuttingDownError

__all__ = ["create_app", "run_server", "QueueFullError", "Scheduler", "ShuttingDownError"]
