"""What the serving hardening and fuzz tests share: one of every served task (tiny models), an FAQ
knowledge base, a live uvicorn server in a thread, and raw HTTP over a socket (for stalled and
abandoned requests, which an HTTP client library will not send)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from support import FAQ_QUESTIONS, free_port

MATCH_DB = "faq.db"


def every_task(tiny_bert_dir: str, tiny_qwen_dir: str) -> dict[str, object]:
    """Served name -> model: an embedder, a pair and a text classifier, a reranker, an extractor."""
    from qtune.api import load

    return {"emb": load(tiny_bert_dir, task="embedding", device="cpu"),
            "pairs": load(tiny_bert_dir, task="pair-cls", device="cpu"),
            "texts": load(tiny_bert_dir, task="classify", labels=["billing", "delivery"], device="cpu"),
            "rr": load(tiny_bert_dir, task="reranker", device="cpu"),
            "ext": load(tiny_qwen_dir, task="extract", device="cpu")}


@contextlib.contextmanager
def faq_matcher(embedder, folder, rescorer=None):
    """A FaqMatcher over FAQ_QUESTIONS in a Milvus Lite file under `folder`."""
    from qtune.kb import FaqMatcher, build_kb

    faq = folder / "faq.csv"
    faq.write_text("question,answer\n" + "".join(f"{q},answer {i}\n" for i, q in enumerate(FAQ_QUESTIONS)),
                   encoding="utf-8")
    with build_kb(embedder, faq, str(folder / MATCH_DB), model_name="tiny-bert") as store:
        yield FaqMatcher(embedder, store, rescorer=rescorer)


@contextlib.contextmanager
def live_server(app, **config):
    """(host, port) of `app` served by uvicorn in a thread until the block ends."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(2000):
        if server.started:
            break
        time.sleep(0.01)
    assert server.started
    try:
        yield "127.0.0.1", server.config.port
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive()


def request_head(path: str, length: int, *, host: str = "127.0.0.1", extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n").encode()


def read_response(sock: socket.socket, timeout: float = 30) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 response with a Content-Length."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, body


def wait_until(condition, timeout: float = 10, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        time.sleep(0.01)
