"""Stage 8's frontier sweep: ONE gradual run through every target, a recovered branch saved at each, the one-shot
magnitude baseline at the same targets with the same recovery, and models/frontier.json.

Ours: a gradual run to the last target with one event exactly at each earlier one (common.pruning.schedule); at each,
a copy of the model (a branch) gets a short recovery (RECOVERY_EPOCHS, a fraction of an epoch drawn with
`recovery_seed`) and is written to pruned_model_sNN, and the run goes on from the recovered branch; the last target
is the end of the run (after settling), recovered the same way. Cost: PRUNE_EPOCHS + targets x RECOVERY_EPOCHS passes
over the training set. The baseline: for each target, the student pruned at once by weight magnitude per FLOP (no
schedule, no data), then the SAME recovery (same fraction, lr and batches) -> pruned_magnitude_sNN.
"""

import json
import os
import sys
import time
import uuid
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from common.flops import SEQ_LEN
from common.modeling_dpq import get_layout
from common.paths import FRONTIER_SUMMARY, models_root, pruned_folder
from common.pruning.importance import magnitude_importance
from common.pruning.run import Job, finish, load_student, pruned_output, recover, recovery_batches, recovery_seed
from common.pruning.schedule import gradual_prune
from common.pruning.selection import prune_to_target
from common.stage import METADATA, is_main_process, json_dump, json_roundtrip, logger, read_metadata, set_seed


def _recover_point(job: Job, seed: int, loaders, target: float, model, desc: str) -> dict:
    """The short recovery every frontier point gets (ours and the baseline: same batches at the same target)."""
    set_seed(recovery_seed(seed, target))
    loader, epochs = recovery_batches(loaders["train"], job.settings.recovery_epochs, seed, target, partial=True)
    return recover(job, model, loaders, loader, epochs, desc)


def write_branch(job: Job, seed: int, loaders, target: float, model, start, run, step: int, sweep: dict) -> dict:
    """Short recovery of one point of our gradual run (a branch, or its end) and its folder."""
    started = time.time()
    with pruned_output(job, pruned_folder(target, seed, job.constants["SEED"]), seed) as out:
        recovered = _recover_point(job, seed, loaders, target, model, f"recovery s{round(100 * target):02d}")
        out.results = finish(job, loaders, model, out, target, start, dict(
            recovered, mode="frontier", method="taylor", seed=seed, trajectory=list(run.trajectory),
            prune_loss_history=list(run.history),
            frontier=dict(sweep, branch_step=step, recovery_epochs=job.settings.recovery_epochs,
                          recovery_s=round(time.time() - started, 1))))
    return out.results


def prune_magnitude(job: Job, seed: int, loaders, target: float, sweep: dict) -> dict:
    """The baseline at one target: the student pruned at once by weight magnitude per FLOP, then the same short
    recovery as our branch at that target."""
    set_seed(seed)
    started = time.time()
    model, start = load_student(job)
    with pruned_output(job, pruned_folder(target, seed, job.constants["SEED"], method="magnitude"), seed) as out:
        removed = prune_to_target(model, magnitude_importance(model), (1 - target) * start["encoder_gflops"], SEQ_LEN)
        event = {"step": 0, "target_sparsity": target, "encoder_gflops": round(removed["encoder_gflops"], 6),
                 "sparsity": round(1 - removed["encoder_gflops"] / start["encoder_gflops"], 5),
                 "layout": get_layout(model),
                 "removed_heads": {str(k): v for k, v in removed["removed_heads"].items()},
                 "removed_ffn": {str(k): v for k, v in removed["removed_ffn"].items()}}
        logger.info(f"[magnitude s{round(100 * target):02d}] one shot to {event['sparsity']:.3f} measured sparsity: "
                    f"heads {event['layout']['heads']}, FFN {event['layout']['ffn']}")
        recovered = _recover_point(job, seed, loaders, target, model, f"magnitude recovery s{round(100 * target):02d}")
        out.results = finish(job, loaders, model, out, target, start, dict(
            recovered, mode="frontier", method="magnitude", seed=seed, trajectory=[event],
            importance="weight magnitude: squared L2 norm of each head's / FFN neuron's weights, per FLOP, one shot",
            frontier=dict(sweep, recovery_epochs=job.settings.recovery_epochs,
                          recovery_s=round(time.time() - started, 1))))
    return out.results


def prune_frontier(job: Job, seed: int, loaders, targets, methods) -> tuple:
    """Every frontier folder of one seed: ({folder name: results}, this seed's entry of models/frontier.json)."""
    started = time.time()
    sweep = {"sweep_id": uuid.uuid4().hex[:12], "targets": list(targets), "seed": seed,
             "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    results, points = {}, {m: [] for m in methods}

    def point(method, r):
        name = pruned_folder(r["target_sparsity"], seed, job.constants["SEED"], method=method).name
        results[name] = r
        points[method].append({
            "target_sparsity": r["target_sparsity"], "folder": name, "measured_sparsity": r["measured_sparsity"],
            "encoder_gflops": r["encoder_gflops_after"], "branch_step": r["frontier"].get("branch_step"),
            "heldout_accuracy_before_recovery": r["heldout_accuracy_before_recovery"],
            "heldout_accuracy": r["heldout_accuracy"], "validation_accuracy": r["validation_accuracy"],
            "recovery_s": r["frontier"]["recovery_s"]})

    summary = {"seed": seed, "sweep_id": sweep["sweep_id"], "gradual_runs": 0}
    if "taylor" in methods:
        set_seed(seed)
        model, start = load_student(job)
        logger.info(f"frontier, seed {seed}: one gradual run of the student through "
                    f"{', '.join(f'{100 * t:.0f}%' for t in targets)} fewer encoder GFLOPs, a branch at each")
        run = gradual_prune(model, loaders["train"], loaders["heldout"], job.loss_fn,
                            job.settings.schedule(targets[-1], targets[:-1]), desc=f"frontier seed {seed}",
                            on_milestone=lambda step, target, branch, run: point("taylor", write_branch(
                                job, seed, loaders, target, branch, start, run, step, sweep)))
        # the last target is the end of the run (after the settling steps), recovered like every branch
        point("taylor", write_branch(job, seed, loaders, targets[-1], model, start, run,
                                     len(loaders["train"]) * job.settings.prune_epochs, sweep))
        summary.update(gradual_runs=1, gradual_run_s=run.wall_time_s,
                       shared_run_s=round(run.wall_time_s - sum(m["branch_s"] for m in run.milestones), 1),
                       trajectory=[{k: e[k] for k in ("step", "target_sparsity", "sparsity", "encoder_gflops",
                                                      "heldout_accuracy")}
                                   | {"milestone": bool(e.get("milestone"))} for e in run.trajectory])
        del model
    if "magnitude" in methods:
        for target in targets:
            point("magnitude", prune_magnitude(job, seed, loaders, target, sweep))
    wall = round(time.time() - started, 1)
    for name in results:  # the folders were written as the sweep went; now that it is over, its wall time
        results[name]["frontier"]["sweep_wall_time_s"] = wall
        _add_sweep_wall_time(models_root() / name, wall)
    summary.update(wall_time_s=wall, points=points)
    return results, summary


def _add_sweep_wall_time(folder, wall: float) -> None:
    """Record the whole sweep's wall time in a frontier folder's metadata.json (rewritten atomically; the only
    change made to a folder after its stage finished)."""
    if not is_main_process():  # the other processes of a multi-process run wrote no folder
        return
    meta = read_metadata(folder)
    meta["results"]["frontier"]["sweep_wall_time_s"] = wall
    tmp = folder / f".{METADATA}.tmp"
    json_dump(meta, tmp)
    os.replace(tmp, folder / METADATA)


# what must match for an earlier frontier run to be listed beside this one in models/frontier.json
_SAME_FRONTIER = ("targets", "methods", "settings", "augment_pairs", "preset", "quick")


def write_frontier_summary(job: Job, targets, methods, seeds, summaries, wall: float) -> dict:
    """models/frontier.json: what the frontier run did and cost, per seed; runs of other seeds made earlier with the
    same frontier settings are kept (`earlier_frontier_runs`)."""
    n, s = len(targets), job.settings
    passes = {"gradual_run": s.prune_epochs if "taylor" in methods else 0,
              "branch_recoveries": round(n * s.recovery_epochs, 3) if "taylor" in methods else 0,
              "baseline_recoveries": round(n * s.recovery_epochs, 3) if "magnitude" in methods else 0}
    passes["total"] = round(sum(passes.values()), 3)
    summary = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
               "targets": list(targets), "methods": list(methods), "seeds": list(seeds), "settings": asdict(s),
               "augment_pairs": job.constants["AUGMENT_PAIRS"], "training_passes_per_seed": passes,
               "wall_time_s": wall, "runs": {str(r["seed"]): r for r in summaries},
               "preset": job.constants["PRESET"], "quick": job.constants["QUICK"]}
    path = models_root() / FRONTIER_SUMMARY
    if not is_main_process():  # only the main process of a multi-process run writes under models/
        return summary
    earlier = earlier_frontier_runs(path, summary)
    if earlier:
        summary["runs"] = {**earlier, **summary["runs"]}
        summary["seeds"] = sorted(int(seed) for seed in summary["runs"])
        logger.info(f"frontier: keeping the earlier run(s) of seed(s) {', '.join(earlier)} in {path.name} (same "
                    f"settings, folders unchanged)")
    tmp = path.with_name(f".{path.name}.tmp")
    json_dump(summary, tmp)
    os.replace(tmp, path)
    logger.info(f"frontier: {len(seeds)} seed(s) x {n} targets in {wall:.0f} s -> {path}")
    return summary


def earlier_frontier_runs(path, summary) -> dict:
    """{seed: run} of the frontier runs recorded in `path` for seeds this run did not redo, when they were made with
    the same frontier settings and their folders are still the ones they wrote (same sweep id), so that
    `SEEDS=(43, 44)` after a seed-42 run leaves one summary of all three; {} otherwise."""
    try:
        old = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    if any(old.get(k) != json_roundtrip(summary[k]) for k in _SAME_FRONTIER):
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
