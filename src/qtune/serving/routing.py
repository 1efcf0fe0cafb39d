"""Which paths the server answers and which served model answers a request.

The paths and how each request is answered come from the task registry (each task's `endpoints()`):
a path several tasks share (`/v1/classify`: pairs and texts) goes to the model the request names, or
else to the only served model whose task takes the body. Each route's request model is attached to
the OpenAPI document (`/openapi.json`) by hand, since the routes parse their bodies themselves
(`qtune.serving.gate`).
"""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel

from qtune.serving.schemas import ApiError
from qtune.serving.state import ServedModel
from qtune.tasks import TASKS, Endpoint, Task

FIXED_ENDPOINTS = ("/v1/match", "/v1/models", "/health", "/metrics", "/openapi.json")


def task_routes() -> dict[str, list[tuple[Task, Endpoint]]]:
    """path -> the (task, endpoint) pairs answering it, in registry order."""
    routes: dict[str, list[tuple[Task, Endpoint]]] = {}
    for task in TASKS.values():
        for endpoint in task.endpoints():
            routes.setdefault(endpoint.path, []).append((task, endpoint))
    return routes


def pick_model(served: dict[str, ServedModel], handlers: list[tuple[Task, Endpoint]],
               body) -> tuple[ServedModel, Endpoint]:
    """The model a request names, or else the only served model whose task takes this body."""
    by_task = {task.name: endpoint for task, endpoint in handlers}
    kinds = " or ".join(task.kind for task, _ in handlers)
    name = getattr(body, "model", None)
    if name is None:
        candidates = [e for e in served.values() if e.kind in by_task]
        if len(candidates) > 1:  # several tasks share the path: the body's shape decides
            taking = [e for e in candidates if by_task[e.kind].accepts(body)]
            candidates = taking or candidates
        if len(candidates) == 1:
            return candidates[0], by_task[candidates[0].kind]
        if not candidates:
            wanted = [t for t, ep in handlers if ep.accepts(body)] or [t for t, _ in handlers]
            raise ApiError(404, f"no {_noun(wanted[0].kind)} loaded", param="model", code="model_not_found")
        raise ApiError(422, f"model is required: several are loaded ({', '.join(e.name for e in candidates)})",
                       param="model", code="model_required")
    entry = served.get(name)
    if entry is None:
        known = ", ".join(e.name for e in served.values() if e.kind in by_task) or "none"
        raise ApiError(404, f"model {name!r} is not loaded (loaded: {known})", param="model",
                       code="model_not_found")
    if entry.kind not in by_task:
        raise ApiError(404, f"model {name!r} is {entry.task.kind}, not {kinds}", param="model",
                       code="model_not_found")
    return entry, by_task[entry.kind]


def _noun(kind: str) -> str:
    return kind.split(" ", 1)[1]


def request_body(*models: type[BaseModel]) -> dict:
    """The OpenAPI `requestBody` of a route that parses its body itself."""
    refs = [{"$ref": f"#/components/schemas/{m.__name__}"} for m in dict.fromkeys(models)]
    schema = refs[0] if len(refs) == 1 else {"oneOf": refs}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def openapi_document(app: FastAPI, models: list[type[BaseModel]]) -> dict:
    """FastAPI's document of the routes, with the request models (and the models they nest) added."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        document = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for model in dict.fromkeys(models):
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
        app.openapi_schema = document
    return app.openapi_schema
