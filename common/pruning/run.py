"""One pruned folder of stage 8: the student pruned gradually to a target, recovered, saved, reloaded and measured.

`Job` is what every folder of one stage-8 invocation shares (typed settings from the stage's constants, the data,
the distillation loss, the student it prunes and what it is measured against); `prune_one` writes one folder, and
the frontier sweep (common.pruning.frontier) writes its folders with the same `recover` and `finish`.
"""

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from common.data import encode, make_loader
from common.flops import FLOPS_CONVENTION, SEQ_LEN, measure_encoder_gflops, measure_gflops
from common.modeling import count_parameters, load_model, save_and_reload
from common.modeling_dpq import get_layout
from common.pruning.schedule import Schedule, gradual_prune, partial_epoch_loader
from common.pruning.selection import kept_units
from common.stage import json_dump, logger, set_seed, stage_output
from common.stats import paired_comparison
from common.training import correct_rows, evaluate, train
from common.vocab import VocabSelection, prune_vocabulary, write_pruned_tokenizer


@dataclass(frozen=True)
class PruneSettings:
    """Stage 8's constants for pruning and recovery, typed (see the stage's constants block for each)."""

    prune_epochs: int
    prune_steps: int  # pruning events per epoch
    end_fraction: float
    prune_lr: float
    recovery_epochs: float  # whole epochs, or a fraction of one (a seeded partial epoch)
    recovery_lr: float
    recovery_keep: str  # "best" or "last" (see `recover`)
    weight_decay: float
    warmup_ratio: float
    evals_per_epoch: int

    def schedule(self, target: float, milestones=()) -> Schedule:
        return Schedule(target, self.prune_epochs, self.prune_steps, self.prune_lr, self.weight_decay,
                        self.warmup_ratio, self.end_fraction, tuple(milestones))


@dataclass
class Job:
    """What every pruned folder of one stage-8 invocation shares."""

    settings: PruneSettings
    constants: dict  # the stage's constants, recorded in each folder's metadata
    data: dict  # common.data.encoded_splits (+ the joined pairs)
    loss_fn: object  # the distillation loss (common.distillation.kd_loss_fn)
    tokenizer: object
    student_dir: Path
    teacher_dir: Path
    reference: dict  # the student's validation accuracy and encoder GFLOPs, the teacher's validation accuracy
    rows: dict  # the held-out and validation sentences, (sentence, label): a pruned vocabulary tokenizes them anew
    vocab: VocabSelection | None = None  # VOCAB="train": the vocabulary every folder keeps; None: all of it


def recovery_seed(seed: int, target: float) -> int:
    """The data order of a partial-epoch recovery at one target: the same for our branch and the baseline."""
    return seed * 1000 + round(100 * target)


def recovery_batches(train_loader, epochs: float, seed: int, target: float, partial: bool = False) -> tuple:
    """(loader, epochs) of a recovery: whole epochs of `train_loader`, or (a fraction below 1, or `partial`) a seeded
    fraction of an epoch, once."""
    if partial or epochs != int(epochs):
        return partial_epoch_loader(train_loader, epochs, recovery_seed(seed, target)), 1
    return train_loader, int(epochs)


def load_student(job: Job) -> tuple:
    """The student pruning starts from, and what a pruned folder records of it."""
    model = load_model(job.student_dir)
    return model, {"encoder_gflops": measure_encoder_gflops(model, SEQ_LEN), "gflops": measure_gflops(model, SEQ_LEN),
                   "parameters": count_parameters(model)}


def recover(job: Job, model, loaders, train_loader, epochs: int, desc: str) -> dict:
    """Distillation at RECOVERY_LR on `train_loader` for `epochs`. keep="best": the best held-out state is kept, or
    the state before recovery if recovery never beats it on held-out data. keep="last": the last step's state (the
    lr has decayed to 0 there) is kept unless the best of the others (before recovery, each held-out check) is
    significantly better on the held-out rows (exact McNemar p < 0.05, paired on the same rows): a difference of a
    few held-out sentences between checks is noise, but a recovery that broke the model never replaces a better one."""
    s = job.settings
    pruned_correct = correct_rows(model, loaders["heldout"])
    pruned_accuracy = pruned_correct.float().mean().item()
    out = {"kept_state": "pruning", "heldout_accuracy_before_recovery": pruned_accuracy,
           "heldout_accuracy": pruned_accuracy, "recovery_history": [], "recovery_batches": 0, "keep": s.recovery_keep}
    if epochs <= 0:
        return out
    before_recovery = copy.deepcopy(model.state_dict())
    recovery = train(model, train_loader, loaders["heldout"], job.loss_fn, epochs=epochs, lr=s.recovery_lr,
                     weight_decay=s.weight_decay, warmup_ratio=s.warmup_ratio, evals_per_epoch=s.evals_per_epoch,
                     desc=desc, keep=s.recovery_keep)
    out.update(recovery_history=recovery.history, recovery_batches=epochs * len(train_loader))
    if s.recovery_keep == "last":
        # the better of the state before recovery and the best check (ties: the state before recovery)
        name, correct, state, accuracy = (
            ("pruning", pruned_correct, before_recovery, pruned_accuracy) if pruned_accuracy >= recovery.best_accuracy
            else (f"recovery step {recovery.best_step}", recovery.best_correct, recovery.best_state,
                  recovery.best_accuracy))
        versus = paired_comparison(correct.numpy(), recovery.last_correct.numpy())  # the same held-out rows
        only_best, only_last, p = versus["only_a_right"], versus["only_b_right"], versus["mcnemar_p"]
        out.update(last_vs_best={"best": name, "only_best": only_best, "only_last": only_last, "p": p})
        if only_best > only_last and versus["significant"]:
            model.load_state_dict(state)
            out.update(kept_state=name, heldout_accuracy=accuracy)
            logger.info(f"[{desc}] the last step is significantly worse on held-out data than {name} "
                        f"({only_best} rows only it gets right against {only_last}, McNemar p {p:.2g}): keeping that")
        else:
            out.update(kept_state=f"recovery step {recovery.history[-1]['step']} (last)",
                       heldout_accuracy=recovery.last_correct.float().mean().item())
    elif recovery.best_accuracy >= pruned_accuracy:
        out.update(kept_state=f"recovery step {recovery.best_step}", heldout_accuracy=recovery.best_accuracy)
    else:
        model.load_state_dict(before_recovery)
        logger.info(f"recovery never beat the end of pruning on held-out data "
                    f"({recovery.best_accuracy:.4f} < {pruned_accuracy:.4f}): keeping the pruned state")
    return out


@contextmanager
def pruned_output(job: Job, folder, seed: int):
    """The stage folder of one pruned model: the constants, the student and teacher it came from, and the data."""
    with stage_output(folder, "pruned", job.constants, seed) as out:
        out.add_upstream(job.student_dir, "student")
        out.add_upstream(job.teacher_dir, "teacher")
        out.add_data()
        yield out


def _with_pruned_vocabulary(job: Job, model, loaders, out) -> tuple:
    """(model copy with only the kept vocabulary, its tokenizer saved in the folder, its validation loader, record):
    the copy is compared with `model` (full vocabulary) on the same held-out and validation sentences, paired."""
    pruned, selection = copy.deepcopy(model), job.vocab
    tokenizer = write_pruned_tokenizer(job.tokenizer, selection.kept, out.dir)
    prune_vocabulary(pruned, job.tokenizer, selection.kept)
    record, new_loaders = selection.record(), {}
    for split in ("heldout", "validation"):
        new_loaders[split] = make_loader(encode(tokenizer, job.rows[split]), 128, pad_id=tokenizer.pad_token_id)
        versus = paired_comparison(correct_rows(pruned, new_loaders[split]).numpy(),
                                   correct_rows(model, loaders[split]).numpy())
        record[f"{split}_vs_full_vocabulary"] = {k: versus[k] for k in (
            "accuracy_a", "accuracy_b", "diff_points", "ci_low_points", "ci_high_points", "only_a_right",
            "only_b_right", "mcnemar_p")}
    logger.info(f"vocabulary: {record['kept_size']:,} of {record['original_size']:,} ids kept; against the full "
                f"vocabulary {record['validation_vs_full_vocabulary']['diff_points']:+.2f} points on validation, "
                f"{record['heldout_vs_full_vocabulary']['diff_points']:+.2f} on held-out")
    return pruned, tokenizer, new_loaders["validation"], record


def finish(job: Job, loaders, model, out, target: float, start: dict, extra: dict) -> dict:
    """Save `model` (with VOCAB="train", a copy keeping only `job.vocab`) into the stage output, reload it from disk
    and measure it: the results every pruned folder records (`extra` added). `target` is the folder's sparsity
    target: recorded here, the one place it is stored."""
    reference, model, tokenizer, validation, vocab = (job.reference, model.cpu(), job.tokenizer, loaders["validation"],
                                                      None)
    units = kept_units(model)
    if job.vocab is not None:
        model, tokenizer, validation, vocab = _with_pruned_vocabulary(job, model, loaders, out)
        units["vocab"] = job.vocab.kept
    reloaded = save_and_reload(model, tokenizer, out.dir)
    json_dump(units, out.dir / "kept_units.json")
    if get_layout(reloaded) != get_layout(model):
        raise RuntimeError(f"reloaded layout {get_layout(reloaded)} differs from the saved {get_layout(model)}")
    encoder_after = measure_encoder_gflops(reloaded, SEQ_LEN)
    sparsity = 1 - encoder_after / reference["encoder_gflops"]
    accuracy = evaluate(reloaded, validation)
    drop = 100 * (reference["validation_accuracy"] - accuracy)
    logger.info(f"{out.final_dir.name}: validation accuracy (reloaded from disk) {accuracy:.4f} (student "
                f"{reference['validation_accuracy']:.4f}, drop {drop:.2f} points); encoder GFLOPs "
                f"{start['encoder_gflops']:.4f} -> {encoder_after:.4f} ({100 * sparsity:.1f}% fewer); parameters "
                f"{start['parameters']:,} -> {count_parameters(reloaded):,}")
    return {"target_sparsity": target, "measured_sparsity": round(sparsity, 5),
            "encoder_gflops_before": start["encoder_gflops"], "encoder_gflops_after": encoder_after,
            "gflops_before": start["gflops"], "gflops_after": measure_gflops(reloaded, SEQ_LEN),
            "flops_convention": FLOPS_CONVENTION, "parameters_before": start["parameters"],
            "parameters_after": count_parameters(reloaded), "layout": get_layout(reloaded),
            "kept_heads": units["heads"], "validation_accuracy": accuracy,
            "student_validation_accuracy": reference["validation_accuracy"],
            "teacher_validation_accuracy": reference["teacher_validation_accuracy"], "drop_points": round(drop, 3),
            "preset": job.constants["PRESET"], "quick": job.constants["QUICK"], "vocabulary": vocab,
            "model_class": type(reloaded).__name__, "train_sentences": len(job.data["train"]), **extra}


def prune_one(job: Job, seed: int, loaders, target: float, folder, mode: str) -> dict:
    """Prune a fresh copy of the student to `target` (gradual, then recovery) and write `folder`."""
    s = job.settings
    set_seed(seed)
    model, start = load_student(job)
    with pruned_output(job, folder, seed) as out:
        logger.info(f"pruning the student {type(model).__name__} ({start['parameters']:,} parameters, "
                    f"{start['encoder_gflops']:.4f} encoder GFLOPs) to {100 * target:.0f}% fewer encoder GFLOPs, "
                    f"seed {seed}")
        run = gradual_prune(model, loaders["train"], loaders["heldout"], job.loss_fn, s.schedule(target),
                            desc=f"prune s{round(100 * target):02d}")
        loader, epochs = recovery_batches(loaders["train"], s.recovery_epochs, seed, target)
        recovered = recover(job, model, loaders, loader, epochs, "recovery")
        out.results = finish(job, loaders, model, out, target, start, dict(
            recovered, mode=mode, method="taylor", seed=seed, trajectory=run.trajectory,
            prune_loss_history=run.history))
    return out.results
