"""Comparisons across the measured models: paired tests, seed groups, the frontier summary, the headline, the
deployment pick, and the assembled report (`build_report`)."""

import statistics
from datetime import datetime, timezone

import torch

from common.flops import FLOPS_CONVENTION
from common.paths import STAGE_FOLDERS
from common.report.discover import BASELINE, FINAL, seed_group
from common.report.length import DIFFERENCE_KEYS, by_length
from common.report.measure import cpu_info, cpu_words, from_bits
from common.stage import git_commit, library_versions
from common.stats import describe_difference, paired_comparison, seed_spread


# --- Paired comparisons (every model sees the same sentences)
def fp32_source(name: str, r: dict, models: dict):
    """The fp32 PyTorch model a 4-bit folder or an export was made from, when it is in the report."""
    if r["bits"] == 32:
        return name
    sources = [u for u in r.get("upstream", []) if u in models and models[u]["bits"] == 32]
    return sources[0] if sources else None


def comparison_pairs(models: dict) -> list:
    """(kind, (model a, artifact a), (model b, artifact b)) for every comparison the report draws."""
    teacher, student = STAGE_FOLDERS["teacher"], STAGE_FOLDERS["student"]
    pairs = [(kind, (a, "pytorch"), (b, "pytorch")) for kind, a, b in [
        ("headline: final vs standard 4-bit", FINAL, BASELINE), ("student vs teacher", student, teacher)]
        if a in models and b in models]
    for name, r in models.items():
        if r["bits"] == 32 and r["family"] == "pruned" and student in models:
            pairs.append(("pruned vs student", (name, "pytorch"), (student, "pytorch")))
        source = fp32_source(name, r, models)
        if r["bits"] == 4 and source:
            pairs.append(("4-bit vs its fp32 source", (name, "pytorch"), (source, "pytorch")))
        for artifact in r.get("artifacts", {}):
            if artifact != "pytorch" and source:
                pairs.append(("export vs its fp32 source", (name, artifact), (source, "pytorch")))
    return pairs


def artifact_label(name: str, artifact: str) -> str:
    return name if artifact == "pytorch" else f"{name} [{artifact}]"


def comparisons(models: dict, eval_files, seed: int) -> list:
    """Each pair on SST-2 validation and every extra eval file (common.stats.paired_comparison)."""
    out = []
    for kind, (a, art_a), (b, art_b) in comparison_pairs(models):
        ra, rb = models[a]["artifacts"][art_a], models[b]["artifacts"][art_b]
        sets = [("validation", ra["correct"], rb["correct"])]
        sets += [(path, ra["eval_files_correct"][path], rb["eval_files_correct"][path]) for path in eval_files]
        for evaluation, bits_a, bits_b in sets:
            result = paired_comparison(from_bits(bits_a), from_bits(bits_b), seed=seed)
            out.append(dict(result, kind=kind, a=a, a_artifact=art_a, b=b, b_artifact=art_b, evaluation=evaluation,
                            sentence=describe_difference(result, artifact_label(a, art_a), artifact_label(b, art_b))))
    return out


# --- Seeds and the frontier: mean and spread across training seeds; ours against the magnitude baseline
SEED_CONVENTION = (
    "Two different uncertainties. accuracy_seed_spread: mean and sample standard deviation (ddof=1) of the "
    "accuracy in points across the training seeds of one seed group (seed-to-seed variation of the training run, "
    "common.stats.seed_spread; 0 with one seed). accuracy_ci_per_seed / accuracy_ci: 95% percentile bootstrap "
    "interval over the validation sentences of each model (sentence-sampling uncertainty: how much the accuracy "
    "would move on another draw of sentences). vs_student: each seed's model paired against the student of its "
    "precision (fp32: student_model; 4-bit: distilled_quantized_student) on the same sentences: difference in "
    "points, 95% paired-bootstrap interval, exact McNemar p; vs_magnitude (frontier rows): ours against the "
    "magnitude baseline at the same target and precision, seed-SEED models, the same paired test; vs_magnitude_seeds: "
    "the same test for every training seed both have, and the difference of the seed means against the larger "
    "seed-to-seed s.d. (beats_by_more_than_seed_spread)")
METHOD_WORDS = {"taylor": "ours (gradual, Taylor)", "magnitude": "magnitude one-shot (baseline)"}


def _source_record(name: str, models: dict) -> dict:
    """The fp32 record a model was made from (itself for fp32): where a 4-bit twin's pruning facts live."""
    source = fp32_source(name, models[name], models)
    return models[source] if source else models[name]


def _paired_vs(models: dict, a: str, b: str, seed: int) -> dict:
    result = paired_comparison(from_bits(models[a]["artifacts"]["pytorch"]["correct"]),
                               from_bits(models[b]["artifacts"]["pytorch"]["correct"]), seed=seed)
    return {"model": a, "reference": b, "seed": models[a].get("seed"), **{k: result[k] for k in DIFFERENCE_KEYS}}


def _group_speedup(models: dict, names: list, reference: str, latency_ms: dict) -> tuple:
    """(speed-up over `reference` per batch, how): the members' mean paired speed-up, else the ratio of medians."""
    speed, detail = {"reference": reference}, {}
    for k, v in latency_ms.items():
        paired = [models[n].get("speedup_vs_reference", {}).get(k) for n in names]
        if all(p and p["reference"] == reference for p in paired):
            speed[k] = round(statistics.fmean(p["speedup"] for p in paired), 4)
            detail[k] = {"paired": True, "per_seed": [{"model": n, "speedup": p["speedup"], "ci": p["ci"]}
                                                      for n, p in zip(names, paired)],
                         "seed_spread": seed_spread([p["speedup"] for p in paired])}
        elif k in models[reference]["latency_ms"] and v > 0:
            speed[k] = round(models[reference]["latency_ms"][k] / v, 4)
            detail[k] = {"paired": False}
    return speed, detail


def seed_groups(models: dict, seed: int) -> dict:
    """{group: summary} of every student and pruned model with its other-seed twins (`seed_group`): members (seed
    SEED first) and seeds; method, target sparsity and mode (a 4-bit twin's from its fp32 source); accuracy mean and
    seed-to-seed spread next to each member's 95% interval; mean GFLOPs, size, latency, speed-up over the student;
    for pruned groups each member paired against the student of its precision (SEED_CONVENTION)."""
    student, members, out = STAGE_FOLDERS["student"], {}, {}
    for name, r in models.items():
        if r["family"] in ("student", "pruned") and name != STAGE_FOLDERS["student_nodistill"]:
            members.setdefault(r.get("seed_group") or seed_group(name), []).append(name)
    for group, names in members.items():
        rs = [models[n] for n in names]
        first, source, bits = rs[0], _source_record(names[0], models), rs[0]["bits"]
        batches = sorted({k for r in rs for k in r["latency_ms"]}, key=lambda k: int(k.split("_")[1]))
        pruned = first["family"] == "pruned"
        entry = {"members": names, "seeds": [_source_record(n, models).get("seed") for n in names],  # training seed
                 "n_seeds": len(names), "family": first["family"], "bits": bits,
                 "method": source.get("pruning_method") if pruned else None,
                 "target_sparsity": source.get("target_sparsity") if pruned else None,
                 "mode": source.get("pruning_mode"),
                 "accuracy_seed_spread": seed_spread([100 * r["accuracy"] for r in rs]),
                 "accuracy_ci_per_seed": {n: [round(100 * v, 4) for v in models[n]["accuracy_ci"]] for n in names},
                 **{k: statistics.fmean(r[k] for r in rs) for k in ("gflops", "size_mb", "params")},
                 "latency_ms": {k: statistics.fmean(r["latency_ms"][k] for r in rs if k in r["latency_ms"])
                                for k in batches}}
        if student in models:
            entry["gflops_reduction_vs_student"] = round(1 - entry["gflops"] / models[student]["gflops"], 5)
        reference = BASELINE if bits == 4 and BASELINE in models else student
        if reference in models:
            entry["speedup_vs_student"], entry["speedup_detail"] = _group_speedup(models, names, reference,
                                                                                  entry["latency_ms"])
        if pruned and reference in models:
            per_seed = [_paired_vs(models, n, reference, seed) for n in names]
            entry["vs_student"] = {"reference": reference, "per_seed": per_seed,
                                   "diff_points_seed_spread": seed_spread([c["diff_points"] for c in per_seed])}
        out[group] = entry
    return out


def _versus_rival_seeds(models: dict, row: dict, rival: dict, seed: int) -> dict:
    """Ours against the baseline seed by seed, and the seed means' difference against the larger seed s.d."""
    by_seed = dict(zip(rival["seeds"], rival["members"]))
    per_seed = [_paired_vs(models, name, by_seed[s], seed) for name, s in zip(row["members"], row["seeds"])
                if s in by_seed]
    ours, theirs = row["accuracy_seed_spread"], rival["accuracy_seed_spread"]
    margin, largest_sd = ours["mean"] - theirs["mean"], max(ours["std"], theirs["std"])
    several = min(ours["n_seeds"], theirs["n_seeds"]) >= 2
    return {"per_seed": per_seed,
            "diff_points_seed_spread": seed_spread([c["diff_points"] for c in per_seed]) if per_seed else None,
            "mean_difference_points": round(margin, 4), "largest_seed_sd_points": round(largest_sd, 4),
            "beats_by_more_than_seed_spread": (margin > largest_sd) if several else None}


def frontier_summary(models: dict, groups: dict, seed: int) -> dict | None:
    """One row per pruned seed group with a target, ours paired against the magnitude baseline; None without any."""
    rows = [{"group": group, **{k: g[k] for k in ("members", "seeds", "n_seeds", "method", "bits", "target_sparsity",
                                                  "mode", "gflops", "latency_ms", "accuracy_seed_spread",
                                                  "accuracy_ci_per_seed")},
             **{k: g.get(k) for k in ("gflops_reduction_vs_student", "speedup_vs_student", "speedup_detail",
                                      "vs_student")}}
            for group, g in groups.items() if g["family"] == "pruned" and g["target_sparsity"] is not None]
    if not rows:
        return None
    rows.sort(key=lambda r: (r["target_sparsity"], r["mode"] != "frontier", r["method"] != "taylor", r["bits"] == 4))
    for row in rows:
        rival = next((r for r in rows if r["method"] == "magnitude" and r["bits"] == row["bits"]
                      and r["target_sparsity"] == row["target_sparsity"]), None)
        if rival and row["method"] == "taylor":
            row["vs_magnitude"] = _paired_vs(models, row["members"][0], rival["members"][0], seed)
            row["vs_magnitude_seeds"] = _versus_rival_seeds(models, row, rival, seed)
    walls = {run["sweep_id"]: {"seed": r.get("seed"), "wall_time_s": run["sweep_wall_time_s"],
                               "recovery_epochs": run.get("recovery_epochs")}
             for r in models.values() if (run := r.get("frontier_run") or {}).get("sweep_id")
             and run.get("sweep_wall_time_s") is not None}
    return {"rows": rows, "frontier_runs": walls,
            "methods": {m: METHOD_WORDS.get(m, m) for m in sorted({r["method"] for r in rows})}}


# --- Headline
def headline(models: dict, comps: list = (), cpu: dict = None, deploy_timing: dict = None):
    """(headline or None, why not): the final model against the standard quantized student, and the deployment line."""
    missing = [n for n in (BASELINE, FINAL) if n not in models]
    if missing:
        return None, f"no headline: {' and '.join(missing)} not measured (run the stages that write them)"
    cpu, b, f = cpu or cpu_info(), models[BASELINE], models[FINAL]
    batches = sorted(int(k.split("_")[1]) for k in b["latency_ms"] if k in f["latency_ms"])
    big = f"batch_{batches[-1]}" if batches else None
    result = {"baseline": BASELINE, "final": FINAL, "gflops_reduction": round(1 - f["gflops"] / b["gflops"], 4),
              "accuracy_drop_points": round((b["accuracy"] - f["accuracy"]) * 100, 2),
              "size_reduction": round(1 - f["size_mb"] / b["size_mb"], 4), "cpu": cpu_words(cpu)}
    paired = next((c for c in comps if (c["a"], c["a_artifact"], c["b"], c["b_artifact"], c["evaluation"])
                   == (FINAL, "pytorch", BASELINE, "pytorch", "validation")), None)
    if paired:
        result["paired"] = {k: paired[k] for k in DIFFERENCE_KEYS}
    if big:
        paired_speed = f.get("speedup_vs_reference", {}).get(big)
        if paired_speed and paired_speed["reference"] == BASELINE:  # timed next to the baseline, run by run
            result[f"latency_speedup_{big}"] = round(paired_speed["speedup"], 3)
            result["speedup_interval"] = paired_speed["ci"]
            result["paired_medians_ms"] = [paired_speed["median_ms"], paired_speed["reference_median_ms"]]
        else:
            result[f"latency_speedup_{big}"] = round(b["latency_ms"][big] / f["latency_ms"][big], 3)
    result["sentence"] = headline_sentence(result, b, f)
    stale = [n for n in (BASELINE, FINAL) if models[n].get("stale")]
    if stale:  # numbers of a model built from inputs that changed since: say so in the headline itself
        result["stale"] = stale
        result["sentence"] += (f" Caveat: {' and '.join(stale)} {'is' if len(stale) == 1 else 'are'} stale (built "
                               f"from inputs that changed since; see the warnings for what to rerun).")
    if deploy := deployment(models, cpu, deploy_timing):
        result["deployment"] = deploy
    return result, None


def deployment_pair(models: dict) -> tuple | None:
    """The fastest artifacts (geometric-mean latency) of any form of pruned_model and of student_model, or None."""
    fastest = []
    for names in ([STAGE_FOLDERS["pruned"], FINAL], [STAGE_FOLDERS["student"], BASELINE]):
        timed = [(statistics.geometric_mean(a["latency_ms"].values()), (name, artifact)) for name in names
                 for artifact, a in models.get(name, {}).get("artifacts", {}).items() if a["latency_ms"]]
        fastest.append(min(timed, key=lambda t: t[0])[1] if timed else None)
    return tuple(fastest) if all(fastest) else None


def deployment(models: dict, cpu: dict, timing: dict = None) -> dict | None:
    """The `deployment_pair` and its speed-ups: from `timing` (measure.time_pair), else the ratio of medians."""
    pair = deployment_pair(models)
    if not pair:
        return None
    (fn, fa), (sn, sa) = pair
    fr, sr = models[fn]["artifacts"][fa], models[sn]["artifacts"][sa]
    paired = timing["speedup"] if timing and (timing["final"], timing["student"]) == (
        {"model": fn, "artifact": fa}, {"model": sn, "artifact": sa}) else None
    speedups = ({k: round(v["speedup"], 2) for k, v in paired.items()} if paired else
                {k: round(sr["latency_ms"][k] / fr["latency_ms"][k], 2) for k in fr["latency_ms"]
                 if k in sr["latency_ms"]})
    intervals = {k: v["ci"] for k, v in paired.items()} if paired else {}
    words = ", ".join(_speed_words(v, k, "", intervals.get(k), paired and [paired[k]["median_ms"],
                                   paired[k]["reference_median_ms"]], (fr["latency_ms"][k], sr["latency_ms"][k]))
                      for k, v in speedups.items())
    sentence = (f"On this CPU ({cpu_words(cpu)}), the final model's fastest artifact, "
                f"{artifact_label(fn, fa)} ({fr['accuracy']:.2%}, {fr['size_mb']:.3g} MiB), runs {words} against "
                f"the student's fastest, {artifact_label(sn, sa)} ({sr['accuracy']:.2%}, {sr['size_mb']:.3g} MiB).")
    return {"final": {"model": fn, "artifact": fa}, "student": {"model": sn, "artifact": sa},
            "final_accuracy": fr["accuracy"], "student_accuracy": sr["accuracy"], "final_size_mb": fr["size_mb"],
            "student_size_mb": sr["size_mb"], "speedup": speedups, "speedup_interval": intervals,
            "speedup_timing": "paired" if paired else "apart",
            "selection": "lowest geometric mean of the median latencies over the batch sizes; the speed-up is "
                         "then timed again with the two run by run next to each other",
            "sentence": sentence}


def _speed_words(v: float, batch_key: str, where: str, ci, paired_medians, medians) -> str:
    """'2.50x as fast at batch 32 (timed paired, run by run: median 12 vs 30.5 ms, 95% interval of the speed-up
    [2.25, 2.75])', or with the two medians timed apart."""
    how = (f"timed paired, run by run: median {paired_medians[0]:.3g} vs {paired_medians[1]:.3g} ms"
           + (f", 95% interval of the speed-up [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "") if paired_medians
           else f"median {medians[0]:.3g} vs {medians[1]:.3g} ms, timed apart")
    speed = f"{v:.2f}x as fast" if v >= 1 else f"{1 / v:.2f}x slower"
    return f"{speed} at {batch_key.replace('_', ' ')}{where} ({how})"


def headline_sentence(h: dict, b: dict, f: dict) -> str:
    paired = h.get("paired")
    if paired:
        diff = paired["diff_points"]
        direction = "lower" if diff < 0 else "higher" if diff > 0 else "equal"
        sig = "significant" if paired["significant"] else "not significant"
        p = "< 0.001" if paired["mcnemar_p"] < 0.001 else f"= {paired['mcnemar_p']:.2g}"
        acc = (f"is {abs(diff):.2f} points {direction} in accuracy" if diff else "is equally accurate") + (
            f" ({f['accuracy']:.2%} vs {b['accuracy']:.2%} on SST-2 validation; 95% interval "
            f"[{paired['ci_low_points']:+.2f}, {paired['ci_high_points']:+.2f}], {sig}, McNemar p {p})")
    else:
        acc = f"scores {f['accuracy']:.2%} vs {b['accuracy']:.2%} on SST-2 validation (no paired test)"
    parts = [f"{h['final']} needs {h['gflops_reduction']:.0%} fewer GFLOPs than {h['baseline']} "
             f"({f['gflops']:.3g} vs {b['gflops']:.3g})", acc,
             f"is {h['size_reduction']:.0%} smaller on disk ({f['size_mb']:.3g} vs {b['size_mb']:.3g} MiB)"]
    key = next((k for k in h if k.startswith("latency_speedup_")), None)
    if key:
        batch = key.replace("latency_speedup_", "")
        parts.append("runs " + _speed_words(h[key], batch, f" in PyTorch on this CPU ({h['cpu']})",
                                            h.get("speedup_interval"), h.get("paired_medians_ms"),
                                            (f["latency_ms"][batch], b["latency_ms"][batch])))
    return ", ".join(parts[:-1]) + " and " + parts[-1] + "."


def build_report(models: dict, *, sentences, settings: dict, dataset: dict, eval_files, preset: str, quick: bool,
                 skipped: dict, notes: list, constants: dict, wall_time_s: float, deploy_timing: dict = None) -> dict:
    """final_report.json as a dict (`sentences`: the validation sentences scored, in order)."""
    seed, cpu = settings["seed"], cpu_info()
    comps, groups = comparisons(models, eval_files, seed), seed_groups(models, seed)
    frontier = frontier_summary(models, groups, seed)
    pruned_pairs = [(a, b) for kind, (a, _), (b, _) in comparison_pairs(models) if kind == "pruned vs student"]
    head, reason = headline(models, comps, cpu, deploy_timing=deploy_timing)
    latency = {"runs": settings["latency_runs"], "warmup": settings["warmup_runs"],
               "batch_sizes": list(settings["latency_batches"]), "seed": seed,
               "statistic": "median wall time of one forward pass, torch.no_grad, CPU",
               "speedup": "each PyTorch model's timed runs alternate one by one with those of the student of its "
                          "precision (student_model; distilled_quantized_student for 4-bit), order swapped every "
                          "round; speed-up = median over the rounds of student time / model time, with a "
                          "distribution-free 95% interval from order statistics (none below 6 runs)",
               "inputs": "real validation sentences (same seeded choice for every model), padded to the "
                         "longest in the batch; batch 1 = the median-length sentence of the sample"}
    run = {"preset": preset, "quick": quick, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "git_commit": git_commit(), "device": f"cpu: {cpu_words(cpu)}", "cpu": cpu, "latency": latency,
           "threads": torch.get_num_threads(), "load_average": settings.get("load_average"),
           "versions": library_versions(), "busy_cores_at_start": settings.get("busy_cores"),  # 1 s, /proc/stat
           "constants": constants, "wall_time_s": round(wall_time_s, 1)}
    return {
        "run": run, "dataset": dataset, "eval_files": list(eval_files),
        "flops_convention": FLOPS_CONVENTION.replace("length 128", f"length {settings['flops_seq_len']}"),
        "gflops_per_sentence_convention": "mean over the validation sentences of the fvcore GFLOPs at each "
                                          "sentence's tokenized length (batch 1, [CLS] and [SEP] included); "
                                          "exact: FLOPs are quadratic in length, fitted on 3 traced lengths and "
                                          "checked against the traced reference length",
        "size_convention": "size_mb = bytes of the model*.safetensors files / 2**20 (MiB); size_by_part (each "
                           "artifact): bytes of the embeddings, the encoder and the rest, from the tensors stored",
        "params_convention": "logical parameters (a packed 4-bit weight counts as its unpacked shape)",
        "models": models, "comparisons": comps,
        "comparison_convention": "Paired on the same sentences: difference a - b in accuracy points, 95% "
                                 "paired-bootstrap interval (10000 resamples of the sentences, seeded), "
                                 "only_a_right / only_b_right = sentences only one of the two got right, exact "
                                 "two-sided McNemar p; accuracy_ci = 95% percentile bootstrap over sentences",
        "model_order": list(models),  # reading order (the JSON itself has sorted keys)
        "seed_groups": groups, "frontier": frontier,
        "by_length": by_length(models, sentences, pruned_pairs, frontier, seed),
        "seed_convention": SEED_CONVENTION, "skipped": skipped, "warnings": notes, "headline": head,
        **({"headline_note": reason} if head is None else {})}

