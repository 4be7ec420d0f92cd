"""The OpenAI-compatible HTTP server: ``create_app(llm)`` (app.py), the single-model Scheduler (scheduler.py) and
request validation (schemas.py). ``edgert serve`` runs it under uvicorn."""
from .app import create_app
from .scheduler import QueueFullError, Scheduler

__all__ = ["create_app", "QueueFullError", "Scheduler"]
