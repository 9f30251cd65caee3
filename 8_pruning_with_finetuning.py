"""Stage 8: gradual structured pruning of the distilled student, then recovery by distillation.

Reads   models/student_model/ (2_distill_student.py), models/teacher_model/ (1_train_teacher.py: soft targets),
        data/sst2/ (download_model.py), models/cache/ (teacher logits, reused from stage 2 when unchanged)
Writes  models/pruned_model/ (TARGET_SPARSITY): weights, config with the per-layer layout (`dpq_layout`), tokenizer,
        the shipped loader, kept_units.json, stage.log, metadata.json (constants, seed, trajectory, GFLOPs and
        parameters before/after, held-out and validation accuracy of the reloaded folder, `target_sparsity`);
        PRUNE_TARGETS: one pruned_model_sNN/ per target; SEEDS: pruned_model[_sNN]_seed43/ for the other seeds;
        FRONTIER=True: pruned_model_sNN/ and pruned_magnitude_sNN/ per FRONTIER_TARGETS point, models/frontier.json.

Heads and FFN neurons are physically removed (common.pruning): PRUNE_EPOCHS of distillation from the teacher during
which PRUNE_STEPS events per epoch follow a cubic schedule to the target; each removes the units with the least
Taylor/Fisher importance per FLOP until the fvcore-measured encoder GFLOPs reach it. Then RECOVERY_EPOCHS of
distillation at RECOVERY_LR. Sparsity = the fraction of the student's encoder GFLOPs removed (batch 1, 128 tokens).
FRONTIER=True runs ONE gradual run through every target, a recovered branch saved at each, plus the one-shot magnitude
baseline with the same recovery (common.pruning.frontier); DEFAULTS_FOR gives its defaults.

Run:      python 8_pruning_with_finetuning.py                 (about 15 min on a 2-core CPU)
Quick:    QUICK=1 python 8_pruning_with_finetuning.py         (2,000 training sentences, 4 pruning events)
Sweep:    python 8_pruning_with_finetuning.py "PRUNE_TARGETS=(0.2, 0.35, 0.5, 0.65)"
Seeds:    python 8_pruning_with_finetuning.py "SEEDS=(42, 43, 44)"
Frontier: python 8_pruning_with_finetuning.py FRONTIER=True   (`make frontier` adds stages 9 and 7)
Processes: torchrun --standalone --nproc_per_node 2 8_pruning_with_finetuning.py
Override any constant below as KEY=VALUE, e.g. `python 8_pruning_with_finetuning.py TARGET_SPARSITY=0.5`.
"""

import sys
import time

from common.config import (LEARNING_RATE, ConfigError, Rule, apply_defaults, as_dict, at_least, check_constants,
                           constants, each, env_flag, env_preset, in_range, one_of, parse_overrides)
from common.data import encoded_splits, load_sst2_splits, split_loaders
from common.distillation import kd_loss_fn, teacher_logits_for, with_joined_inputs
from common.flops import SEQ_LEN, measure_encoder_gflops
from common.modeling import check_loadable, load_model, load_tokenizer
from common.modeling_dpq import original_sizes
from common.paths import PRUNING_BASES, models_root, pruned_folder, stage_dir, target_tag
from common.pruning.frontier import prune_frontier, write_frontier_summary
from common.pruning.run import Job, PruneSettings, prune_one
from common.pruning.selection import FFN_FLOOR, ffn_granularity, reachable_sparsity
from common.stage import (StageError, check_preset, logger, require_fresh, require_stage, run_main, set_seed,
                          setup_logging)
from common.training import evaluate
from common.vocab import select_vocabulary

# -----------------------------------------------------------------------------
PRESET = env_preset()
QUICK = env_flag("QUICK")
TARGET_SPARSITY = 0.20     # fraction fewer encoder GFLOPs than the student (fvcore, 128 tokens) -> pruned_model
PRUNE_TARGETS = ()         # a sweep instead, e.g. (0.2, 0.35, 0.5, 0.65): one full run and folder pruned_model_sNN each
PRUNE_EPOCHS = 1           # distillation epochs while the model shrinks
PRUNE_STEPS = 10           # pruning events per pruning epoch, on the cubic schedule
PRUNE_END_FRACTION = 0.8   # the last event falls at this fraction of the pruning epochs; the rest lets the model settle
PRUNE_LR = 5e-5            # peak lr while pruning (the student was distilled at 1e-4)
RECOVERY_EPOCHS = 1.0      # distillation after the last event: whole epochs, or a fraction of one (a seeded part)
RECOVERY_LR = 3e-5         # peak lr of the recovery
RECOVERY_KEEP = "best"     # "best" held-out check, or "last" step unless another is significantly better (McNemar)
TEMPERATURE = 2.0          # of the teacher's soft targets, as in 2_distill_student.py
ALPHA = 0.5                # weight of the soft-target loss; 1 - ALPHA on the hard labels
AUGMENT_PAIRS = 0          # extra inputs, each two training rows (5+ tokens) joined, labelled by the teacher; 0 = none
VOCAB = "full"             # "train": keep only the training text's tokens, every character piece and VOCAB_EXTRA more
VOCAB_EXTRA = 0            # with VOCAB="train", this many of the lowest other ids too (BERT's rough frequency order)
BATCH_SIZE = 32
WEIGHT_DECAY = 0.01
WARMUP_RATIO = 0.06
EVALS_PER_EPOCH = 4        # held-out checks per recovery epoch
MAX_LENGTH = 128
TRAIN_LIMIT = 0            # 0 = all training sentences
SEED = 42
SEEDS = ()                 # several seeds (data order, importance batches, dropout), e.g. (42, 43, 44); () = only SEED
FRONTIER = False           # True: ONE gradual run through FRONTIER_TARGETS, a recovered branch saved at each
FRONTIER_TARGETS = (0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.95)  # -> pruned_model_s20 ... pruned_model_s95
FRONTIER_METHODS = ("taylor", "magnitude")  # ours (gradual Taylor, branched) and/or the one-shot magnitude baseline
# -----------------------------------------------------------------------------
DEFAULTS_FOR = {  # by situation, for every constant not given on the command line (common.config.apply_defaults)
    "bert": {"PRUNE_LR": 3e-5, "RECOVERY_LR": 2e-5},
    # frontier: finer steps for a run that goes much further; each point recovers a quarter epoch at the student's
    # distillation lr and keeps its last step; the joined pairs (+0.4 to +2.1 points at 65-95%, 3 seeds)
    "frontier": {"PRUNE_STEPS": 20, "RECOVERY_EPOCHS": 0.25, "RECOVERY_LR": 1e-4, "RECOVERY_KEEP": "last",
                 "AUGMENT_PAIRS": 16000},
    "bert frontier": {"RECOVERY_LR": 5e-5},
    "quick": {"TRAIN_LIMIT": 2000, "PRUNE_STEPS": 4, "EVALS_PER_EPOCH": 2},
    "quick frontier": {"AUGMENT_PAIRS": 500},
}


def rules(cfg) -> dict:
    """What each constant must be (besides common.config.RULES), checked before anything is loaded."""
    fraction = in_range(0, 1, low_open=True, high_open=True, what="0.2 = 20% fewer encoder GFLOPs")
    targets = Rule(lambda v: each(fraction).ok(v) and len({target_tag(t) for t in v}) == len(v),
                   "a non-empty tuple of fractions in (0, 1), no two in the same whole percent (the folder names)")
    recovery = (in_range(0, 1, low_open=True, what="a frontier point recovers at most one epoch") if cfg.FRONTIER else
                Rule(lambda v: isinstance(v, float) and (v == int(v) >= 0 or 0 < v < 1),
                     "0, a fraction of an epoch below 1, or a whole number of epochs"))
    return {
        "TARGET_SPARSITY": fraction,
        "PRUNE_TARGETS": (Rule(lambda v: v == (), "() with FRONTIER=True, which prunes to FRONTIER_TARGETS")
                          if cfg.FRONTIER else Rule(lambda v: v == () or targets.ok(v), targets.text + ", or ()")),
        "PRUNE_EPOCHS": at_least(1, "distillation epochs while pruning"),
        "PRUNE_STEPS": at_least(1, "pruning events per pruning epoch"),
        "PRUNE_END_FRACTION": in_range(0, 1, low_open=True, what="where the last pruning event falls"),
        "PRUNE_LR": LEARNING_RATE,
        "RECOVERY_EPOCHS": recovery,
        "RECOVERY_LR": LEARNING_RATE,
        "RECOVERY_KEEP": one_of("best", "last"),
        "AUGMENT_PAIRS": at_least(0, "extra teacher-labelled inputs of two joined training rows, 0 = none"),
        "VOCAB": one_of("full", "train"),
        "VOCAB_EXTRA": at_least(0, "ids kept besides the training text's and the character pieces"),
        "FRONTIER_TARGETS": targets,
        "FRONTIER_METHODS": each(one_of(*PRUNING_BASES), distinct=True),
    }


def check_inputs(cfg, student_dir, teacher_dir) -> dict:
    """The teacher's metadata, after checking that the student and teacher are finished, fresh, of this preset,
    readable and share one tokenizer."""
    student_meta = require_stage(student_dir, "student")
    teacher_meta = require_stage(teacher_dir, "teacher")
    check_preset(student_dir, student_meta, cfg.PRESET, "student")
    check_preset(teacher_dir, teacher_meta, cfg.PRESET, "teacher")
    require_fresh(student_dir, student_meta, "student")  # teacher or data changed since: names what to rerun
    require_fresh(teacher_dir, teacher_meta, "teacher")
    check_loadable(student_dir)  # before the teacher logits over the whole training set, not after
    check_loadable(teacher_dir)
    if load_tokenizer(student_dir).get_vocab() != load_tokenizer(teacher_dir).get_vocab():
        raise StageError(f"{student_dir} and {teacher_dir} use different vocabularies; distillation needs one "
                         f"tokenizer: run `python 2_distill_student.py` again first")
    return teacher_meta


def check_reachable(targets, student) -> None:
    """Refuse, before any work, a target beyond what removing every head and all but the FFN floor can reach."""
    limit = reachable_sparsity(student, SEQ_LEN)
    beyond = [t for t in targets if t >= limit]
    if beyond:
        floor = ffn_granularity(original_sizes(student.config)[2]) * FFN_FLOOR
        raise ConfigError(f"sparsity target {', '.join(map(str, beyond))} is out of reach: removing every head and all "
                          f"but {floor} FFN neurons per layer saves {limit:.3f} of the encoder GFLOPs")


def main(argv=None):
    setup_logging()
    cfg = parse_overrides(constants(globals()), sys.argv[1:] if argv is None else argv)
    apply_defaults(cfg, DEFAULTS_FOR)
    check_constants(cfg, rules(cfg))  # before anything is loaded: a nonsense value never replaces a model
    mode = "frontier" if cfg.FRONTIER else "sweep" if cfg.PRUNE_TARGETS else "single"
    targets = sorted(cfg.FRONTIER_TARGETS) if cfg.FRONTIER else list(cfg.PRUNE_TARGETS) or [cfg.TARGET_SPARSITY]
    seeds = list(cfg.SEEDS) or [cfg.SEED]
    student_dir, teacher_dir = stage_dir("student"), stage_dir("teacher")
    teacher_meta = check_inputs(cfg, student_dir, teacher_dir)
    student = load_model(student_dir).eval()  # every sparsity and drop here is against it; it is never trained here
    check_reachable(targets, student)
    set_seed(cfg.SEED)
    tokenizer = load_tokenizer(student_dir)
    data = encoded_splits(tokenizer, cfg.TRAIN_LIMIT, cfg.MAX_LENGTH)
    loaders = split_loaders(data, cfg.BATCH_SIZE, cfg.SEED, tokenizer.pad_token_id)
    vocab = select_vocabulary(tokenizer, data["train"].input_ids, cfg.VOCAB_EXTRA) if cfg.VOCAB == "train" else None
    logits = teacher_logits_for(teacher_dir, data["train"], models_root() / "cache", tokenization=data["tokenization"])
    if cfg.AUGMENT_PAIRS:
        data["train"], logits = with_joined_inputs(data, logits, teacher_dir, models_root() / "cache",
                                                   cfg.AUGMENT_PAIRS, cfg.SEED, cfg.MAX_LENGTH)
    reference = {"validation_accuracy": evaluate(student, loaders["validation"]),
                 "encoder_gflops": measure_encoder_gflops(student, SEQ_LEN),
                 "teacher_validation_accuracy": teacher_meta.get("results", {}).get("validation_accuracy")}
    logger.info(f"student validation accuracy {reference['validation_accuracy']:.4f}; "
                f"{len(data['train'])} training / {len(data['heldout'])} held-out sentences")
    settings = PruneSettings(cfg.PRUNE_EPOCHS, cfg.PRUNE_STEPS, cfg.PRUNE_END_FRACTION, cfg.PRUNE_LR,
                             cfg.RECOVERY_EPOCHS, cfg.RECOVERY_LR, cfg.RECOVERY_KEEP, cfg.WEIGHT_DECAY,
                             cfg.WARMUP_RATIO, cfg.EVALS_PER_EPOCH)
    rows = load_sst2_splits(train_limit=cfg.TRAIN_LIMIT or None)
    job = Job(settings, as_dict(cfg), data, kd_loss_fn(logits, cfg.TEMPERATURE, cfg.ALPHA), tokenizer, student_dir,
              teacher_dir, reference, {split: rows[split] for split in ("heldout", "validation")}, vocab)

    started = time.time()
    results, summaries = {}, []
    for seed in seeds:  # the same student each time; the seed sets data order, importance batches and dropout
        loaders = split_loaders(data, cfg.BATCH_SIZE, seed, tokenizer.pad_token_id)
        if mode == "frontier":
            written, summary = prune_frontier(job, seed, loaders, targets, cfg.FRONTIER_METHODS)
            results.update(written)
            summaries.append(summary)
            continue
        for target in targets:
            folder = pruned_folder(target if mode == "sweep" else None, seed, cfg.SEED)
            results[folder.name] = prune_one(job, seed, loaders, target, folder, mode)
    if mode == "frontier":
        write_frontier_summary(job, targets, cfg.FRONTIER_METHODS, seeds, summaries, round(time.time() - started, 1))
    return results if mode != "single" or len(seeds) > 1 else next(iter(results.values()))


if __name__ == "__main__":
    run_main(main)
