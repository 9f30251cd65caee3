"""Stage 2: distil the fine-tuned teacher into a smaller student.

Reads   models/teacher_model/ (1_train_teacher.py), data/sst2/ (download_model.py), and for the bert preset
        models/pretrained_student/ (distilbert-base-uncased, from download_model.py)
Writes  models/student_model/            (DISTILL=True, the default)
        models/student_model_nodistill/  (DISTILL=False: same student on hard labels only, the ablation)
        models/cache/                    teacher logits on the training set, reused while nothing changed
        SEEDS=(42, 43, 44): one student per seed (data order, dropout); seed SEED keeps the names above, other
        seeds add a suffix: models/student_model_seed43/ (common.paths.seeded_stage_dir)

Student: for `minilm`, a BERT with every other teacher layer (0, 2, 4) plus the teacher's embeddings,
pooler and classifier, the way DistilBERT was initialised from BERT; for `bert`, distilbert-base-uncased.
Loss: alpha * T^2 * KL(teacher soft targets) + (1 - alpha) * cross-entropy, plus INTERMEDIATE_WEIGHT times
TinyBERT's intermediate terms (hidden-state + attention MSE to the teacher layer each student layer was copied from,
common/distillation.py; INTERMEDIATE_WEIGHT=0 turns them off). The best held-out state is kept.

Run:    python 2_distill_student.py
Quick:  QUICK=1 python 2_distill_student.py
Processes: torchrun --standalone --nproc_per_node 2 2_distill_student.py   (data-parallel; README: Several processes)
Ablation: python 2_distill_student.py DISTILL=False
Seeds:  python 2_distill_student.py "SEEDS=(42, 43, 44)"   (stage 8 keeps pruning student_model, seed SEED)
Override any constant below as KEY=VALUE.
"""

import json
import sys
from contextlib import nullcontext

from common.config import (ConfigError, apply_defaults, as_dict, at_least, check_constants, constants, each, env_flag,
                           env_preset, parse_overrides)
from common.data import encoded_splits, split_loaders
from common.distillation import (IntermediateDistillation, eager_attention, intermediate_layer_map, kd_loss_fn,
                                 student_from_teacher_layers, teacher_logits_for)
from common.modeling import check_loadable, count_parameters, load_model, load_tokenizer, save_and_reload
from common.modeling_dpq import config_sizes
from common.paths import models_root, seeded_stage_dir, stage_dir
from common.stage import (StageError, check_preset, logger, require_fresh, require_stage, run_main, set_seed,
                          setup_logging, stage_output)
from common.training import evaluate, train

# -----------------------------------------------------------------------------
PRESET = env_preset()
QUICK = env_flag("QUICK")
STUDENT_LAYERS = (0, 2, 4)     # minilm preset: teacher layers the student starts from
DISTILL = True                 # False: hard labels only, written to student_model_nodistill (ablation)
TEMPERATURE = 2.0
ALPHA = 0.5                    # weight of the soft-target loss; 1 - ALPHA on the hard labels
EPOCHS = 2                     # one epoch reached 88.5% in a reference run; the target is >= 89
LR = 1e-4
BATCH_SIZE = 32
WEIGHT_DECAY = 0.01
WARMUP_RATIO = 0.06
EVALS_PER_EPOCH = 4
MAX_LENGTH = 128
TRAIN_LIMIT = 0                # 0 = all training sentences
SEED = 42
SEEDS = ()                     # several students in one run, e.g. (42, 43, 44): seed SEED -> student_model, the
                               # others -> student_model_seed43, ...; () = only SEED
INTERMEDIATE_WEIGHT = 1.0      # weight of hidden-state + attention MSE to mapped teacher layers; 0 = off. 1.0 vs 0:
                               # +1.72 points (3 seeds, docs/experiments.md), 1.23x this stage's time (a live teacher)
# -----------------------------------------------------------------------------
DEFAULTS_FOR = {"bert": {"EPOCHS": 3, "LR": 5e-5, "EVALS_PER_EPOCH": 2,  # by situation (common.config.apply_defaults)
                         "INTERMEDIATE_WEIGHT": 0.0},  # measured on minilm only: =1.0 turns it on
                "quick": {"EPOCHS": 1, "TRAIN_LIMIT": 2000, "EVALS_PER_EPOCH": 2, "LR": 2e-4}}
_RULES = {  # besides the shared ones (common.config.RULES: EPOCHS, LR, BATCH_SIZE, TEMPERATURE, ALPHA, SEEDS, ...)
    "STUDENT_LAYERS": each(at_least(0, "teacher layer indices"), distinct=True),
    "INTERMEDIATE_WEIGHT": at_least(0.0, "weight of the intermediate-layer loss, 0 = off"),
}


def build_student(cfg, teacher):
    if cfg.PRESET == "minilm":
        return student_from_teacher_layers(teacher, cfg.STUDENT_LAYERS)
    source = stage_dir("pretrained_student")
    student = load_model(source)
    if load_tokenizer(source).get_vocab() != load_tokenizer(stage_dir("teacher")).get_vocab():
        raise StageError(f"{source} and the teacher use different vocabularies; distillation needs one tokenizer")
    return student


def check_inputs(cfg, teacher_dir) -> dict:
    """The teacher's metadata, after checking (cheaply, before any data or weights are loaded) that the teacher
    and, for the bert preset, the pretrained student are finished, fresh, made for this preset and readable."""
    teacher_meta = require_stage(teacher_dir, "teacher")
    check_preset(teacher_dir, teacher_meta, cfg.PRESET, "teacher")
    require_fresh(teacher_dir, teacher_meta, "teacher")
    check_loadable(teacher_dir)
    if cfg.PRESET == "minilm":
        layers = config_sizes(json.loads((teacher_dir / "config.json").read_text()))["layers"]
        if max(cfg.STUDENT_LAYERS) >= layers:
            raise ConfigError(f"STUDENT_LAYERS={cfg.STUDENT_LAYERS!r}: must be layers of the teacher in {teacher_dir}, "
                              f"which has {layers} (0 to {layers - 1})")
    else:
        source = stage_dir("pretrained_student")
        require_stage(source, "pretrained_student")
        check_loadable(source)
    return teacher_meta


def main(argv=None):
    setup_logging()
    cfg = parse_overrides(constants(globals()), sys.argv[1:] if argv is None else argv)
    apply_defaults(cfg, DEFAULTS_FOR)
    check_constants(cfg, _RULES)  # before anything is loaded: a nonsense value never replaces a student
    if not cfg.DISTILL:  # the ablation learns from the labels alone: no teacher terms unless asked for (refused)
        if cfg.INTERMEDIATE_WEIGHT and "INTERMEDIATE_WEIGHT" in cfg.OVERRIDDEN:
            raise ConfigError("INTERMEDIATE_WEIGHT distils from the teacher: leave it 0 with DISTILL=False")
        cfg.INTERMEDIATE_WEIGHT = 0.0
    teacher_dir = stage_dir("teacher")
    teacher_meta = check_inputs(cfg, teacher_dir)
    seeds = list(cfg.SEEDS) or [cfg.SEED]
    set_seed(cfg.SEED)
    tokenizer = load_tokenizer(teacher_dir)
    data = encoded_splits(tokenizer, cfg.TRAIN_LIMIT, cfg.MAX_LENGTH)
    teacher = load_model(teacher_dir)
    logits = (teacher_logits_for(teacher_dir, data["train"], models_root() / "cache", tokenization=data["tokenization"])
              if cfg.DISTILL else None)
    results = {}
    for seed in seeds:  # seed SEED -> student_model (today's name), others -> student_model_seed43, ...
        folder = seeded_stage_dir("student" if cfg.DISTILL else "student_nodistill", seed, cfg.SEED)
        results[folder.name] = distil_one(cfg, seed, folder, data, tokenizer, teacher, teacher_dir, teacher_meta,
                                          logits)
    return results if len(seeds) > 1 else next(iter(results.values()))


def distil_one(cfg, seed, folder, data, tokenizer, teacher, teacher_dir, teacher_meta, logits) -> dict:
    """Build the student, distil it with `seed` (data order, dropout) and write `folder`."""
    set_seed(seed)
    loaders = split_loaders(data, cfg.BATCH_SIZE, seed, tokenizer.pad_token_id)
    student = build_student(cfg, teacher)
    logger.info(f"student: {type(student).__name__}, {count_parameters(student):,} parameters "
                f"(teacher {count_parameters(teacher):,}), seed {seed}")

    intermediate = (IntermediateDistillation(teacher, intermediate_layer_map(student, teacher), cfg.INTERMEDIATE_WEIGHT)
                    if cfg.INTERMEDIATE_WEIGHT else None)
    loss_fn = kd_loss_fn(logits, cfg.TEMPERATURE, cfg.ALPHA, intermediate) if cfg.DISTILL else None
    stage = "student" if cfg.DISTILL else "student_nodistill"
    with stage_output(folder, stage, as_dict(cfg), seed) as out:
        out.add_upstream(teacher_dir, "teacher")
        if cfg.PRESET != "minilm":
            out.add_upstream(stage_dir("pretrained_student"), "pretrained_student")
        out.add_data()
        kwargs = {"loss_fn": loss_fn} if loss_fn else {}
        with eager_attention(student, teacher) if intermediate else nullcontext():
            result = train(student, loaders["train"], loaders["heldout"], epochs=cfg.EPOCHS, lr=cfg.LR,
                           weight_decay=cfg.WEIGHT_DECAY, warmup_ratio=cfg.WARMUP_RATIO,
                           evals_per_epoch=cfg.EVALS_PER_EPOCH, desc=folder.name, **kwargs)
        reloaded = save_and_reload(student.cpu(), tokenizer, out.dir)
        accuracy = evaluate(reloaded, loaders["validation"])
        teacher_accuracy = teacher_meta["results"]["validation_accuracy"]
        logger.info(f"{folder.name} validation accuracy (reloaded from disk): {accuracy:.4f} "
                    f"(teacher {teacher_accuracy:.4f}, gap {100 * (teacher_accuracy - accuracy):.2f} points)")
        out.results = {"validation_accuracy": accuracy, "teacher_validation_accuracy": teacher_accuracy,
                       "gap_points": round(100 * (teacher_accuracy - accuracy), 3),
                       "heldout_accuracy": result.best_accuracy, "best_step": result.best_step,
                       "history": result.history, "parameters": count_parameters(reloaded),
                       "teacher_parameters": count_parameters(teacher), "preset": cfg.PRESET,
                       "quick": cfg.QUICK, "distilled": cfg.DISTILL, "model_class": type(reloaded).__name__,
                       "student_layers": list(cfg.STUDENT_LAYERS) if cfg.PRESET == "minilm" else None,
                       "seed": seed, "train_sentences": len(data["train"]),
                       "intermediate_layer_map": intermediate.layer_map if intermediate else None}
    return out.results


if __name__ == "__main__":
    run_main(main)
