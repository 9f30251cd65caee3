"""Gradual pruning while the model trains: the cubic schedule, and pruning as a hook of the one training loop.

`gradual_prune(model, ..., Schedule(...))` is `common.training.train` with the `GradualPruning` hook: Taylor importance
accumulates during the ordinary backward passes (common.pruning.importance), the pruning events follow the cubic
schedule of Zhu & Gupta (2017), each removes the least important units per FLOP until the measured encoder GFLOPs reach
the event's target (common.pruning.selection), and after each event train rebuilds AdamW, the lr schedule and the
data-parallel wrapper. Under several processes (torchrun) the importance is summed over the processes before ranking,
so every process removes the same units.

Frontier: `Schedule(milestones=(0.2, 0.35, ...))` with `on_milestone=callback` passes through every milestone on its
way to the final sparsity (events placed where the cubic curve crosses each one, so each is hit exactly) and hands the
callback a copy of the model there (a branch, e.g. for a short recovery on `partial_epoch_loader`); the run then goes
on from the branch as the callback left it (iterative prune-recover).
"""

import copy
import itertools
import math
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader

from common.data import LengthGroupedSampler
from common.flops import SEQ_LEN, measure_encoder_gflops
from common.modeling_dpq import get_layout
from common.pruning.importance import TaylorImportance
from common.pruning.selection import prune_to_target
from common.stage import logger
from common.training import TrainHook, evaluate, train


# ----------------------------------------------------------------------------------------------------
# The cubic schedule


def cubic_sparsity(step: float, total_steps: float, final_sparsity: float) -> float:
    """Zhu & Gupta (2017): s_t = s_f (1 - (1 - t/T)^3): 0 at t=0, s_f from t=T on."""
    if total_steps <= 0:
        return final_sparsity
    t = min(max(step / total_steps, 0.0), 1.0)
    return final_sparsity - final_sparsity * (1.0 - t) ** 3


def cubic_step(sparsity: float, total_steps: float, final_sparsity: float) -> float:
    """Where the cubic schedule reaches `sparsity` (its inverse): T (1 - (1 - s / s_f)^(1/3))."""
    if not 0 <= sparsity <= final_sparsity:
        raise ValueError(f"sparsity {sparsity} is outside the schedule's range 0..{final_sparsity}")
    return total_steps * (1.0 - ((final_sparsity - sparsity) / final_sparsity) ** (1.0 / 3.0))


def pruning_schedule(total_train_steps: int, prune_steps: int, final_sparsity: float, end_fraction: float = 0.8,
                     milestones=()) -> list:
    """[(train step, sparsity target)] for `prune_steps` pruning events spread evenly over the first `end_fraction`
    of training (the rest lets the model settle), their targets on the cubic curve; the last reaches `final_sparsity`.

    `milestones` (sparsities below `final_sparsity`) add events that hit each of them EXACTLY, placed where the curve
    crosses them (a frontier run branches there). Every event gets its own training step: a regular event due at the
    step of a later one is dropped, two milestones due together are a step apart. Raises ValueError when the events
    do not fit in the training steps.
    """
    bad = [m for m in milestones if not 0 < m <= final_sparsity]
    if bad:
        raise ValueError(f"milestones {bad} must lie in (0, {final_sparsity}] (the final sparsity)")
    end = max(1, int(round(total_train_steps * end_fraction)))
    by_target = {}
    for k in range(1, prune_steps + 1):
        by_target[cubic_sparsity(k, prune_steps, final_sparsity)] = max(1, int(round(end * k / prune_steps)))
    for m in milestones:
        if m < final_sparsity:
            by_target[m] = max(1, int(round(cubic_step(m, end, final_sparsity))))
    required = set(milestones) | {final_sparsity}
    events = []
    for target in sorted(by_target):  # the curve rises: by target = by step
        step = by_target[target]
        while events and events[-1][0] >= step and events[-1][1] not in required:
            events.pop()  # a regular event superseded by a later one due at the same step
        if events and events[-1][0] >= step:
            step = events[-1][0] + 1
        events.append((step, target))
    if events[-1][0] > total_train_steps:
        raise ValueError(f"{len(events)} pruning events ({len(required) - 1} milestones) do not fit in "
                         f"{total_train_steps} training steps: use fewer pruning steps or more training data")
    return events


# ----------------------------------------------------------------------------------------------------
# Gradual pruning while training


@dataclass(frozen=True)
class Schedule:
    """One gradual pruning run: train `epochs` with `steps_per_epoch` pruning events per epoch spread over the first
    `end_fraction` of training, on the cubic curve to `target_sparsity` (fraction fewer MEASURED encoder GFLOPs than
    the model the run is measured against), through every one of `milestones` exactly."""

    target_sparsity: float
    epochs: int
    steps_per_epoch: int
    lr: float
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    end_fraction: float = 0.8
    milestones: tuple = ()
    max_grad_norm: float = 1.0
    seq_len: int = SEQ_LEN


@dataclass
class PruneRun:
    trajectory: list = field(default_factory=list)  # one dict per pruning event (and step 0)
    history: list = field(default_factory=list)  # training loss every 50 steps
    base_encoder_gflops: float = 0.0
    milestones: list = field(default_factory=list)  # {"step", "target_sparsity", "branch_s"} per milestone branched
    wall_time_s: float = 0.0  # the whole run, branches included


def gradual_prune(model, train_loader, heldout_loader, loss_fn, schedule: Schedule, *, on_milestone=None,
                  desc: str = "prune") -> PruneRun:
    """Train with `loss_fn` while pruning along `schedule` (see the module docstring); every sparsity is measured
    against the model's own encoder GFLOPs at the start; held-out accuracy is measured after every event; no
    held-out model selection. `on_milestone(step, target, branch, run)` is called right after each milestone's
    event with `branch` a deep copy of the model (no importance hooks; the callback may train and save it) and `run`
    this PruneRun so far; the random-number state is restored after it, and the run goes on from the branch as the
    callback left it (its weights loaded into the model, same layout)."""
    started = time.time()
    hook = GradualPruning(heldout_loader, schedule, on_milestone, desc,
                          data_epoch=getattr(train_loader.batch_sampler, "epoch", 0))
    train(model, train_loader, heldout_loader, loss_fn, epochs=schedule.epochs, lr=schedule.lr,
          weight_decay=schedule.weight_decay, warmup_ratio=schedule.warmup_ratio, evals_per_epoch=0,
          max_grad_norm=schedule.max_grad_norm, desc=desc, hook=hook)
    hook.run.wall_time_s = round(time.time() - started, 1)  # every event ran: the final target was reached
    return hook.run


class GradualPruning(TrainHook):
    """The pruning schedule as a `common.training.train` hook (see `gradual_prune`, which is how it is used).

    on_start: measure the base GFLOPs, place the events over the loop's steps, record step 0 and attach
    TaylorImportance. on_step: keep a loss record every 50 steps; at an event, sum the importance across processes,
    prune to the event's target, reset the importance, record the event, hand a milestone's branch to `on_milestone`,
    and report that the structure changed. on_end: detach the importance hooks.
    """

    def __init__(self, heldout_loader, schedule: Schedule, on_milestone=None, desc: str = "prune",
                 data_epoch: int = 0):
        self.heldout_loader, self.schedule, self.base = heldout_loader, schedule, None
        self.on_milestone, self.desc, self.data_epoch = on_milestone, desc, data_epoch
        self.branch_at = set(schedule.milestones) if on_milestone else set()
        self.run = PruneRun()
        self.importance = None
        self.pending = []
        self.last_entry = None
        self.running_loss = None  # moving average over the whole run (train's restarts every epoch)

    def on_start(self, loop) -> None:
        # Accelerate's loader restarts its shuffle at epoch 0 unless told: go on from the epochs earlier runs drew on
        # this loader (a sweep's later targets), so each run sees its own data order.
        loop.loader.set_epoch(self.data_epoch)
        model = loop.unwrapped
        self.base = self.run.base_encoder_gflops = measure_encoder_gflops(model, self.schedule.seq_len)
        s = self.schedule
        self.pending = pruning_schedule(loop.total_steps, s.steps_per_epoch * s.epochs, s.target_sparsity,
                                        s.end_fraction, s.milestones)
        self.record(model, 0, 0.0)
        self.importance = TaylorImportance(model)

    def on_step(self, loop) -> bool:
        changed = False
        self.last_entry = None
        self.running_loss = loop.loss if self.running_loss is None else 0.98 * self.running_loss + 0.02 * loop.loss
        if self.pending and loop.step >= self.pending[0][0]:  # one event per step (pruning_schedule)
            _, target = self.pending.pop(0)
            self.prune(loop, target)
            changed = True
        if loop.step % 50 == 0 or loop.step == loop.total_steps:
            self.run.history.append({"step": loop.step, "loss": round(self.running_loss, 5)})
        return changed

    def prune(self, loop, target: float) -> None:
        model = loop.unwrapped
        self.importance.all_reduce(loop.accelerator)  # every process ranks the same (summed) scores
        removed = prune_to_target(model, self.importance, (1 - target) * self.base, self.schedule.seq_len)
        self.importance.reset()
        self.last_entry = self.record(model, loop.step, target, removed)
        if target not in self.branch_at:
            return
        self.importance.close()  # the copy must not carry hooks that feed this run's importance
        branch = copy.deepcopy(model)
        self.importance = TaylorImportance(model)
        state = _rng_state()  # the branch's training draws random numbers; the run's own sequence goes on unchanged
        branch_started = time.time()
        self.on_milestone(loop.step, target, branch, self.run)
        model.load_state_dict(branch.state_dict())  # go on from the branch as the callback left it (recovered)
        self.run.trajectory[-1]["continued_from_branch"] = True
        del branch
        _set_rng_state(state)
        self.run.milestones.append({"step": loop.step, "target_sparsity": target,
                                    "branch_s": round(time.time() - branch_started, 1)})

    def on_end(self, loop) -> None:
        if self.importance is not None:
            self.importance.close()

    def postfix(self, loop):
        if self.last_entry is None:
            return {"loss": f"{self.running_loss:.4f}", "lr": f"{loop.scheduler.get_last_lr()[0]:.1e}"}
        return {"loss": f"{self.running_loss:.4f}", "sparsity": f"{self.last_entry['sparsity']:.3f}"}

    def record(self, model, step, target, removed=None) -> dict:
        gflops = measure_encoder_gflops(model, self.schedule.seq_len)
        accuracy = evaluate(model, self.heldout_loader)
        entry = {"step": step, "target_sparsity": round(target, 5), "encoder_gflops": round(gflops, 6),
                 "sparsity": round(1 - gflops / self.base, 5), "heldout_accuracy": round(accuracy, 5),
                 "parameters": sum(p.numel() for p in model.parameters()), "layout": get_layout(model)}
        if removed is not None:
            entry["removed_heads"] = {str(k): v for k, v in removed["removed_heads"].items()}
            entry["removed_ffn"] = {str(k): v for k, v in removed["removed_ffn"].items()}
        if target in self.branch_at:
            entry["milestone"] = True
        self.run.trajectory.append(entry)
        logger.info(f"[{self.desc}] step {step}: target {target:.3f}, measured sparsity {entry['sparsity']:.3f} "
                    f"({gflops:.4f} encoder GFLOPs), heads {entry['layout']['heads']}, FFN {entry['layout']['ffn']}, "
                    f"held-out accuracy {accuracy:.4f}")
        return entry


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------
# A fraction of an epoch: the short recoveries of the frontier


class PartialEpoch:
    """Batch sampler: the first `n_batches` batches of a fresh length-grouped shuffle of the data (seeded), i.e. a
    fraction of an epoch. Same batches (same seed) for every model given the same budget."""

    def __init__(self, lengths, batch_size: int, n_batches: int, seed: int):
        self.sampler = LengthGroupedSampler(lengths, batch_size, shuffle=True, seed=seed)
        self.batch_size = batch_size
        self.n_batches = max(1, min(n_batches, len(self.sampler)))

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.n_batches)

    def __len__(self):
        return self.n_batches


def partial_epoch_loader(train_loader, fraction: float, seed: int):
    """A loader over `fraction` (at most 1) of an epoch of `train_loader`'s data (at least one batch), shuffled with
    `seed`: the short recovery of a frontier branch (and of the baseline at the same target: same seed, same
    batches)."""
    dataset = train_loader.dataset
    n_batches = math.ceil(fraction * len(train_loader))
    sampler = PartialEpoch(dataset.lengths, train_loader.batch_sampler.batch_size, n_batches, seed)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=train_loader.collate_fn)
