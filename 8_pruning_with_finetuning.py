"""Stage 8: gradual structured pruning of the distilled student, then recovery fine-tuning.

Reads   models/student_model/ (2_distill_student.py), models/teacher_model/ (1_train_teacher.py: soft targets),
        data/sst2/ (download_model.py), models/cache/ (teacher logits, reused from stage 2 when unchanged)
Writes  models/pruned_model/ (TARGET_SPARSITY), or with PRUNE_TARGETS one folder per target
        (models/pruned_model_s20/, models/pruned_model_s50/, ...): weights, config (with the per-layer layout
        under `dpq_layout`), tokenizer, kept_units.json (original heads/neurons kept), stage.log and
        metadata.json (layout, pruning trajectory, GFLOPs and parameters before/after, validation accuracy
        measured after reloading the saved folder).

Attention heads and FFN neurons are physically removed, so parameters, GFLOPs and latency really drop.
Pruning: PRUNE_EPOCHS of distillation training (alpha * T^2 * KL to the teacher + (1 - alpha) * CE) during
which PRUNE_STEPS pruning events per epoch raise the sparsity along a cubic schedule (Zhu & Gupta 2017) to the
target; at each event the units with the least Taylor importance (per-example gate gradients under the KD
loss, squared: the empirical Fisher, accumulated on the training batches since the last event) per FLOP saved
are removed, globally across layers and unit types, until the
encoder GFLOPs MEASURED with fvcore (batch 1, sequence length 128) reach the target. Then RECOVERY_EPOCHS of
distillation at a lower lr; the best state by held-out accuracy (2% of train, never validation) is kept.
"Sparsity" here always means the fraction of encoder GFLOPs removed relative to the input student.

Defaults (minilm preset, 2-core CPU): one pruning epoch (~4 min for 67k sentences at batch 32, 10 events,
the last at 80% so the shrunken model settles), one recovery epoch at a lower lr (~3.5 min, the model is
smaller), ~15 held-out checks: about 9 minutes, with the teacher logits reused from stage 2's cache (about 2
more minutes when they must be recomputed). Each sweep target is a separate run of the same length.

Run:    python 8_pruning_with_finetuning.py
Quick:  QUICK=1 python 8_pruning_with_finetuning.py       (2,000 training sentences, 4 pruning events)
Sweep:  python 8_pruning_with_finetuning.py "PRUNE_TARGETS=(0.2, 0.35, 0.5, 0.65)"
Override any constant below as KEY=VALUE, e.g. `python 8_pruning_with_finetuning.py TARGET_SPARSITY=0.5`.
"""

import copy
import sys

from common.config import (ConfigError, apply_preset, apply_quick, as_dict, constants, env_flag, env_preset,
                           parse_overrides)
from common.data import encoded_splits, split_loaders
from common.distillation import kd_loss_fn, teacher_logits_for
from common.flops import FLOPS_CONVENTION, SEQ_LEN, measure_encoder_gflops, measure_gflops
from common.modeling import count_parameters, load_model, load_tokenizer, save_model
from common.paths import models_root, pruned_sweep_folder, stage_dir
from common.pruning import CRITERIA, get_layout, gradual_prune, kept_units, reachable_sparsity
from common.stage import (StageError, check_preset, is_stale, json_dump,
                          logger, require_stage, run_main, set_seed, stage_output)
from common.training import evaluate, train

# -----------------------------------------------------------------------------
PRESET = env_preset()
QUICK = env_flag("QUICK")
TARGET_SPARSITY = 0.20     # fraction fewer encoder GFLOPs than the input student (measured, fvcore, seq 128)
PRUNE_TARGETS = ()         # sweep, e.g. (0.2, 0.35, 0.5, 0.65): one folder per target, models/pruned_model_sNN;
                           # () = only TARGET_SPARSITY, into models/pruned_model
PRUNE_EPOCHS = 1           # distillation epochs while the model shrinks
PRUNE_STEPS = 10           # pruning events per pruning epoch (cubic schedule)
PRUNE_END_FRACTION = 0.8   # the last event falls at this fraction of the pruning epochs; the rest settles
IMPORTANCE = "fisher"      # per-example Taylor gate gradient, squared ("fisher") or absolute ("abs")
PRUNE_LR = 5e-5            # peak lr while pruning (the student was distilled at 1e-4)
RECOVERY_EPOCHS = 1        # distillation epochs after the last event; best held-out state kept
RECOVERY_LR = 3e-5
TEMPERATURE = 2.0          # soft targets, as in 2_distill_student.py
ALPHA = 0.5                # weight of the soft-target loss; 1 - ALPHA on the hard labels
BATCH_SIZE = 32
WEIGHT_DECAY = 0.01
WARMUP_RATIO = 0.06
EVALS_PER_EPOCH = 4        # held-out checks per recovery epoch
MAX_LENGTH = 128
TRAIN_LIMIT = 0            # 0 = all training sentences
SEED = 42
# -----------------------------------------------------------------------------
PRESET_VALUES = {"bert": {"PRUNE_LR": 3e-5, "RECOVERY_LR": 2e-5}}
QUICK_VALUES = {"TRAIN_LIMIT": 2000, "PRUNE_EPOCHS": 1, "RECOVERY_EPOCHS": 1, "PRUNE_STEPS": 4,
                "EVALS_PER_EPOCH": 2}


def check_config(cfg) -> list:
    """The sparsity targets to run, after checking the constants make sense."""
    targets = list(cfg.PRUNE_TARGETS) or [cfg.TARGET_SPARSITY]
    for t in targets:
        if not isinstance(t, (int, float)) or not 0 < t < 1:
            raise ConfigError(f"sparsity target {t!r} must be a fraction between 0 and 1 (e.g. 0.2 = 20% fewer GFLOPs)")
    if cfg.PRUNE_EPOCHS < 1 or cfg.PRUNE_STEPS < 1:
        raise ConfigError("PRUNE_EPOCHS and PRUNE_STEPS must be >= 1")
    if not 0 < cfg.PRUNE_END_FRACTION <= 1:
        raise ConfigError("PRUNE_END_FRACTION must be in (0, 1]")
    if cfg.IMPORTANCE not in CRITERIA:
        raise ConfigError(f"IMPORTANCE={cfg.IMPORTANCE!r}: use one of {', '.join(CRITERIA)}")
    return targets


def check_inputs(cfg, student_dir, teacher_dir) -> tuple:
    """Metadata of the student and teacher folders, after checking they belong together."""
    student_meta = require_stage(student_dir, "student")
    teacher_meta = require_stage(teacher_dir, "teacher")
    check_preset(student_dir, student_meta, cfg.PRESET, "student")
    check_preset(teacher_dir, teacher_meta, cfg.PRESET, "teacher")
    if is_stale(student_meta):
        raise StageError(f"{student_dir} was distilled from an earlier {teacher_dir.name} (rebuilt since): "
                         f"run `python 2_distill_student.py` again first")
    if load_tokenizer(student_dir).get_vocab() != load_tokenizer(teacher_dir).get_vocab():
        raise StageError(f"{student_dir} and {teacher_dir} use different vocabularies; distillation needs one "
                         f"tokenizer: run `python 2_distill_student.py` again first")
    return student_meta, teacher_meta


def prune_one(cfg, target, folder, data, loaders, loss_fn, student_dir, teacher_dir, tokenizer, reference) -> dict:
    """Prune a fresh copy of the student to `target` and write `folder`."""
    set_seed(cfg.SEED)
    model = load_model(student_dir)
    limit = reachable_sparsity(model, SEQ_LEN)
    if target >= limit:
        raise ConfigError(f"sparsity target {target} is out of reach: removing every head and all but 32 FFN "
                          f"neurons per layer saves {limit:.3f} of the encoder GFLOPs")
    config = dict(as_dict(cfg), TARGET_SPARSITY=target)
    with stage_output(folder, "pruned", config, cfg.SEED) as out:
        out.add_upstream(student_dir, "student")
        out.add_upstream(teacher_dir, "teacher")
        encoder_before = measure_encoder_gflops(model, SEQ_LEN)
        gflops_before, params_before = measure_gflops(model, SEQ_LEN), count_parameters(model)
        logger.info(f"pruning {type(model).__name__} ({params_before:,} parameters, {encoder_before:.4f} encoder "
                    f"GFLOPs) to {100 * target:.0f}% fewer encoder GFLOPs")
        run = gradual_prune(model, loaders["train"], loaders["heldout"], loss_fn, target_sparsity=target,
                            epochs=cfg.PRUNE_EPOCHS, prune_steps=cfg.PRUNE_STEPS, lr=cfg.PRUNE_LR,
                            weight_decay=cfg.WEIGHT_DECAY, warmup_ratio=cfg.WARMUP_RATIO,
                            end_fraction=cfg.PRUNE_END_FRACTION, base_encoder_gflops=encoder_before,
                            criterion=cfg.IMPORTANCE,
                            desc=f"prune s{round(100 * target):02d}")
        pruned_accuracy = evaluate(model, loaders["heldout"])
        kept = "pruning"
        recovery = None
        if cfg.RECOVERY_EPOCHS > 0:
            before_recovery = copy.deepcopy(model.state_dict())
            recovery = train(model, loaders["train"], loaders["heldout"], loss_fn, epochs=cfg.RECOVERY_EPOCHS,
                             lr=cfg.RECOVERY_LR, weight_decay=cfg.WEIGHT_DECAY, warmup_ratio=cfg.WARMUP_RATIO,
                             evals_per_epoch=cfg.EVALS_PER_EPOCH, desc="recovery")
            if recovery.best_accuracy >= pruned_accuracy:
                kept = f"recovery step {recovery.best_step}"
            else:
                model.load_state_dict(before_recovery)
                logger.info(f"recovery never beat the end of pruning on held-out data "
                            f"({recovery.best_accuracy:.4f} < {pruned_accuracy:.4f}): keeping the pruned state")
        heldout_accuracy = max(pruned_accuracy, recovery.best_accuracy if recovery else -1.0)

        model = model.cpu()
        save_model(model, tokenizer, out.dir)
        units = kept_units(model)
        json_dump(units, out.dir / "kept_units.json")
        reloaded = load_model(out.dir)
        if get_layout(reloaded) != get_layout(model):
            raise RuntimeError(f"reloaded layout {get_layout(reloaded)} differs from the saved {get_layout(model)}")
        encoder_after = measure_encoder_gflops(reloaded, SEQ_LEN)
        accuracy = evaluate(reloaded, loaders["validation"])
        drop = 100 * (reference["validation_accuracy"] - accuracy)
        logger.info(f"pruned s{round(100 * target):02d}: validation accuracy (reloaded from disk) {accuracy:.4f} "
                    f"(student {reference['validation_accuracy']:.4f}, drop {drop:.2f} points); encoder GFLOPs "
                    f"{encoder_before:.4f} -> {encoder_after:.4f} ({100 * (1 - encoder_after / encoder_before):.1f}% "
                    f"fewer); parameters {params_before:,} -> {count_parameters(reloaded):,}")
        out.results = {
            "target_sparsity": target,
            "measured_sparsity": round(1 - encoder_after / encoder_before, 5),
            "encoder_gflops_before": encoder_before, "encoder_gflops_after": encoder_after,
            "gflops_before": gflops_before, "gflops_after": measure_gflops(reloaded, SEQ_LEN),
            "flops_convention": FLOPS_CONVENTION,
            "parameters_before": params_before, "parameters_after": count_parameters(reloaded),
            "layout": get_layout(reloaded), "kept_heads": units["heads"],
            "trajectory": run.trajectory, "prune_loss_history": run.history,
            "recovery_history": recovery.history if recovery else [],
            "kept_state": kept, "heldout_accuracy": heldout_accuracy,
            "validation_accuracy": accuracy,
            "student_validation_accuracy": reference["validation_accuracy"],
            "teacher_validation_accuracy": reference["teacher_validation_accuracy"],
            "drop_points": round(drop, 3),
            "preset": cfg.PRESET, "quick": cfg.QUICK, "model_class": type(reloaded).__name__,
            "train_sentences": len(data["train"]),
        }
    return out.results


def main(argv=None):
    cfg = parse_overrides(constants(globals()), sys.argv[1:] if argv is None else argv)
    apply_preset(cfg, PRESET_VALUES)
    apply_quick(cfg, **QUICK_VALUES)
    targets = check_config(cfg)
    student_dir, teacher_dir = stage_dir("student"), stage_dir("teacher")
    _, teacher_meta = check_inputs(cfg, student_dir, teacher_dir)
    set_seed(cfg.SEED)
    tokenizer = load_tokenizer(student_dir)
    data = encoded_splits(tokenizer, cfg.TRAIN_LIMIT, cfg.MAX_LENGTH)
    loaders = split_loaders(data, cfg.BATCH_SIZE, cfg.SEED, tokenizer.pad_token_id)
    logits = teacher_logits_for(teacher_dir, data["train"], models_root() / "cache", tokenization=data["tokenization"])
    loss_fn = kd_loss_fn(logits, cfg.TEMPERATURE, cfg.ALPHA)
    reference = {"validation_accuracy": evaluate(load_model(student_dir), loaders["validation"]),
                 "teacher_validation_accuracy": teacher_meta.get("results", {}).get("validation_accuracy")}
    logger.info(f"student validation accuracy {reference['validation_accuracy']:.4f}; "
                f"{len(data['train'])} training / {len(data['heldout'])} held-out sentences")

    folders = [pruned_sweep_folder(t) for t in targets] if cfg.PRUNE_TARGETS else [stage_dir("pruned")]
    results = {}
    for target, folder in zip(targets, folders):
        results[folder.name] = prune_one(cfg, target, folder, data, loaders, loss_fn, student_dir, teacher_dir,
                                         tokenizer, reference)
    return results if cfg.PRUNE_TARGETS else results[folders[0].name]


if __name__ == "__main__":
    run_main(main)
