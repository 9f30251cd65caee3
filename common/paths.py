"""Where everything lives: one map from stage name to folder.

`MODELS_DIR` (env) moves the models root, `DATA_DIR` (env) the data root; both default to folders beside
the stage scripts, so every script works from any working directory.
"""

import os
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# stage name -> folder name under the models root. Sweep folders (pruned_model_s50, ...) come from
# `pruned_sweep_folder`; their 4-bit twins are named by 9_quantize_pruned_model.py (pruned_model_s50_quantized).
STAGE_FOLDERS = {
    "pretrained_teacher": "pretrained_teacher",
    "pretrained_student": "pretrained_student",
    "teacher": "teacher_model",
    "student": "student_model",
    "student_nodistill": "student_model_nodistill",
    "pruned": "pruned_model",
    "pruned_quantized": "pruned_quantized_final",
    "student_quantized": "distilled_quantized_student",
}

# which script writes each stage: used in every "run X first" message
STAGE_SCRIPTS = {
    "pretrained_teacher": "download_model.py",
    "pretrained_student": "download_model.py",
    "data": "download_model.py",
    "teacher": "1_train_teacher.py",
    "student": "2_distill_student.py",
    "student_nodistill": "2_distill_student.py DISTILL=False",
    "pruned": "8_pruning_with_finetuning.py",
    "pruned_quantized": "9_quantize_pruned_model.py",
    "student_quantized": "9_quantize_pruned_model.py",
}


def models_root() -> Path:
    return Path(os.environ.get("MODELS_DIR", REPO_ROOT / "models")).resolve()


def data_root() -> Path:
    return Path(os.environ.get("DATA_DIR", REPO_ROOT / "data")).resolve()


def sst2_dir() -> Path:
    """The prepared SST-2 folder written by download_model.py (train.tsv, validation.tsv, manifest.json)."""
    return data_root() / "sst2"


def stage_dir(stage: str) -> Path:
    if stage not in STAGE_FOLDERS:
        raise KeyError(f"unknown stage {stage!r}; known: {', '.join(STAGE_FOLDERS)}")
    return models_root() / STAGE_FOLDERS[stage]


def pruned_sweep_folder(target: float) -> Path:
    """models/pruned_model_s50 for target 0.50 (percent of GFLOPs removed, rounded)."""
    return models_root() / f"pruned_model_s{round(target * 100):02d}"


# ----------------------------------------------------------------------------------------------------
# Seeds, sweep / frontier points and the pruning baseline: one naming rule for stages 2, 8, 9 and the report.
#   <base>[_s<NN>][_seed<N>][_quantized]
# base: student_model (stage 2), pruned_model (ours, stage 8) or pruned_magnitude (the one-shot magnitude baseline);
# _s<NN>: a sweep / frontier point, NN = percent of encoder GFLOPs removed (rounded); _seed<N>: a training seed
# other than the stage's SEED (seed SEED keeps the plain name); _quantized: the 4-bit twin (9_quantize_pruned_model.py;
# pruned_model's own twin keeps its stage name, pruned_quantized_final).

SEED_TAG = "_seed"
QUANTIZED_TAG = "_quantized"
PRUNING_BASES = {"taylor": "pruned_model", "magnitude": "pruned_magnitude"}  # pruning method -> folder base
PRUNED_NAME_RE = re.compile(r"^pruned_(?P<base>model|magnitude)(?:_s(?P<target>\d+))?(?:_seed(?P<seed>\d+))?"
                            r"(?P<quantized>_quantized)?$")
STUDENT_SEED_RE = re.compile(r"^(?P<base>student_model(?:_nodistill)?)_seed(?P<seed>\d+)$")


def seed_tag(seed: int, main_seed: int) -> str:
    """'' for the stage's own SEED (today's folder names), else '_seed43'."""
    return "" if seed == main_seed else f"{SEED_TAG}{int(seed)}"


def target_tag(target: float) -> str:
    """'_s50' for 0.50 (percent of encoder GFLOPs removed, rounded to a whole percent)."""
    return f"_s{round(target * 100):02d}"


def pruned_folder(target: float | None = None, seed: int = 0, main_seed: int = 0, method: str = "taylor") -> Path:
    """models/pruned_model (no target, seed == main_seed), pruned_model_s50, pruned_model_s50_seed43,
    pruned_model_seed43, pruned_magnitude_s50, pruned_magnitude_s50_seed43."""
    if method not in PRUNING_BASES:
        raise KeyError(f"unknown pruning method {method!r}; known: {', '.join(PRUNING_BASES)}")
    name = PRUNING_BASES[method] + (target_tag(target) if target is not None else "") + seed_tag(seed, main_seed)
    return models_root() / name


def seeded_stage_dir(stage: str, seed: int, main_seed: int) -> Path:
    """stage_dir(stage) for the stage's own SEED, else the same name + '_seed43' (e.g. student_model_seed43)."""
    folder = stage_dir(stage)
    return folder.with_name(folder.name + seed_tag(seed, main_seed))


def parse_pruned_name(name: str) -> dict | None:
    """{"method", "target" (fraction or None), "seed" (int, None = the stage's SEED), "quantized"} of a folder named
    by `pruned_folder` (+ its '_quantized' twin); None for any other name."""
    match = PRUNED_NAME_RE.match(name)
    if not match:
        return None
    method = {base: m for m, base in PRUNING_BASES.items()}["pruned_" + match["base"]]
    return {"method": method, "target": int(match["target"]) / 100 if match["target"] else None,
            "seed": int(match["seed"]) if match["seed"] else None, "quantized": bool(match["quantized"])}


def without_seed(name: str) -> str:
    """The folder name the stage's own SEED gives the same model: pruned_model_s50_seed43_quantized ->
    pruned_model_s50_quantized, student_model_seed43 -> student_model (seed groups in the report)."""
    return re.sub(rf"{SEED_TAG}\d+(?={QUANTIZED_TAG}$|$)", "", name)


def stage_of_folder(name: str):
    """The stage that writes a folder of this name, or None: teacher_model -> teacher, pruned_model_s50 -> pruned,
    pruned_model_s50_quantized -> pruned_quantized, sst2 -> data."""
    by_folder = {folder: stage for stage, folder in STAGE_FOLDERS.items()}
    if name in by_folder:
        return by_folder[name]
    if name == "sst2":
        return "data"
    parsed = parse_pruned_name(name)
    if parsed:
        return "pruned_quantized" if parsed["quantized"] else "pruned"
    student = STUDENT_SEED_RE.match(name)
    if student:
        return by_folder.get(student["base"])
    return None


FRONTIER_SUMMARY = "frontier.json"  # models/frontier.json: the frontier runs of 8_pruning_with_finetuning.py, per seed
