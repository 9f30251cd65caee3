"""final_report.md, a view of final_report.json: `markdown_report` and its tables (models, frontier, seeds, accuracy
by length, artifacts, comparisons)."""

from pathlib import Path

from common.report.compare import artifact_label
from common.report.measure import cpu_words


def markdown_report(report: dict) -> str:
    models, run, ds = report["models"], report["run"], report["dataset"]
    batch_keys = sorted({k for r in models.values() for k in r["latency_ms"]}, key=lambda k: int(k.split("_")[1]))
    head = report.get("headline")
    lines = ["# Distill-Prune-Quantize: final report", "",
             f"**Headline.** {head['sentence']}" if head else f"**Headline.** {report.get('headline_note')}", ""]
    if report.get("skipped"):  # at the top: a model that is missing from the tables below, and why
        lines += ["**Skipped.** " + "; ".join(f"`{n}`: {why}" for n, why in report["skipped"].items()), ""]
    if head and head.get("deployment"):
        lines += [f"**Deployment.** {head['deployment']['sentence']}", ""]
    if run["quick"]:
        lines += ["> QUICK run: few latency runs and/or a slice of the data; smoke numbers, not a benchmark.", ""]
    lines += [f"Accuracy on {ds['name']} {ds['split']} ({ds['n']} sentences). GFLOPs: {report['flops_convention']}; "
              f"4-bit models are counted through their fp32 twin. GFLOPs/sent: mean at each sentence's real length. "
              f"Size: weight files on disk in MiB. Latency: CPU, median of {run['latency']['runs']} runs after "
              f"{run['latency']['warmup']} warm-up, {run['threads']} torch threads, {run['device']}.", ""]
    lines += model_table(report, batch_keys) + frontier_table(report, batch_keys)
    lines += length_table(report) if report.get("frontier") else []  # after the frontier, else after comparisons
    lines += artifact_table(report, batch_keys) + comparison_table(report)
    lines += [] if report.get("frontier") else length_table(report)
    if report.get("skipped") or report.get("warnings"):
        lines += ["## Warnings", ""] + [f"- {w}" for w in report.get("warnings", [])]
        lines += [f"- `{n}` skipped: {why}" for n, why in report.get("skipped", {}).items()] + [""]
    lines += [f"Run: preset {run['preset']}, git {run['git_commit']}, created {run['created']}, "
              f"{run['wall_time_s']:.0f} s.", ""]
    return "\n".join(lines)


def _table(header: list, align: str, rows) -> list:
    """A Markdown table: `align` has one letter per column, "l" (left) or "r" (right)."""
    return (["| " + " | ".join(header) + " |", "|" + "".join("---:|" if a == "r" else "---|" for a in align)]
            + ["| " + " | ".join(row) + " |" for row in rows])


def model_table(report: dict, batch_keys) -> list:
    """One row per model: accuracy, GFLOPs, size, latency, what is kept, and notes."""
    files, rows = report.get("eval_files", []), []
    for name, r in report["models"].items():
        vocab, notes = r.get("vocabulary"), [r["gflops_source"]] if r["bits"] == 4 else []
        notes += ["STALE (upstream rebuilt)"] if r.get("stale") else []
        notes += [] if r.get("complete", True) else ["INCOMPLETE (no metadata.json)"]
        notes += [f"vocabulary {vocab['kept_size']:,} of {vocab['original_size']:,} ids: "
                  f"{_versus(vocab['validation_vs_full_vocabulary'])} vs the full one"] if vocab else []
        low, high = (100 * v for v in r["accuracy_ci"])
        rows.append([f"`{name}`" + (f": {r['label']}" if r["label"] != name else ""), str(r["bits"]),
                     f"{r['accuracy'] * 100:.2f}", f"[{low:.1f}, {high:.1f}]"]
                    + [f"{r['eval_files'].get(p, float('nan')) * 100:.2f}" for p in files]
                    + [f"{r['gflops']:.4g}", f"{r['gflops_per_sentence']:.4g}", f"{r['params'] / 1e6:.2f}",
                       f"{r['size_mb']:.4g}"]
                    + [f"{r['latency_ms'].get(k, float('nan')):.4g}" for k in batch_keys]
                    + [str(r["layers"]), str(r["heads"]), str(r["ffn_neurons"]), "; ".join(notes)])
    header = (["model", "bits", "accuracy (%)", "95% interval"] + [f"acc {Path(p).name} (%)" for p in files]
              + ["GFLOPs", "GFLOPs/sent", "params (M)", "size (MiB)"]
              + [f"latency {k.replace('_', ' ')} (ms)" for k in batch_keys]
              + ["layers", "heads", "FFN neurons", "notes"])
    return _table(header, "l" + "r" * (len(header) - 2) + "l", rows) + [""]


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.2g}"


def _seed_mean(spread: dict) -> str:
    """'88.88' for one seed, '88.88 ± 0.31 (3 seeds)' for several (± = sample s.d. across seeds)."""
    return f"{spread['mean']:.2f}" + (f" ± {spread['std']:.2f} ({spread['n_seeds']} seeds)" if spread["n_seeds"] >= 2
                                      else "")


def _versus(c: dict) -> str:
    return f"{c['diff_points']:+.2f} [{c['ci_low_points']:+.2f}, {c['ci_high_points']:+.2f}], p {_p(c['mcnemar_p'])}"


def _versus_seeds(v: dict) -> str:
    if not v or len(v["per_seed"]) == 1:
        return _versus(v["per_seed"][0]) if v else ""
    spread = v["diff_points_seed_spread"]
    return (f"{spread['mean']:+.2f} ± {spread['std']:.2f} over {len(v['per_seed'])} seeds; per seed p "
            + ", ".join(_p(c["mcnemar_p"]) for c in v["per_seed"]))


def _versus_rival(row: dict) -> str:
    """ours - magnitude: one seed as a paired test; several as the per-seed differences and the spread verdict."""
    several = row.get("vs_magnitude_seeds") or {}
    if len(several.get("per_seed") or ()) < 2:
        return _versus(row["vs_magnitude"]) if row.get("vs_magnitude") else ""
    verdict = {True: "more than the seed spread", False: "NOT more than the seed spread", None: ""}[
        several["beats_by_more_than_seed_spread"]]
    return (_versus_seeds(several) + f"; means differ by {several['mean_difference_points']:+.2f} vs seed s.d. "
            f"{several['largest_seed_sd_points']:.2f}: {verdict}")


def _more_seeds(n_seeds: int) -> str:  # ' (+2 seeds)' after a seed group's first model; '' for one seed
    return f" (+{n_seeds - 1} seed{'s' if n_seeds > 2 else ''})" if n_seeds > 1 else ""


def _speedup(speed: float, ci, spread: dict = None) -> str:
    """'1.44 ± 0.02x [1.40, 1.51]': a paired speed-up, ± its s.d. over seeds, its 95% interval over the timed runs
    (none below 6 runs)."""
    sd = f" ± {spread['std']:.2f}" if spread and spread["n_seeds"] >= 2 else ""
    return f"{speed:.2f}{sd}x" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _row_speedup(row: dict, big: str) -> str:
    """A frontier row's speed-up at the largest batch (paired: the seeds' mean, the first seed's interval)."""
    speed, detail = row.get("speedup_vs_student") or {}, (row.get("speedup_detail") or {}).get(big) or {}
    if big not in speed:
        return ""
    if not detail.get("paired"):
        return f"{speed[big]:.2f}x (unpaired)"
    return _speedup(speed[big], detail["per_seed"][0]["ci"], detail["seed_spread"])


FRONTIER_TEXT = (
    "One row per pruned seed group with a target: ours = gradual Taylor pruning, baseline = one-shot weight magnitude "
    "with the same recovery. GFLOPs cut: measured, against student_model. Accuracy: mean ± s.d. ACROSS TRAINING SEEDS "
    "(seed-to-seed spread); [interval]: 95% bootstrap OVER SENTENCES of the first seed's model. vs student / ours - "
    "magnitude: paired on the same sentences against the student of the row's precision / the baseline at the same "
    "target (each seed against the same seed): difference in points [95% paired-bootstrap interval], exact McNemar "
    "p; with several seeds, mean ± s.d. of the per-seed differences and whether the means differ by more than the "
    "larger seed s.d. Speed-up at the largest batch over the student of the same precision, timed paired run by run: "
    "median ratio (mean ± s.d. over seeds) [distribution-free 95% interval over the first seed's timed runs].")


def frontier_table(report: dict, batch_keys) -> list:
    """The frontier (ours vs the magnitude baseline, fp32 and 4-bit, by target) and the seed groups."""
    front, groups, lines = report.get("frontier"), report.get("seed_groups") or {}, []
    if front:
        rows = []
        for row in front["rows"]:
            low, high = row["accuracy_ci_per_seed"][row["members"][0]]
            cut = row.get("gflops_reduction_vs_student")
            rows.append([f"{100 * row['target_sparsity']:.0f}%", f"`{row['group']}`{_more_seeds(row['n_seeds'])}",
                         front["methods"].get(row["method"], row["method"])
                         + (" (full run)" if row["mode"] in ("single", "sweep") else ""), str(row["bits"]),
                         f"{100 * cut:.1f}%" if cut is not None else "", _seed_mean(row["accuracy_seed_spread"]),
                         f"[{low:.1f}, {high:.1f}]", _versus_seeds(row.get("vs_student")), _versus_rival(row)]
                        + [f"{row['latency_ms'][k]:.4g}" if k in row["latency_ms"] else "" for k in batch_keys]
                        + [_row_speedup(row, batch_keys[-1] if batch_keys else None)])
        header = (["target", "model", "method", "bits", "GFLOPs cut", "accuracy (%)", "95% interval",
                   "vs student (points)", "ours - magnitude (points)"]
                  + [f"latency {k.replace('_', ' ')} (ms)" for k in batch_keys] + ["speed-up"])
        lines += ["## Accuracy-compute frontier", "", FRONTIER_TEXT, ""]
        lines += _table(header, "rllrrrrrr" + "r" * (len(batch_keys) + 1), rows)
        for sweep_id, run in sorted(front.get("frontier_runs", {}).items(), key=lambda kv: (str(kv[1]["seed"]),
                                                                                            kv[0])):
            lines.append(f"\nFrontier run {sweep_id} (seed {run['seed']}): {run['wall_time_s']:.0f} s wall time for "
                         f"the whole sweep (one gradual run with a branch per target, plus the baseline), "
                         f"{run.get('recovery_epochs')} epoch of recovery per point; details in "
                         f"models/frontier.json.")
        lines.append("")
    several = {g: e for g, e in groups.items() if e["n_seeds"] >= 2}
    if several:
        rows = [[f"`{group}`", ", ".join(str(s) for s in e["seeds"]), _seed_mean(e["accuracy_seed_spread"]),
                 f"{e['accuracy_seed_spread']['min']:.2f} - {e['accuracy_seed_spread']['max']:.2f}",
                 "; ".join(f"{s}: {report['models'][n]['accuracy'] * 100:.2f} [{e['accuracy_ci_per_seed'][n][0]:.1f}, "
                           f"{e['accuracy_ci_per_seed'][n][1]:.1f}]" for n, s in zip(e["members"], e["seeds"])),
                 _versus_seeds(e.get("vs_student"))] for group, e in several.items()]
        lines += ["## Seeds", "", "Models that differ only by training seed. mean ± s.d.: across seeds (seed-to-seed "
                  "spread); each seed's [95% interval] is over sentences (sentence sampling).", ""]
        lines += _table(["seed group", "seeds", "accuracy (%) mean ± s.d.", "min - max",
                         "each seed: accuracy [95% interval]", "vs student (points)"], "llrrlr", rows) + [""]
    return lines


def _words(bucket: dict) -> str:
    """'12-19 words', '5 words', or 'empty'."""
    if not bucket["words"]:
        return "empty"
    low, high = bucket["words"]
    return f"{low} words" if low == high else f"{low}-{high} words"


def _length_sentence(length: dict, frontier: bool) -> str:
    """What the buckets are (ranges and counts) and what the interval means, above the table."""
    return (f"Buckets: the word-count quartiles of the {length['n']} validation sentences (whitespace-split words, not "
            f"tokens; sentences of equal length share a bucket): "
            + ", ".join(f"{b['name']} {_words(b)} ({b['n']} sentences)" for b in length["buckets"])
            + ". Accuracy in % on each bucket's sentences"
            + (" (mean over a row's training seeds; fp32 rows only)" if frontier else "") + ". Q4 vs student: "
            + ("the first seed's model" if frontier else "each pruned model") + " paired against student_model on "
            "the longest bucket's sentences only: difference in points [95% paired-bootstrap interval over the "
            "sentences within the bucket: sentence-sampling uncertainty, not seed spread], exact McNemar p.")


def length_table(report: dict) -> list:
    """Accuracy by length: per fp32 frontier row, else per model; and against the student in the longest bucket."""
    length = report.get("by_length")
    if not length:
        return []
    frontier, student = bool(length["frontier_rows"]), length["models"].get("student_model")
    if frontier:  # (first cells, bucket accuracies, vs-student entry or None) per row
        methods = report["frontier"]["methods"]
        table = [(["0%", "`student_model`", "unpruned student (the reference)"], student["accuracy_points"],
                  None)] if student else []
        table += [([f"{100 * row['target_sparsity']:.0f}%", f"`{row['group']}`{_more_seeds(row['n_seeds'])}",
                    methods.get(row["method"], row["method"])], row["accuracy_points_mean"], row["vs_student"])
                  for row in length["frontier_rows"] if row["bits"] == 32]
    else:
        versus = {v["model"]: v for v in length["vs_student"]}
        table = [([f"`{name}`", str(report["models"][name]["bits"])], length["models"][name]["accuracy_points"],
                  versus.get(name)) for name in report["models"] if name in length["models"]]
    first = ["target", "model", "method"] if frontier else ["model", "bits"]
    header = first + [f"{b['name']}: {_words(b)} (%)" for b in length["buckets"]] + ["Q4 vs student (points)"]
    rows = [cells + ["" if a is None else f"{a:.1f}" for a in accuracies]
            + [_versus(versus["per_bucket"][-1]) if versus and versus["per_bucket"][-1] else ""]
            for cells, accuracies, versus in table]
    return (["## Accuracy by sentence length (validation)", "", _length_sentence(length, frontier), ""]
            + _table(header, ("rll" if frontier else "ll") + "r" * 5, rows) + [""])


def artifact_table(report: dict, batch_keys) -> list:
    """Every runnable artifact of every model, timed on the same inputs and threads in this run."""
    run, big = report["run"], batch_keys[-1] if batch_keys else None
    rows = [[f"`{name}`", a["precision"], a["runtime"], f"{a['accuracy'] * 100:.2f}",
             f"[{a['accuracy_ci'][0] * 100:.1f}, {a['accuracy_ci'][1] * 100:.1f}]", f"{a['size_mb']:.4g}",
             " / ".join(f"{v / 2**20:.3g}" for v in a["size_by_part"].values())]
            + [f"{a['latency_ms'].get(k, float('nan')):.4g}" for k in batch_keys]
            + ([_speedup(p["speedup"], p["ci"]) + f" vs `{artifact_label(p['reference'], artifact)}`"
                if (p := a.get("speedup_vs_reference", {}).get(big)) else ""] if big else [])
            for name, r in report["models"].items() for artifact, a in r.get("artifacts", {}).items()]
    header = (["model", "artifact", "runtime", "accuracy (%)", "95% interval", "size (MiB)",
               "of it: embeddings / encoder / rest"]
              + [f"latency {k.replace('_', ' ')} (ms)" for k in batch_keys]
              + ([f"speed-up at {big.replace('_', ' ')}"] if big else []))
    return ["## Deployment artifacts", "",
            f"Each artifact measured by running it: accuracy on the same {report['dataset']['n']} sentences (95% "
            f"bootstrap interval), size of its weight file(s) and where those bytes are, CPU latency on the same "
            f"inputs with {run['threads']} threads" + (f" on {cpu_words(run['cpu'])}" if run.get("cpu") else "")
            + ". PyTorch 4-bit is bitsandbytes NF4 (dequantized to the compute dtype on every forward); ONNX int8 is "
            "ONNX Runtime dynamic quantization. Speed-up: timed paired, run by run, next to the artifact named (the "
            "student of the same precision, or the student's export of the same kind): the median ratio of their times "
            "[distribution-free 95% interval over the runs].", ""] + _table(header, "lllrrrr" + "r" * len(batch_keys)
                                                                            + ("l" if big else ""), rows) + [""]


def comparison_table(report: dict) -> list:
    comps = report.get("comparisons", [])
    if not comps:
        return []
    rows = [[c["kind"], Path(c["evaluation"]).name, f"`{artifact_label(c['a'], c['a_artifact'])}`",
             f"`{artifact_label(c['b'], c['b_artifact'])}`", f"{c['diff_points']:+.2f}",
             f"[{c['ci_low_points']:+.2f}, {c['ci_high_points']:+.2f}]", str(c["only_a_right"]), str(c["only_b_right"]),
             _p(c["mcnemar_p"]), "significant" if c["significant"] else "not significant"] for c in comps]
    return (["## Paired comparisons", "", report["comparison_convention"] + ".", ""]
            + _table(["comparison", "evaluation", "a", "b", "a - b (points)", "95% interval", "only a right",
                      "only b right", "McNemar p", ""], "llllrrrrrl", rows) + [""])

