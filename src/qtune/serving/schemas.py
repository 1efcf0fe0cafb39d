"""Server settings, request bodies and the JSON error shape of the serving contract."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_tokens: int = 16384  # padded tokens (rows x longest row) per model call
    max_wait_ms: float = 5.0  # how long the first waiting request may wait for company
    max_queue: int = 1024  # waiting requests per model; more -> 429
    max_inputs: int = 2048  # inputs per request
    max_input_tokens: int | None = None  # None: the model's max_length
    max_body_bytes: int = 8 * 1024 * 1024
    max_new_tokens: int = 512  # /v1/extract: the most a request may ask for; more -> 422
    extract_batch_size: int = 16  # /v1/extract: prompts per generate() call
    api_key: str | None = None


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
               503: "service_unavailable"}


class ApiError(Exception):
    """An error the client caused (or a state it must wait out), answered as JSON."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return error_body(self.message, ERROR_TYPES.get(self.status, "server_error"), self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _Request(BaseModel):
    # Clients send extra fields (`user`, ...); they are ignored rather than rejected.
    model_config = ConfigDict(extra="ignore")
    # What a union field accepts, said once instead of one pydantic failure per alternative.
    union_messages: ClassVar[dict[str, str]] = {}


class EmbeddingRequest(_Request):
    union_messages = {"input": "input: expected a string, a list of strings, a list of token ids or a list of "
                               "those lists"}
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    model: StrictStr | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(default=None, gt=0)
    # Not in OpenAI's API: queries get the model's query instruction (Cohere/Voyage style).
    input_type: Literal["query", "document"] = "document"


class ClassifyRequest(_Request):
    union_messages = {"input": "input: expected a list of pairs [[text_a, text_b], ...]"}
    input: list[list[StrictStr]] | list[StrictStr] | StrictStr
    model: StrictStr | None = None


class RerankDocument(_Request):
    text: StrictStr


class RerankRequest(_Request):
    # Documents as strings (Jina/vLLM) or {"text": ...} objects (Cohere's older clients).
    union_messages = {"documents": 'documents: expected a list of strings (or of {"text": string} objects)'}
    query: StrictStr
    documents: list[StrictStr | RerankDocument]
    model: StrictStr | None = None
    top_n: StrictInt | None = Field(default=None, ge=1)
    return_documents: StrictBool = False


class ExtractRequest(_Request):
    union_messages = {"input": "input: expected a string or a list of strings"}
    input: StrictStr | list[StrictStr]
    model: StrictStr | None = None
    max_new_tokens: StrictInt | None = Field(default=None, ge=1)
