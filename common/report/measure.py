"""Measuring one saved model folder: architecture, GFLOPs (through the fp32 twin for 4-bit), accuracy on the
validation set and extra eval files, CPU latency, ONNX exports; and the machine the latencies were taken on."""

import logging
import os
import platform
import random
import statistics
import time
from fractions import Fraction
from math import prod
from pathlib import Path
from typing import NamedTuple

import torch

from common.data import DataError, encode, make_loader, read_glue_tsv
from common.export import ExportError, OnnxClassifier, exported_artifacts, onnx_bytes_by_part, onnx_predict_logits
from common.flops import count_flops
from common.modeling import load_model, load_tokenizer, weight_bytes, weight_bytes_by_part
from common.modeling_dpq import build_model, get_layout, original_sizes
from common.modeling_dpq_4bit import QUANT_KEY
from common.report.discover import config_dict, display_label, family, folder_status, pruning_fields
from common.stats import accuracy_interval, median_interval
from common.training import predict_logits

logger = logging.getLogger("dpq")


class SkipModel(Exception):
    """A folder that cannot be loaded; the report lists it under "skipped" with the reason."""


# --- Architecture and size, counted from the model itself
def architecture(model) -> dict:
    """Layers, heads and FFN neurons kept (from the modules, fp32 or 4-bit) and the config's hidden and head size."""
    layout = get_layout(model)
    _, head_dim, _, hidden = original_sizes(model.config)
    return {"layers": len(layout["heads"]), "heads": sum(layout["heads"]), "ffn_neurons": sum(layout["ffn"]),
            "heads_per_layer": layout["heads"], "ffn_per_layer": layout["ffn"], "hidden_size": hidden,
            "head_dim": head_dim}


def architecture_signature(model_class: str, arch: dict) -> tuple:
    """Two models with equal signatures run the same matmuls (embedding lookups are not counted by fvcore)."""
    return (model_class, arch["hidden_size"], arch["head_dim"], tuple(arch["heads_per_layer"]),
            tuple(arch["ffn_per_layer"]))


def logical_parameters(model) -> int:
    """Parameters as the model means them: a packed 4-bit weight counts as its original shape."""
    states = [(p, getattr(p, "quant_state", None)) for p in model.parameters()]
    return int(sum(prod(s.shape) if s is not None and getattr(s, "shape", None) else p.numel() for p, s in states))


# --- GFLOPs (a 4-bit model is counted through its fp32 twin)
FIT_LENGTHS = (8, 16, 32, 48, 12, 24)  # sequence lengths traced to get a model's FLOPs as a function of length


class FlopsCurve:
    """FLOPs of one architecture as a function of sequence length (batch 1). Under fvcore's convention a forward is
    exactly quadratic in the length (Linears a*L, attention matmuls b*L^2, classifier a constant): three traced
    lengths give every length, checked against a fourth (the reference length); if it disagrees, each is traced."""

    def __init__(self, model_fn, ref_len: int):
        self.model_fn, self.traced = model_fn, {}
        self.points = [n for n in FIT_LENGTHS if n != ref_len][:3]
        for n in self.points + [ref_len]:
            self._trace(n)
        self.exact = self._fit(ref_len) == self.traced[ref_len]
        if not self.exact:
            logger.warning("[report] FLOPs are not quadratic in length for this model: tracing each length")

    def _trace(self, n: int) -> int:
        if n not in self.traced:
            self.traced[n] = count_flops(self.model_fn(), seq_len=n)
        return self.traced[n]

    def _fit(self, n: int) -> Fraction:  # the quadratic through the three traced points (Lagrange), exact
        return sum(self.traced[xi] * prod(Fraction(n - xj, xi - xj) for xj in self.points if xj != xi)
                   for xi in self.points)

    def gflops(self, n: int) -> float:
        if n in self.traced:
            return self.traced[n] / 1e9
        return float(self._fit(n)) / 1e9 if self.exact else self._trace(n) / 1e9


def fp32_twin(folder: Path):
    """An fp32 model of a 4-bit folder's class and layout, built from its config (random weights: it runs the same
    matmuls, so it has the same FLOPs; fvcore cannot trace bitsandbytes' 4-bit matmuls)."""
    from transformers import AutoConfig  # in the body: transformers is slow to import

    config = AutoConfig.from_pretrained(str(folder))
    for key in (QUANT_KEY, "quantization_config"):
        if hasattr(config, key):
            delattr(config, key)
    return build_model(config).eval()


def gflops_fields(model, arch: dict, bits: int, folder: Path, curves: dict, ref_len: int, lengths: list) -> dict:
    """GFLOPs at `ref_len` and per sentence at its tokenized length (`curves`: {signature: FlopsCurve})."""
    signature = architecture_signature(type(model).__name__, arch)
    source = (f"fp32 twin rebuilt from {folder.name}/config.json (same class and layout)" if bits == 4
              else "measured on this model")
    if signature not in curves:
        curves[signature] = FlopsCurve((lambda: fp32_twin(folder)) if bits == 4 else (lambda: model), ref_len)
    curve = curves[signature]
    gflops = curve.gflops(ref_len)
    per_length = {n: curve.gflops(n) for n in sorted(set(lengths))}
    per_sentence = sum(per_length[n] for n in lengths) / len(lengths)
    return {"gflops": round(gflops, 6), "gflops_per_sentence": round(per_sentence, 6), "gflops_source": source,
            "gflops_length_fit_exact": curve.exact}


# --- Latency
def latency_indices(sentences, batch_size: int, seed: int):
    """Row indices of the sentences timed at this batch size, the same for every model: batch b takes the first b rows
    of a seeded permutation (cycling), batch 1 the median-length (in characters) of its first 32 rows."""
    order = list(range(len(sentences)))
    random.Random(seed).shuffle(order)
    if batch_size == 1:
        pool = sorted(order[:32], key=lambda i: (len(sentences[i]), i))
        return [pool[len(pool) // 2]]
    return [order[i % len(order)] for i in range(batch_size)]


@torch.no_grad()
def _timed_rounds(runners: list, runs: int, warmup: int) -> list:
    """Times (ms) of each (model, inputs) over `runs` rounds after `warmup`: in turn, reversed in odd rounds."""
    for model, _ in runners:
        getattr(model, "eval", lambda: None)()
    for _ in range(warmup):
        for model, inputs in runners:
            model(**inputs)
    times = [[] for _ in runners]
    for i in range(runs):
        turns = list(zip(runners, times))
        for (model, inputs), out in (turns if i % 2 == 0 else turns[::-1]):
            start = time.perf_counter()
            model(**inputs)
            out.append((time.perf_counter() - start) * 1000.0)
    return times


def _timing(times: list, runs: int, warmup: int, inputs: dict) -> dict:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "runs": runs,
            "warmup": warmup, "seq_len": int(inputs["input_ids"].shape[1]),
            "batch_size": int(inputs["input_ids"].shape[0])}


def time_paired(model, inputs: dict, reference, reference_inputs: dict, runs: int, warmup: int) -> dict:
    """`model` timed with each run next to one of `reference` (the same sentences, tokenized for it), the order
    alternating, so that a slow stretch of the machine falls on both; speed-up = median over the rounds of reference
    time / model time, with its distribution-free 95% interval (common.stats.median_interval; None below 6 rounds)."""
    times, reference_times = _timed_rounds([(model, inputs), (reference, reference_inputs)], runs, warmup)
    speed = median_interval([r / t for r, t in zip(reference_times, times)])
    return dict(_timing(times, runs, warmup, inputs), reference_median_ms=statistics.median(reference_times),
                speedup=speed["median"], speedup_ci=[speed["ci_low"], speed["ci_high"]] if speed["coverage"] else None,
                speedup_coverage=speed["coverage"])


def speedup_record(detail: dict) -> dict:
    """What the report keeps of a `time_paired` result (speedup_vs_reference), rounded."""
    return {"speedup": round(detail["speedup"], 4),
            "ci": [round(v, 4) for v in detail["speedup_ci"]] if detail["speedup_ci"] else None,
            "coverage": detail["speedup_coverage"] and round(detail["speedup_coverage"], 4), "runs": detail["runs"],
            "median_ms": round(detail["median_ms"], 3), "reference_median_ms": round(detail["reference_median_ms"], 3)}


class TimingReference(NamedTuple):
    """The model the others of its precision are timed next to: folder name, loaded model, timed inputs by batch."""
    name: str
    model: object
    inputs: dict


def timed_inputs(tokenizer, validation, settings: dict) -> dict:
    """{batch size: the validation sentences timed at it (`latency_indices`), padded to the longest in the batch}."""
    sentences, out = [s for s, _ in validation], {}
    for batch in settings["latency_batches"]:
        enc = tokenizer([sentences[i] for i in latency_indices(sentences, batch, settings["seed"])], padding="longest",
                        truncation=True, max_length=settings["max_length"], return_tensors="pt")
        out[batch] = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}  # DistilBERT: no types
    return out


def artifact_runner(folder, artifact: str):
    """One artifact of a folder, ready to run: the PyTorch model ("pytorch") or an ONNX Runtime session."""
    if artifact == "pytorch":
        return load_model(Path(folder)).eval()
    return OnnxClassifier(exported_artifacts(folder)[artifact], threads=torch.get_num_threads())


def time_pair(final: tuple, student: tuple, validation, settings: dict) -> dict:
    """The deployment pair ((folder, artifact) of the final model, of the student) timed again, paired."""
    runner, reference = artifact_runner(*final), artifact_runner(*student)
    inputs, reference_inputs = (timed_inputs(load_tokenizer(Path(folder)), validation, settings)
                                for folder, _ in (final, student))
    return {"speedup": {f"batch_{b}": speedup_record(time_paired(runner, inputs[b], reference, reference_inputs[b],
                                                                 settings["latency_runs"], settings["warmup_runs"]))
                        for b in settings["latency_batches"]}}


def timing_references(name: str, folder, validation, settings: dict, bits: int) -> dict:
    """{bits or ONNX artifact: TimingReference}: `folder` loaded once more, and each ONNX export it ships."""
    inputs = timed_inputs(load_tokenizer(Path(folder)), validation, settings)
    artifacts = {bits: "pytorch", **{artifact: artifact for artifact in exported(folder, [])}}
    return {key: TimingReference(name, artifact_runner(folder, artifact), inputs)
            for key, artifact in artifacts.items()}


def _reference_for(references: dict, name: str, *keys):
    """The first of `references[key]` present, unless it is folder `name` itself (a reference is timed alone)."""
    reference = next((references[key] for key in keys if key in references), None)
    return None if reference is None or reference.name == name else reference


# --- Accuracy
def load_eval_files(paths) -> dict:
    """Read and validate every --eval-file before any model is loaded: {path as given: rows}."""
    rows = {}
    for path in map(str, paths):
        if not Path(path).is_file():
            raise DataError(f"--eval-file {path}: no such file (expected a GLUE-format TSV: sentence<TAB>label)")
        if not rows.setdefault(path, read_glue_tsv(path)):
            raise DataError(f"--eval-file {path}: no rows to evaluate")
    return rows


def eval_loader(tokenizer, rows, batch_size: int, max_length: int):
    """`rows` [(sentence, label)] through the project's data code: (loader, tokenized lengths)."""
    encoded = encode(tokenizer, rows, max_length=max_length)
    loader = make_loader(encoded, batch_size, shuffle=False, pad_id=tokenizer.pad_token_id or 0)
    return loader, [len(ids) for ids in encoded.input_ids]


def correct_on(runner, loader) -> list:
    """Per sentence (dataset order): did the model (PyTorch, or an ONNX classifier) predict its label?"""
    predict = onnx_predict_logits if isinstance(runner, OnnxClassifier) else predict_logits
    return (predict(runner, loader).argmax(-1) == loader.dataset.labels).tolist()


def as_bits(correct) -> str:
    """Per-sentence correctness as a compact JSON string ("1" right, "0" wrong), for paired tests later."""
    return "".join("1" if c else "0" for c in correct)


def from_bits(bits: str) -> list:
    return [c == "1" for c in bits]


# --- One folder: each artifact (the PyTorch model, each ONNX file) on the same inputs, then the folder's record
class FolderInputs(NamedTuple):
    """What every artifact of a folder runs on, tokenized by the folder's tokenizer."""
    loader: object
    lengths: list
    file_loaders: dict
    timed: dict


def measure_runner(runner, inputs: FolderInputs, settings: dict, reference, size: int, **about) -> dict:
    """Accuracy (95% bootstrap interval, per-sentence correctness), accuracy on each extra file and latency at each
    batch size of one runnable artifact; with a `reference` (TimingReference), timed paired with it
    (speedup_vs_reference); its `size` in bytes and what it is (`about`: runtime, precision, file)."""
    correct = correct_on(runner, inputs.loader)
    interval = accuracy_interval(correct, seed=settings["seed"])
    record = {"accuracy": round(interval["accuracy"], 6),
              "accuracy_ci": [round(interval["ci_low"], 6), round(interval["ci_high"], 6)],
              "correct": as_bits(correct), "eval_files": {}, "eval_files_correct": {}, "latency_ms": {},
              "latency_detail": {}, "speedup_vs_reference": {}, "size_bytes": size, "size_mb": round(size / 2**20, 3),
              **about}
    for path, file_loader in inputs.file_loaders.items():
        file_correct = correct_on(runner, file_loader)
        record["eval_files"][path] = round(sum(file_correct) / len(file_correct), 6)
        record["eval_files_correct"][path] = as_bits(file_correct)
    runs, warmup = settings["latency_runs"], settings["warmup_runs"]
    for batch, timed in inputs.timed.items():
        if reference is not None and batch in reference.inputs:
            detail = time_paired(runner, timed, reference.model, reference.inputs[batch], runs, warmup)
            record["speedup_vs_reference"][f"batch_{batch}"] = {"reference": reference.name,
                                                                **speedup_record(detail)}
        else:
            detail = _timing(_timed_rounds([(runner, timed)], runs, warmup)[0], runs, warmup, timed)
        record["latency_ms"][f"batch_{batch}"] = round(detail["median_ms"], 3)
        record["latency_detail"][f"batch_{batch}"] = {k: round(v, 3) if isinstance(v, float) else v
                                                     for k, v in detail.items()}
    return record


def measure_pytorch(model, folder: Path, bits: int, inputs: FolderInputs, settings: dict, reference) -> dict:
    """The PyTorch model as loaded, sized by its weight files (and where their bytes are)."""
    return measure_runner(model, inputs, settings, reference, weight_bytes(folder), runtime="pytorch",
                          precision="bnb 4-bit" if bits == 4 else "fp32", file="model*.safetensors",
                          size_by_part=weight_bytes_by_part(folder, model))


def measure_onnx(folder: Path, artifact: str, path: Path, inputs: FolderInputs, settings: dict, reference) -> dict:
    """One ONNX export the folder ships (`artifact`, e.g. onnx_int8, at `path`), run in ONNX Runtime."""
    return measure_runner(OnnxClassifier(path, threads=torch.get_num_threads()), inputs, settings, reference,
                          path.stat().st_size, runtime="onnxruntime", precision=artifact.replace("onnx_", ""),
                          file=str(path.relative_to(folder)), size_by_part=onnx_bytes_by_part(path))


def exported(folder, notes: list) -> dict:
    """{artifact: path} of the ONNX exports a folder ships; an unreadable export becomes a note, not a crash."""
    try:
        return exported_artifacts(folder)
    except ExportError as err:
        notes.append(f"ONNX export not measured: {err}")
        return {}


def measure_model(name: str, folder, *, validation, eval_files, settings, flops_curves: dict,
                  references: dict = None) -> dict:
    """Every number of one saved model folder. `settings`: batch_size, max_length, flops_seq_len, latency_batches,
    latency_runs, warmup_runs, seed; `flops_curves`: see gflops_fields; `references` ({bits or ONNX artifact:
    TimingReference}): the PyTorch model is timed paired with the one of its precision (else the fp32 one), each
    ONNX export with the reference's export of the same kind, unless this folder is that reference."""
    folder, references = Path(folder), references or {}
    meta, notes = folder_status(folder)
    config = config_dict(folder)
    started = time.time()
    logger.info(f"[report] {name}: loading {folder}")
    try:
        model, tokenizer = load_model(folder), load_tokenizer(folder)
    except Exception as err:  # a half-made or corrupt folder: skip it, say why; measuring errors still raise
        raise SkipModel(f"could not be loaded: {type(err).__name__}: {err}" + (f" ({notes[0]})" if notes else ""))
    arch = architecture(model)  # the loader built the layout of the config and loaded the weights strictly into it
    bits = 4 if config.get(QUANT_KEY) else 32

    batch, length = settings["batch_size"], settings["max_length"]
    inputs = FolderInputs(*eval_loader(tokenizer, validation, batch, length), {
        path: eval_loader(tokenizer, rows, batch, length)[0] for path, rows in eval_files.items()},
        timed_inputs(tokenizer, validation, settings))
    artifacts = {"pytorch": measure_pytorch(model, folder, bits, inputs, settings,
                                            _reference_for(references, name, bits, 32))}
    for artifact, path in exported(folder, notes).items():
        artifacts[artifact] = measure_onnx(folder, artifact, path, inputs, settings,
                                           _reference_for(references, name, artifact))
    pytorch = artifacts["pytorch"]
    record = {k: pytorch[k] for k in ("accuracy", "accuracy_ci", "eval_files", "latency_ms", "latency_detail",
                                      "speedup_vs_reference", "size_bytes", "size_mb")}
    record.update(gflops_fields(model, arch, bits, folder, flops_curves, settings["flops_seq_len"],
                                inputs.lengths))
    record.update({k: arch[k] for k in ("layers", "heads", "ffn_neurons", "heads_per_layer", "ffn_per_layer")})
    record.update({
        "params": logical_parameters(model), "bits": bits, "artifacts": artifacts,
        "torch_threads": torch.get_num_threads(), "label": display_label(name), "model_class": type(model).__name__,
        "family": family(name, config, meta), "stage": meta.get("stage"), "run_id": meta.get("run_id"),
        "upstream": sorted(Path(r.get("folder", "")).name for r in meta.get("upstream", {}).values()),
        "folder": str(folder), "stale": any(n.startswith("stale") for n in notes), "complete": bool(meta),
        "warnings": notes, "measure_time_s": round(time.time() - started, 1)})
    if config.get(QUANT_KEY):
        record["quantization"] = config[QUANT_KEY]
    record.update(pruning_fields(name, folder, meta))
    for note in notes:
        logger.warning(f"[report] {name}: {note}")
    logger.info(f"[report] {name}: acc {record['accuracy']:.4f}, {record['gflops']:.3f} GFLOPs "
                f"({record['gflops_source']}), {record['size_mb']:.1f} MiB, {bits}-bit, latency "
                f"{record['latency_ms']}, {arch['layers']} layers / {arch['heads']} heads / {arch['ffn_neurons']} FFN "
                f"neurons")
    return record


# --- The machine the latencies are measured on
def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def busy_cores(window_s: float = 1.0):
    """Cores other processes keep busy over the next `window_s` s (/proc/stat; unlike the load average, not a job that
    has just ended, like the previous stage of `make frontier`); None without /proc/stat."""
    def sample():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields[:8]) - fields[3] - (fields[4] if len(fields) > 4 else 0), sum(fields[:8])  # - idle, iowait
    try:
        (busy0, total0), _, (busy1, total1) = sample(), time.sleep(window_s), sample()
    except (OSError, ValueError, IndexError):
        return None
    return round((os.cpu_count() or 1) * (busy1 - busy0) / max(total1 - total0, 1), 2)


def machine_busy(load, busy=None) -> str:
    """A warning when other processes compete for the CPU (`busy_cores`, else the load average), else ""."""
    cores = os.cpu_count() or 1
    why = ((f"other processes kept {busy:.1f} of {cores} cores busy" if busy > cores * 0.5 else "") if busy is not None
           else f"load average {load[0]:.1f} on {cores} cores" if load and load[0] > cores * 0.75 else "")
    return why and (f"machine busy at the start ({why}): latency numbers are inflated by other processes; rerun on "
                    f"an idle machine (or with THREADS=1 to avoid thread oversubscription) before quoting them")


CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_info() -> dict:
    """The CPU: name, cores, the flags that decide int8/bf16 speed, native bf16 (what makes bnb 4-bit fast on CPU)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"name": name, "logical_cores": os.cpu_count(), "flags": [f for f in CPU_FLAGS if f in flags],
            "bf16_native": "avx512_bf16" in flags or "amx_bf16" in flags}


def cpu_words(cpu: dict) -> str:
    """'AMD EPYC, 2 logical cores, AVX2 only, no native bf16' (the qualifier every CPU timing carries)."""
    isa = "AVX-512" if "avx512f" in cpu["flags"] else "AVX2 only" if "avx2" in cpu["flags"] else "no AVX2"
    bf16 = "native bf16" if cpu["bf16_native"] else "no native bf16"
    return f"{cpu['name']}, {cpu['logical_cores']} logical cores, {isa}, {bf16}"
