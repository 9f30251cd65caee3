"""Stage 1: fine-tune the teacher on SST-2.

Reads   models/pretrained_teacher/ and data/sst2/ (both from download_model.py)
Writes  models/teacher_model/  (weights, config, tokenizer, stage.log, metadata.json with the validation
        accuracy measured by reloading the saved folder)

AdamW with linear warmup and decay over length-grouped batches; the best state by held-out accuracy (a
fixed 2% slice of train, never the validation set) is kept.

Run:    python 1_train_teacher.py
Quick:  QUICK=1 python 1_train_teacher.py       (2,000 training sentences, one epoch)
Processes: torchrun --standalone --nproc_per_node 2 1_train_teacher.py   (data-parallel; README: Several processes)
Override any constant below as KEY=VALUE, e.g. `python 1_train_teacher.py EPOCHS=3 LR=5e-5`.
Several GPUs: `accelerate launch 1_train_teacher.py`.
"""

import sys

from common.config import (apply_defaults, as_dict, check_constants, constants, env_flag, env_preset,
                           parse_overrides)
from common.data import encoded_splits, split_loaders
from common.modeling import check_loadable, count_parameters, load_model, load_tokenizer, save_and_reload
from common.paths import stage_dir
from common.stage import (check_preset, logger, require_fresh, require_stage, run_main, set_seed, setup_logging,
                          stage_output)
from common.training import evaluate, train

# -----------------------------------------------------------------------------
PRESET = env_preset()      # minilm | bert; must match what download_model.py wrote
QUICK = env_flag("QUICK")  # tiny slice, one epoch: checks the pipeline runs end to end
EPOCHS = 2
LR = 1e-4                  # MiniLM-L6 likes a high lr; the bert preset uses 2e-5 (below)
BATCH_SIZE = 32
WEIGHT_DECAY = 0.01
WARMUP_RATIO = 0.06
EVALS_PER_EPOCH = 4        # held-out checks per epoch; the best one is kept
MAX_LENGTH = 128
TRAIN_LIMIT = 0            # 0 = all training sentences
SEED = 42
# -----------------------------------------------------------------------------
DEFAULTS_FOR = {"bert": {"EPOCHS": 3, "LR": 2e-5, "EVALS_PER_EPOCH": 2},  # by situation (common.config.apply_defaults)
                "quick": {"EPOCHS": 1, "TRAIN_LIMIT": 2000, "EVALS_PER_EPOCH": 2, "LR": 2e-4}}  # 2e-4: 81.3% vs 79.7%


def main(argv=None):
    setup_logging()
    cfg = parse_overrides(constants(globals()), sys.argv[1:] if argv is None else argv)
    apply_defaults(cfg, DEFAULTS_FOR)
    check_constants(cfg)  # before anything is loaded: a nonsense value never replaces a trained teacher
    source = stage_dir("pretrained_teacher")
    source_meta = require_stage(source, "pretrained_teacher")
    check_preset(source, source_meta, cfg.PRESET, "pretrained_teacher")
    require_fresh(source, source_meta, "pretrained_teacher")
    check_loadable(source)
    set_seed(cfg.SEED)
    tokenizer = load_tokenizer(source)
    data = encoded_splits(tokenizer, cfg.TRAIN_LIMIT, cfg.MAX_LENGTH)
    loaders = split_loaders(data, cfg.BATCH_SIZE, cfg.SEED, tokenizer.pad_token_id)
    model = load_model(source)
    logger.info(f"teacher: {type(model).__name__}, {count_parameters(model):,} parameters; "
                f"{len(data['train'])} training / {len(data['heldout'])} held-out sentences")

    with stage_output(stage_dir("teacher"), "teacher", as_dict(cfg), cfg.SEED) as out:
        out.add_upstream(source, "pretrained_teacher")
        out.add_data()
        result = train(model, loaders["train"], loaders["heldout"], epochs=cfg.EPOCHS, lr=cfg.LR,
                       weight_decay=cfg.WEIGHT_DECAY, warmup_ratio=cfg.WARMUP_RATIO,
                       evals_per_epoch=cfg.EVALS_PER_EPOCH, desc="teacher")
        reloaded = save_and_reload(model.cpu(), tokenizer, out.dir)
        accuracy = evaluate(reloaded, loaders["validation"])
        logger.info(f"teacher validation accuracy (reloaded from disk): {accuracy:.4f}")
        out.results = {"validation_accuracy": accuracy, "heldout_accuracy": result.best_accuracy,
                       "best_step": result.best_step, "history": result.history,
                       "parameters": count_parameters(reloaded), "preset": cfg.PRESET, "quick": cfg.QUICK,
                       "train_sentences": len(data["train"]), "model_class": type(reloaded).__name__}
    return out.results


if __name__ == "__main__":
    run_main(main)
