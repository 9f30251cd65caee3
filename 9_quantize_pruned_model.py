"""Stage 9: the deployable forms of the final pruned model and of its unpruned baseline: bitsandbytes NF4 4-bit
(PyTorch) and ONNX Runtime int8 / fp32 (CPU serving).

Reads   models/pruned_model/ (8_pruning_with_finetuning.py), models/student_model/ (2_distill_student.py), every
        other fp32 pruned folder present (sweep, frontier, seeds, magnitude baseline), data/sst2/ (download_model.py)
Writes  models/pruned_quantized_final/        the final model: the pruned student in 4-bit, plus onnx/
        models/distilled_quantized_student/   the unpruned student the same way (the standard quantized model)
        models/<folder>_quantized/            the same for every other pruned folder (pruned_model_s50_quantized, ...)
        Each: 4-bit weights, config (`dpq_quantization`, `dpq_layout`, `auto_map` to the shipped loader), tokenizer,
        onnx/ (model.onnx, model_int8.onnx, tokenizer, export.json), stage.log, metadata.json (source, settings,
        bytes, precision of each part, validation accuracy of every artifact next to its fp32 source's).

Every Linear of the blocks (and the pooler / pre_classifier) becomes a bitsandbytes Linear4bit, the word embeddings
8-bit, the classifier stays fp32 (common/quantization.py); the saved folder is reloaded and must give the same logits.
The 4-bit layers compute in bfloat16 where the hardware has native bf16 (COMPUTE_DTYPE=auto); on an AVX2-only CPU
they are slower than fp32 and ONNX Runtime int8 is the fast CPU artifact. The report times every artifact.

Run:    python 9_quantize_pruned_model.py                  (QUICK=1 changes nothing: seconds per model)
Some:   python 9_quantize_pruned_model.py 'QUANTIZE=("student", "sweep")'
An output already made from the same source run, settings, data and code is kept; REDO=True makes every one again.
Override any constant below as KEY=VALUE, e.g. `python 9_quantize_pruned_model.py QUANT_TYPE=fp4 DOUBLE_QUANT=True`.
"""

import sys
from pathlib import Path

import torch

from common import export, paths, quantization  # modules: their UPPER_CASE names must not become this stage's constants
from common.config import (ConfigError, as_dict, check_constants, constants, each, env_flag, env_preset, in_range,
                           one_of, parse_overrides)
from common.data import encode, load_sst2_splits, make_loader
from common.modeling import check_loadable, count_parameters, load_model, load_tokenizer, weight_bytes
from common.modeling_dpq import config_is_pruned, get_layout
from common.modeling_dpq_4bit import COMPUTE_DTYPES
from common.paths import models_root, stage_dir
from common.quantization import precision_map, quantize_model, save_quantized
from common.stage import (METADATA, StageError, check_preset, code_sha256, is_stale, json_roundtrip, logger,
                          read_metadata, require_fresh, require_stage, run_main, set_seed, setup_logging, stage_output,
                          upstream_record)
from common.training import predict_logits

# -----------------------------------------------------------------------------
PRESET = env_preset()
QUICK = env_flag("QUICK")  # accepted for `make`/CI; changes nothing here (quantizing takes seconds)
QUANTIZE = ("student", "pruned", "sweep")  # inputs: student_model, pruned_model, "sweep" = every other fp32 pruned
                                           # folder present (sweep/frontier points, seeds, magnitude baseline)
QUANT_TYPE = "nf4"         # "nf4" (4-bit NormalFloat, QLoRA) | "fp4"
DOUBLE_QUANT = False       # also quantize the per-block absmax to 8 bits (QLoRA's double quantization)
BLOCKSIZE = 32             # weights per absmax; 32 | 64 | 128 | 256. 32: the 50%-pruned MiniLM kept 98.6% of its
                           # fp32 predictions (max logit error 1.3) vs 93.1% (4.1) at 64, for +1% size
EMBEDDING_BITS = 8         # word embeddings: 8 (int8 rows), 4 (QUANT_TYPE, blockwise), 32 (left fp32)
QUANTIZE_HEAD = True       # BERT pooler dense / DistilBERT pre_classifier in 4-bit too (the classifier stays fp32)
COMPUTE_DTYPE = "auto"     # matmuls of the 4-bit layers (weights dequantized to it on the fly): float32 | bfloat16 |
                           # auto = bfloat16 where the device has native bf16 matmuls (AVX512-BF16 CPU, GPU)
DEVICE = "auto"            # where to quantize and evaluate: auto (cuda if available) | cpu | cuda
ONNX = ("fp32", "int8")   # CPU serving artifacts of each source, written to <folder>/onnx/: fp32 (ONNX Runtime),
                           # int8 (ONNX Runtime dynamic quantization), int4 (every weight 4-bit: smallest, slower); () = none
ONNX_MIN_AGREEMENT = 0.97  # an int8/int4 export agreeing with its fp32 source on fewer validation predictions is
                           # removed (and the reason recorded); the fp32 export must match to 1e-3 in the logits
EVAL_BATCH_SIZE = 128
MAX_LENGTH = 128
SEED = 42
REDO = False               # False: an output already made from the same source run, with the same settings, data and
                           # code, is kept (logged as up to date); True: every output is made again
# -----------------------------------------------------------------------------
_QUANTIZED_SUFFIX = "_quantized"  # models/pruned_model_s50 -> models/pruned_model_s50_quantized
_INPUTS = ("student", "pruned", "sweep")


def check_config(cfg) -> torch.device:
    """The device to run on, after checking every constant (before anything is loaded)."""
    check_constants(cfg, {
        "QUANTIZE": each(one_of(*_INPUTS), distinct=True),
        "QUANT_TYPE": one_of(*quantization.QUANT_TYPES),
        "EMBEDDING_BITS": one_of(*quantization.EMBEDDING_BITS),
        "BLOCKSIZE": one_of(*quantization.BLOCKSIZES),
        "COMPUTE_DTYPE": one_of("auto", *COMPUTE_DTYPES),
        "DEVICE": one_of("auto", "cpu", "cuda"),
        "ONNX": each(one_of(*export.KINDS), empty_ok=True, distinct=True),
        "ONNX_MIN_AGREEMENT": in_range(0, 1, what="a fraction, e.g. 0.97"),
    })
    if cfg.DEVICE == "cuda" and not torch.cuda.is_available():
        raise ConfigError("DEVICE=cuda but no CUDA device is available; use DEVICE=cpu or auto")
    return torch.device("cuda" if cfg.DEVICE == "auto" and torch.cuda.is_available() else
                        "cpu" if cfg.DEVICE == "auto" else cfg.DEVICE)


def sweep_folders() -> list:
    """Every fp32 pruned folder present besides pruned_model itself: sweep and frontier points (pruned_model_s20),
    other seeds (pruned_model_seed43, pruned_model_s50_seed43) and the magnitude baseline (pruned_magnitude_s50,
    ...), named as common.paths.pruned_folder names them; not their quantized twins."""
    root = models_root()
    if not root.is_dir():
        return []
    return sorted(f for f in root.iterdir()
                  if f.is_dir() and f.name != paths.STAGE_FOLDERS["pruned"]
                  and (parsed := paths.parse_pruned_name(f.name)) and not parsed["quantized"])


def quantized_folder_for(source: Path) -> Path:
    return source.parent / f"{source.name}{_QUANTIZED_SUFFIX}"


def plan(cfg) -> list:
    """[(source folder, source stage, output folder, output stage)], after checking every input exists."""
    jobs = []
    sweep = sweep_folders() if "sweep" in cfg.QUANTIZE else []
    if "student" in cfg.QUANTIZE:
        jobs.append((stage_dir("student"), "student", stage_dir("student_quantized"), "student_quantized"))
    if "pruned" in cfg.QUANTIZE:
        if not stage_dir("pruned").is_dir() and sweep:
            raise StageError(
                f"{stage_dir('pruned')} does not exist (only sweep folders do): run `python "
                f"8_pruning_with_finetuning.py` first, or quantize the sweep alone with "
                f"'QUANTIZE=(\"student\", \"sweep\")'"
            )
        jobs.append((stage_dir("pruned"), "pruned", stage_dir("pruned_quantized"), "pruned_quantized"))
    jobs += [(folder, "pruned", quantized_folder_for(folder), "pruned_quantized") for folder in sweep]
    for source, stage, _, _ in jobs:  # every input checked (cheaply) before the first is quantized
        meta = require_stage(source, stage)
        check_preset(source, meta, cfg.PRESET, stage)
        require_fresh(source, meta, stage)  # names what changed and the scripts to rerun
        check_loadable(source)  # truncated weights, impossible layout: one line naming the folder
    return jobs


# settings that choose which outputs to make, not how: an output made under other values is still up to date
_SELECTION_KEYS = ("QUANTIZE", "REDO")


def up_to_date(cfg, source, source_stage, dest) -> dict | None:
    """The metadata of `dest` when it can be kept as it is: finished, made from the source folder's current run
    (same run id), with the same settings (except _SELECTION_KEYS), the same data and the same code (this script and
    common/: `code_sha256`), and nothing it was built from changed since; otherwise None (it is made again)."""
    if cfg.REDO or not (dest / METADATA).is_file():
        return None
    try:
        meta = read_metadata(dest)
        check_loadable(dest)
    except (OSError, ValueError, StageError):
        return None
    settings = {k: v for k, v in as_dict(cfg).items() if k not in _SELECTION_KEYS}
    made_with = {k: v for k, v in meta.get("config", {}).items() if k not in _SELECTION_KEYS}
    same = (meta.get("upstream", {}).get(source_stage) == upstream_record(source, source_stage, root=dest.parent)
            and made_with == json_roundtrip(settings) and meta.get("code_sha256") == code_sha256(__file__)
            and not is_stale(meta, dest.parent))
    return meta if same else None


def quantize_one(cfg, device, compute_dtype, source, source_stage, dest, dest_stage, rows, student_bytes) -> dict:
    """Quantize one fp32 folder into `dest`, reload it from disk and measure it against its source."""
    set_seed(cfg.SEED)
    tokenizer = load_tokenizer(source)
    loader = make_loader(encode(tokenizer, rows, cfg.MAX_LENGTH), cfg.EVAL_BATCH_SIZE, pad_id=tokenizer.pad_token_id)
    labels = loader.dataset.labels
    with stage_output(dest, dest_stage, as_dict(cfg), cfg.SEED) as out:
        out.add_upstream(source, source_stage)
        out.add_data()
        out.extra["code_sha256"] = code_sha256(__file__)  # what made it (up_to_date compares it)
        model = load_model(source).to(device)
        parameters = count_parameters(model)
        fp32_logits = predict_logits(model, loader)
        fp32_accuracy = (fp32_logits.argmax(-1) == labels).float().mean().item()

        quantize_model(model, quant_type=cfg.QUANT_TYPE, double_quant=cfg.DOUBLE_QUANT,
                       compute_dtype=COMPUTE_DTYPES[compute_dtype], embedding_bits=cfg.EMBEDDING_BITS,
                       quantize_head=cfg.QUANTIZE_HEAD, blocksize=cfg.BLOCKSIZE)
        saved_logits = predict_logits(model, loader)
        save_quantized(model.cpu(), tokenizer, out.dir)

        reloaded = load_model(out.dir).to(device)
        logits = predict_logits(reloaded, loader)
        reload_diff = (logits - saved_logits).abs().max().item()
        tolerance = 0.0 if device.type == "cpu" else 1e-4
        if reload_diff > tolerance:
            raise RuntimeError(f"{dest.name}: the reloaded 4-bit model differs from the one saved "
                               f"(max |logit difference| {reload_diff:.3g})")
        accuracy = (logits.argmax(-1) == labels).float().mean().item()
        size = weight_bytes(out.dir)
        results = {
            "source_folder": str(source),
            "quantization": reloaded.config.dpq_quantization,
            "bytes_on_disk": size,
            "folder_bytes": sum(f.stat().st_size for f in out.dir.iterdir() if f.is_file()),
            "source_bytes_on_disk": weight_bytes(source),
            "size_vs_source": round(size / weight_bytes(source), 4),
            "size_vs_fp32_student": round(size / student_bytes, 4) if student_bytes else None,
            "precision_map": precision_map(reloaded),
            "parameters": parameters,
            "validation_accuracy": accuracy,
            "source_validation_accuracy": fp32_accuracy,
            "accuracy_diff_points": round(100 * (accuracy - fp32_accuracy), 3),
            "prediction_agreement": (logits.argmax(-1) == fp32_logits.argmax(-1)).float().mean().item(),
            "max_abs_logit_diff_vs_source": (logits - fp32_logits).abs().max().item(),
            "reload_max_abs_logit_diff": reload_diff,
            "layout": get_layout(reloaded) if config_is_pruned(reloaded.config) else None,
            "model_class": type(reloaded).__name__,
            "device": str(device),
            "validation_sentences": len(rows),
            "preset": cfg.PRESET,
            "quick": cfg.QUICK,
        }
        if cfg.ONNX:
            results["onnx"] = export_onnx(cfg, source, tokenizer, loader, fp32_logits if device.type == "cpu" else None,
                                          out.dir)
        logger.info(f"{dest.name}: validation accuracy (reloaded from disk) {accuracy:.4f} vs fp32 "
                    f"{fp32_accuracy:.4f} ({results['accuracy_diff_points']:+.2f} points, predictions agree on "
                    f"{100 * results['prediction_agreement']:.1f}%); {size / 2**20:.2f} MiB on disk = "
                    f"{100 * results['size_vs_source']:.1f}% of {source.name}"
                    + (f", {100 * results['size_vs_fp32_student']:.1f}% of the fp32 student" if student_bytes else ""))
        out.results = results
    return results


def export_onnx(cfg, source, tokenizer, loader, fp32_logits, folder) -> dict:
    """The CPU serving artifacts of the fp32 source, in folder/onnx/, each checked against the source's logits.
    An export that does not match is not kept: the stage still succeeds, and the reason is recorded and logged."""
    model = load_model(source)  # fresh fp32 copy on CPU: the one on `device` was quantized in place
    if fp32_logits is None:
        fp32_logits = predict_logits(model, loader)
    try:
        return export.export_folder(model, tokenizer, folder, cfg.ONNX, reference_logits=fp32_logits,
                                    labels=loader.dataset.labels, loader=loader,
                                    min_agreement=cfg.ONNX_MIN_AGREEMENT, log=logger.info)
    except export.ExportError as err:
        logger.warning(f"WARNING: no ONNX export for {source.name}: {err}")
        return {"error": str(err), "artifacts": {}}


def main(argv=None):
    setup_logging()
    cfg = parse_overrides(constants(globals()), sys.argv[1:] if argv is None else argv)
    device = check_config(cfg)
    jobs = plan(cfg)
    rows = load_sst2_splits()["validation"]
    student_dir = stage_dir("student")
    student_bytes = weight_bytes(student_dir) if student_dir.is_dir() else 0
    compute_dtype = quantization.resolve_compute_dtype(cfg.COMPUTE_DTYPE, device)
    logger.info(f"quantizing {len(jobs)} model(s) to {cfg.QUANT_TYPE} on {device}, {compute_dtype} compute: "
                + ", ".join(f"{s.name} -> {d.name}" for s, _, d, _ in jobs))
    results = {}
    for source, source_stage, dest, dest_stage in jobs:
        kept = up_to_date(cfg, source, source_stage, dest)
        if kept is not None:
            run_id = kept["upstream"][source_stage]["run_id"]
            logger.info(f"{dest.name}: up to date (made from {source.name} run {run_id} with these settings, data "
                        f"and code); kept as it is (REDO=True makes it again)")
            results[dest.name] = kept["results"]
            continue
        results[dest.name] = quantize_one(cfg, device, compute_dtype, source, source_stage, dest, dest_stage, rows,
                                          student_bytes)
    return results


if __name__ == "__main__":
    run_main(main)
