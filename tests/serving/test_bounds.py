"""Bounded work for every request: a megabyte text is cut or refused before a tokenizer reads it,
one big request is split into short model calls so that others are answered meanwhile, headers
that trickle in are cut off, a port in use is reported before any model loads, and classifier
scores carry their label names."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
from support import MISSING_MODEL, assert_api_error, assert_user_error, run
from fastapi.testclient import TestClient
from served_models import every_task, faq_matcher, free_port, wait_until

from qtune.serving import ServerSettings, create_app
from qtune.tasks.requests import CHARS_PER_TOKEN

HUGE = "the cat is here " * (7_000_000 // 16)  # 7 MB: about 10 s for the tiny tokenizer to read whole


@pytest.fixture(scope="module")
def models(tiny_bert_dir, tiny_qwen_dir):
    served = every_task(tiny_bert_dir, tiny_qwen_dir)
    for name in ("emb", "pairs", "texts", "rr"):  # the tiny BERT has 64 positions: cut texts there, not at 512
        served[name].loaded.meta.max_length = 64
    served["rr"].formatter.max_length = 64
    return served


@pytest.fixture(scope="module")
def matcher(models, tmp_path_factory):
    with faq_matcher(models["emb"], tmp_path_factory.mktemp("faq"), rescorer=models["pairs"]) as m:
        yield m


@pytest.fixture(scope="module")
def client(models, matcher):
    with TestClient(create_app(models, ServerSettings(), matcher)) as c:
        yield c


def _timed(post, *args, **kwargs) -> tuple[httpx.Response, float]:
    began = time.monotonic()
    response = post(*args, **kwargs)
    return response, time.monotonic() - began


def _beside(client, big: tuple[str, dict], small: tuple[str, dict] = ("/v1/embeddings", {"model": "emb",
                                                                                          "input": "dog"})):
    """(the big request's answer and seconds, the small one's), the small one sent while the big
    one is being read or computed."""
    done = {}
    thread = threading.Thread(target=lambda: done.update(big=_timed(client.post, big[0], json=big[1])))
    thread.start()
    time.sleep(0.3)  # the big body is parsed by now, and being tokenized (or computed)
    small_answer = _timed(client.post, small[0], json=small[1])
    thread.join(120)
    return done["big"], small_answer


# --- 1. /v1/match: a megabyte query is cut to what the models read, off the model thread ---------------

def test_a_megabyte_match_query_is_cut_and_other_requests_are_answered_meanwhile(client, matcher):
    (answer, took), (small, waited) = _beside(client, ("/v1/match", {"query": HUGE, "top_k": 5}))
    assert answer.status_code == 200, answer.text
    assert small.status_code == 200
    assert took < 5, f"the 7 MB query took {took:.1f} s"
    assert waited < 2, f"a one-text request waited {waited:.1f} s behind it"
    cut = matcher.query_text(HUGE)
    assert len(cut) == matcher.embedder.loaded.meta.max_length * CHARS_PER_TOKEN and HUGE.startswith(cut)
    expected = matcher.match(cut, top_k=5)
    got = answer.json()
    assert [c["id"] for c in got["candidates"]] == [c["id"] for c in expected["candidates"]]
    assert [c["score"] for c in got["candidates"]] == pytest.approx([c["score"] for c in expected["candidates"]],
                                                                    abs=1e-5)


# --- 2. texts over the limit are refused (or cut where the API cuts) before they are tokenized ---------

@pytest.mark.parametrize("path, body, param", [
    ("/v1/rerank", {"model": "rr", "query": "cat", "documents": ["dog", HUGE]}, "documents"),
    ("/v1/rerank", {"model": "rr", "query": HUGE, "documents": ["dog"]}, "query"),
    ("/v1/embeddings", {"model": "emb", "input": ["dog", HUGE]}, "input"),
    ("/v1/classify", {"model": "texts", "input": [HUGE]}, "input"),
    ("/v1/classify", {"model": "pairs", "input": [["cat", HUGE]]}, "input"),
    ("/v1/extract", {"model": "ext", "input": [HUGE]}, "input"),
], ids=["rerank-document", "rerank-query", "embeddings", "classify-texts", "classify-pairs", "extract"])
def test_a_megabyte_text_is_refused_at_once_and_blocks_no_one(client, path, body, param):
    (answer, took), (small, waited) = _beside(client, (path, body))
    assert took < 3, f"the answer came after {took:.1f} s"
    assert small.status_code == 200
    assert waited < 2, f"a one-text request waited {waited:.1f} s behind it"
    error = assert_api_error(answer, 422, "characters", "the limit is", code="input_too_long", param=param)
    assert f"{len(HUGE)} characters" in error["message"]


def test_a_megabyte_document_is_cut_by_max_tokens_per_doc_before_it_is_tokenized(client, models):
    body = {"model": "rr", "query": "cat", "documents": [HUGE, "dog"], "max_tokens_per_doc": 10}
    (answer, took), (small, waited) = _beside(client, ("/v2/rerank", body))
    assert answer.status_code == 200, answer.text
    assert small.status_code == 200
    assert took < 3 and waited < 2, (took, waited)
    scores = {r["index"]: r["relevance_score"] for r in answer.json()["results"]}
    expected = models["rr"].score([("cat", "the cat is here the cat is here the cat"), ("cat", "dog")])
    assert [scores[0], scores[1]] == pytest.approx(expected.tolist(), abs=1e-5)


def test_cohere_truncate_cuts_a_megabyte_text_before_it_is_tokenized(client, models):
    (answer, took), _ = _beside(client, ("/v2/embed", {"model": "emb", "texts": [HUGE], "truncate": "END",
                                                      "input_type": "search_document"}))
    assert answer.status_code == 200, answer.text
    assert took < 3, f"took {took:.1f} s"
    short = client.post("/v2/embed", json={"model": "emb", "texts": [HUGE[:1000]], "truncate": "END"})
    assert answer.json()["embeddings"]["float"][0] == pytest.approx(short.json()["embeddings"]["float"][0], abs=1e-6)


# --- 3. one request at the default limits is many short model calls ------------------------------------

def test_a_big_rerank_is_split_into_short_calls_and_other_models_interleave(models, monkeypatch):
    reranker = models["rr"]
    real, calls = reranker.run_batch, []

    def slow_run_batch(features):  # a slow CPU model: 150 us per padded token, a 16384-token call 2.5 s
        padded = len(features) * max(len(f["input_ids"]) for f in features)
        calls.append(padded)
        time.sleep(150e-6 * padded)
        return real(features)

    monkeypatch.setattr(reranker, "run_batch", slow_run_batch)
    documents = [f"the {animal} is here now" for animal in ("cat", "dog", "cow", "goat")] * 512  # 2048
    with TestClient(create_app({"rr": reranker, "emb": models["emb"]}, ServerSettings())) as c:
        done = {}
        thread = threading.Thread(target=lambda: done.update(big=_timed(
            c.post, "/v1/rerank", json={"model": "rr", "query": "cat", "documents": documents})))
        thread.start()
        wait_until(lambda: len(calls) >= 1, timeout=30, message="the reranker's first model call")
        small, waited = _timed(c.post, "/v1/embeddings", json={"model": "emb", "input": "dog"})
        thread.join(120)
    answer, took = done["big"]
    assert answer.status_code == 200 and len(answer.json()["results"]) == 2048
    assert small.status_code == 200
    assert waited < 1.5, f"an embedding request waited {waited:.2f} s behind the rerank's model calls"
    assert max(calls) * 150e-6 < 1.0, f"a model call of {max(calls)} padded tokens"
    assert sum(calls) == 2048 * 9  # every row (9 tokens with the query) computed once


def test_model_calls_are_sized_from_the_measured_speed():
    """A model at 0.2 ms per padded token and a 100 ms target: after the first two calls (the first
    untimed, both at most FIRST_CALL_TOKENS) each call holds about 500 padded tokens."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from qtune.serving.batcher import FIRST_CALL_TOKENS, MicroBatcher

    sizes = []

    def runner(features):
        padded = len(features) * max(len(f["input_ids"]) for f in features)
        sizes.append(padded)
        time.sleep(0.2e-3 * padded)
        return np.zeros((len(features), 1), dtype=np.float32)

    async def main():
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher = MicroBatcher(runner, executor, max_batch_tokens=16384, max_wait_ms=0, max_queue=8,
                                   target_call_ms=100)
            batcher.start()
            answer = await batcher.submit([{"input_ids": [0] * 10}] * 700)  # 7000 tokens
            await batcher.stop()
            return answer

    assert asyncio.run(main()).shape == (700, 1)
    assert sum(sizes) == 7000 and sizes[:2] == [FIRST_CALL_TOKENS - 8, FIRST_CALL_TOKENS - 8]  # 204 rows of 10
    assert all(300 <= size <= 700 for size in sizes[2:-1]), sizes


# --- 4. headers that trickle in are cut off -------------------------------------------------------------

def _serve(app, settings: ServerSettings):
    """A uvicorn server with the configuration `qtune serve` uses, in a thread."""
    import uvicorn

    from qtune.serving.app import server_config

    server = uvicorn.Server(server_config(app, settings))
    server.config.log_level = "warning"
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, message="the server to start")
    return server, thread


def _closed_after(sock: socket.socket, trickle: bytes | None, limit: float = 10) -> tuple[float, bytes]:
    """(seconds until the server closed the connection, what it sent), sending `trickle` every 0.1 s."""
    began, received = time.monotonic(), b""
    sock.settimeout(0.1)
    while time.monotonic() - began < limit:
        try:
            if trickle:
                sock.sendall(trickle)
            chunk = sock.recv(65536)
            if not chunk:
                return time.monotonic() - began, received
            received += chunk
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - began, received
    return limit, received


def test_headers_that_trickle_in_are_cut_off_after_the_header_timeout(models):
    port = free_port()
    server, thread = _serve(create_app({"emb": models["emb"]}, ServerSettings(port=port, header_timeout_s=0.5)),
                            ServerSettings(port=port, header_timeout_s=0.5))
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock:  # slowloris: a header line at a time
            sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n")
            took, received = _closed_after(sock, b"X-Slow: 1\r\n")
        assert 0.4 < took < 3, f"closed after {took:.2f} s"
        assert received.startswith(b"HTTP/1.1 408 "), received
        assert b'"code":"header_timeout"' in received.replace(b" ", b"")
        with socket.create_connection(("127.0.0.1", port)) as sock:  # connects and sends nothing
            took, received = _closed_after(sock, None)
        assert 0.4 < took < 3 and received == b""
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:  # a prompt client is unaffected
            for _ in range(2):  # the same keep-alive connection: each request gets its own deadline
                assert http.post("/v1/embeddings", json={"input": "cat"}).status_code == 200
                time.sleep(0.3)
    finally:
        server.should_exit = True
        thread.join(30)


def test_the_header_timeout_reaches_the_server_settings(tiny_bert_dir, served, capsys):
    code, _, err = run(capsys, "serve", "--embedding", tiny_bert_dir, "--device", "cpu", "--port", str(free_port()),
                       "--header-timeout", "3.5", "--target-call-ms", "100")
    assert code == 0, err
    assert (served["settings"].header_timeout_s, served["settings"].target_call_ms) == (3.5, 100.0)
    run(capsys, "serve", "--embedding", tiny_bert_dir, "--device", "cpu", "--port", str(free_port()))
    assert (served["settings"].header_timeout_s, served["settings"].target_call_ms) == (10.0, 250.0)


# --- 5. a port in use is reported before any model loads ------------------------------------------------

def test_a_port_in_use_is_one_clear_error_before_any_model_loads(served, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        began = time.monotonic()
        code, _, err = run(capsys, "serve", "--embedding", MISSING_MODEL, "--port", str(port))
    assert_user_error(code, err, f"port {port} on 127.0.0.1 is in use (")
    assert len(err.strip().splitlines()) == 1, err
    assert "nonexistent" not in err  # the model was never looked for
    assert served == {}
    assert time.monotonic() - began < 5


# --- 6. classifier scores carry their label names -------------------------------------------------------

def test_classify_answers_name_the_label_of_each_score(client):
    texts = client.post("/v1/classify", json={"model": "texts", "input": ["cat", "a red bus"]})
    assert texts.status_code == 200
    for row in texts.json()["data"]:
        assert [s["label"] for s in row["scores"]] == ["billing", "delivery"]
        assert [s["score"] for s in row["scores"]] == row["probs"]
        assert row["label"] == max(row["scores"], key=lambda s: s["score"])["label"]
    pairs = client.post("/v1/classify", json={"model": "pairs", "input": [["cat", "dog"]]})
    assert pairs.status_code == 200
    (row,) = pairs.json()["data"]
    assert [s["label"] for s in row["scores"]] == ["0", "1"] and [s["score"] for s in row["scores"]] == row["probs"]
