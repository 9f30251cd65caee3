"""Which folders the report covers: discovery and reading order, each folder's metadata and staleness, the naming
helpers (family, seed group, chart label), the pruning facts recorded in metadata.json, and the preset."""

import json
import logging
import os
from pathlib import Path

from common.modeling_dpq import LAYOUT_KEY
from common.modeling_dpq_4bit import QUANT_KEY
from common.paths import REPO_ROOT, STAGE_FOLDERS, STAGE_SCRIPTS, STUDENT_SEED_RE, parse_pruned_name, stage_of_folder, \
    without_seed
from common.stage import METADATA, describe_stale, read_metadata, rerun_commands, resolve_upstream, stale_reasons

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
NOT_MODELS = {STAGE_FOLDERS["pretrained_teacher"], STAGE_FOLDERS["pretrained_student"]}


def report_dir(override: str = "") -> Path:
    """Where the report files go: the override, else env REPORT_DIR, else the repository root."""
    return Path(override or os.environ.get(REPORT_DIR_ENV) or REPO_ROOT).resolve()


def write_atomic(path: Path, write) -> None:
    """`write(tmp)` a hidden file beside `path`, then move it there: a reader never sees half a report file."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


# --- Which folders
def _order_key(name: str):
    """Teacher, students, the final pipeline, then sweep / frontier points by the target in their names."""
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


def is_model_folder(folder: Path) -> bool:
    return folder.is_dir() and not folder.name.startswith(".") and (folder / "config.json").is_file()


def discover_models(models_root, names=None):
    """([(name, folder)] in reading order, warnings about expected ones missing): the folders `names`, else the
    pipeline's stage folders, every pruned folder named by common.paths.pruned_folder (and its `_quantized` twin),
    students of other seeds (student_model_seed43) and any other folder holding a 4-bit model."""
    models_root, notes = Path(models_root), []
    if names:
        found = {name: models_root / name for name in names if is_model_folder(models_root / name)}
        notes += [f"{name}: no model folder at {models_root / name}; skipped" for name in names if name not in found]
    else:
        found = {name: models_root / name for name in EXPECTED + OPTIONAL if is_model_folder(models_root / name)}
        script = {folder: s for s, folder in STAGE_FOLDERS.items()}
        notes += [f"{name}: not found in {models_root}; skipped (written by {STAGE_SCRIPTS[script[name]]})"
                  for name in EXPECTED if name not in found]
        for folder in sorted(models_root.iterdir()) if models_root.is_dir() else []:
            if (folder.name not in found and folder.name not in NOT_MODELS and is_model_folder(folder)
                    and (parse_pruned_name(folder.name) or STUDENT_SEED_RE.match(folder.name)
                         or config_dict(folder).get(QUANT_KEY))):
                found[folder.name] = folder
    return [(name, found[name]) for name in sorted(found, key=_order_key)], notes


def config_dict(folder: Path) -> dict:
    try:
        with open(Path(folder) / "config.json") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def folder_status(folder: Path):
    """(metadata or {}, warnings): half-made (no metadata.json) and stale folders, naming the scripts to rerun."""
    folder, notes = Path(folder), []
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


# --- Names and pruning facts: family, seed group, target sparsity, chart label
def family(name: str, config: dict, meta: dict) -> str:
    """teacher | student | pruned: from the pipeline's folder names, the config's layout, else the stage recorded."""
    if name == STAGE_FOLDERS["teacher"]:
        return "teacher"
    if name.startswith("pruned") or config.get(LAYOUT_KEY):
        return "pruned"
    if name in (STAGE_FOLDERS["student"], STAGE_FOLDERS["student_nodistill"], BASELINE):
        return "student"
    stage = meta.get("stage") or ""
    return "teacher" if stage == "teacher" else "pruned" if stage.startswith("pruned") else "student"


def seed_group(name: str) -> str:
    """The folder name seed SEED gives the same model (pruned_model_s50_seed43 -> pruned_model_s50,
    pruned_model_seed43_quantized -> pruned_quantized_final): a seed group's models differ only by training seed."""
    base = without_seed(name)
    return FINAL if base == f"{STAGE_FOLDERS['pruned']}_quantized" else base


def target_sparsity(name: str, folder: Path, meta: dict):
    """The sparsity target stage 8 recorded (metadata.json results.target_sparsity, exact: the folder name rounds it);
    a 4-bit twin without one takes its fp32 source's, through its upstream record. Only a half-made folder (no
    metadata.json) falls back to its name (pruned_model_s20 -> 0.2); None when nothing records one."""
    if not meta:
        return (parse_pruned_name(name) or {}).get("target")
    for source in [meta] + list(meta.get("upstream", {}).values()):
        try:
            recorded = source if source is meta else read_metadata(resolve_upstream(source, Path(folder).parent))
        except (OSError, json.JSONDecodeError):
            continue
        if recorded.get("results", {}).get("target_sparsity") is not None:
            return recorded["results"]["target_sparsity"]
    return None


def pruning_fields(name: str, folder: Path, meta: dict) -> dict:
    """What a folder says about how it was made: seed, seed group, a pruned vocabulary (and its paired cost), pruning
    method (ours "taylor" or the "magnitude" baseline), target sparsity, stage-8 mode and the frontier run."""
    results = meta.get("results", {})
    out = {"seed": meta.get("seed"), "seed_group": seed_group(name), "vocabulary": results.get("vocabulary"),
           "pruning_method": (parse_pruned_name(name) or {}).get("method") or results.get("method"),
           "target_sparsity": target_sparsity(name, folder, meta)}
    if results.get("mode"):
        out["pruning_mode"] = results["mode"]
    if results.get("frontier"):
        out["frontier_run"] = {k: results["frontier"][k] for k in ("sweep_id", "branch_step", "recovery_epochs",
                                                                   "sweep_wall_time_s") if k in results["frontier"]}
    return out


FIXED_LABELS = {"teacher_model": "teacher", "student_model": "student", "student_model_nodistill": "student, no KD",
                BASELINE: "student 4-bit (baseline)", "pruned_model": "pruned", FINAL: "pruned 4-bit (final)"}


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
    """The preset the models were made with (`requested` only when none records one); a mismatch is a warning."""
    presets = set()
    for _, folder in found:
        try:
            presets.add(read_metadata(folder).get("results", {}).get("preset"))
        except (OSError, ValueError, AttributeError):
            pass
    presets -= {None, ""}
    if not presets:
        return requested
    made = next(iter(presets)) if len(presets) == 1 else "mixed: " + ", ".join(sorted(presets))
    if len(presets) > 1 or (requested and requested not in presets):
        note = (f"the models were made with different presets ({', '.join(sorted(presets))}): compare with care"
                if len(presets) > 1 else f"PRESET={requested} ignored: the models were made with preset {made}")
        notes.append(note)
        logger.warning(f"[report] {note}")
    return made
