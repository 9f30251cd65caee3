"""The final report: every number measured on the saved model folders, then JSON, chart and markdown.

For each model folder under the models root (`discover_models`), `measure_model` loads it through the
project's one loader (`common.modeling.load_model`: plain, pruned or 4-bit) and measures:
- accuracy on SST-2 validation (and on every extra GLUE-format TSV given), by running the loaded model;
- GFLOPs (fvcore, batch 1, sequence length 128, attention counted; `common.flops`), and the mean GFLOPs per
  validation sentence at its real tokenized length. fvcore cannot trace bitsandbytes 4-bit layers; a 4-bit
  model runs the same matmuls as its fp32 twin, so the twin is counted and `gflops_source` says which;
- logical parameter count (a packed 4-bit weight counts as its unpacked shape), bytes on disk, bits;
- CPU latency at each batch size: median of N timed forward passes after warm-up, on real validation
  sentences padded to the batch's longest, chosen with a fixed seed (the same sentences for every model);
- architecture counted from the modules themselves: layers, attention heads kept, FFN neurons kept.

Then `build_report` assembles final_report.json (sorted keys, indented), `headline` compares the final model
with the standard quantized student, `plot_report` draws final_report.png and `markdown_report` writes
final_report.md.
"""

import json
import logging
import os
import platform
import random
import re
import statistics
import textwrap
import time
from datetime import datetime, timezone
from fractions import Fraction
from math import prod
from pathlib import Path

import torch

from common.data import DataError, encode, make_loader, read_glue_tsv
from common.export import ExportError, OnnxClassifier, exported_artifacts, onnx_predict_logits
from common.flops import FLOPS_CONVENTION, count_flops
from common.modeling import LAYOUT_KEY, QUANT_KEY, check_loadable, load_model, load_tokenizer, weight_bytes
from common.modeling_dpq import FAMILIES, build_model, get_layout, original_sizes
from common.paths import (PRUNED_NAME_RE, REPO_ROOT, STAGE_FOLDERS, STAGE_SCRIPTS, STUDENT_SEED_RE, parse_pruned_name,
                          stage_of_folder, without_seed)
from common.stage import (METADATA, StageError, describe_stale, git_commit, json_dump, library_versions,
                          read_metadata, rerun_commands, resolve_upstream, stale_reasons)
from common.stats import accuracy_interval, describe_difference, paired_comparison, seed_spread
from common.training import predict_logits

logger = logging.getLogger("dpq")

REPORT_JSON = "final_report.json"
REPORT_PNG = "final_report.png"
REPORT_MD = "final_report.md"
REPORT_DIR_ENV = "REPORT_DIR"  # tests (and users) can write the report somewhere other than the repo root

BASELINE = STAGE_FOLDERS["student_quantized"]  # distilled_quantized_student
FINAL = STAGE_FOLDERS["pruned_quantized"]  # pruned_quantized_final

# Folders every full pipeline writes (a missing one is warned about), then optional ones (silently absent).
EXPECTED = [STAGE_FOLDERS[s] for s in ("teacher", "student", "student_quantized", "pruned", "pruned_quantized")]
OPTIONAL = [STAGE_FOLDERS["student_nodistill"]]
# Pruned folders besides the pipeline's own (sweep and frontier points, other seeds, the magnitude baseline, and their
# 4-bit twins): <base>[_sNN][_seedN][_quantized], base pruned_model or pruned_magnitude (common.paths.pruned_folder).
SWEEP_RE = PRUNED_NAME_RE
NOT_MODELS = {STAGE_FOLDERS["pretrained_teacher"], STAGE_FOLDERS["pretrained_student"]}


class SkipModel(Exception):
    """A folder that cannot be loaded; the report lists it under "skipped" with the reason."""


def report_dir(override: str = "") -> Path:
    """Where the report files go: the override, else env REPORT_DIR, else the repository root."""
    return Path(override or os.environ.get(REPORT_DIR_ENV) or REPO_ROOT).resolve()


# ----------------------------------------------------------------------------------------------------
# Which folders


def _order_key(name: str):
    """Fixed reading order: teacher, students (other seeds after each), the final pipeline (pruned_model's other seeds
    after it), then the sweep / frontier by target: ours before the magnitude baseline, fp32 before 4-bit, seed SEED
    before the others."""
    fixed = ["teacher_model", "student_model", "student_model_nodistill", BASELINE, "pruned_model", FINAL]
    if name in fixed:
        return (0, fixed.index(name), -1, name)
    student = STUDENT_SEED_RE.match(name)
    if student:
        return (0, fixed.index(student["base"]), int(student["seed"]), name)
    parsed = parse_pruned_name(name)
    if parsed and parsed["target"] is None:  # pruned_model_seed43 (+ its 4-bit twin): beside pruned_model / FINAL
        return (0, fixed.index(FINAL if parsed["quantized"] else "pruned_model"), parsed["seed"] or 0, name)
    if parsed:
        return (1, round(100 * parsed["target"]), parsed["method"] != "taylor", parsed["quantized"],
                -1 if parsed["seed"] is None else parsed["seed"], name)
    return (2, 0, 0, name)


def _is_model_folder(folder: Path) -> bool:
    return folder.is_dir() and not folder.name.startswith(".") and (folder / "config.json").is_file()


def discover_models(models_root, names=None):
    """The model folders to report on, in reading order, and the warnings about expected ones missing.

    `names` (optional) restricts the report to those folder names. Without it: the pipeline's stage folders,
    every pruned folder named by common.paths.pruned_folder (sweep and frontier points, other seeds, the magnitude
    baseline; fp32 and their `_quantized` twins), students of other seeds (student_model_seed43), and any other
    folder holding a 4-bit model (a quantized twin named differently).
    """
    models_root = Path(models_root)
    found, notes = {}, []
    if names:
        for name in names:
            folder = models_root / name
            if _is_model_folder(folder):
                found[name] = folder
            else:
                notes.append(f"{name}: no model folder at {folder}; skipped")
    else:
        script = {folder: s for s, folder in STAGE_FOLDERS.items()}
        for name in EXPECTED + OPTIONAL:
            folder = models_root / name
            if _is_model_folder(folder):
                found[name] = folder
            elif name in EXPECTED:
                notes.append(
                    f"{name}: not found in {models_root}; skipped (written by {STAGE_SCRIPTS[script[name]]})"
                )
        if models_root.is_dir():
            for folder in sorted(models_root.iterdir()):
                if folder.name in found or folder.name in NOT_MODELS or not _is_model_folder(folder):
                    continue
                if (parse_pruned_name(folder.name) or STUDENT_SEED_RE.match(folder.name)
                        or _config_dict(folder).get(QUANT_KEY)):
                    found[folder.name] = folder
    ordered = sorted(found, key=_order_key)
    return [(name, found[name]) for name in ordered], notes


def _config_dict(folder: Path) -> dict:
    try:
        with open(Path(folder) / "config.json") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def folder_status(folder: Path):
    """(metadata or {}, warnings): half-made folders (no metadata.json) and stale ones: anything they were built
    from, directly or through their upstream folders, rebuilt, removed or (the data) changed since
    (common.stage.stale_reasons); the warning names it and the scripts to rerun."""
    folder = Path(folder)
    notes = []
    if not (folder / METADATA).is_file():
        return {}, [f"no {METADATA}: the stage that writes {folder.name} did not finish; numbers may be wrong"]
    try:
        meta = read_metadata(folder)
    except (OSError, json.JSONDecodeError) as err:
        return {}, [f"unreadable {METADATA} ({err})"]
    reasons = stale_reasons(meta, folder.parent)
    if reasons:
        notes.append(f"stale: built from inputs that changed since ({'; '.join(describe_stale(reasons))}): rerun "
                     + rerun_commands(reasons, meta.get("stage") or stage_of_folder(folder.name) or []))
    return meta, notes


# ----------------------------------------------------------------------------------------------------
# Architecture and size, counted from the model itself


def architecture(model) -> dict:
    """Layers, attention heads kept and FFN neurons kept, counted from the modules by common.modeling_dpq.get_layout
    (any family, pruned or not, fp32 or 4-bit: Linear4bit keeps out_features)."""
    layout = get_layout(model)
    _, head_dim, _, hidden = original_sizes(model.config)  # of the unpruned model; slicing keeps the head size
    return {
        "layers": len(layout["heads"]),
        "heads": sum(layout["heads"]),
        "ffn_neurons": sum(layout["ffn"]),
        "heads_per_layer": layout["heads"],
        "ffn_per_layer": layout["ffn"],
        "hidden_size": hidden,
        "head_dim": head_dim,
    }


def architecture_signature(model_class: str, arch: dict) -> tuple:
    """Two models with equal signatures run the same matmuls (embedding lookups are not counted by fvcore)."""
    return (model_class, arch["hidden_size"], arch["head_dim"], tuple(arch["heads_per_layer"]),
            tuple(arch["ffn_per_layer"]))


def logical_parameters(model) -> int:
    """Parameters as the model means them: a packed 4-bit weight counts as its original shape."""
    total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        total += prod(state.shape) if state is not None and getattr(state, "shape", None) else p.numel()
    return int(total)


def is_4bit(model) -> bool:
    """Any bitsandbytes Linear4bit (or a subclass, like common.quantization's) in the model."""
    return any(any(c.__name__ == "Linear4bit" for c in type(m).__mro__) for m in model.modules())


# ----------------------------------------------------------------------------------------------------
# GFLOPs (a 4-bit model is counted through its fp32 twin)


# the config entries that fix a model's shape, in every family's names (common.modeling_dpq.FAMILIES)
SAME_SHAPE_KEYS = ("model_type", *sorted({getattr(f, k) for f in FAMILIES.values()
                                          for k in ("hidden_key", "layers_key", "heads_key", "ffn_key")}), LAYOUT_KEY)


FIT_LENGTHS = (8, 16, 32, 48, 12, 24)  # sequence lengths traced to get a model's FLOPs as a function of length


class FlopsCurve:
    """FLOPs of one architecture as a function of sequence length (batch 1).

    Under fvcore's convention a BERT/DistilBERT forward is exactly quadratic in the length L: the Linears and
    LayerNorms cost a*L, the attention matmuls b*L^2, the pooler and classifier a constant (embedding lookups
    and element-wise ops are not counted). So three traced lengths give every length; the fit is checked
    against a fourth trace (the reference length) and, if it ever disagrees, every length is traced instead.
    """

    def __init__(self, model_fn, ref_len: int):
        self.model_fn = model_fn
        self.traced = {}
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

    def _fit(self, n: int) -> Fraction:
        total = Fraction(0)
        for i, xi in enumerate(self.points):
            term = Fraction(self.traced[xi])
            for j, xj in enumerate(self.points):
                if i != j:
                    term *= Fraction(n - xj, xi - xj)
            total += term
        return total

    def gflops(self, n: int) -> float:
        if n in self.traced:
            return self.traced[n] / 1e9
        return float(self._fit(n)) / 1e9 if self.exact else self._trace(n) / 1e9


class FlopsCache:
    """One FlopsCurve per architecture signature: each shape is traced a handful of times per report."""

    def __init__(self, ref_len: int):
        self.ref_len = ref_len
        self.curves = {}

    def curve(self, signature, model_fn) -> FlopsCurve:
        if signature not in self.curves:
            self.curves[signature] = FlopsCurve(model_fn, self.ref_len)
        return self.curves[signature]


def _upstream_twin(folder: Path, meta: dict, models_root: Path):
    """The fp32 folder a 4-bit folder was made from, if its metadata names one that still matches: fresh
    (same run_id as recorded), not 4-bit, same model type, width and pruning layout."""
    mine = _config_dict(folder)
    for record in meta.get("upstream", {}).values():
        source = resolve_upstream(record, models_root)  # relative to the models root (old records: by name)
        if not _is_model_folder(source) or source.resolve() == Path(folder).resolve():
            continue
        theirs = _config_dict(source)
        if theirs.get(QUANT_KEY) or any(theirs.get(k) != mine.get(k) for k in SAME_SHAPE_KEYS):
            continue
        try:
            if read_metadata(source).get("run_id") != record.get("run_id"):
                continue  # rebuilt since: not the twin of this 4-bit model any more
            check_loadable(source)  # unreadable (truncated weights, ...): the twin is rebuilt from config instead
        except (OSError, json.JSONDecodeError, StageError):
            continue
        return source
    return None


def rebuild_fp32_twin(folder: Path):
    """An fp32 model of the same class and layout as a 4-bit folder (random weights: FLOPs only).

    Built by the one loader's `common.modeling_dpq.build_model` with the quantization settings removed from the
    config: unpruned skeleton shrunk to the folder's `dpq_layout`, no weights loaded."""
    from transformers import AutoConfig  # in the body: transformers is slow to import

    config = AutoConfig.from_pretrained(str(folder))
    for key in (QUANT_KEY, "quantization_config"):
        if hasattr(config, key):
            delattr(config, key)
    return build_model(config).eval()


def fp32_twin(folder: Path, meta: dict, models_root: Path, arch: dict, model_class: str):
    """(description, model factory) of the fp32 twin whose FLOPs a 4-bit folder reports.

    Prefers the fp32 source folder named in metadata.json "upstream" (fresh, same architecture); otherwise an
    fp32 model rebuilt from the 4-bit folder's own config and layout.
    """
    signature = architecture_signature(model_class, arch)
    source = _upstream_twin(folder, meta, models_root)
    if source is not None:
        twin = {}

        def load_source():
            if "model" not in twin:
                try:
                    twin["model"] = load_model(source)
                except StageError as err:  # passed check_loadable, failed to load: same matmuls from config
                    logger.warning(f"[report] {folder.name}: {err}; FLOPs from the fp32 twin rebuilt from config")
                    twin["model"] = rebuild_fp32_twin(folder)
                    return twin["model"]
                twin_sig = architecture_signature(type(twin["model"]).__name__, architecture(twin["model"]))
                if twin_sig != signature:
                    raise StageError(f"{source.name} does not have the layout of {folder.name}")
            return twin["model"]

        return f"fp32 twin {source.name} (upstream of this 4-bit model)", load_source
    twin = {}

    def rebuild():
        if "model" not in twin:
            twin["model"] = rebuild_fp32_twin(folder)
        return twin["model"]

    return f"fp32 twin rebuilt from {folder.name}/config.json (same class and layout)", rebuild


# ----------------------------------------------------------------------------------------------------
# Latency


def latency_indices(sentences, batch_size: int, seed: int):
    """Row indices of the sentences timed at this batch size: the same for every model.

    A seeded permutation; batch b takes its first b rows (cycling when the data is smaller than b); batch 1
    takes the median-length sentence (in characters, so independent of the tokenizer) of the first 32 rows,
    so a single very short or very long sentence does not decide the batch-1 number.
    """
    order = list(range(len(sentences)))
    random.Random(seed).shuffle(order)
    if batch_size == 1:
        pool = sorted(order[:32], key=lambda i: (len(sentences[i]), i))
        return [pool[len(pool) // 2]]
    return [order[i % len(order)] for i in range(batch_size)]


def latency_inputs(tokenizer, sentences, max_length: int) -> dict:
    """Real sentences, padded to the longest in the batch (no token_type_ids: DistilBERT has none)."""
    enc = tokenizer(list(sentences), padding="longest", truncation=True, max_length=max_length,
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.no_grad()
def time_forward(model, inputs: dict, runs: int, warmup: int) -> dict:
    """Median wall time of `runs` forward passes after `warmup` untimed ones, in milliseconds (a PyTorch model or a
    common.export.OnnxClassifier: both are called as model(input_ids=..., attention_mask=...))."""
    if hasattr(model, "eval"):
        model.eval()
    for _ in range(warmup):
        model(**inputs)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model(**inputs)
        times.append((time.perf_counter() - start) * 1000.0)
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "runs": runs,
        "warmup": warmup,
        "seq_len": int(inputs["input_ids"].shape[1]),
        "batch_size": int(inputs["input_ids"].shape[0]),
    }


# ----------------------------------------------------------------------------------------------------
# Accuracy


def load_eval_files(paths) -> dict:
    """Read and validate every --eval-file before any model is loaded: {path as given: rows}."""
    rows = {}
    for path in paths:
        if not Path(path).is_file():
            raise DataError(f"--eval-file {path}: no such file (expected a GLUE-format TSV: sentence<TAB>label)")
        rows[str(path)] = read_glue_tsv(path)
        if not rows[str(path)]:
            raise DataError(f"--eval-file {path}: no rows to evaluate")
    return rows


def eval_loader(tokenizer, rows, batch_size: int, max_length: int):
    """`rows` [(sentence, label)] through the project's data code: (loader, tokenized lengths)."""
    encoded = encode(tokenizer, rows, max_length=max_length)
    loader = make_loader(encoded, batch_size, shuffle=False, pad_id=tokenizer.pad_token_id or 0)
    return loader, [len(ids) for ids in encoded.input_ids]


def correct_on(runner, loader) -> list:
    """Per sentence (dataset order): did the model (PyTorch, or an ONNX classifier) predict its label?"""
    logits = onnx_predict_logits(runner, loader) if isinstance(runner, OnnxClassifier) else predict_logits(runner,
                                                                                                           loader)
    return (logits.argmax(-1) == loader.dataset.labels).tolist()


def as_bits(correct) -> str:
    """Per-sentence correctness as a compact JSON string ("1" right, "0" wrong), for paired tests later."""
    return "".join("1" if c else "0" for c in correct)


def from_bits(bits: str) -> list:
    return [c == "1" for c in bits]


# ----------------------------------------------------------------------------------------------------
# One model


def family(name: str, config: dict, meta: dict) -> str:
    """teacher | student | pruned: from the folder name when it is one of the pipeline's, else from the stage
    recorded in metadata.json and the config's pruning layout."""
    if name == STAGE_FOLDERS["teacher"]:
        return "teacher"
    if name.startswith("pruned") or config.get(LAYOUT_KEY):
        return "pruned"
    if name in (STAGE_FOLDERS["student"], STAGE_FOLDERS["student_nodistill"], BASELINE):
        return "student"
    stage = meta.get("stage") or ""
    return "teacher" if stage == "teacher" else "pruned" if stage.startswith("pruned") else "student"


def sweep_target(name: str):
    parsed = parse_pruned_name(name)
    return parsed["target"] if parsed else None


def seed_group(name: str) -> str:
    """The folder name seed SEED gives the same model (pruned_model_s50_seed43 -> pruned_model_s50,
    pruned_model_seed43_quantized -> pruned_quantized_final, student_model_seed43 -> student_model): the models of
    one seed group differ only by training seed."""
    base = without_seed(name)
    return FINAL if base == f"{STAGE_FOLDERS['pruned']}_quantized" else base


def pruning_fields(name: str, meta: dict) -> dict:
    """What a pruned folder says about how it was made: method (ours "taylor" or the "magnitude" baseline),
    sparsity target, stage-8 mode (single / sweep / frontier), seed, and the frontier run it came from."""
    parsed = parse_pruned_name(name) or {}
    results = meta.get("results", {})
    out = {"seed": meta.get("seed"), "seed_group": seed_group(name),
           "pruning_method": parsed.get("method") or results.get("method"),
           "sparsity_target": parsed.get("target") if parsed.get("target") is not None
           else results.get("target_sparsity")}
    if results.get("mode"):
        out["pruning_mode"] = results["mode"]
    if results.get("frontier"):
        out["frontier_run"] = {k: results["frontier"][k] for k in ("sweep_id", "branch_step", "recovery_fraction",
                                                                   "sweep_wall_time_s") if k in results["frontier"]}
    return out


def measure_runner(runner, loader, file_loaders: dict, timed_inputs: dict, settings: dict) -> dict:
    """Accuracy (with its 95% bootstrap interval and per-sentence correctness), accuracy on each extra file,
    and latency at each batch size, of one runnable artifact on the same loaders and timed inputs as the others."""
    correct = correct_on(runner, loader)
    interval = accuracy_interval(correct, seed=settings["seed"])
    record = {
        "accuracy": round(interval["accuracy"], 6),
        "accuracy_ci": [round(interval["ci_low"], 6), round(interval["ci_high"], 6)],
        "correct": as_bits(correct),
        "eval_files": {},
        "eval_files_correct": {},
        "latency_ms": {},
        "latency_detail": {},
    }
    for path, file_loader in file_loaders.items():
        file_correct = correct_on(runner, file_loader)
        record["eval_files"][path] = round(sum(file_correct) / len(file_correct), 6)
        record["eval_files_correct"][path] = as_bits(file_correct)
    for batch, inputs in timed_inputs.items():
        detail = time_forward(runner, inputs, settings["latency_runs"], settings["warmup_runs"])
        record["latency_ms"][f"batch_{batch}"] = round(detail["median_ms"], 3)
        record["latency_detail"][f"batch_{batch}"] = {k: round(v, 3) if isinstance(v, float) else v
                                                     for k, v in detail.items()}
    return record


def exported(folder, notes: list) -> dict:
    """{artifact: path} of the ONNX exports a folder ships; an unreadable export becomes a note, not a crash."""
    try:
        return exported_artifacts(folder)
    except ExportError as err:
        notes.append(f"ONNX export not measured: {err}")
        return {}


def measure_model(name: str, folder, *, validation, eval_files, settings, flops_cache, models_root) -> dict:
    """Every number of one saved model folder. `settings`: batch_size, max_length, flops_seq_len,
    latency_batches, latency_runs, warmup_runs, seed."""
    folder = Path(folder)
    meta, notes = folder_status(folder)
    config = _config_dict(folder)
    started = time.time()
    logger.info(f"[report] {name}: loading {folder}")
    try:
        model = load_model(folder)
        tokenizer = load_tokenizer(folder)
    except Exception as err:  # a half-made or corrupt folder: skip it, say why; measuring errors still raise
        raise SkipModel(f"could not be loaded: {type(err).__name__}: {err}" + (f" ({notes[0]})" if notes else ""))
    arch = architecture(model)
    model_class = type(model).__name__
    bits = 4 if (config.get(QUANT_KEY) or is_4bit(model)) else 32

    layout = config.get(LAYOUT_KEY)
    if layout and (list(layout.get("heads", [])) != arch["heads_per_layer"]
                   or list(layout.get("ffn", [])) != arch["ffn_per_layer"]):
        notes.append(f"config {LAYOUT_KEY} {layout} differs from the loaded modules "
                     f"(heads {arch['heads_per_layer']}, ffn {arch['ffn_per_layer']})")

    sentences = [s for s, _ in validation]
    loader, lengths = eval_loader(tokenizer, validation, settings["batch_size"], settings["max_length"])
    file_loaders = {path: eval_loader(tokenizer, rows, settings["batch_size"], settings["max_length"])[0]
                    for path, rows in eval_files.items()}
    timed_inputs = {batch: latency_inputs(tokenizer, [sentences[i] for i in latency_indices(sentences, batch,
                                                                                            settings["seed"])],
                                          settings["max_length"])
                    for batch in settings["latency_batches"]}
    pytorch = measure_runner(model, loader, file_loaders, timed_inputs, settings)
    artifacts = {"pytorch": dict(pytorch, runtime="pytorch", precision="bnb 4-bit" if bits == 4 else "fp32",
                                 size_bytes=weight_bytes(folder), file="model*.safetensors")}
    for artifact, path in exported(folder, notes).items():
        runner = OnnxClassifier(path, threads=torch.get_num_threads())
        artifacts[artifact] = dict(measure_runner(runner, loader, file_loaders, timed_inputs, settings),
                                   runtime="onnxruntime", precision=artifact.replace("onnx_", ""),
                                   size_bytes=path.stat().st_size, file=str(path.relative_to(folder)))
    for record in artifacts.values():
        record["size_mb"] = round(record["size_bytes"] / 2**20, 3)
    accuracy, file_accuracy = pytorch["accuracy"], pytorch["eval_files"]
    latency, latency_detail = pytorch["latency_ms"], pytorch["latency_detail"]

    signature = architecture_signature(model_class, arch)
    if bits == 4:
        gflops_source, model_fn = fp32_twin(folder, meta, models_root, arch, model_class)
    else:
        gflops_source, model_fn = "measured on this model", (lambda: model)
    curve = flops_cache.curve(signature, model_fn)
    gflops = curve.gflops(flops_cache.ref_len)
    per_length = {n: curve.gflops(n) for n in sorted(set(lengths))}
    gflops_per_sentence = sum(per_length[n] for n in lengths) / len(lengths)

    size = weight_bytes(folder)
    record = {
        "accuracy": round(accuracy, 6),
        "eval_files": {p: round(a, 6) for p, a in file_accuracy.items()},
        "gflops": round(gflops, 6),
        "gflops_per_sentence": round(gflops_per_sentence, 6),
        "gflops_source": gflops_source,
        "gflops_length_fit_exact": curve.exact,
        "params": logical_parameters(model),
        "size_bytes": size,
        "size_mb": round(size / 2**20, 3),
        "bits": bits,
        "latency_ms": latency,
        "latency_detail": latency_detail,
        "accuracy_ci": artifacts["pytorch"]["accuracy_ci"],
        "artifacts": artifacts,
        "torch_threads": torch.get_num_threads(),
        "layers": arch["layers"],
        "heads": arch["heads"],
        "ffn_neurons": arch["ffn_neurons"],
        "heads_per_layer": arch["heads_per_layer"],
        "ffn_per_layer": arch["ffn_per_layer"],
        "label": display_label(name),
        "model_class": model_class,
        "family": family(name, config, meta),
        "stage": meta.get("stage"),
        "run_id": meta.get("run_id"),
        "upstream": sorted(Path(r.get("folder", "")).name for r in meta.get("upstream", {}).values()),
        "folder": str(folder),
        "stale": any(n.startswith("stale") for n in notes),
        "complete": bool(meta),
        "warnings": notes,
        "measure_time_s": round(time.time() - started, 1),
    }
    if config.get(QUANT_KEY):
        record["quantization"] = config[QUANT_KEY]
    if sweep_target(name) is not None:
        record["sweep_target"] = sweep_target(name)
    record.update(pruning_fields(name, meta))
    for note in notes:
        logger.warning(f"[report] {name}: {note}")
    logger.info(
        f"[report] {name}: acc {accuracy:.4f}, {gflops:.3f} GFLOPs ({gflops_source}), {record['size_mb']:.1f} MiB, "
        f"{bits}-bit, latency {latency}, {arch['layers']} layers / {arch['heads']} heads / "
        f"{arch['ffn_neurons']} FFN neurons"
    )
    return record


# ----------------------------------------------------------------------------------------------------
# Assembly


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_busy(load) -> str:
    """A warning when other processes compete for the CPU: latency medians are then not comparable."""
    cores = os.cpu_count() or 1
    if load and load[0] > cores * 0.75:
        return (f"machine busy at the start (load average {load[0]:.1f} on {cores} cores): latency numbers are "
                f"inflated by other processes; rerun on an idle machine (or with THREADS=1 to avoid thread "
                f"oversubscription) before quoting them")
    return ""


def flops_convention(seq_len: int) -> str:
    return FLOPS_CONVENTION.replace("sequence length 128", f"sequence length {seq_len}")


CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_info() -> dict:
    """The CPU the latencies were measured on: model name, logical cores, the instruction-set flags that decide
    int8/bf16 speed, and whether bf16 matmuls are native (AVX512-BF16 or AMX), which is what makes
    bitsandbytes 4-bit fast or slow on a CPU."""
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
    present = [f for f in CPU_FLAGS if f in flags]
    return {"name": name, "logical_cores": os.cpu_count(), "flags": present,
            "bf16_native": "avx512_bf16" in flags or "amx_bf16" in flags}


def cpu_words(cpu: dict) -> str:
    """'AMD EPYC, 2 logical cores, AVX2 only, no native bf16' (the qualifier every CPU timing carries)."""
    isa = "AVX-512" if "avx512f" in cpu["flags"] else "AVX2 only" if "avx2" in cpu["flags"] else "no AVX2"
    bf16 = "native bf16" if cpu["bf16_native"] else "no native bf16"
    return f"{cpu['name']}, {cpu['logical_cores']} logical cores, {isa}, {bf16}"


def device_description() -> str:
    return f"cpu: {cpu_words(cpu_info())}"


# ----------------------------------------------------------------------------------------------------
# Paired comparisons (every model sees the same sentences)


def fp32_source(name: str, r: dict, models: dict):
    """The fp32 PyTorch model a 4-bit folder or an export was made from, when it is in the report."""
    if r["bits"] == 32:
        return name
    sources = [u for u in r.get("upstream", []) if u in models and models[u]["bits"] == 32]
    return sources[0] if sources else None


def comparison_pairs(models: dict) -> list:
    """(kind, (model a, artifact a), (model b, artifact b)) for every comparison the report draws."""
    pairs = []
    teacher, student = STAGE_FOLDERS["teacher"], STAGE_FOLDERS["student"]
    if BASELINE in models and FINAL in models:
        pairs.append(("headline: final vs standard 4-bit", (FINAL, "pytorch"), (BASELINE, "pytorch")))
    if student in models and teacher in models:
        pairs.append(("student vs teacher", (student, "pytorch"), (teacher, "pytorch")))
    for name, r in models.items():
        if r["bits"] == 32 and r["family"] == "pruned" and student in models:
            pairs.append(("pruned vs student", (name, "pytorch"), (student, "pytorch")))
        source = fp32_source(name, r, models)
        if r["bits"] == 4 and source:
            pairs.append(("4-bit vs its fp32 source", (name, "pytorch"), (source, "pytorch")))
        for artifact in r.get("artifacts", {}):
            if artifact != "pytorch" and source:
                pairs.append(("export vs its fp32 source", (name, artifact), (source, "pytorch")))
    return pairs


def artifact_label(name: str, artifact: str) -> str:
    return name if artifact == "pytorch" else f"{name} [{artifact}]"


def comparisons(models: dict, eval_files, seed: int) -> list:
    """Each pair on SST-2 validation and on every extra eval file: paired difference in points with its 95%
    paired-bootstrap interval, disagreement counts and the exact McNemar p (common.stats)."""
    out = []
    for kind, (a, art_a), (b, art_b) in comparison_pairs(models):
        ra, rb = models[a]["artifacts"][art_a], models[b]["artifacts"][art_b]
        sets = [("validation", ra["correct"], rb["correct"])]
        sets += [(path, ra["eval_files_correct"][path], rb["eval_files_correct"][path]) for path in eval_files]
        for evaluation, bits_a, bits_b in sets:
            result = paired_comparison(from_bits(bits_a), from_bits(bits_b), seed=seed)
            label_a, label_b = artifact_label(a, art_a), artifact_label(b, art_b)
            out.append(dict(result, kind=kind, a=a, a_artifact=art_a, b=b, b_artifact=art_b, evaluation=evaluation,
                            sentence=describe_difference(result, label_a, label_b)))
    return out


def find_comparison(comps: list, a: str, b: str, a_artifact="pytorch", b_artifact="pytorch",
                    evaluation="validation"):
    for c in comps:
        if (c["a"], c["a_artifact"], c["b"], c["b_artifact"], c["evaluation"]) == (a, a_artifact, b, b_artifact,
                                                                                 evaluation):
            return c
    return None


# ----------------------------------------------------------------------------------------------------
# Seeds and the frontier: mean and spread across training seeds; ours against the magnitude baseline

SEED_CONVENTION = (
    "Two different uncertainties. accuracy_seed_spread: mean and sample standard deviation (ddof=1) of the "
    "accuracy in points across the training seeds of one seed group (seed-to-seed variation of the training run, "
    "common.stats.seed_spread; 0 with one seed). accuracy_ci_per_seed / accuracy_ci: 95% percentile bootstrap "
    "interval over the validation sentences of each model (sentence-sampling uncertainty: how much the accuracy "
    "would move on another draw of sentences). vs_student: each seed's model paired against the student of its "
    "precision (fp32: student_model; 4-bit: distilled_quantized_student) on the same sentences: difference in "
    "points, 95% paired-bootstrap interval, exact McNemar p; vs_magnitude (frontier rows): ours against the "
    "magnitude baseline at the same target and precision, seed-SEED models, the same paired test")
METHOD_WORDS = {"taylor": "ours (gradual, Taylor)", "magnitude": "magnitude one-shot (baseline)"}


def _source_record(name: str, models: dict) -> dict:
    """The fp32 record a model was made from (itself for fp32): where a 4-bit twin's pruning facts live."""
    source = fp32_source(name, models[name], models)
    return models[source] if source else models[name]


def _paired_vs(models: dict, a: str, b: str, seed: int) -> dict:
    result = paired_comparison(from_bits(models[a]["artifacts"]["pytorch"]["correct"]),
                               from_bits(models[b]["artifacts"]["pytorch"]["correct"]), seed=seed)
    return {"model": a, "reference": b, "seed": models[a].get("seed"),
            **{k: result[k] for k in ("diff_points", "ci_low_points", "ci_high_points", "only_a_right",
                                      "only_b_right", "mcnemar_p", "significant")}}


def seed_groups(models: dict, seed: int) -> dict:
    """{group: summary} for every student and pruned model, grouped with its other-seed twins (`seed_group`).

    Each: members (reading order, seed SEED first when present) and their seeds; method, sparsity target and
    stage-8 mode (a 4-bit twin's from its fp32 source); accuracy mean and seed-to-seed spread in points
    (common.stats.seed_spread) next to each member's 95% bootstrap interval over sentences; mean GFLOPs, GFLOPs
    cut against the student, size and latency; and for pruned groups every member paired against the student of
    its precision (SEED_CONVENTION)."""
    student = STAGE_FOLDERS["student"]
    members = {}
    for name, r in models.items():
        if r["family"] in ("student", "pruned") and name != STAGE_FOLDERS["student_nodistill"]:
            members.setdefault(r.get("seed_group") or seed_group(name), []).append(name)
    out = {}
    for group, names in members.items():
        rs = [models[n] for n in names]
        first, source = rs[0], _source_record(names[0], models)
        bits = first["bits"]
        batches = sorted({k for r in rs for k in r["latency_ms"]}, key=lambda k: int(k.split("_")[1]))
        entry = {
            "members": names, "seeds": [_source_record(n, models).get("seed") for n in names],  # training seed
            "n_seeds": len(names),
            "family": first["family"], "bits": bits,
            "method": source.get("pruning_method") if first["family"] == "pruned" else None,
            "sparsity_target": source.get("sparsity_target") if first["family"] == "pruned" else None,
            "mode": source.get("pruning_mode"),
            "accuracy_seed_spread": seed_spread([100 * r["accuracy"] for r in rs]),
            "accuracy_ci_per_seed": {n: [round(100 * v, 4) for v in models[n]["accuracy_ci"]] for n in names},
            "gflops": statistics.fmean(r["gflops"] for r in rs),
            "size_mb": statistics.fmean(r["size_mb"] for r in rs),
            "params": statistics.fmean(r["params"] for r in rs),
            "latency_ms": {k: statistics.fmean(r["latency_ms"][k] for r in rs if k in r["latency_ms"])
                           for k in batches},
        }
        if student in models:
            entry["gflops_reduction_vs_student"] = round(1 - entry["gflops"] / models[student]["gflops"], 5)
        reference = BASELINE if bits == 4 and BASELINE in models else student
        if first["family"] == "pruned" and reference in models:
            per_seed = [_paired_vs(models, n, reference, seed) for n in names]
            entry["vs_student"] = {"reference": reference, "per_seed": per_seed,
                                   "diff_points_seed_spread": seed_spread([c["diff_points"] for c in per_seed])}
        out[group] = entry
    return out


def frontier_summary(models: dict, groups: dict, seed: int) -> dict | None:
    """The accuracy-compute frontier: one row per pruned seed group with a sparsity target (ours and the magnitude
    baseline, fp32 and 4-bit), by target; ours paired against the magnitude baseline at the same target and
    precision; the frontier run's wall time (stage 8 metadata / models/frontier.json). None without such groups."""
    rows = []
    for group, g in groups.items():
        if g["family"] != "pruned" or g["sparsity_target"] is None:
            continue
        rows.append({"group": group, **{k: g[k] for k in ("members", "seeds", "n_seeds", "method", "bits",
                                                          "sparsity_target", "mode", "gflops", "latency_ms",
                                                          "accuracy_seed_spread", "accuracy_ci_per_seed")},
                     "gflops_reduction_vs_student": g.get("gflops_reduction_vs_student"),
                     "vs_student": g.get("vs_student")})
    if not rows:
        return None
    rows.sort(key=lambda r: (r["sparsity_target"], r["mode"] != "frontier", r["method"] != "taylor", r["bits"] == 4))
    for row in rows:
        if row["method"] != "taylor":
            continue
        rival = next((r for r in rows if r["method"] == "magnitude" and r["bits"] == row["bits"]
                      and r["sparsity_target"] == row["sparsity_target"]), None)
        if rival:
            row["vs_magnitude"] = _paired_vs(models, row["members"][0], rival["members"][0], seed)
    walls = {}
    for name, r in models.items():
        run = r.get("frontier_run") or {}
        if run.get("sweep_id") and run.get("sweep_wall_time_s") is not None:
            walls[run["sweep_id"]] = {"seed": r.get("seed"), "wall_time_s": run["sweep_wall_time_s"],
                                      "recovery_fraction": run.get("recovery_fraction")}
    return {"rows": rows, "frontier_runs": walls,
            "methods": {m: METHOD_WORDS.get(m, m) for m in sorted({r["method"] for r in rows})}}


# ----------------------------------------------------------------------------------------------------
# Headline


def headline(models: dict, comps: list = (), cpu: dict = None, baseline: str = BASELINE, final: str = FINAL):
    """(headline dict or None, reason when None): the final model against the standard quantized student, then
    one line for deployment: the fastest artifact of the final model against the fastest of the student."""
    missing = [n for n in (baseline, final) if n not in models]
    if missing:
        return None, f"no headline: {' and '.join(missing)} not measured (run the stages that write them)"
    cpu = cpu or cpu_info()
    b, f = models[baseline], models[final]
    batches = sorted(int(k.split("_")[1]) for k in b["latency_ms"] if k in f["latency_ms"])
    big = f"batch_{batches[-1]}" if batches else None
    result = {
        "baseline": baseline,
        "final": final,
        "gflops_reduction": round(1 - f["gflops"] / b["gflops"], 4),
        "accuracy_drop_points": round((b["accuracy"] - f["accuracy"]) * 100, 2),
        "size_reduction": round(1 - f["size_mb"] / b["size_mb"], 4),
        "cpu": cpu_words(cpu),
    }
    paired = find_comparison(comps, final, baseline)
    if paired:
        result["paired"] = {k: paired[k] for k in ("diff_points", "ci_low_points", "ci_high_points", "only_a_right",
                                                   "only_b_right", "mcnemar_p", "significant")}
    if big:
        result[f"latency_speedup_{big}"] = round(b["latency_ms"][big] / f["latency_ms"][big], 3)
    result["sentence"] = headline_sentence(result, b, f)
    stale = [n for n in (baseline, final) if models[n].get("stale")]
    if stale:  # numbers of a model built from inputs that changed since: say so in the headline itself
        result["stale"] = stale
        result["sentence"] += (f" Caveat: {' and '.join(stale)} {'is' if len(stale) == 1 else 'are'} stale (built "
                               f"from inputs that changed since; see the warnings for what to rerun).")
    deploy = deployment(models, cpu)
    if deploy:
        result["deployment"] = deploy
    return result, None


def fastest_artifact(models: dict, names) -> tuple | None:
    """(model, artifact, record) with the lowest geometric-mean latency over the batch sizes timed."""
    best = None
    for name in names:
        for artifact, record in models.get(name, {}).get("artifacts", {}).items():
            times = list(record["latency_ms"].values())
            if not times:
                continue
            score = statistics.geometric_mean(times)
            if best is None or score < best[0]:
                best = (score, name, artifact, record)
    return best[1:] if best else None


def deployment(models: dict, cpu: dict) -> dict | None:
    """The final model's fastest CPU artifact (any form of pruned_model: PyTorch fp32, 4-bit, ONNX) against the
    student's fastest (any form of student_model), with accuracies and the speed-up at each batch size."""
    final = fastest_artifact(models, [STAGE_FOLDERS["pruned"], FINAL])
    student = fastest_artifact(models, [STAGE_FOLDERS["student"], BASELINE])
    if not final or not student:
        return None
    (fn, fa, fr), (sn, sa, sr) = final, student
    speedups = {k: round(sr["latency_ms"][k] / fr["latency_ms"][k], 2) for k in fr["latency_ms"] if k in sr["latency_ms"]}
    words = ", ".join((f"{v:.2f}x as fast" if v >= 1 else f"{1 / v:.2f}x slower") + f" at {k.replace('_', ' ')} "
                      f"({fr['latency_ms'][k]:.3g} vs {sr['latency_ms'][k]:.3g} ms)" for k, v in speedups.items())
    sentence = (f"On this CPU ({cpu_words(cpu)}), the final model's fastest artifact, "
                f"{artifact_label(fn, fa)} ({fr['accuracy']:.2%}, {fr['size_mb']:.3g} MiB), runs {words} against "
                f"the student's fastest, {artifact_label(sn, sa)} ({sr['accuracy']:.2%}, {sr['size_mb']:.3g} MiB).")
    return {"final": {"model": fn, "artifact": fa}, "student": {"model": sn, "artifact": sa},
            "final_accuracy": fr["accuracy"], "student_accuracy": sr["accuracy"],
            "final_size_mb": fr["size_mb"], "student_size_mb": sr["size_mb"],
            "speedup": speedups, "selection": "lowest geometric mean of the median latencies over the batch sizes",
            "sentence": sentence}


def headline_sentence(h: dict, b: dict, f: dict) -> str:
    paired = h.get("paired")
    if paired:
        diff = paired["diff_points"]
        direction = "lower" if diff < 0 else "higher" if diff > 0 else "equal"
        sig = "significant" if paired["significant"] else "not significant"
        p = "< 0.001" if paired["mcnemar_p"] < 0.001 else f"= {paired['mcnemar_p']:.2g}"
        acc = (f"is {abs(diff):.2f} points {direction} in accuracy" if diff else "is equally accurate") + (
            f" ({f['accuracy']:.2%} vs {b['accuracy']:.2%} on SST-2 validation; 95% interval "
            f"[{paired['ci_low_points']:+.2f}, {paired['ci_high_points']:+.2f}], {sig}, McNemar p {p})")
    else:
        acc = f"scores {f['accuracy']:.2%} vs {b['accuracy']:.2%} on SST-2 validation (no paired test)"
    parts = [
        f"{h['final']} needs {h['gflops_reduction']:.0%} fewer GFLOPs than {h['baseline']} "
        f"({f['gflops']:.3g} vs {b['gflops']:.3g})",
        acc,
        f"is {h['size_reduction']:.0%} smaller on disk ({f['size_mb']:.3g} vs {b['size_mb']:.3g} MiB)",
    ]
    speed = [k for k in h if k.startswith("latency_speedup_")]
    if speed:
        key = speed[0]
        batch = key.replace("latency_speedup_", "")
        speed = (f"runs {h[key]:.2f}x as fast" if h[key] >= 1 else f"runs {1 / h[key]:.2f}x slower")
        parts.append(f"{speed} at {batch.replace('_', ' ')} in PyTorch on this CPU ({h['cpu']}) "
                     f"({f['latency_ms'][batch]:.3g} vs {b['latency_ms'][batch]:.3g} ms)")
    return ", ".join(parts[:-1]) + " and " + parts[-1] + "."


def build_report(models: dict, *, settings: dict, dataset: dict, eval_files, preset: str, quick: bool,
                 skipped: dict, notes: list, constants: dict, wall_time_s: float) -> dict:
    cpu = cpu_info()
    comps = comparisons(models, eval_files, settings["seed"])
    groups = seed_groups(models, settings["seed"])
    head, reason = headline(models, comps, cpu)
    report = {
        "run": {
            "preset": preset,
            "quick": quick,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "device": device_description(),
            "cpu": cpu,
            "threads": torch.get_num_threads(),
            "load_average": settings.get("load_average"),
            "versions": library_versions(),
            "latency": {
                "runs": settings["latency_runs"],
                "warmup": settings["warmup_runs"],
                "batch_sizes": list(settings["latency_batches"]),
                "statistic": "median wall time of one forward pass, torch.no_grad, CPU",
                "inputs": "real validation sentences (same seeded choice for every model), padded to the "
                          "longest in the batch; batch 1 = the median-length sentence of the sample",
                "seed": settings["seed"],
            },
            "constants": constants,
            "wall_time_s": round(wall_time_s, 1),
        },
        "dataset": dataset,
        "eval_files": list(eval_files),
        "flops_convention": flops_convention(settings["flops_seq_len"]),
        "gflops_per_sentence_convention": "mean over the validation sentences of the fvcore GFLOPs at each "
                                          "sentence's tokenized length (batch 1, [CLS] and [SEP] included); "
                                          "exact: FLOPs are quadratic in length, fitted on 3 traced lengths and "
                                          "checked against the traced reference length",
        "size_convention": "size_mb = bytes of the model*.safetensors files / 2**20 (MiB)",
        "params_convention": "logical parameters (a packed 4-bit weight counts as its unpacked shape)",
        "models": models,
        "comparisons": comps,
        "comparison_convention": "Paired on the same sentences: difference a - b in accuracy points, 95% "
                                 "paired-bootstrap interval (10000 resamples of the sentences, seeded), "
                                 "only_a_right / only_b_right = sentences only one of the two got right, exact "
                                 "two-sided McNemar p; accuracy_ci = 95% percentile bootstrap over sentences",
        "model_order": list(models),  # reading order (the JSON itself has sorted keys)
        "seed_groups": groups,
        "frontier": frontier_summary(models, groups, settings["seed"]),
        "seed_convention": SEED_CONVENTION,
        "skipped": skipped,
        "warnings": notes,
        "headline": head,
    }
    if head is None:
        report["headline_note"] = reason
    return report


def write_json(report: dict, path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    json_dump(report, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# Chart

FAMILY_COLORS = {"teacher": "#6b6b6b", "student": "#1f77b4", "pruned": "#e6550d"}
METHOD_COLORS = {"taylor": FAMILY_COLORS["pruned"], "magnitude": "#756bb1"}  # ours / the magnitude baseline
MAX_MARKER_AREA = 1000.0  # pt^2 of the largest model on disk
FIXED_LABELS = {
    "teacher_model": "teacher",
    "student_model": "student",
    "student_model_nodistill": "student, no KD",
    BASELINE: "student 4-bit (baseline)",
    "pruned_model": "pruned",
    FINAL: "pruned 4-bit (final)",
}


def display_label(name: str) -> str:
    """Short chart label: what the model is, not its folder name (the table gives both)."""
    if name in FIXED_LABELS:
        return FIXED_LABELS[name]
    parsed = parse_pruned_name(name)
    if parsed:
        return (("magnitude" if parsed["method"] == "magnitude" else "pruned")
                + (f" s{round(100 * parsed['target']):02d}" if parsed["target"] is not None else "")
                + (f" seed {parsed['seed']}" if parsed["seed"] is not None else "")
                + (" 4-bit" if parsed["quantized"] else ""))
    student = STUDENT_SEED_RE.match(name)
    if student:
        return f"{FIXED_LABELS[student['base']]} seed {student['seed']}"
    return name


def _color(r: dict) -> str:
    if r.get("family") == "pruned" and r.get("pruning_method") == "magnitude":
        return METHOD_COLORS["magnitude"]
    return FAMILY_COLORS.get(r.get("family"), "#555555")


def _curves(groups: dict) -> dict:
    """{(method, bits): [seed group entries]}: the frontier lines through the seed-group means, from the student of
    that precision (student_model / distilled_quantized_student) down to the smallest model; frontier points only
    where a frontier run exists for that method (else every pruned group of it)."""
    starts = {32: STAGE_FOLDERS["student"], 4: BASELINE}
    curves = {}
    for g in groups.values():
        if g["family"] == "pruned" and g["method"] in METHOD_COLORS:
            curves.setdefault((g["method"], g["bits"]), []).append(g)
    out = {}
    for (method, bits), points in curves.items():
        if any(g["mode"] == "frontier" for g in points):
            points = [g for g in points if g["mode"] == "frontier"]
        start = [groups[starts[bits]]] if starts[bits] in groups else []
        out[(method, bits)] = start + sorted(points, key=lambda g: -g["gflops"])
    return out


def _labelled(name: str) -> bool:
    """Models that get a text label on the chart: the pipeline's own (sweep, frontier, seed and baseline points are
    drawn as lines and marked with their target instead)."""
    return name in FIXED_LABELS or not (parse_pruned_name(name) or STUDENT_SEED_RE.match(name))


def _scale_x(ax, xs) -> None:
    import matplotlib.ticker  # in the body: matplotlib is slow to import and only the chart needs it

    xspan = (max(xs) - min(xs)) or max(xs) or 1.0
    if min(xs) > 0 and max(xs) / min(xs) > 3:  # teacher far right: a log axis keeps the pruned points apart
        ax.set_xscale("log")
        ax.set_xlim(min(xs) / 1.3, max(xs) * 1.3)
        nice = [m * 10.0 ** e for e in range(-4, 6) for m in (1, 1.5, 2, 3, 5, 7)]
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(
            [t for t in nice if min(xs) / 1.3 <= t <= max(xs) * 1.3]))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    else:
        ax.set_xlim(max(0.0, min(xs) - 0.15 * xspan), max(xs) + 0.15 * xspan)


def _accuracy_panel(ax, models: dict, groups: dict, x_of, area: dict, labels: dict) -> list:
    """Accuracy against one cost (x_of: record -> x, or None when not measured) for every model: marker area = size on
    disk, circle fp32, diamond 4-bit, thin bar = 95% bootstrap interval over sentences; frontier lines through the
    seed-group means, thick capped bar = +-1 s.d. across seeds. Returns the label items for _place_labels."""
    ys_all, xs_all = [], []
    for (method, bits), points in _curves(groups).items():
        pts = [(x_of(g), g["accuracy_seed_spread"]["mean"], g) for g in points if x_of(g) is not None]
        if len(pts) >= 2:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-" if bits == 32 else "--", color=METHOD_COLORS[method],
                    alpha=0.65, lw=1.6, zorder=1)
        for x, y, g in pts:
            if g["sparsity_target"] is not None:
                ax.annotate(f"{round(100 * g['sparsity_target'])}", (x, y), xytext=(5, 5 if bits == 32 else -10),
                            textcoords="offset points", fontsize=6.5, color=METHOD_COLORS[method], zorder=5)
    for name in sorted(models, key=lambda n: -area[n]):  # big markers first, small ones stay visible on top
        r = models[name]
        x = x_of(r)
        if x is None:
            continue
        color, four, y = _color(r), r["bits"] == 4, r["accuracy"] * 100
        ax.scatter(x, y, s=area[name], marker="D" if four else "o", facecolor="white" if four else color,
                   edgecolor=color, linewidth=2.0 if four else 0.8, alpha=1.0 if four else 0.6, zorder=3 if four else 2)
        xs_all.append(x)
        ys_all.append(y)
        if r.get("accuracy_ci"):  # 95% bootstrap interval over sentences
            low, high = (100 * v for v in r["accuracy_ci"])
            ax.errorbar(x, y, yerr=[[y - low], [high - y]], fmt="none", ecolor=color, elinewidth=1.0, alpha=0.45,
                        capsize=3, zorder=1)
            ys_all += [low, high]
    for g in groups.values():  # seed-to-seed spread where a group has several seeds
        x = x_of(g)
        if g["n_seeds"] >= 2 and x is not None:
            spread = g["accuracy_seed_spread"]
            ax.errorbar(x, spread["mean"], yerr=spread["std"], fmt="_", color="black", markersize=12,
                        elinewidth=2.2, capsize=5, capthick=2.0, zorder=4)
            ys_all += [spread["mean"] - spread["std"], spread["mean"] + spread["std"]]
    if xs_all:
        _scale_x(ax, xs_all)
        yspan = max(max(ys_all) - min(ys_all), 1.0)
        ax.set_ylim(min(ys_all) - 0.08 * yspan, max(ys_all) + 0.08 * yspan)
    ax.grid(alpha=0.3)
    return [(x_of(models[n]), models[n]["accuracy"] * 100, labels[n], (area[n] ** 0.5) / 2,
             "below" if models[n]["bits"] == 4 else "above")
            for n in sorted(models, key=lambda n: (models[n]["bits"] == 4, -models[n]["gflops"]))
            if _labelled(n) and x_of(models[n]) is not None]


def _place_labels(ax, fig, items):
    """Annotate points without clutter: try positions around each point (its preferred side first, then
    right, left, the other side, diagonals), moving further out step by step, and keep the first one that
    overlaps no marker and no earlier label and stays inside the axes. A label not right next to its point
    gets a thin leader line.

    items: (x, y, text, marker radius in points, prefer "above" | "below")."""
    renderer = fig.canvas.get_renderer()
    to_px = fig.dpi / 72.0
    frame = ax.get_window_extent(renderer)
    taken = []
    for x, y, _, radius, _ in items:  # the markers themselves
        px, py = ax.transData.transform((x, y))
        r = radius * to_px * 0.8
        taken.append(matplotlib_bbox(px - r, py - r, px + r, py + r))

    def label(x, y, text, offset, ha, va, leader):
        bold = text.endswith(("(final)", "(baseline)"))
        return ax.annotate(text, (x, y), xytext=offset, textcoords="offset points", ha=ha, va=va, fontsize=8,
                           fontweight="bold" if bold else "normal", zorder=5,
                           bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.75),
                           arrowprops=dict(arrowstyle="-", lw=0.6, color="#777777", shrinkA=0, shrinkB=2)
                           if leader else None)

    for x, y, text, radius, prefer in items:
        v = 1 if prefer == "above" else -1
        directions = [(0, v), (1, 0), (-1, 0), (0, -v), (1, v), (-1, v), (1, -v), (-1, -v)]
        best = None  # (clashes, offset, ha, va, leader, box)
        for ring in range(6):
            for dx, dy in directions:
                gap = radius + 2 + 12 * ring
                offset = (dx * gap * (0.8 if dy else 1.0), dy * gap)
                ha = "center" if dx == 0 else ("left" if dx > 0 else "right")
                va = "center" if dy == 0 else ("bottom" if dy > 0 else "top")
                ann = label(x, y, text, offset, ha, va, leader=False)  # measured without its leader line
                box = ann.get_window_extent(renderer)
                ann.remove()
                inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
                clashes = sum(box.overlaps(other) for other in taken) + (0 if inside else 100)
                if best is None or clashes < best[0]:
                    best = (clashes, offset, ha, va, ring > 0, box)
                if clashes == 0:
                    break
            if best[0] == 0:
                break
        label(x, y, text, *best[1:5])
        taken.append(best[5])


def matplotlib_bbox(x0, y0, x1, y1):
    from matplotlib.transforms import Bbox  # in the body: matplotlib is slow to import (chart only)

    return Bbox([[x0, y0], [x1, y1]])


def plot_report(report: dict, path) -> None:
    """Top: accuracy vs GFLOPs and accuracy vs measured CPU latency at the largest batch timed (marker area = size on
    disk, circle = fp32, diamond = 4-bit; frontier lines for ours and the magnitude baseline, fp32 solid, 4-bit
    dashed; thin bars = 95% bootstrap interval over sentences, thick capped bars = +-1 s.d. across seeds).
    Bottom: per-model size and latency bars."""
    import matplotlib  # in the body: matplotlib is slow to import and only the chart needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # (matplotlib: chart only, see above)
    from matplotlib.lines import Line2D  # (matplotlib: chart only)

    models = report["models"]
    groups = report.get("seed_groups") or seed_groups(models, report["run"]["latency"]["seed"])
    names = list(models)
    labels = {n: display_label(n) + (" (stale)" if models[n].get("stale") else "")
              + ("" if models[n].get("complete", True) else " (incomplete)") for n in names}
    batch_keys = sorted({k for r in models.values() for k in r["latency_ms"]}, key=lambda k: int(k.split("_")[1]))
    big = batch_keys[-1] if batch_keys else None

    # geometry in inches: title, the two accuracy panels, their legend, the bars (one row per model)
    title_h, top_h, legend_h, bar_h, bottom_h = 1.2, 4.8, 1.6, max(2.6, 0.32 * len(names)), 0.6
    height = title_h + top_h + legend_h + bar_h + bottom_h
    fig = plt.figure(figsize=(16, height))
    top = fig.add_gridspec(1, 2, left=0.05, right=0.99, top=1 - title_h / height,
                           bottom=1 - (title_h + top_h) / height, wspace=0.16)
    bottom = fig.add_gridspec(1, 2, left=0.17, right=0.99, top=(bar_h + bottom_h) / height,
                              bottom=bottom_h / height, wspace=0.05)
    ax, ax_speed = fig.add_subplot(top[0]), fig.add_subplot(top[1])
    ax_size = fig.add_subplot(bottom[0])
    ax_lat = fig.add_subplot(bottom[1], sharey=ax_size)

    biggest = max(r["size_mb"] for r in models.values()) or 1.0
    area = {n: max(r["size_mb"] / biggest * MAX_MARKER_AREA, 15.0) for n, r in models.items()}
    seq = re.search(r"sequence length (\d+)", report["flops_convention"])
    accuracy_words = (f"accuracy on {report['dataset']['name'].upper()} {report['dataset']['split']} (%)")
    flops_items = _accuracy_panel(ax, models, groups, lambda r: r["gflops"], area, labels)
    ax.set_xlabel(f"GFLOPs per forward pass (fvcore, batch 1, {seq.group(1) if seq else '?'} tokens; "
                  f"4-bit counted on its fp32 twin)" + ("; log scale" if ax.get_xscale() == "log" else ""))
    ax.set_ylabel(accuracy_words)
    ax.set_title("Accuracy vs compute (up and to the left is better)", fontsize=11)
    speed_items = _accuracy_panel(ax_speed, models, groups, lambda r: r["latency_ms"].get(big) if big else None,
                                  area, labels)
    onnx_points = [(n, r["artifacts"]["onnx_int8"]) for n, r in models.items()
                   if big and big in r.get("artifacts", {}).get("onnx_int8", {}).get("latency_ms", {})]
    for name, a in onnx_points:  # the CPU serving artifact of the same model: where a user would deploy it
        color = FAMILY_COLORS.get(models[name]["family"], "#555555")
        ax_speed.scatter(a["latency_ms"][big], a["accuracy"] * 100, s=60, marker="^", facecolor=color,
                         edgecolor="black", linewidth=0.6, zorder=4)
        if name == FINAL:
            ax_speed.annotate("final, ONNX int8", (a["latency_ms"][big], a["accuracy"] * 100), xytext=(0, -14),
                              textcoords="offset points", ha="center", fontsize=8, fontweight="bold")
    if onnx_points:
        low = min(a["latency_ms"][big] for _, a in onnx_points)
        left, right = ax_speed.get_xlim()
        if low < left:
            ax_speed.set_xlim(low / 1.3, right)
    threads = report["run"]["threads"]
    ax_speed.set_xlabel(f"CPU latency at {big.replace('_', ' ') if big else '?'}, median ms "
                        f"({threads} thread{'s' if threads != 1 else ''}; triangles: ONNX Runtime int8)"
                        + ("; log scale" if ax_speed.get_xscale() == "log" else ""))
    ax_speed.set_ylabel(accuracy_words)
    ax_speed.set_title("Accuracy vs measured latency (up and to the left is better)", fontsize=11)

    handles = [
        Line2D([], [], marker="o", ls="", markerfacecolor="#999999", markeredgecolor="#999999", alpha=0.7,
               markersize=9, label="fp32"),
        Line2D([], [], marker="D", ls="", markerfacecolor="white", markeredgecolor="#555555",
               markeredgewidth=2, markersize=8, label="4-bit (bitsandbytes NF4)"),
    ]
    handles += [Line2D([], [], marker="s", ls="", color=c, markersize=9, label="pruned (ours)" if f == "pruned" else f)
                for f, c in FAMILY_COLORS.items() if any(r["family"] == f for r in models.values())]
    if any(r.get("pruning_method") == "magnitude" for r in models.values()):
        handles.append(Line2D([], [], marker="s", ls="", color=METHOD_COLORS["magnitude"], markersize=9,
                              label="pruned by magnitude (baseline)"))
    for (method, bits), points in sorted(_curves(groups).items(), key=lambda kv: (kv[0][0] != "taylor", -kv[0][1])):
        if len(points) >= 2:
            handles.append(Line2D([], [], ls="-" if bits == 32 else "--", color=METHOD_COLORS[method], alpha=0.8,
                                  label=f"{METHOD_WORDS.get(method, method)}, {'fp32' if bits == 32 else '4-bit'}"))
    if onnx_points:
        handles.append(Line2D([], [], marker="^", ls="", markerfacecolor="#999999", markeredgecolor="black",
                              markersize=8, label="ONNX Runtime int8 export (right panel)"))
    handles.append(Line2D([], [], color="#777777", marker="|", markersize=10, lw=1,
                          label="thin bar: 95% bootstrap interval over sentences"))
    if any(g["n_seeds"] >= 2 for g in groups.values()):
        handles.append(Line2D([], [], color="black", lw=2.2, marker="_", markersize=12,
                              label="thick bar: mean +-1 s.d. across seeds"))
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1 - (title_h + top_h + 0.5) / height),
               ncol=5, fontsize=8, frameon=False,
               title="marker area = size on disk; small numbers = % fewer encoder GFLOPs targeted", title_fontsize=8)

    # Bottom: size and latency per model, in table order (top to bottom)
    rows = list(range(len(names)))[::-1]
    colors = [_color(models[n]) for n in names]
    sizes = [models[n]["size_mb"] for n in names]
    bars = ax_size.barh(rows, sizes, color=colors, alpha=0.85, edgecolor="white", height=0.7)
    for bar, n in zip(bars, names):
        if models[n]["bits"] == 4:
            bar.set_hatch("////")
    for y, v in zip(rows, sizes):
        ax_size.text(v, y, f" {v:.3g}", va="center", fontsize=8)
    ax_size.set_yticks(rows)
    ax_size.set_yticklabels([f"{labels[n]}\n{n}" if labels[n] != n else n for n in names], fontsize=8)
    ax_size.set_ylim(-0.6, len(names) - 0.4)
    ax_size.set_xlabel("weight files on disk (MiB)")
    ax_size.set_xlim(0, max(sizes) * 1.25)
    ax_size.set_title("Size on disk (hatched = 4-bit)", fontsize=11)
    ax_size.grid(axis="x", alpha=0.3)

    height_bar = 0.7 / max(len(batch_keys), 1)
    shades = [0.4, 0.95, 0.7, 0.25]
    longest = 0.0
    for i, key in enumerate(batch_keys):
        offset = ((len(batch_keys) - 1) / 2 - i) * height_bar
        values = [models[n]["latency_ms"].get(key, 0.0) for n in names]
        longest = max([longest] + values)
        ax_lat.barh([y + offset for y in rows], values, height=height_bar, color=colors,
                    alpha=shades[i % len(shades)], edgecolor="white")
        for y, v in zip(rows, values):
            ax_lat.text(v, y + offset, f" {v:.3g}", va="center", fontsize=7)
    ax_lat.set_xlim(0, (longest or 1.0) * 1.25)
    ax_lat.tick_params(axis="y", labelleft=False)
    ax_lat.set_xlabel(f"CPU latency, median ms per forward pass ({threads} thread{'s' if threads != 1 else ''})")
    ax_lat.set_title("Latency: " + ", ".join(f"{k.replace('_', ' ')} ({'light' if i == 0 else 'dark'})"
                                             for i, k in enumerate(batch_keys)), fontsize=11)
    ax_lat.grid(axis="x", alpha=0.3)

    head = report.get("headline")
    subtitle = head["sentence"] if head else report.get("headline_note", "")
    quick = "   [QUICK run: smoke numbers, not a benchmark]" if report["run"]["quick"] else ""
    fig.suptitle("Distill-Prune-Quantize on SST-2" + quick, fontsize=13, y=1 - 0.15 / height)
    fig.text(0.5, 1 - 0.5 / height, _wrap(subtitle, 190), ha="center", va="top", fontsize=9.5, style="italic")
    fig.canvas.draw()  # labels are placed against the final layout
    _place_labels(ax, fig, flops_items)
    _place_labels(ax_speed, fig, speed_items)
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width))


# ----------------------------------------------------------------------------------------------------
# Markdown


def markdown_report(report: dict) -> str:
    models = report["models"]
    run = report["run"]
    files = report.get("eval_files", [])
    batch_keys = sorted({k for r in models.values() for k in r["latency_ms"]}, key=lambda k: int(k.split("_")[1]))
    lines = ["# Distill-Prune-Quantize: final report", ""]
    head = report.get("headline")
    lines += [f"**Headline.** {head['sentence']}" if head else f"**Headline.** {report.get('headline_note')}", ""]
    if report.get("skipped"):  # at the top: a model that is missing from the tables below, and why
        lines += ["**Skipped.** " + "; ".join(f"`{n}`: {why}" for n, why in report["skipped"].items()), ""]
    if head and head.get("deployment"):
        lines += [f"**Deployment.** {head['deployment']['sentence']}", ""]
    if run["quick"]:
        lines += ["> QUICK run: few latency runs and/or a slice of the data; smoke numbers, not a benchmark.", ""]
    ds = report["dataset"]
    lines += [
        f"Accuracy on {ds['name']} {ds['split']} ({ds['n']} sentences). GFLOPs: {report['flops_convention']}; "
        f"4-bit models are counted through their fp32 twin. GFLOPs/sent: mean at each sentence's real length. "
        f"Size: weight files on disk in MiB. Latency: CPU, median of {run['latency']['runs']} runs after "
        f"{run['latency']['warmup']} warm-up, {run['threads']} torch threads, {run['device']}.",
        "",
    ]
    header = (["model", "bits", "accuracy (%)", "95% interval"] + [f"acc {Path(p).name} (%)" for p in files]
              + ["GFLOPs", "GFLOPs/sent", "params (M)", "size (MiB)"]
              + [f"latency {k.replace('_', ' ')} (ms)" for k in batch_keys]
              + ["layers", "heads", "FFN neurons", "notes"])
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header) - 1)) + "|---|")
    for name, r in models.items():
        notes = []
        if r["bits"] == 4:
            notes.append(r["gflops_source"])
        if r.get("stale"):
            notes.append("STALE (upstream rebuilt)")
        if not r.get("complete", True):
            notes.append("INCOMPLETE (no metadata.json)")
        label = display_label(name)
        row = ([f"`{name}`" + (f": {label}" if label != name else ""), str(r["bits"]),
                f"{r['accuracy'] * 100:.2f}", f"[{r['accuracy_ci'][0] * 100:.1f}, {r['accuracy_ci'][1] * 100:.1f}]"]
               + [f"{r['eval_files'].get(p, float('nan')) * 100:.2f}" for p in files]
               + [f"{r['gflops']:.4g}", f"{r['gflops_per_sentence']:.4g}", f"{r['params'] / 1e6:.2f}",
                  f"{r['size_mb']:.4g}"]
               + [f"{r['latency_ms'].get(k, float('nan')):.4g}" for k in batch_keys]
               + [str(r["layers"]), str(r["heads"]), str(r["ffn_neurons"]), "; ".join(notes)])
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines += frontier_table(report, batch_keys)
    lines += artifact_table(report, batch_keys)
    lines += comparison_table(report)
    if report.get("skipped") or report.get("warnings"):
        lines += ["## Warnings", ""]
        lines += [f"- {w}" for w in report.get("warnings", [])]
        lines += [f"- `{n}` skipped: {why}" for n, why in report.get("skipped", {}).items()]
        lines.append("")
    lines += [f"Run: preset {run['preset']}, git {run['git_commit']}, created {run['created']}, "
              f"{run['wall_time_s']:.0f} s.", ""]
    return "\n".join(lines)


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.2g}"


def _seed_mean(spread: dict, digits: int = 2) -> str:
    """'88.88' for one seed, '88.88 ± 0.31 (3 seeds)' for several (± = sample s.d. across seeds)."""
    if spread["n_seeds"] < 2:
        return f"{spread['mean']:.{digits}f}"
    return f"{spread['mean']:.{digits}f} ± {spread['std']:.{digits}f} ({spread['n_seeds']} seeds)"


def _versus(c: dict) -> str:
    return f"{c['diff_points']:+.2f} [{c['ci_low_points']:+.2f}, {c['ci_high_points']:+.2f}], p {_p(c['mcnemar_p'])}"


def _versus_seeds(v: dict) -> str:
    if not v:
        return ""
    per_seed = v["per_seed"]
    if len(per_seed) == 1:
        return _versus(per_seed[0])
    spread = v["diff_points_seed_spread"]
    return (f"{spread['mean']:+.2f} ± {spread['std']:.2f} over {len(per_seed)} seeds; per seed p "
            + ", ".join(_p(c["mcnemar_p"]) for c in per_seed))


def frontier_table(report: dict, batch_keys) -> list:
    """The frontier (ours vs the magnitude baseline, fp32 and 4-bit, by target) and the seed groups."""
    front, groups = report.get("frontier"), report.get("seed_groups") or {}
    lines = []
    if front:
        lines += ["## Accuracy-compute frontier", "",
                  "One row per pruned model (seed group) with a sparsity target: ours = gradual Taylor pruning (a "
                  "frontier branch, or a full stage-8 run), baseline = one-shot weight-magnitude pruning with the same "
                  "short recovery. GFLOPs cut: measured, against student_model. Accuracy: mean ± sample s.d. ACROSS "
                  "TRAINING SEEDS where a group has several (seed-to-seed spread); the bracketed interval next to it "
                  "is the 95% bootstrap interval OVER SENTENCES of the first seed's model (sentence sampling). "
                  "vs student: paired on the same sentences against student_model (fp32 rows) or "
                  "distilled_quantized_student (4-bit rows): difference in points [95% paired-bootstrap interval], "
                  "exact McNemar p. ours - magnitude: the same paired test against the baseline at the same target "
                  "and precision. Latency: PyTorch, as in the table above.", "",
                  "| target | model | method | bits | GFLOPs cut | accuracy (%) | 95% interval | vs student (points) | "
                  "ours - magnitude (points) | " + " | ".join(f"latency {k.replace('_', ' ')} (ms)" for k in batch_keys)
                  + " |", "|---:|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(batch_keys)]
        for row in front["rows"]:
            low, high = row["accuracy_ci_per_seed"][row["members"][0]]
            cut = row.get("gflops_reduction_vs_student")
            others = row["n_seeds"] - 1
            extra = f" (+{others} seed{'s' if others > 1 else ''})" if others else ""
            mode = " (full run)" if row["mode"] in ("single", "sweep") else ""
            lines.append(
                f"| {100 * row['sparsity_target']:.0f}% | `{row['group']}`{extra} | "
                f"{front['methods'].get(row['method'], row['method'])}{mode} | {row['bits']} | "
                + (f"{100 * cut:.1f}%" if cut is not None else "") + f" | {_seed_mean(row['accuracy_seed_spread'])} | "
                f"[{low:.1f}, {high:.1f}] | {_versus_seeds(row.get('vs_student'))} | "
                + (_versus(row["vs_magnitude"]) if row.get("vs_magnitude") else "") + " | "
                + " | ".join(f"{row['latency_ms'][k]:.4g}" if k in row["latency_ms"] else "" for k in batch_keys)
                + " |")
        runs = sorted(front.get("frontier_runs", {}).items(), key=lambda kv: (str(kv[1]["seed"]), kv[0]))
        for sweep_id, run in runs:
            lines.append(f"\nFrontier run {sweep_id} (seed {run['seed']}): {run['wall_time_s']:.0f} s wall time for "
                         f"the whole sweep (one gradual run with a branch per target, plus the baseline), "
                         f"{run.get('recovery_fraction')} epoch of recovery per point; details in "
                         f"models/frontier.json.")
        lines.append("")
    several = {g: e for g, e in groups.items() if e["n_seeds"] >= 2}
    if several:
        lines += ["## Seeds", "",
                  "Models that differ only by training seed. mean ± s.d.: across seeds (seed-to-seed spread); "
                  "each seed's [95% interval] is over sentences (sentence sampling).", "",
                  "| seed group | seeds | accuracy (%) mean ± s.d. | min - max | each seed: accuracy [95% interval] | "
                  "vs student (points) |", "|---|---|---:|---:|---|---:|"]
        for group, e in several.items():
            spread = e["accuracy_seed_spread"]
            per_seed = "; ".join(f"{s}: {report['models'][n]['accuracy'] * 100:.2f} "
                                 f"[{e['accuracy_ci_per_seed'][n][0]:.1f}, {e['accuracy_ci_per_seed'][n][1]:.1f}]"
                                 for n, s in zip(e["members"], e["seeds"]))
            lines.append(f"| `{group}` | {', '.join(str(s) for s in e['seeds'])} | {_seed_mean(spread)} | "
                         f"{spread['min']:.2f} - {spread['max']:.2f} | {per_seed} | "
                         f"{_versus_seeds(e.get('vs_student'))} |")
        lines.append("")
    return lines


def artifact_table(report: dict, batch_keys) -> list:
    """Every runnable artifact of every model, timed on the same inputs and threads in this run."""
    run = report["run"]
    cpu = run.get("cpu")
    lines = ["## Deployment artifacts", "",
             f"Each artifact measured by running it: accuracy on the same {report['dataset']['n']} sentences (95% "
             f"bootstrap interval), size of its weight file(s), CPU latency on the same inputs with "
             f"{run['threads']} threads" + (f" on {cpu_words(cpu)}" if cpu else "") + ". PyTorch 4-bit is "
             "bitsandbytes NF4 (dequantized to the compute dtype on every forward); ONNX int8 is ONNX Runtime "
             "dynamic quantization.", "",
             "| model | artifact | runtime | accuracy (%) | 95% interval | size (MiB) | "
             + " | ".join(f"latency {k.replace('_', ' ')} (ms)" for k in batch_keys) + " |",
             "|---|---|---|---:|---:|---:|" + "---:|" * len(batch_keys)]
    for name, r in report["models"].items():
        for artifact, a in r.get("artifacts", {}).items():
            low, high = a["accuracy_ci"]
            lines.append(f"| `{name}` | {a['precision']} | {a['runtime']} | {a['accuracy'] * 100:.2f} | "
                         f"[{low * 100:.1f}, {high * 100:.1f}] | {a['size_mb']:.4g} | "
                         + " | ".join(f"{a['latency_ms'].get(k, float('nan')):.4g}" for k in batch_keys) + " |")
    return lines + [""]


def comparison_table(report: dict) -> list:
    comps = report.get("comparisons", [])
    if not comps:
        return []
    lines = ["## Paired comparisons", "", report["comparison_convention"] + ".", "",
             "| comparison | evaluation | a | b | a - b (points) | 95% interval | only a right | only b right | "
             "McNemar p | |", "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for c in comps:
        p = "< 0.001" if c["mcnemar_p"] < 0.001 else f"{c['mcnemar_p']:.2g}"
        lines.append(f"| {c['kind']} | {Path(c['evaluation']).name} | `{artifact_label(c['a'], c['a_artifact'])}` | "
                     f"`{artifact_label(c['b'], c['b_artifact'])}` | {c['diff_points']:+.2f} | "
                     f"[{c['ci_low_points']:+.2f}, {c['ci_high_points']:+.2f}] | {c['only_a_right']} | "
                     f"{c['only_b_right']} | {p} | {'significant' if c['significant'] else 'not significant'} |")
    return lines + [""]


def write_text(text: str, path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def recorded_preset(found, requested: str, notes: list) -> str:
    """The preset the models were made with (results.preset in their metadata.json), not this run's PRESET: a
    report of MiniLM models is never labelled "bert". `requested` only when no folder records one; a mismatch
    or a mix of presets is a warning."""
    presets = set()
    for _, folder in found:
        try:
            made = read_metadata(folder).get("results", {}).get("preset")
        except (OSError, ValueError, AttributeError):
            made = None
        if made:
            presets.add(made)
    if not presets:
        return requested
    note = None
    if len(presets) > 1:
        note = f"the models were made with different presets ({', '.join(sorted(presets))}): compare with care"
    elif requested and requested not in presets:
        note = f"PRESET={requested} ignored: the models were made with preset {next(iter(presets))}"
    if note:
        notes.append(note)
        logger.warning(f"[report] {note}")
    return next(iter(presets)) if len(presets) == 1 else "mixed: " + ", ".join(sorted(presets))


def generate(models_root, *, validation, dataset: dict, eval_files: dict, settings: dict, out_dir,
             preset: str, quick: bool, constants: dict, names=None) -> dict:
    """Discover, measure, and write final_report.json/.png/.md into `out_dir`; return the report."""
    started = time.time()
    found, notes = discover_models(models_root, names)
    for note in notes:
        logger.warning(f"[report] {note}")
    if not found:
        raise StageError(
            f"no model folders found in {models_root}: run the pipeline first "
            f"(download_model.py, 1_train_teacher.py, 2_distill_student.py, ...)"
        )
    preset = recorded_preset(found, preset, notes)
    settings = dict(settings, load_average=load_average())
    busy = machine_busy(settings["load_average"])
    if busy:
        notes.append(busy)
        logger.warning(f"[report] {busy}")
    flops_cache = FlopsCache(settings["flops_seq_len"])
    models, skipped = {}, {}
    for name, folder in found:
        try:
            models[name] = measure_model(name, folder, validation=validation, eval_files=eval_files,
                                         settings=settings, flops_cache=flops_cache, models_root=models_root)
        except SkipModel as err:
            logger.warning(f"[report] {name}: skipped, {err}")
            skipped[name] = str(err)
    if not models:
        raise StageError(f"none of the model folders in {models_root} could be measured: {skipped}")
    for name, r in models.items():
        needs = [u for u in r.get("upstream", []) if u in skipped]
        if needs:  # measured on its own; what it was compared with or counted through is gone
            r["warnings"].append(f"made from {', '.join(needs)}, which was skipped; GFLOPs: {r['gflops_source']}")
        notes += [f"{name}: {w}" for w in r["warnings"]]
    report = build_report(models, settings=settings, dataset=dataset, eval_files=eval_files, preset=preset,
                          quick=quick, skipped=skipped, notes=notes, constants=constants,
                          wall_time_s=time.time() - started)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(report, out_dir / REPORT_JSON)
    plot_report(report, out_dir / REPORT_PNG)
    write_text(markdown_report(report), out_dir / REPORT_MD)
    logger.info(f"[report] wrote {out_dir / REPORT_JSON}, {REPORT_PNG}, {REPORT_MD}")
    if report["headline"]:
        logger.info(f"[report] {report['headline']['sentence']}")
    else:
        logger.warning(f"[report] {report['headline_note']}")
    return report

