"""Stage 7: measure every saved model and write the final report.

Reads   every model folder under models/ (teacher_model, student_model, distilled_quantized_student, pruned_model,
        pruned_quantized_final, sweep / frontier / other-seed folders and their 4-bit twins) and data/sst2/.
        Missing folders are skipped with a warning; half-made (no metadata.json) and stale ones are marked.
Writes  final_report.json, final_report.png, final_report.md at the repository root (OUTPUT_DIR or env REPORT_DIR
        to write elsewhere).

Every number is measured on the saved folder loaded through common.modeling.load_model: accuracy on SST-2
validation (and each --eval-file) with 95% intervals, GFLOPs (fvcore, batch 1; a 4-bit model through its fp32
twin), parameters, bytes on disk, layers / heads / FFN neurons kept, and CPU latency at each batch size. Each
model's timed runs alternate with those of the student of its precision: its speed-up is the median ratio, with a
95% interval over the runs (none below 6). The JSON holds every number; the chart and markdown are views of it.

Run:    python 7_evaluate_and_generate_report.py
        python 7_evaluate_and_generate_report.py --eval-file my_reviews.tsv   (GLUE TSV sentence<TAB>label; repeatable)
Quick:  QUICK=1 python 7_evaluate_and_generate_report.py   (3 latency runs, first 200 validation sentences)
Override any constant below as KEY=VALUE, e.g. `python 7_evaluate_and_generate_report.py LATENCY_RUNS=30`.
"""

import sys

import torch

from common.config import (ConfigError, apply_defaults, as_dict, at_least, check_constants, constants, each, env_flag,
                           env_preset, int_range, parse_overrides)
from common.paths import models_root
from common.stage import logger, run_main, set_seed, setup_logging

# -----------------------------------------------------------------------------
PRESET = env_preset()            # the report records the preset the models' metadata names; this one only when
                                 # none does (a different one is a warning in the report)
QUICK = env_flag("QUICK")        # smoke run: fewer latency runs, a validation slice (recorded in the report)
SEED = 0                         # picks the sentences timed for latency
EVAL_BATCH_SIZE = 128            # accuracy evaluation batch (does not change accuracy)
MAX_LENGTH = 128                 # tokenization limit for accuracy, GFLOPs per sentence and latency inputs
FLOPS_SEQ_LEN = 128              # sequence length of the headline GFLOPs figure (batch 1)
LATENCY_BATCH_SIZES = (1, 32)    # batch sizes timed (the headline uses the largest)
LATENCY_RUNS = 20                # timed forward passes per batch size; the median is reported (>= 10); each
                                 # paired with one of the student's (so a model costs twice this many runs).
                                 # 20 runs: the speed-up's 95% interval is the 6th to 15th ratio, so up to 5
                                 # hiccups of the machine on either side do not widen it (10 runs: 2nd to 9th)
WARMUP_RUNS = 3                  # untimed forward passes first
THREADS = 0                      # torch CPU threads while measuring; 0 = torch's default (all cores).
                                 # On a machine shared with other jobs, THREADS=1 avoids oversubscription
VALIDATION_LIMIT = 0             # 0 = all 872 validation sentences; N = the first N (quick runs)
MODELS = ""                      # comma-separated folder names to report on; "" = every model under models/
OUTPUT_DIR = ""                  # "" = env REPORT_DIR, else the repository root
# -----------------------------------------------------------------------------
DEFAULTS_FOR = {"quick": {"LATENCY_RUNS": 3, "WARMUP_RUNS": 1, "VALIDATION_LIMIT": 200}}  # common.config.apply_defaults
_MIN_LATENCY_RUNS = 10  # private: not a settable constant
_RULES = {  # besides the shared ones (common.config.RULES: SEED, EVAL_BATCH_SIZE, MAX_LENGTH)
    "LATENCY_RUNS": at_least(1, f"timed runs per batch size; {_MIN_LATENCY_RUNS} or more unless QUICK=1"),
    "WARMUP_RUNS": at_least(0, "untimed runs first"),
    "LATENCY_BATCH_SIZES": each(at_least(1, "sentences per timed batch")),
    "FLOPS_SEQ_LEN": int_range(8, 512, "tokens of the headline GFLOPs figure"),
    "THREADS": at_least(0, "torch CPU threads; 0 = torch's default"),
    "VALIDATION_LIMIT": at_least(0, "validation sentences; 0 = all"),
}


def split_eval_files(argv):
    """(eval file paths, the remaining KEY=VALUE arguments): `--eval-file PATH` / `--eval-file=PATH`."""
    files, rest = [], []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--eval-file":
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError("--eval-file needs a path: --eval-file PATH (a GLUE TSV: sentence<TAB>label)")
            files.append(args[i + 1])
            i += 2
            continue
        if arg.startswith("--eval-file="):
            files.append(arg.split("=", 1)[1])
        elif arg.startswith("--") and "=" not in arg:
            raise ConfigError(f"unknown flag {arg!r}: the only flag is --eval-file PATH; constants are KEY=VALUE")
        else:
            rest.append(arg)
        i += 1
    return files, rest


def main(argv=None):
    setup_logging()
    eval_paths, rest = split_eval_files(sys.argv[1:] if argv is None else argv)
    cfg = parse_overrides(constants(globals()), rest)
    apply_defaults(cfg, DEFAULTS_FOR)
    check_constants(cfg, _RULES)
    if cfg.LATENCY_RUNS < _MIN_LATENCY_RUNS and not cfg.QUICK:
        raise ConfigError(f"LATENCY_RUNS={cfg.LATENCY_RUNS}: a report times at least {_MIN_LATENCY_RUNS} runs "
                          f"(QUICK=1 allows fewer for a smoke run, and the report says so)")

    # Cheap checks first: extra eval files and the validation data, before any model is loaded.
    from common.data import load_sst2_splits
    from common.report import generate
    from common.report.discover import report_dir
    from common.report.measure import load_eval_files

    eval_files = load_eval_files(eval_paths)
    validation = load_sst2_splits()["validation"]
    n_full = len(validation)
    if cfg.VALIDATION_LIMIT:
        validation = validation[:cfg.VALIDATION_LIMIT]
    set_seed(cfg.SEED)
    dataset = {"name": "sst2", "split": "validation", "n": len(validation)}
    if len(validation) < n_full:
        dataset["sliced_from"] = n_full

    settings = {
        "batch_size": cfg.EVAL_BATCH_SIZE,
        "max_length": cfg.MAX_LENGTH,
        "flops_seq_len": cfg.FLOPS_SEQ_LEN,
        "latency_batches": tuple(cfg.LATENCY_BATCH_SIZES),
        "latency_runs": cfg.LATENCY_RUNS,
        "warmup_runs": cfg.WARMUP_RUNS,
        "seed": cfg.SEED,
    }
    logger.info(f"[report] {len(validation)} validation sentences, {len(eval_files)} extra eval file(s), "
                f"{torch.get_num_threads()} torch threads")
    threads_before = torch.get_num_threads()
    if cfg.THREADS:
        torch.set_num_threads(cfg.THREADS)
    try:
        return generate(
            models_root(), validation=validation, dataset=dataset, eval_files=eval_files, settings=settings,
            out_dir=report_dir(cfg.OUTPUT_DIR), preset=cfg.PRESET, quick=cfg.QUICK,
            constants=as_dict(cfg), names=[n.strip() for n in cfg.MODELS.split(",") if n.strip()] or None,
        )
    finally:
        torch.set_num_threads(threads_before)


if __name__ == "__main__":
    run_main(main)
