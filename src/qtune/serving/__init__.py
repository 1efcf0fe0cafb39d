"""HTTP serving: OpenAI/Cohere-shaped endpoints over loaded qtune models.

    >>> from qtune.api import load
    >>> from qtune.serving import ServerSettings, serve
    >>> serve({"my-embedder": load("out/best", task="embedding")}, ServerSettings(port=8000))

Nothing heavy is imported here: FastAPI and uvicorn load when `create_app` / `serve` are called.
"""

from __future__ import annotations

from qtune.serving.schemas import ServerSettings

__all__ = ["ServerSettings", "create_app", "serve"]


def create_app(models, settings, matcher=None):
    from qtune.serving.app import create_app as _create_app

    return _create_app(models, settings, matcher)


def serve(models, settings, matcher=None) -> None:
    from qtune.serving.app import serve as _serve

    _serve(models, settings, matcher)
