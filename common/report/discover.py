"""Which folders the report covers: discovery and reading order, each folder's metadata and staleness, the naming
helpers (family, sweep target, seed group, chart label) and the preset the models were made with."""

import json
import logging
import os
from pathlib import Path

from common.modeling import LAYOUT_KEY, QUANT_KEY
from common.paths import (PRUNED_NAME_RE, REPO_ROOT, STAGE_FOLDERS, STAGE_SCRIPTS, STUDENT_SEED_RE, parse_pruned_name,
                          stage_of_folder, without_seed)
from common.stage import METADATA, describe_stale, read_metadata, rerun_commands, stale_reasons

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
# Names: family, sweep target, seed group, chart label


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
