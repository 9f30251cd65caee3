"""Where everything lives: one map from stage name to folder.

`MODELS_DIR` (env) moves the models root, `DATA_DIR` (env) the data root; both default to folders beside
the stage scripts, so every script works from any working directory.
"""

import os
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
