"""CPU int8 inference through ONNX Runtime, behind the same model interface.

`quantize_int8(loaded)` exports the loaded encoder (LoRA merged first) to ONNX, quantizes the
weights of its matrix multiplications to int8 (dynamic quantization: int8 weights per output
channel, activations quantized on the fly per batch) and swaps `loaded.model` for an
`OnnxModel`, which is called like the transformers model (`model(**batch).last_hidden_state` or
`.logits`, a mean-pooled classifier's pooling included) and returns torch tensors. Tokenization, padding, pooling and heads' post-processing
stay the same code as in fp32, so `Embedder`, `PairClassifier` and cross-encoder `Reranker` work
unchanged, in `qtune eval`, `predict` and `serve` alike (`--quantize int8`).

Only BERT-family encoders are exported; decoders (Qwen3) stay in PyTorch. Install with
`pip install "qtune[int8]"` (onnxruntime, onnx).

Static int8 through OpenVINO: `write_openvino_int8` (`qtune quantize`) calibrates the exported graph
on the user's texts with NNCF (int8 weights and activations, the activation ranges fixed by the
calibration) and saves it in the model folder (`openvino/int8.xml`, `int8.bin`, and `int8.json`,
which records a fingerprint of the weights it was made from). `--quantize int8` then runs that
graph through OpenVINO instead of exporting a dynamic one, as long as the fingerprint matches; on
CPUs with AMX or AVX512-BF16 OpenVINO runs the layers that stay in floating point in bf16.
`pip install "qtune[openvino]"` (openvino; nncf to quantize).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from qtune.errors import QtuneError

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OPENVINO_FOLDER = "openvino"  # in the model folder, beside what sentence-transformers' OpenVINO export writes
OPENVINO_IR, OPENVINO_NOTE = "int8.xml", "int8.json"  # the graph (and int8.bin, its weights), its note


class OnnxModel:
    """An ONNX Runtime session that answers `model(**batch)` like a transformers model (inference only)."""

    engine = "onnxruntime"

    def __init__(self, session, config, output: str):
        self.session, self.config, self.output = session, config, output
        self.input_names = [i.name for i in session.get_inputs()]
        self.training = False

    def run(self, feed: dict) -> np.ndarray:
        return self.session.run([self.output], feed)[0]

    def eval(self) -> "OnnxModel":
        return self

    def train(self, mode: bool = True) -> "OnnxModel":
        if mode:
            raise QtuneError("an int8 (ONNX Runtime) model runs inference only; load it without --quantize to train")
        return self

    def to(self, *args, **kwargs) -> "OnnxModel":
        return self

    def __call__(self, **inputs):
        import torch

        feed = {}
        for name in self.input_names:
            value = inputs.get(name)
            if value is None:  # e.g. token_type_ids left out by a caller: the model's default is zeros
                value = torch.zeros_like(inputs["input_ids"])
            feed[name] = value.detach().cpu().numpy().astype(np.int64)
        return SimpleNamespace(**{self.output: torch.from_numpy(np.ascontiguousarray(self.run(feed)))})


class OpenVinoModel(OnnxModel):
    """A compiled OpenVINO model (the static int8 graph of `write_openvino_int8`), called like `OnnxModel`."""

    engine = "openvino"

    def __init__(self, compiled, config, output: str):
        self.compiled, self.config, self.output = compiled, config, output
        self.input_names = [port.get_any_name() for port in compiled.inputs]
        self.request = compiled.create_infer_request()
        self.lock = threading.Lock()  # an infer request serves one call at a time
        self.training = False

    def run(self, feed: dict) -> np.ndarray:
        with self.lock:
            return np.array(self.request.infer(feed)[0])  # a copy: the request reuses its output memory


def _export_module(model, output: str):
    """A module taking the tokenizer's tensors positionally (what the ONNX exporter traces). Logits
    are the classification head's as qtune computes them (`class_logits`), so a classifier that
    pools the mean of the last hidden state has that pooling in the graph too."""
    import torch

    from qtune.modeling.heads import class_logits

    class Exported(torch.nn.Module):
        def __init__(self, inner, names):
            super().__init__()
            self.inner, self.names = inner, names

        def forward(self, *tensors):
            inputs = dict(zip(self.names, tensors))
            if output == "logits":
                return class_logits(self.inner, inputs)
            return getattr(self.inner(**inputs), output)

    return Exported


def _fp32_model(loaded):
    model = loaded.model
    if loaded.is_adapter:
        model = model.merge_and_unload()
    return model.float().eval()


def export_onnx(loaded, model, output: str, path: Path) -> None:
    """Write `model` (fp32, LoRA merged) as an ONNX graph taking the tokenizer's tensors, with batch
    and sequence axes free."""
    import torch

    probe = loaded.tokenizer(["a probe text", "a longer probe text for the exporter"], padding=True,
                             return_tensors="pt")
    names = [n for n in MODEL_INPUTS if n in probe]
    module = _export_module(model, output)(model, names)
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes[output] = {0: "batch"} if output == "logits" else {0: "batch", 1: "sequence"}
    # The probe batch is padded, so the traced graph always applies the attention mask; the
    # tracer's warnings about Python branches are about exactly that choice.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(probe[n] for n in names), str(path), input_names=names,
                          output_names=[output], dynamic_axes=axes, opset_version=17, dynamo=False)


def weights_fingerprint(folder: str | Path, base_model: str | None = None) -> str:
    """sha256 over the weight files at the top of `folder` (names and bytes) and, for an adapter, the
    base it applies to: what a static int8 graph was made from."""
    digest = hashlib.sha256(str(base_model or "").encode())
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and path.suffix in (".safetensors", ".bin", ".pt", ".pth"):
            digest.update(path.name.encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def _openvino_note(folder: Path) -> dict | None:
    note = folder / OPENVINO_FOLDER / OPENVINO_NOTE
    if not note.is_file():
        return None
    try:
        return json.loads(note.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise QtuneError(f"{note}: unreadable ({error}); run `qtune quantize` again") from None


def static_int8_graph(source: str | Path, loaded, output: str) -> Path | None:
    """The static int8 graph `qtune quantize` wrote in the model folder `source`, when there is one made
    from these weights for this output; None otherwise (a stale one is named on stderr)."""
    folder = Path(source)
    if not folder.is_dir():
        return None
    note = _openvino_note(folder)
    if note is None:
        return None
    base = loaded.meta.base_model if loaded.is_adapter else None
    if note.get("weights") != weights_fingerprint(folder, base) or note.get("output") != output:
        print(f"qtune: {folder / OPENVINO_FOLDER / OPENVINO_IR} was calibrated for other weights: run `qtune "
              f"quantize` again; using dynamic int8 (ONNX Runtime) meanwhile", file=sys.stderr)
        return None
    return folder / OPENVINO_FOLDER / OPENVINO_IR


def _openvino():
    try:
        import openvino
    except ImportError:
        raise QtuneError("the static int8 graph runs on OpenVINO: pip install 'qtune[openvino]'") from None
    return openvino


def load_openvino_int8(loaded, graph: Path, output: str, threads: int | None = None):
    """Swap `loaded.model` for the compiled static int8 graph at `graph`; returns `loaded`."""
    import torch

    ov = _openvino()
    core = ov.Core()
    # the same thread budget as PyTorch; one request at a time (the batcher forms the batches)
    compiled = core.compile_model(str(graph), "CPU", {"INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
                                                      "PERFORMANCE_HINT": "LATENCY"})
    loaded.model = OpenVinoModel(compiled, loaded.model.config, output)
    loaded.packed = False
    loaded.precision = "int8"
    return loaded


def write_openvino_int8(loaded, folder: str | Path, features: list[dict], *, output: str, source: dict) -> Path:
    """Calibrate a static int8 graph of `loaded` (fp32, CPU) on `features` (the tokenizer's unpadded
    rows, as the task makes them) with NNCF and write it into `folder`/openvino; returns the note's path.
    `source` goes into the note (what calibrated it)."""
    from qtune.io import atomic_path, refuse_link, write_json

    ov = _openvino()
    try:
        import nncf
    except ImportError:
        raise QtuneError("qtune quantize needs NNCF: pip install 'qtune[openvino]'") from None
    folder = Path(folder)
    target = folder / OPENVINO_FOLDER
    refuse_link(target)
    base = loaded.meta.base_model if loaded.is_adapter else None
    fingerprint = weights_fingerprint(folder, base)
    model = _fp32_model(loaded)
    with tempfile.TemporaryDirectory(prefix="qtune-int8-") as tmp:
        onnx_path = Path(tmp, "model.onnx")
        export_onnx(loaded, model, output, onnx_path)
        graph = ov.Core().read_model(str(onnx_path))
        names = [port.get_any_name() for port in graph.inputs]
        # one text a row, unpadded; an input the features lack (token types) is zeros, as in OnnxModel
        rows = [{n: np.asarray([row[n] if n in row else [0] * len(row["input_ids"])], dtype=np.int64)
                 for n in names} for row in features]
        quiet = logging.getLogger("nncf").level
        logging.getLogger("nncf").setLevel(logging.ERROR)  # its progress bars and advice
        try:
            quantized = nncf.quantize(graph, nncf.Dataset(rows), model_type=nncf.ModelType.TRANSFORMER,
                                      subset_size=len(rows))
        finally:
            logging.getLogger("nncf").setLevel(quiet)
        ov.save_model(quantized, str(Path(tmp, OPENVINO_IR)), compress_to_fp16=False)
        target.mkdir(exist_ok=True)
        note = target / OPENVINO_NOTE
        if note.exists():  # the old graph stops counting before its files are replaced
            refuse_link(note)
            note.unlink()
        for name in (Path(OPENVINO_IR).with_suffix(".bin").name, OPENVINO_IR):
            with atomic_path(target / name) as out:
                shutil.copyfile(Path(tmp, name), out)
    write_json(note, {"weights": fingerprint, "output": output, "calibration": source,
                      "rows": len(rows), "openvino": ov.__version__, "nncf": nncf.__version__})
    return note


def quantize_int8(loaded, *, output: str | None, threads: int | None = None, int8: bool = True,
                  source: str | Path | None = None):
    """Replace `loaded.model` by an int8 ONNX Runtime model of it; returns `loaded`.

    `output` is the model output the task reads ("last_hidden_state", "logits"; None: the task
    has no int8 path). `int8=False` keeps the exported fp32 graph (the export alone, e.g. to check it).
    A model folder `source` holding a static int8 graph made from these weights (`qtune quantize`)
    runs that graph through OpenVINO instead."""
    import torch

    task = loaded.meta.task
    if loaded.family.is_decoder or output is None:
        raise QtuneError(f"--quantize int8 is available for BERT-family encoders (embedding, pair-cls, "
                         f"cross-encoder reranker); '{loaded.meta.base_model}' is a {loaded.family.model_type} "
                         f"{task} model")
    if loaded.device.type != "cpu":
        raise QtuneError("--quantize int8 runs on the CPU; use --device cpu (on a GPU, bf16 is the fast path)")
    graph = static_int8_graph(source, loaded, output) if int8 and source is not None else None
    if graph is not None:
        return load_openvino_int8(loaded, graph, output, threads)
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise QtuneError("--quantize int8 needs ONNX Runtime: pip install 'qtune[int8]' (onnxruntime, onnx)") from None
    model = _fp32_model(loaded)
    with tempfile.TemporaryDirectory(prefix="qtune-int8-") as tmp:
        fp32_path, int8_path = Path(tmp, "model.onnx"), Path(tmp, "model.int8.onnx")
        export_onnx(loaded, model, output, fp32_path)
        quiet = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs advice on the root logger
        try:  # only the matrix multiplications: int8 embeddings and norms cost accuracy, gain nothing
            if int8:
                quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8, per_channel=True,
                                 op_types_to_quantize=["MatMul", "Gemm"])
        finally:
            logging.getLogger().setLevel(quiet)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # the same thread budget as PyTorch (torch.set_num_threads / OMP_NUM_THREADS)
        options.intra_op_num_threads = threads or torch.get_num_threads()
        session = ort.InferenceSession(str(int8_path if int8 else fp32_path), options,
                                       providers=["CPUExecutionProvider"])
    loaded.model = OnnxModel(session, model.config, output)
    loaded.packed = False  # the graph takes padded batches
    loaded.precision = "int8" if int8 else "fp32"
    return loaded
