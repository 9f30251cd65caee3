"""Stage 8: gradual structured pruning of the distilled student, then recovery fine-tuning.

Reads   models/student_model/ (2_distill_student.py), models/teacher_model/ (1_train_teacher.py: soft targets),
        data/sst2/ (download_model.py), models/cache/ (teacher logits, reused from stage 2 when unchanged)
Writes  models/pruned_model/ (TARGET_SPARSITY), or with PRUNE_TARGETS one folder per target
        (models/pruned_model_s20/, models/pruned_model_s50/, ...): weights, config (with the per-layer layout
        under `dpq_layout`), tokenizer, kept_units.json (original heads/neurons kept), stage.log and
        metadata.json (seed, layout, pruning trajectory, GFLOPs and parameters before/after, validation accuracy
        measured after reloading the saved folder).
        SEEDS=(42, 43, 44): the same for each seed (data order, importance batches, dropout); seed SEED keeps the
        names above, other seeds add a suffix: pruned_model_seed43/, pruned_model_s50_seed43/ (common.paths).
        FRONTIER=True: models/pruned_model_sNN/ for every FRONTIER_TARGETS point from ONE gradual run,
        models/pruned_magnitude_sNN/ (the one-shot magnitude baseline), and models/frontier.json (targets,
        measured sparsities, accuracies, trajectory, wall time).

Attention heads and FFN neurons are physically removed, so parameters, GFLOPs and latency really drop.
Pruning: PRUNE_EPOCHS of distillation training (alpha * T^2 * KL to the teacher + (1 - alpha) * CE) during
which PRUNE_STEPS pruning events per epoch raise the sparsity along a cubic schedule (Zhu & Gupta 2017) to the
target; at each event the units with the least Taylor importance (per-example gate gradients under the KD
loss, squared: the empirical Fisher, accumulated on the training batches since the last event) per FLOP saved
are removed, globally across layers and unit types, until the
encoder GFLOPs MEASURED with fvcore (batch 1, sequence length 128) reach the target. Then RECOVERY_EPOCHS of
distillation at a lower lr; the best state by held-out accuracy (2% of train, never validation) is kept
(RECOVERY_KEEP="best"; "last" keeps the end of the recovery unless another state is significantly better there).
"Sparsity" here always means the fraction of encoder GFLOPs removed relative to the input student.

Defaults (minilm preset, 2-core CPU): one pruning epoch (~4 min for 67k sentences at batch 32, 10 events,
the last at 80% so the shrunken model settles), one recovery epoch at a lower lr (~3.5 min, the model is
smaller), ~15 held-out checks: about 9 minutes, with the teacher logits reused from stage 2's cache (about 2
more minutes when they must be recomputed). Each sweep target is a separate run of the same length.

Frontier (FRONTIER=True, `make frontier`): ONE gradual run to the last of FRONTIER_TARGETS (cubic schedule,
FRONTIER_PRUNE_STEPS events per epoch, plus one event exactly at each earlier target, placed where the cubic curve
crosses it). At each target a copy of the model (a branch) gets a short recovery, FRONTIER_RECOVERY_FRACTION of an
epoch of distillation at FRONTIER_RECOVERY_LR, and is written to pruned_model_sNN; the
run goes on from the recovered branch (FRONTIER_CONTINUE_RECOVERED=True: iterative prune-recover, so every later
target starts from a model recovered at each earlier one) or from the un-recovered model (False); the last target is
the end of the run (after settling) with the same recovery. Each recovery there (and in the baseline) keeps its
last step (FRONTIER_RECOVERY_KEEP="last", see recover()): on 3 seeds a little better than the best held-out check
of the same recovery, inside the noise of any single comparison (numbers in docs/frontier-screens.md). Cost:
PRUNE_EPOCHS + len(targets) x FRONTIER_RECOVERY_FRACTION passes over the training set, against
len(targets) x (PRUNE_EPOCHS + RECOVERY_EPOCHS) for separate runs. The baseline (FRONTIER_METHODS "magnitude"):
for each target, the student pruned at once by weight magnitude per FLOP (common.pruning.magnitude_importance,
no gradual schedule, no data), then the SAME recovery (same fraction, lr, batches) -> pruned_magnitude_sNN.

Options (one setting each; the measured numbers, seeds, dates and machines are in docs/frontier-screens.md):
- HIDDEN_DISTILL > 0 adds layer-wise distillation from the unpruned student (every layer's output, relative squared
  error, common.distillation.hidden_states_loss) to every loss here, at a higher cost per step. Off by default: did
  not move 80% / 90% beyond noise (3 seeds).
- LENGTH_WEIGHT > 0 weighs each sentence's loss by (its tokens) ** LENGTH_WEIGHT (common.distillation.length_weights).
  Off by default: did not move 80% / 90% beyond noise.
- PRUNE_SCHEDULE="geometric" spends more of the run between 65% and 90% ("cubic" by default). Did not move 80% / 90%
  beyond noise.
- Joined pairs (FRONTIER_AUGMENT_PAIRS = 16000 in frontier runs, AUGMENT_PAIRS = 0 in the others): that many extra
  training inputs, each two training rows of 5+ tokens joined end to end (median 29 tokens), labelled by the teacher
  (its logits as soft targets, its argmax as the hard label), cached like the training set's logits; every loss here
  (pruning, importance, recovery, the baseline's recovery) sees them. SST-2 train is mostly short phrases, and the
  pruned models lose accuracy mostly on long validation sentences. Helped at 65-95% on every seed (3 seeds), for
  more time: default in frontier runs. AUGMENT_ROWS=3 joins three rows instead (2 by default): did not help (3 seeds).
- ABLATION_FROM > 0: events at or past that sparsity rank heads and FFN blocks by their measured loss increase when
  removed (ABLATION_BATCHES recent training batches, common.pruning.ablation_order) instead of the Taylor estimate.
  Off by default: other layouts, the same accuracy at 80% / 90%, for more time.
- PRUNE_DROPOUT: dropout while this stage trains (0.1 by default, the students' own). 0 did not move 80% / 90%.
- HEAD_DIM_STEP > 0: heads can also be narrowed, HEAD_DIM_STEP query/key and value dimensions per head at a time
  (every head of a layer, each its own least important, per-dimension Taylor/Fisher gates; common.pruning). Off by
  default: 8 gave other layouts and the same accuracy at 65 / 80 / 90% (one seed, two CPUs), and slower models.
- HIDDEN_STEP > 0: the residual stream (hidden size) can be narrowed too, HIDDEN_STEP hidden dimensions at a time
  (one Taylor/Fisher gate per dimension shared by every LayerNorm output, as CoFi's hidden mask; common.pruning),
  ranked per FLOP with heads and FFN blocks. Off by default: the ranking never chose a hidden block up to 95%, and
  forced (one seed) it gave other layouts and the same accuracy at 80 / 90%.
- PRUNE_FROM="teacher": our gradual run starts from teacher_model (6 layers) instead of student_model (3 of them) and
  prunes it straight to each target, distilling from the teacher's own soft targets (as CoFi prunes the fine-tuned
  model); the sparsity is still counted against the student (the teacher starts at -1: twice its encoder GFLOPs; the
  schedule runs from there, common.pruning.pruning_schedule(initial_sparsity=...)). The magnitude baseline always
  starts from the student. Off by default: no significant change on 2 seeds, behind at 90% and 95% on both.
- FFN_FLOOR: FFN blocks of 32 neurons every layer keeps (1 by default, in our run and the baseline); 0 lets a layer
  lose its whole FFN, so a layer without heads costs only its LayerNorms. 0 did not move 80% / 90% beyond noise,
  from the student or the teacher.

Run:    python 8_pruning_with_finetuning.py
Quick:  QUICK=1 python 8_pruning_with_finetuning.py       (2,000 training sentences, 4 pruning events)
Processes: torchrun --standalone --nproc_per_node 2 8_pruning_with_finetuning.py     (README: Several processes)
Sweep:  python 8_pruning_with_finetuning.py "PRUNE_TARGETS=(0.2, 0.35, 0.5, 0.65)"
Seeds:  python 8_pruning_with_finetuning.py "SEEDS=(42, 43, 44)"       (prunes student_model with each seed)
Frontier: python 8_pruning_with_finetuning.py FRONTIER=True           (`make frontier` adds stages 9 and 7)
Override any constant below as KEY=VALUE, e.g. `python 8_pruning_with_finetuning.py TARGET_SPARSITY=0.5`.
"""

import copy
from contextlib import contextmanager
import json
import os
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import torch

from common.config import (LEARNING_RATE, ConfigError, apply_preset, apply_quick, as_dict, at_least, check_constants,
                           constants, each, env_flag, env_preset, in_range, int_range, one_of, parse_overrides)
from common.data import encoded_splits, split_loaders
from common.distillation import (ROWS_BEFORE_AUGMENT_ROWS, kd_loss_fn, length_norm, teacher_logits_for,
                                 with_joined_inputs)
from common.flops import FLOPS_CONVENTION, SEQ_LEN, measure_encoder_gflops, measure_gflops
from common.modeling import check_loadable, count_parameters, load_model, load_tokenizer, save_and_reload, set_dropout
from common.paths import FRONTIER_SUMMARY, PRUNING_BASES, models_root, pruned_folder, stage_dir, target_tag
from common.pruning import (CRITERIA, SCHEDULES, ffn_granularity, get_layout, gradual_prune, head_sizes, hidden_size,
                            kept_units, magnitude_importance, original_sizes, partial_epoch_loader, prune_to_target,
                            reachable_sparsity)
from common.stage import (METADATA, StageError, check_preset, is_main_process, json_dump, json_roundtrip, logger,
                          read_metadata, require_fresh, require_stage, run_main, set_seed, setup_logging, stage_output)
from common.stats import paired_comparison
from common.training import correct_rows, evaluate, train

# -----------------------------------------------------------------------------
PRESET = env_preset()
QUICK = env_flag("QUICK")
TARGET_SPARSITY = 0.20     # fraction fewer encoder GFLOPs than the input student (measured, fvcore, seq 128)
PRUNE_TARGETS = ()         # sweep, e.g. (0.2, 0.35, 0.5, 0.65): one folder per target, models/pruned_model_sNN;
                           # () = only TARGET_SPARSITY, into models/pruned_model
PRUNE_EPOCHS = 1           # distillation epochs while the model shrinks
PRUNE_STEPS = 10           # pruning events per pruning epoch (cubic schedule)
PRUNE_END_FRACTION = 0.8   # the last event falls at this fraction of the pruning epochs; the rest settles
PRUNE_SCHEDULE = "cubic"   # the curve the events' targets follow: "cubic" (Zhu & Gupta 2017: most removed early)
                           # or "geometric" (each stretch removes the same fraction of what is left: more of the
                           # run between 65% and 90% on the way to 95%, common.pruning.geometric_sparsity)
ABLATION_FROM = 0.0        # > 0: pruning events at or past this sparsity rank units by their MEASURED loss increase
                           # when removed (ABLATION_BATCHES recent training batches, common.pruning.ablation_order)
                           # instead of the Taylor estimate; 0 = Taylor everywhere
ABLATION_BATCHES = 32      # training batches (the last ones before the event) each removal is measured on
PRUNE_DROPOUT = 0.1        # dropout probability while this stage trains (pruning, recovery, the baseline's recovery);
                           # both presets' students were trained with 0.1; saved configs keep the model's own
PRUNE_FROM = "student"     # the model our gradual pruning starts from: "student" (student_model) or "teacher"
                           # (teacher_model, pruned straight to the targets with the teacher's own soft targets, as
                           # CoFi prunes the fine-tuned model); the sparsity is measured against the student either way
                           # (the teacher starts at -1 with twice its encoder GFLOPs). The magnitude baseline always
                           # starts from the student; not with HIDDEN_DISTILL (its reference is the student's layers)
HEAD_DIM_STEP = 0          # > 0: heads can also be NARROWED, this many query/key and value dimensions per head at a
                           # time (every head of a layer, each its own least important; common.pruning), ranked per
                           # FLOP with whole heads and FFN blocks; 0 = whole heads only. The gradual run only (the
                           # magnitude baseline removes whole units); not with ABLATION_FROM
HIDDEN_STEP = 0            # > 0: the residual stream (hidden size) can be NARROWED too, this many hidden dimensions at
                           # a time (a multiple of 32 that divides the hidden size; one Taylor/Fisher gate per dimension
                           # on every LayerNorm output, as CoFi's hidden mask), ranked per FLOP with heads and FFN
                           # blocks; 0 = the hidden size stays. The gradual run only; not with ABLATION_FROM or
                           # HIDDEN_DISTILL (which compares hidden states with the student's)
FFN_FLOOR = 1              # FFN blocks of 32 neurons (common.pruning.ffn_granularity) every layer keeps, in our run
                           # and the baseline; 0 = a layer may lose its whole FFN (with every head gone too, it
                           # costs only its LayerNorms: 0.07% of the MiniLM student's GFLOPs). Measured: no gain
IMPORTANCE = "fisher"      # per-example Taylor gate gradient, squared ("fisher") or absolute ("abs")
PRUNE_LR = 5e-5            # peak lr while pruning (the student was distilled at 1e-4)
RECOVERY_EPOCHS = 1        # distillation epochs after the last event (RECOVERY_KEEP: which state is kept)
RECOVERY_LR = 3e-5
RECOVERY_KEEP = "best"     # the recovered state kept: "best" held-out check (or the state before recovery), or
                           # "last" step unless another is significantly better on held-out data (see recover())
TEMPERATURE = 2.0          # soft targets, as in 2_distill_student.py
ALPHA = 0.5                # weight of the soft-target loss; 1 - ALPHA on the hard labels
HIDDEN_DISTILL = 0.0       # > 0: plus this weight x each layer's output error against the unpruned student's
                           # (relative squared error, common.distillation.hidden_states_loss); 0 = logits only
LENGTH_WEIGHT = 0.0        # > 0: each sentence's loss (and so its say in Taylor importance) weighs (its tokens) **
                           # LENGTH_WEIGHT, normalised to average 1 over the training set; 1 = every token alike.
                           # SST-2 train is mostly phrases (median 7 words), validation full sentences (median 19)
AUGMENT_PAIRS = 0          # > 0: this many extra training inputs, each two training rows (5+ tokens) joined end to
                           # end and labelled by the teacher (soft targets, argmax as the hard label): longer inputs
                           # for the distillation (common.data.concatenated_pairs); 0 = the training set alone.
                           # Frontier runs use FRONTIER_AUGMENT_PAIRS instead
AUGMENT_ROWS = 2           # training rows joined into each of those extra inputs: 2 = pairs (median 29 tokens),
                           # 3 = triples (longer, nearer the longest validation sentences)
BATCH_SIZE = 32
WEIGHT_DECAY = 0.01
WARMUP_RATIO = 0.06
EVALS_PER_EPOCH = 4        # held-out checks per recovery epoch
MAX_LENGTH = 128
TRAIN_LIMIT = 0            # 0 = all training sentences
SEED = 42
SEEDS = ()                 # several seeds in one run, e.g. (42, 43, 44): one folder per seed (seed SEED keeps the
                           # plain name, others get _seed43); () = only SEED
FRONTIER = False           # True: ONE gradual run through FRONTIER_TARGETS, a branch saved at each (see docstring)
FRONTIER_TARGETS = (0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.95)  # -> pruned_model_s20 ... pruned_model_s95
FRONTIER_PRUNE_STEPS = 20  # pruning events per epoch of the frontier run (plus one per target); finer steps
                           # than PRUNE_STEPS because the run goes much further
FRONTIER_RECOVERY_FRACTION = 0.25  # epochs of KD recovery per branch (and per baseline point)
FRONTIER_RECOVERY_LR = 1e-4  # their peak lr (the student was distilled at 1e-4). Measured, the magnitude one-shot
                             # 80% model after 0.1 epoch: 80.4 / 82.8 / 83.7% at 3e-5 / 1e-4 / 3e-4
FRONTIER_RECOVERY_KEEP = "last"  # RECOVERY_KEEP of the branches and the baseline: measured on 3 seeds, +0.24 points
                                 # a branch on average against "best" from the same recovery (docs/frontier-screens.md)
FRONTIER_CONTINUE_RECOVERED = True  # True: the gradual run goes on from each branch's RECOVERED model (iterative
                                   # prune-recover, same cost); False: from the un-recovered one
FRONTIER_METHODS = ("taylor", "magnitude")  # ours (gradual Taylor, branched) and/or the one-shot magnitude baseline
FRONTIER_AUGMENT_PAIRS = 16000  # AUGMENT_PAIRS of frontier runs (both methods): measured on 3 seeds, +0.4 to +2.1
                                # points at 65-95% against 0 (docs/frontier-screens.md), ~1.3x the stage's time
# -----------------------------------------------------------------------------
PRESET_VALUES = {"bert": {"PRUNE_LR": 3e-5, "RECOVERY_LR": 2e-5, "FRONTIER_RECOVERY_LR": 5e-5}}
QUICK_VALUES = {"TRAIN_LIMIT": 2000, "PRUNE_EPOCHS": 1, "RECOVERY_EPOCHS": 1, "PRUNE_STEPS": 4,
                "EVALS_PER_EPOCH": 2, "FRONTIER_PRUNE_STEPS": 4, "FRONTIER_AUGMENT_PAIRS": 500}


def check_config(cfg) -> list:
    """The sparsity targets to run, after checking the constants make sense (before anything is loaded): each in
    its range (common.config rules), and no two targets written to one folder (pruned_model_s20 for 0.2 and
    0.204: the second would silently replace the first)."""
    target = in_range(0, 1, low_open=True, high_open=True,
                      what="a fraction between 0 and 1: 0.2 = 20% fewer encoder GFLOPs")
    check_constants(cfg, {
        "TARGET_SPARSITY": target,
        "PRUNE_TARGETS": each(target, empty_ok=True),
        "PRUNE_EPOCHS": at_least(1, "distillation epochs while pruning"),
        "PRUNE_STEPS": at_least(1, "pruning events per pruning epoch"),
        "PRUNE_END_FRACTION": in_range(0, 1, low_open=True, what="where the last pruning event falls"),
        "IMPORTANCE": one_of(*CRITERIA),
        "PRUNE_FROM": one_of("student", "teacher"),
        "PRUNE_SCHEDULE": one_of(*SCHEDULES),
        "ABLATION_FROM": in_range(0, 1, high_open=True, what="the sparsity from which units are ranked by measured "
                                  "loss increase, 0 = never"),
        "ABLATION_BATCHES": int_range(1, 1000, what="training batches each removal is measured on"),
        "PRUNE_DROPOUT": in_range(0, 1, high_open=True, what="dropout probability while pruning and recovering"),
        "HEAD_DIM_STEP": int_range(0, 1024, what="head dimensions removed per narrowing step, 0 = whole heads only"),
        "FFN_FLOOR": int_range(0, 64, what="FFN blocks of 32 neurons every layer keeps, 0 = none"),
        "HIDDEN_STEP": int_range(0, 8192, what="hidden dimensions removed per step, 0 = the hidden size stays"),
        "PRUNE_LR": LEARNING_RATE,
        "RECOVERY_EPOCHS": at_least(0, "0 = no recovery"),
        "RECOVERY_LR": LEARNING_RATE,
        "FRONTIER_RECOVERY_LR": LEARNING_RATE,
        "RECOVERY_KEEP": one_of("best", "last"),
        "FRONTIER_RECOVERY_KEEP": one_of("best", "last"),
        "HIDDEN_DISTILL": in_range(0, 100, what="weight of the layer-wise loss against the unpruned student, 0 = off"),
        "LENGTH_WEIGHT": in_range(0, 4, what="exponent of the per-sentence length weight, 0 = every sentence alike"),
        "AUGMENT_PAIRS": at_least(0, "extra teacher-labelled inputs of two joined training rows, 0 = none"),
        "FRONTIER_AUGMENT_PAIRS": at_least(0, "AUGMENT_PAIRS of frontier runs, 0 = none"),
        "AUGMENT_ROWS": int_range(2, 4, what="training rows joined into each extra input: 2 = pairs, 3 = triples"),
    })
    if cfg.HEAD_DIM_STEP and cfg.ABLATION_FROM:
        raise ConfigError(f"HEAD_DIM_STEP={cfg.HEAD_DIM_STEP} and ABLATION_FROM={cfg.ABLATION_FROM}: the measured "
                          f"ranking does not score narrowing steps; set one of them to 0")
    if cfg.HIDDEN_STEP and (cfg.ABLATION_FROM or cfg.HIDDEN_DISTILL):
        other = f"ABLATION_FROM={cfg.ABLATION_FROM}" if cfg.ABLATION_FROM else f"HIDDEN_DISTILL={cfg.HIDDEN_DISTILL}"
        why = ("the measured ranking does not score hidden dimensions" if cfg.ABLATION_FROM else
               "the layer-wise loss compares hidden states with the student's full-width ones")
        raise ConfigError(f"HIDDEN_STEP={cfg.HIDDEN_STEP} and {other}: {why}; set one of them to 0")
    if cfg.PRUNE_FROM == "teacher" and cfg.HIDDEN_DISTILL:
        raise ConfigError(f"PRUNE_FROM='teacher' and HIDDEN_DISTILL={cfg.HIDDEN_DISTILL}: the layer-wise loss compares "
                          f"with the student's layers, which a pruned teacher does not have; set HIDDEN_DISTILL=0")
    targets = list(cfg.PRUNE_TARGETS) or [cfg.TARGET_SPARSITY]
    if cfg.PRUNE_TARGETS:
        seen = {}
        for t in targets:
            name = pruned_folder(t).name
            if name in seen:
                raise ConfigError(f"PRUNE_TARGETS={cfg.PRUNE_TARGETS!r}: " + (
                    f"{t} is listed twice" if seen[name] == t else
                    f"{seen[name]} and {t} would both be written to {name} (folders are named by whole percent)")
                    + ": give each target once, at least 0.01 apart")
            seen[name] = t
    return targets


def check_inputs(cfg, student_dir, teacher_dir) -> tuple:
    """Metadata of the student and teacher folders, after checking they belong together."""
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
    return student_meta, teacher_meta


def check_runs(cfg, targets) -> tuple:
    """(mode, targets, seeds): "single" (TARGET_SPARSITY -> pruned_model), "sweep" (PRUNE_TARGETS, one full run
    per target) or "frontier" (FRONTIER_TARGETS, one gradual run branched at each), after checking the seed and
    frontier constants."""
    seeds = list(cfg.SEEDS) or [cfg.SEED]
    if (any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds)
            or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"SEEDS={cfg.SEEDS!r}: distinct non-negative integers, e.g. (42, 43, 44); () = only SEED")
    if not cfg.FRONTIER:
        return ("sweep" if cfg.PRUNE_TARGETS else "single"), targets, seeds
    if cfg.PRUNE_TARGETS:
        raise ConfigError("FRONTIER=True prunes to FRONTIER_TARGETS in one run: leave PRUNE_TARGETS empty")
    targets = sorted(cfg.FRONTIER_TARGETS)
    if not targets or any(not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 < t < 1 for t in targets):
        raise ConfigError(f"FRONTIER_TARGETS={cfg.FRONTIER_TARGETS!r}: fractions between 0 and 1, e.g. "
                          f"(0.2, 0.5, 0.8) = 20, 50, 80% fewer encoder GFLOPs")
    if len({target_tag(t) for t in targets}) != len(targets):
        raise ConfigError(f"FRONTIER_TARGETS={cfg.FRONTIER_TARGETS!r}: two targets round to the same whole percent "
                          f"(the folder names pruned_model_sNN would clash)")
    if not 0 < cfg.FRONTIER_RECOVERY_FRACTION <= 10:
        raise ConfigError("FRONTIER_RECOVERY_FRACTION must be > 0 (epochs of recovery per branch, e.g. 0.25)")
    if cfg.FRONTIER_PRUNE_STEPS < 1:
        raise ConfigError("FRONTIER_PRUNE_STEPS must be >= 1")
    unknown = [m for m in cfg.FRONTIER_METHODS if m not in PRUNING_BASES]
    if unknown or not cfg.FRONTIER_METHODS:
        raise ConfigError(f"FRONTIER_METHODS={cfg.FRONTIER_METHODS!r}: a non-empty tuple of {tuple(PRUNING_BASES)}")
    return "frontier", targets, seeds


def check_reachable(targets, start_dir, student_dir, head_dim_step: int = 0, ffn_floor: int = 1,
                    hidden_step: int = 0) -> None:
    """Refuse, before any work, a target that removing every head and all but `ffn_floor` FFN blocks per layer (and
    with `hidden_step` all but one step of the hidden size) of the model pruning starts from (`start_dir`) cannot
    reach, counted against the student (`student_dir`), a HEAD_DIM_STEP that cannot narrow its heads (not below its
    head size), and a HIDDEN_STEP that is not a multiple of 32 dividing the hidden size into two steps or more."""
    start = load_model(start_dir)
    from_student = start_dir == student_dir
    whose = "student" if from_student else "teacher"
    size = max(head_sizes(start))
    if head_dim_step >= size:
        raise ConfigError(f"HEAD_DIM_STEP={head_dim_step} narrows nothing: the {whose}'s heads have {size} dimensions; "
                          f"use a step below that (e.g. {max(size // 4, 1)}), or 0 for whole heads only")
    hidden = hidden_size(start)
    granularity = ffn_granularity(hidden)  # bitsandbytes' CPU kernels: out_features (the hidden size here) % 32 == 0
    if hidden_step and (hidden_step % granularity or hidden % hidden_step or hidden_step >= hidden):
        steps = [k for k in range(granularity, hidden // 2 + 1, granularity) if hidden % k == 0]
        raise ConfigError(f"HIDDEN_STEP={hidden_step} does not fit the {whose}'s hidden size {hidden}: use a multiple "
                          f"of {granularity} that divides it at least twice" + (
                              f" ({', '.join(map(str, steps))})" if steps else " (none does: use 0)"))
    limit = reachable_sparsity(start, SEQ_LEN, ffn_floor, hidden_step)
    if not from_student:  # from the start model's own GFLOPs to the student's
        limit = 1 - (1 - limit) * measure_encoder_gflops(start, SEQ_LEN) / measure_encoder_gflops(
            load_model(student_dir), SEQ_LEN)
    beyond = [t for t in targets if t >= limit]
    if beyond:
        kept = ffn_granularity(original_sizes(start.config)[2]) * ffn_floor
        raise ConfigError(f"sparsity target {', '.join(map(str, beyond))} is out of reach: removing every head and "
                          f"all but {kept} FFN neurons per layer (FFN_FLOOR={ffn_floor})"
                          + (f" and all but {hidden_step} hidden dimensions" if hidden_step else "")
                          + f" saves {limit:.3f} of the encoder GFLOPs"
                          + ("; FFN_FLOOR=0 lets a layer lose its whole FFN" if ffn_floor else ""))


def measure_start(model, source: str = "student") -> dict:
    """What a pruned folder records of the model its pruning started from (`source`: "student" or "teacher")."""
    return {"encoder_gflops": measure_encoder_gflops(model, SEQ_LEN), "gflops": measure_gflops(model, SEQ_LEN),
            "parameters": count_parameters(model), "from": source}


def load_start(ctx):
    """The model our gradual pruning starts from (PRUNE_FROM), with this stage's dropout, and its measurements."""
    model = load_model(ctx.start_dir)
    set_dropout(model, ctx.cfg.PRUNE_DROPOUT)
    return model, measure_start(model, ctx.cfg.PRUNE_FROM)


def recover(ctx, model, loaders, train_loader, epochs: int, desc: str, lr: float, keep: str = "best") -> dict:
    """Distillation at peak `lr` on `train_loader` for `epochs`. keep="best": the best held-out state is kept, or
    the state before recovery if recovery never beats it on held-out data. keep="last": the last step's state (the
    lr has decayed to 0 there) is kept unless the best of the others (before recovery, each held-out check) is
    significantly better on the held-out rows (exact McNemar p < 0.05, paired on the same rows): a
    difference of a few held-out sentences between checks is noise, and the end of the schedule is the annealed
    state, but a recovery that broke the model (a nonsense lr) never replaces the better one."""
    cfg = ctx.cfg
    pruned_correct = correct_rows(model, loaders["heldout"])
    pruned_accuracy = pruned_correct.float().mean().item()
    out = {"kept_state": "pruning", "heldout_accuracy_before_recovery": pruned_accuracy,
           "heldout_accuracy": pruned_accuracy, "recovery_history": [], "recovery_batches": 0, "keep": keep}
    if epochs <= 0:
        return out
    before_recovery = copy.deepcopy(model.state_dict())
    recovery = train(model, train_loader, loaders["heldout"], ctx.loss_fn, epochs=epochs, lr=lr,
                     weight_decay=cfg.WEIGHT_DECAY, warmup_ratio=cfg.WARMUP_RATIO,
                     evals_per_epoch=cfg.EVALS_PER_EPOCH, desc=desc, keep=keep)
    out.update(recovery_history=recovery.history, recovery_batches=epochs * len(train_loader))
    if keep == "last":
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


def finish(ctx, loaders, model, out, folder, target, start, extra) -> dict:
    """Save `model` into the stage output, reload it from disk and measure it: the results every pruned folder
    records (`extra` added)."""
    reference = ctx.reference
    model = model.cpu()
    reloaded = save_and_reload(model, ctx.tokenizer, out.dir)
    units = kept_units(model)
    json_dump(units, out.dir / "kept_units.json")
    if get_layout(reloaded) != get_layout(model):
        raise RuntimeError(f"reloaded layout {get_layout(reloaded)} differs from the saved {get_layout(model)}")
    encoder_before, encoder_after = start["encoder_gflops"], measure_encoder_gflops(reloaded, SEQ_LEN)
    sparsity = 1 - encoder_after / reference["encoder_gflops"]  # against the student, whatever pruning started from
    accuracy = evaluate(reloaded, loaders["validation"])
    drop = 100 * (reference["validation_accuracy"] - accuracy)
    logger.info(f"{folder.name}: validation accuracy (reloaded from disk) {accuracy:.4f} "
                f"(student {reference['validation_accuracy']:.4f}, drop {drop:.2f} points); encoder GFLOPs "
                f"{encoder_before:.4f} -> {encoder_after:.4f} ({100 * sparsity:.1f}% fewer than the student's "
                f"{reference['encoder_gflops']:.4f}); parameters {start['parameters']:,} -> "
                f"{count_parameters(reloaded):,}")
    results = {
        "target_sparsity": target,
        "measured_sparsity": round(sparsity, 5),
        "pruned_from": start["from"], "student_encoder_gflops": reference["encoder_gflops"],
        "encoder_gflops_before": encoder_before, "encoder_gflops_after": encoder_after,
        "gflops_before": start["gflops"], "gflops_after": measure_gflops(reloaded, SEQ_LEN),
        "flops_convention": FLOPS_CONVENTION,
        "parameters_before": start["parameters"], "parameters_after": count_parameters(reloaded),
        "layout": get_layout(reloaded), "kept_heads": units["heads"],
        "validation_accuracy": accuracy,
        "student_validation_accuracy": reference["validation_accuracy"],
        "teacher_validation_accuracy": reference["teacher_validation_accuracy"],
        "drop_points": round(drop, 3),
        "preset": ctx.cfg.PRESET, "quick": ctx.cfg.QUICK, "model_class": type(reloaded).__name__,
        "train_sentences": len(ctx.data["train"]),
    }
    results.update(extra)
    return results


@contextmanager
def pruned_output(ctx, folder, target, seed):
    """The stage folder of one pruned model: its constants (with this target), the student and teacher it came
    from, and the data it was trained on."""
    with stage_output(folder, "pruned", dict(as_dict(ctx.cfg), TARGET_SPARSITY=target), seed) as out:
        out.add_upstream(ctx.student_dir, "student")
        out.add_upstream(ctx.teacher_dir, "teacher")
        out.add_data()
        yield out


def prune_one(ctx, seed, loaders, target, folder, mode) -> dict:
    """Prune a fresh copy of the start model (PRUNE_FROM) to `target` (gradual, then RECOVERY_EPOCHS) and write
    `folder`."""
    cfg = ctx.cfg
    set_seed(seed)
    model, start = load_start(ctx)
    with pruned_output(ctx, folder, target, seed) as out:
        logger.info(f"pruning the {start['from']} {type(model).__name__} ({start['parameters']:,} parameters, "
                    f"{start['encoder_gflops']:.4f} encoder GFLOPs) to {100 * target:.0f}% fewer encoder GFLOPs than "
                    f"the student, seed {seed}")
        run = gradual_prune(model, loaders["train"], loaders["heldout"], ctx.loss_fn, target_sparsity=target,
                            epochs=cfg.PRUNE_EPOCHS, prune_steps=cfg.PRUNE_STEPS, lr=cfg.PRUNE_LR,
                            weight_decay=cfg.WEIGHT_DECAY, warmup_ratio=cfg.WARMUP_RATIO,
                            end_fraction=cfg.PRUNE_END_FRACTION, base_encoder_gflops=ctx.reference["encoder_gflops"],
                            criterion=cfg.IMPORTANCE, schedule=cfg.PRUNE_SCHEDULE,
                            ablation_from=cfg.ABLATION_FROM, ablation_batches=cfg.ABLATION_BATCHES,
                            head_dim_step=cfg.HEAD_DIM_STEP, min_ffn_blocks=cfg.FFN_FLOOR,
                            hidden_step=cfg.HIDDEN_STEP, desc=f"prune s{round(100 * target):02d}")
        recovered = recover(ctx, model, loaders, loaders["train"], cfg.RECOVERY_EPOCHS, "recovery", cfg.RECOVERY_LR,
                            cfg.RECOVERY_KEEP)
        out.results = finish(ctx, loaders, model, out, folder, target, start, dict(
            recovered, mode=mode, method="taylor", seed=seed, trajectory=run.trajectory,
            prune_loss_history=run.history))
    return out.results


# ----------------------------------------------------------------------------------------------------
# Frontier: one gradual run, a branch per target; the one-shot magnitude baseline with the same recovery


def recovery_seed(seed: int, target: float) -> int:
    """The data order of the short recovery at one target: the same for our branch and the baseline."""
    return seed * 1000 + round(100 * target)


def write_branch(ctx, seed, loaders, target, folder, model, start, run, step, sweep) -> dict:
    """Short recovery of one frontier point (a branch of the gradual run, or its end) and its folder."""
    cfg = ctx.cfg
    set_seed(recovery_seed(seed, target))
    branch_started = time.time()
    with pruned_output(ctx, folder, target, seed) as out:
        loader = partial_epoch_loader(loaders["train"], cfg.FRONTIER_RECOVERY_FRACTION, recovery_seed(seed, target))
        recovered = recover(ctx, model, loaders, loader, 1, f"recovery s{round(100 * target):02d}",
                            cfg.FRONTIER_RECOVERY_LR, cfg.FRONTIER_RECOVERY_KEEP)
        out.results = finish(ctx, loaders, model, out, folder, target, start, dict(
            recovered, mode="frontier", method="taylor", seed=seed, trajectory=list(run.trajectory),
            prune_loss_history=list(run.history),
            frontier=dict(sweep, branch_step=step, recovery_fraction=cfg.FRONTIER_RECOVERY_FRACTION,
                          recovery_s=round(time.time() - branch_started, 1))))
    return out.results


def prune_magnitude(ctx, seed, loaders, target, folder, sweep) -> dict:
    """The baseline at one target: the student pruned at once by weight magnitude per FLOP, then the same short
    recovery as our branch at that target (same fraction, lr and batches)."""
    cfg = ctx.cfg
    set_seed(seed)
    started = time.time()
    model = load_model(ctx.student_dir)
    set_dropout(model, cfg.PRUNE_DROPOUT)
    with pruned_output(ctx, folder, target, seed) as out:
        start = measure_start(model)
        removed = prune_to_target(model, magnitude_importance(model), (1 - target) * start["encoder_gflops"], SEQ_LEN,
                                  min_ffn_blocks=cfg.FFN_FLOOR)
        event = {"step": 0, "sparsity_target": target, "encoder_gflops": round(removed["encoder_gflops"], 6),
                 "sparsity": round(1 - removed["encoder_gflops"] / start["encoder_gflops"], 5),
                 "layout": get_layout(model),
                 "removed_heads": {str(k): v for k, v in removed["removed_heads"].items()},
                 "removed_ffn": {str(k): v for k, v in removed["removed_ffn"].items()}}
        logger.info(f"[magnitude s{round(100 * target):02d}] one shot to {event['sparsity']:.3f} measured sparsity: "
                    f"heads {event['layout']['heads']}, FFN {event['layout']['ffn']}")
        set_seed(recovery_seed(seed, target))
        loader = partial_epoch_loader(loaders["train"], cfg.FRONTIER_RECOVERY_FRACTION, recovery_seed(seed, target))
        recovered = recover(ctx, model, loaders, loader, 1, f"magnitude recovery s{round(100 * target):02d}",
                            cfg.FRONTIER_RECOVERY_LR, cfg.FRONTIER_RECOVERY_KEEP)
        out.results = finish(ctx, loaders, model, out, folder, target, start, dict(
            recovered, mode="frontier", method="magnitude", seed=seed, trajectory=[event],
            importance="weight magnitude: squared L2 norm of each head's / FFN neuron's weights, per FLOP, one shot",
            frontier=dict(sweep, recovery_fraction=cfg.FRONTIER_RECOVERY_FRACTION,
                          recovery_s=round(time.time() - started, 1))))
    return out.results


def prune_frontier(ctx, seed, loaders, targets) -> tuple:
    """Every frontier folder of one seed: ({folder name: results}, summary for models/frontier.json)."""
    cfg = ctx.cfg
    started = time.time()
    sweep = {"sweep_id": uuid.uuid4().hex[:12], "targets": list(targets), "seed": seed,
             "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    results, points = {}, {m: [] for m in cfg.FRONTIER_METHODS}

    def point(method, name, r):
        results[name] = r
        points[method].append({
            "target": r["target_sparsity"], "folder": name, "measured_sparsity": r["measured_sparsity"],
            "encoder_gflops": r["encoder_gflops_after"], "branch_step": r["frontier"].get("branch_step"),
            "heldout_accuracy_before_recovery": r["heldout_accuracy_before_recovery"],
            "heldout_accuracy": r["heldout_accuracy"], "validation_accuracy": r["validation_accuracy"],
            "recovery_s": r["frontier"]["recovery_s"]})

    summary = {"seed": seed, "sweep_id": sweep["sweep_id"], "gradual_runs": 0}
    if "taylor" in cfg.FRONTIER_METHODS:
        set_seed(seed)
        model, start = load_start(ctx)
        logger.info(f"frontier, seed {seed}: one gradual run of the {start['from']} {type(model).__name__} through "
                    f"{', '.join(f'{100 * t:.0f}%' for t in targets)} fewer encoder GFLOPs, a branch at each")

        def branch(step, target, copy_of_model, run):
            folder = pruned_folder(target, seed, cfg.SEED)
            point("taylor", folder.name, write_branch(ctx, seed, loaders, target, folder, copy_of_model, start, run,
                                                      step, sweep))

        run = gradual_prune(model, loaders["train"], loaders["heldout"], ctx.loss_fn, target_sparsity=targets[-1],
                            epochs=cfg.PRUNE_EPOCHS, prune_steps=cfg.FRONTIER_PRUNE_STEPS, lr=cfg.PRUNE_LR,
                            weight_decay=cfg.WEIGHT_DECAY, warmup_ratio=cfg.WARMUP_RATIO,
                            end_fraction=cfg.PRUNE_END_FRACTION, base_encoder_gflops=ctx.reference["encoder_gflops"],
                            criterion=cfg.IMPORTANCE, schedule=cfg.PRUNE_SCHEDULE, milestones=targets[:-1],
                            ablation_from=cfg.ABLATION_FROM, ablation_batches=cfg.ABLATION_BATCHES,
                            head_dim_step=cfg.HEAD_DIM_STEP, min_ffn_blocks=cfg.FFN_FLOOR,
                            hidden_step=cfg.HIDDEN_STEP, on_milestone=branch,
                            continue_from_branch=cfg.FRONTIER_CONTINUE_RECOVERED, desc=f"frontier seed {seed}")
        summary["gradual_runs"] = 1
        # the last target is the end of the run (after the settling steps), recovered like every branch
        folder = pruned_folder(targets[-1], seed, cfg.SEED)
        point("taylor", folder.name, write_branch(ctx, seed, loaders, targets[-1], folder, model, start, run,
                                                  len(loaders["train"]) * cfg.PRUNE_EPOCHS, sweep))
        summary.update(gradual_run_s=run.wall_time_s,
                       shared_run_s=round(run.wall_time_s - sum(m["branch_s"] for m in run.milestones), 1),
                       trajectory=[{k: e[k] for k in ("step", "sparsity_target", "sparsity", "encoder_gflops",
                                                      "heldout_accuracy") if k in e}
                                   | {"milestone": bool(e.get("milestone"))} for e in run.trajectory])
        del model
    if "magnitude" in cfg.FRONTIER_METHODS:
        for target in targets:
            folder = pruned_folder(target, seed, cfg.SEED, method="magnitude")
            point("magnitude", folder.name, prune_magnitude(ctx, seed, loaders, target, folder, sweep))
    wall = round(time.time() - started, 1)
    for name in results:  # the folders were written as the sweep went; now that it is over, its wall time
        results[name]["frontier"]["sweep_wall_time_s"] = wall
        add_sweep_wall_time(models_root() / name, wall)
    summary.update(wall_time_s=wall, points=points)
    return results, summary


def add_sweep_wall_time(folder, wall: float) -> None:
    """Record the whole sweep's wall time in a frontier folder's metadata.json (rewritten atomically; the only
    change made to a folder after its stage finished)."""
    if not is_main_process():  # the other processes of a multi-process run wrote no folder
        return
    meta = read_metadata(folder)
    meta["results"]["frontier"]["sweep_wall_time_s"] = wall
    tmp = folder / f".{METADATA}.tmp"
    json_dump(meta, tmp)
    os.replace(tmp, folder / METADATA)


def write_frontier_summary(cfg, targets, seeds, summaries, wall: float) -> dict:
    """models/frontier.json: what the frontier run did and cost, per seed; runs of other seeds made earlier with the
    same frontier settings are kept (`earlier_frontier_runs`)."""
    n = len(targets)
    methods = list(cfg.FRONTIER_METHODS)
    passes = {"gradual_run": cfg.PRUNE_EPOCHS if "taylor" in methods else 0,
              "branch_recoveries": round(n * cfg.FRONTIER_RECOVERY_FRACTION, 3) if "taylor" in methods else 0,
              "baseline_recoveries": round(n * cfg.FRONTIER_RECOVERY_FRACTION, 3) if "magnitude" in methods else 0}
    passes["total"] = round(sum(passes.values()), 3)
    summary = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "targets": list(targets), "methods": methods, "seeds": list(seeds),
        "prune_epochs": cfg.PRUNE_EPOCHS, "prune_steps_per_epoch": cfg.FRONTIER_PRUNE_STEPS,
        "recovery_fraction": cfg.FRONTIER_RECOVERY_FRACTION, "recovery_lr": cfg.FRONTIER_RECOVERY_LR,
        "recovery_keep": cfg.FRONTIER_RECOVERY_KEEP,
        "continue_recovered": cfg.FRONTIER_CONTINUE_RECOVERED,
        "hidden_distill": cfg.HIDDEN_DISTILL, "length_weight": cfg.LENGTH_WEIGHT, "schedule": cfg.PRUNE_SCHEDULE,
        "ablation_from": cfg.ABLATION_FROM, "ablation_batches": cfg.ABLATION_BATCHES, "dropout": cfg.PRUNE_DROPOUT,
        "head_dim_step": cfg.HEAD_DIM_STEP, "pruned_from": cfg.PRUNE_FROM, "ffn_floor": cfg.FFN_FLOOR,
        "hidden_step": cfg.HIDDEN_STEP,
        "augment_pairs": augment_pairs(cfg), "augment_rows": cfg.AUGMENT_ROWS,
        "training_passes_per_seed": passes,
        "separate_runs_would_take_passes": n * (cfg.PRUNE_EPOCHS + cfg.RECOVERY_EPOCHS),
        "wall_time_s": wall, "runs": {str(s["seed"]): s for s in summaries},
        "preset": cfg.PRESET, "quick": cfg.QUICK,
    }
    path = models_root() / FRONTIER_SUMMARY
    if not is_main_process():  # only the main process of a multi-process run writes under models/
        return summary
    earlier = earlier_frontier_runs(path, summary)
    if earlier:
        summary["runs"] = {**earlier, **summary["runs"]}
        summary["seeds"] = sorted(int(s) for s in summary["runs"])
        logger.info(f"frontier: keeping the earlier run(s) of seed(s) {', '.join(earlier)} in {path.name} (same "
                    f"settings, folders unchanged)")
    tmp = path.with_name(f".{path.name}.tmp")
    json_dump(summary, tmp)
    os.replace(tmp, path)
    logger.info(f"frontier: {len(seeds)} seed(s) x {n} targets in {wall:.0f} s -> {path}")
    return summary


# what must match for an earlier frontier run to be listed beside this one in models/frontier.json
_SAME_FRONTIER = ("targets", "methods", "prune_epochs", "prune_steps_per_epoch", "recovery_fraction", "recovery_lr",
                  "recovery_keep", "continue_recovered", "hidden_distill", "length_weight", "schedule",
                  "augment_pairs", "augment_rows", "ablation_from", "ablation_batches", "dropout", "head_dim_step",
                  "pruned_from", "ffn_floor", "hidden_step", "preset", "quick")
# for keys a frontier.json written before them lacks: what those runs did
_FRONTIER_DEFAULTS = {"augment_rows": ROWS_BEFORE_AUGMENT_ROWS, "ablation_from": 0.0, "ablation_batches": 32,
                      "dropout": 0.1, "head_dim_step": 0, "pruned_from": "student", "ffn_floor": 1,
                      "hidden_step": 0}


def earlier_frontier_runs(path, summary) -> dict:
    """{seed: run} of the frontier runs recorded in `path` for seeds this run did not redo, when they were made with
    the same frontier settings and their folders are still the ones they wrote (same sweep id), so that
    `SEEDS=(43, 44)` after a seed-42 run leaves one summary of all three; {} otherwise."""
    try:
        old = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    if any(old.get(k, _FRONTIER_DEFAULTS.get(k)) != json_roundtrip(summary[k]) for k in _SAME_FRONTIER):
        return {}
    kept = {}
    for seed, run in old.get("runs", {}).items():
        if seed in summary["runs"]:
            continue
        folders = [p["folder"] for points in run.get("points", {}).values() for p in points]
        try:
            ids = {read_metadata(models_root() / f)["results"]["frontier"]["sweep_id"] for f in folders}
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if folders and ids == {run.get("sweep_id")}:
            kept[seed] = run
    return kept


def augment_pairs(cfg) -> int:
    """How many joined pairs this run adds to the training set: FRONTIER_AUGMENT_PAIRS in a frontier run,
    AUGMENT_PAIRS otherwise."""
    return cfg.FRONTIER_AUGMENT_PAIRS if cfg.FRONTIER else cfg.AUGMENT_PAIRS


def main(argv=None):
    setup_logging()
    cfg = parse_overrides(constants(globals()), sys.argv[1:] if argv is None else argv)
    apply_preset(cfg, PRESET_VALUES)
    apply_quick(cfg, **QUICK_VALUES)
    targets = check_config(cfg)
    mode, targets, seeds = check_runs(cfg, targets)
    student_dir, teacher_dir = stage_dir("student"), stage_dir("teacher")
    _, teacher_meta = check_inputs(cfg, student_dir, teacher_dir)
    start_dir = teacher_dir if cfg.PRUNE_FROM == "teacher" else student_dir  # where our gradual runs start
    check_reachable(targets, start_dir, student_dir, cfg.HEAD_DIM_STEP, cfg.FFN_FLOOR, cfg.HIDDEN_STEP)
    set_seed(cfg.SEED)
    tokenizer = load_tokenizer(student_dir)
    data = encoded_splits(tokenizer, cfg.TRAIN_LIMIT, cfg.MAX_LENGTH)
    loaders = split_loaders(data, cfg.BATCH_SIZE, cfg.SEED, tokenizer.pad_token_id)
    logits = teacher_logits_for(teacher_dir, data["train"], models_root() / "cache", tokenization=data["tokenization"])
    n_pairs = augment_pairs(cfg)
    if n_pairs:
        data["train"], logits = with_joined_inputs(data, logits, teacher_dir, models_root() / "cache", n_pairs,
                                                   cfg.SEED, cfg.MAX_LENGTH, cfg.AUGMENT_ROWS)
    student = load_model(student_dir).eval()  # the unpruned student: every sparsity and drop here is against it
    # layer-wise distillation (HIDDEN_DISTILL > 0) from it; the student is never trained here, only read
    loss_fn = kd_loss_fn(logits, cfg.TEMPERATURE, cfg.ALPHA, hidden_weight=cfg.HIDDEN_DISTILL,
                         reference=student if cfg.HIDDEN_DISTILL else None, length_power=cfg.LENGTH_WEIGHT,
                         length_norm_value=length_norm(data["train"].input_ids, cfg.LENGTH_WEIGHT)
                         if cfg.LENGTH_WEIGHT else 1.0)
    reference = {"validation_accuracy": evaluate(student, loaders["validation"]),
                 "encoder_gflops": measure_encoder_gflops(student, SEQ_LEN),  # every sparsity here is against it
                 "teacher_validation_accuracy": teacher_meta.get("results", {}).get("validation_accuracy")}
    logger.info(f"student validation accuracy {reference['validation_accuracy']:.4f}; "
                f"{len(data['train'])} training / {len(data['heldout'])} held-out sentences")
    ctx = SimpleNamespace(cfg=cfg, data=data, loss_fn=loss_fn, student_dir=student_dir, teacher_dir=teacher_dir,
                          start_dir=start_dir, tokenizer=tokenizer, reference=reference)

    started = time.time()
    results, summaries = {}, []
    for seed in seeds:  # the same student each time; the seed sets data order, importance batches and dropout
        loaders = split_loaders(data, cfg.BATCH_SIZE, seed, tokenizer.pad_token_id)
        if mode == "frontier":
            written, summary = prune_frontier(ctx, seed, loaders, targets)
            results.update(written)
            summaries.append(summary)
            continue
        for target in targets:
            folder = pruned_folder(target if mode == "sweep" else None, seed, cfg.SEED)
            results[folder.name] = prune_one(ctx, seed, loaders, target, folder, mode)
    if mode == "frontier":
        write_frontier_summary(cfg, targets, seeds, summaries, round(time.time() - started, 1))
    return results if mode != "single" or len(seeds) > 1 else next(iter(results.values()))

if __name__ == "__main__":
    run_main(main)
