"""CPU serving artifacts: a classifier exported to ONNX and quantized for ONNX Runtime, checked against its source.

Why: on a plain CPU, PyTorch eager at batch 1 is mostly framework overhead for a 3-layer model, and bitsandbytes'
4-bit layers dequantize every weight on every forward (fast only where bf16 compute is native). ONNX Runtime runs
the same graph with far less overhead, and its dynamic int8 quantization (int8 weights, activations quantized per
batch at run time, integer matmuls) is the fastest form measured on AVX2 CPUs (see ../shared/docs/stack-notes.md).

What is written (`export_folder`), inside a model folder under `onnx/`:
  model.onnx         fp32 graph of the PyTorch model (legacy TorchScript exporter, opset 18: it exports pruned
                     models with uneven heads and layers that kept no head; outputs equal PyTorch to ~1e-6)
  model_int8.onnx    ONNX Runtime dynamic quantization (`quantize_dynamic`, signed int8 weights per channel; the word
                     embeddings (Gather) become int8 too; LayerNorms, softmax and the classifier bias stay fp32)
  model_int4.onnx    optional: ONNX Runtime weight-only 4-bit: the MatMuls as `MatMulNBits` (symmetric, one scale
                     per 32 weights), the embedding tables as `GatherBlockQuantized` (4-bit rows, one scale and zero
                     point per 32 values); the pooler and classifier (Gemm nodes, which MatMulNBits does not take,
                     0.6 MB) and the activations stay fp32. The smallest file, about half int8's speed
  tokenizer files, config.json (labels), and export.json: the files, the inputs, the opset, library versions,
                     and the checks below (also recorded in the stage's metadata.json).

Checks before an artifact is kept (`check_artifacts`, on the validation set, same padded batches as PyTorch):
  fp32: max |logit difference| against the PyTorch model <= `FP32_TOLERANCE`, else the export is refused;
  int8 / int4: accuracy, prediction agreement with the PyTorch model and max |logit difference| are measured and
        recorded; an artifact agreeing on fewer than `min_agreement` of the predictions is removed (recorded with
        the reason). Accuracy is only ever measured by running the file.

Inputs of every graph: `input_ids` and `attention_mask`, int64, shape (batch, sequence), both dynamic; output
`logits` (batch, 2). The export traces a batch that contains padding, so the attention mask is part of the graph.

`OnnxClassifier(path, threads)` runs a file with ONNX Runtime's CPU provider (graph optimizations on, `threads`
intra-op threads, one inter-op thread): `.logits(input_ids, attention_mask)` on numpy or torch int tensors.
"""

import importlib.metadata as md
import json
import logging
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ONNX_DIR = "onnx"
MANIFEST = "export.json"
FILES = {"fp32": "model.onnx", "int8": "model_int8.onnx", "int4": "model_int4.onnx"}
KINDS = tuple(FILES)
OPSET = 18
INPUTS = ("input_ids", "attention_mask")
FP32_TOLERANCE = 1e-3  # max |logit difference| of the fp32 export against PyTorch (seen: ~1e-6)
INT4_BLOCK = 32


class ExportError(RuntimeError):
    """An export that cannot be made or does not match its source; the message names the folder."""


def artifact_name(kind: str) -> str:
    """The report's and metadata's name of an artifact: onnx_fp32, onnx_int8, onnx_int4."""
    return f"onnx_{kind}"


def _quiet_onnxruntime():
    import onnxruntime  # in the body: slow to import, only needed here

    onnxruntime.set_default_logger_severity(3)  # errors only: no graph-optimizer chatter
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    return onnxruntime


# ----------------------------------------------------------------------------------------------------
# Export and quantization


def _dummy_inputs(model):
    """Two sentences of 8 tokens, the second padded after 5: the trace then keeps the attention mask."""
    vocab = model.config.vocab_size
    input_ids = (torch.arange(16, dtype=torch.long).reshape(2, 8) * 7 + 100) % vocab
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    return input_ids, attention_mask


def export_fp32(model, path, opset: int = OPSET) -> None:
    """The fp32 ONNX graph of a BERT/DistilBERT classifier (pruned or not), batch and length dynamic."""
    path = Path(path)
    model = model.eval()
    if next(model.parameters()).device.type != "cpu":
        raise ExportError("export_fp32 wants a CPU model: move it with .cpu() first")
    dynamic = {"batch": 0, "sequence": 1}
    axes = {name: {axis: label for label, axis in dynamic.items()} for name in INPUTS}
    axes["logits"] = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        # the legacy exporter warns that it is deprecated and that python booleans on tensors are traced as
        # constants (shape checks inside transformers); the graph is checked against PyTorch afterwards
        warnings.simplefilter("ignore")
        torch.onnx.export(model, _dummy_inputs(model), str(path), input_names=list(INPUTS),
                          output_names=["logits"], dynamic_axes=axes, opset_version=opset, dynamo=False)


def empty_weight_nodes(path) -> list:
    """Nodes that multiply by an empty weight: the attention of a layer that kept no head (0 rows/columns). ONNX
    Runtime's dynamic quantization turns them into garbage (scale of an empty tensor), so they stay fp32 (they
    compute nothing anyway)."""
    import onnx  # in the body: slow to import, only needed here

    graph = onnx.load(str(path)).graph
    empty = {t.name for t in graph.initializer if 0 in t.dims}
    return [node.name for node in graph.node if empty.intersection(node.input)]


def quantize_int8(src, dst) -> None:
    """ONNX Runtime dynamic quantization: int8 weights with one scale per output channel (per tensor, the 20%-pruned
    MiniLM agreed with its fp32 source on 96.8% of the validation predictions, per channel on 98.7%, at the same
    speed), activations quantized per batch at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic  # in the body: slow to import, only needed here

    _quiet_onnxruntime()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a generic "consider pre-processing" hint on the root logger
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         nodes_to_exclude=empty_weight_nodes(src))
    finally:
        root.setLevel(level)


def quantize_int4(src, dst, block_size: int = INT4_BLOCK) -> None:
    """ONNX Runtime weight-only 4-bit: every MatMul weight as `MatMulNBits` (symmetric, one fp32 scale per
    `block_size`), every embedding table as `GatherBlockQuantized` (each row in blocks of `block_size`, a scale and
    zero point each). Block 128 for the tables cost 0.3 points of validation accuracy on average, 32 nothing
    measurable (docs/experiments.md)."""
    _weight_only_4bit(src, dst, ("MatMul",), block_size, symmetric=True)
    _weight_only_4bit(dst, dst, ("Gather",), block_size)


def _weight_only_4bit(src, dst, op_types: tuple, block_size: int, symmetric: bool = False) -> None:
    """The weights that `op_types` nodes read from initializers, in 4 bits (ONNX Runtime's MatMulNBitsQuantizer:
    MatMul -> MatMulNBits; Gather over axis 1, i.e. each row in blocks -> GatherBlockQuantized)."""
    import onnx  # in the body: slow to import, only needed here
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    _quiet_onnxruntime()
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=block_size, is_symmetric=symmetric,
                                     op_types_to_quantize=op_types)
    with np.errstate(divide="ignore", invalid="ignore"):  # a block of equal values has scale 0: stored as zero point
        quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)


# ----------------------------------------------------------------------------------------------------
# Running


class OnnxClassifier:
    """An ONNX classifier file in ONNX Runtime (CPU provider)."""

    def __init__(self, path, threads: int = 0):
        ort = _quiet_onnxruntime()
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"{self.path}: no such ONNX file")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # no busy-waiting between runs: spinning threads would steal the cores from whatever runs next (the next
        # model timed in the same process, the tokenizer of a server)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for unreadable files
            raise ExportError(f"{self.path} cannot be loaded by ONNX Runtime "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
        self.threads = options.intra_op_num_threads

    def logits(self, input_ids, attention_mask) -> np.ndarray:
        def as_int64(x):
            x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
            return x.astype(np.int64, copy=False)

        return self.session.run(None, {"input_ids": as_int64(input_ids),
                                       "attention_mask": as_int64(attention_mask)})[0]

    def __call__(self, input_ids, attention_mask, **_):
        """Same call shape as a PyTorch classifier's forward (for timing loops); returns numpy logits."""
        return self.logits(input_ids, attention_mask)


def onnx_predict_logits(classifier: OnnxClassifier, loader) -> torch.Tensor:
    """Logits of every example of a `common.data.make_loader` loader, in dataset order (like
    common.training.predict_logits)."""
    out = torch.zeros((len(loader.dataset), 2))
    for batch in loader:
        out[batch["idx"]] = torch.from_numpy(classifier.logits(batch["input_ids"], batch["attention_mask"])).float()
    return out


# ----------------------------------------------------------------------------------------------------
# One folder: export, quantize, check, write export.json


def _versions() -> dict:
    return {name: md.version(name) for name in ("onnx", "onnxruntime", "torch")}


def check_artifact(kind: str, path, reference_logits: torch.Tensor, labels: torch.Tensor, loader,
                   threads: int) -> dict:
    """Run one ONNX file on the loader and compare it with the PyTorch reference logits."""
    started = time.time()
    logits = onnx_predict_logits(OnnxClassifier(path, threads), loader)
    predictions = logits.argmax(-1)
    return {
        "file": Path(path).name,
        "bytes": Path(path).stat().st_size,
        "accuracy": (predictions == labels).float().mean().item(),
        "source_accuracy": (reference_logits.argmax(-1) == labels).float().mean().item(),
        "prediction_agreement": (predictions == reference_logits.argmax(-1)).float().mean().item(),
        "max_abs_logit_diff": (logits - reference_logits).abs().max().item(),
        "sentences": len(labels),
        "check_time_s": round(time.time() - started, 1),
    }


def export_folder(model, tokenizer, folder, kinds, *, reference_logits, labels, loader, min_agreement: float,
                  threads: int = 0, log=print) -> dict:
    """Write `folder/onnx/` for a CPU PyTorch model: every kind in `kinds` ("fp32" is always made: the others
    are quantized from it), each checked against `reference_logits` (the PyTorch model's logits on `loader`).
    Returns the record stored in export.json and metadata.json; raises ExportError when the fp32 export does
    not match its source (nothing is left behind then)."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown ONNX artifact kinds {unknown}: use some of {KINDS}")
    out = Path(folder) / ONNX_DIR
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    record = {"opset": OPSET, "inputs": list(INPUTS), "outputs": ["logits"], "versions": _versions(),
              "fp32_tolerance": FP32_TOLERANCE, "min_agreement": min_agreement, "artifacts": {}, "rejected": {}}
    try:
        export_fp32(model, out / FILES["fp32"])
        checked = {"fp32": check_artifact("fp32", out / FILES["fp32"], reference_logits, labels, loader, threads)}
        if checked["fp32"]["max_abs_logit_diff"] > FP32_TOLERANCE:
            raise ExportError(f"{out / FILES['fp32']}: ONNX Runtime logits differ from PyTorch by "
                              f"{checked['fp32']['max_abs_logit_diff']:.3g} (tolerance {FP32_TOLERANCE})")
        for kind in kinds:
            if kind == "fp32":
                continue
            path = out / FILES[kind]
            (quantize_int8 if kind == "int8" else quantize_int4)(out / FILES["fp32"], path)
            result = check_artifact(kind, path, reference_logits, labels, loader, threads)
            if result["prediction_agreement"] < min_agreement:
                path.unlink()
                record["rejected"][artifact_name(kind)] = dict(
                    result, reason=f"agrees with the PyTorch model on {result['prediction_agreement']:.1%} of "
                                   f"the predictions, below the {min_agreement:.1%} required")
                log(f"{out}: {FILES[kind]} rejected: {record['rejected'][artifact_name(kind)]['reason']}")
                continue
            checked[kind] = result
        if "fp32" not in kinds:
            (out / FILES["fp32"]).unlink()
            checked.pop("fp32")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    for kind, result in checked.items():
        record["artifacts"][artifact_name(kind)] = result
        log(f"{out.name}/{result['file']}: accuracy {result['accuracy']:.4f} (PyTorch {result['source_accuracy']:.4f}), "
            f"agreement {result['prediction_agreement']:.2%}, max |logit diff| {result['max_abs_logit_diff']:.2g}, "
            f"{result['bytes'] / 2**20:.2f} MiB")
    tokenizer.save_pretrained(str(out))
    config = model.config.to_dict()
    record["labels"] = {str(k): v for k, v in config.get("id2label", {}).items()}
    record["model_type"] = config.get("model_type")
    with open(out / MANIFEST, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")
    return record


# ----------------------------------------------------------------------------------------------------
# Reading what a folder ships


def read_manifest(folder) -> dict | None:
    """The export.json of `folder/onnx/` (None when the folder has no export); ExportError when unreadable."""
    path = Path(folder) / ONNX_DIR / MANIFEST
    if not path.exists():
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"{path} is unreadable ({err}): run `python 9_quantize_pruned_model.py` again") from None


def onnx_bytes_by_part(path) -> dict:
    """{"embeddings", "encoder", "rest": bytes of the initializers (weights, quantization scales) the graph's nodes of
    that part read}: a node's name carries its module path (`/bert/embeddings/...`, `/bert/encoder/layer.0/...`)."""
    import onnx  # in the body: slow to import, only ONNX work needs it
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    readers = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.name)
    out = dict.fromkeys(("embeddings", "encoder", "rest"), 0)
    for init in graph.initializer:
        names = " ".join(readers.get(init.name, []))
        part = ("embeddings" if "/embeddings/" in names else
                "encoder" if "/encoder/" in names or "/transformer/" in names else "rest")
        # the stored bytes: 4-bit tensors are packed two values a byte, but unpacked by numpy_helper.to_array
        out[part] += len(init.raw_data) if init.HasField("raw_data") else numpy_helper.to_array(init).nbytes
    return out


def exported_artifacts(folder) -> dict:
    """{artifact name: path} of the ONNX files a folder ships (checked: each listed file must exist)."""
    manifest = read_manifest(folder)
    if manifest is None:
        return {}
    out = {}
    for name, result in manifest.get("artifacts", {}).items():
        path = Path(folder) / ONNX_DIR / result["file"]
        if not path.is_file():
            raise ExportError(f"{path} is listed in {MANIFEST} but missing: "
                              f"run `python 9_quantize_pruned_model.py` again")
        out[name] = path
    return out
