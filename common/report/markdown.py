"""final_report.md: `markdown_report` and its tables (frontier, accuracy by length, artifacts, comparisons)."""

import os
from pathlib import Path

from common.report.compare import artifact_label
from common.report.discover import display_label
from common.report.measure import cpu_words



def markdown_report(report: dict) -> str:
    models = report["models"]
    run = report["run"]
    files = report.get("eval_files", [])
    batch_keys = sorted({k for r in models.values() for k in r["latency_ms"]}, key=lambda k: int(k.split("_")[1]))
    lines = ["# Distill-Prune-Quantize: final report", ""]
    head = report.get("headline")
    lines += [f"**Headline.** {head['sentence']}" if head else f"**Headline.** {report.get('headline_note')}", ""]
    if report.get("skipped"):  # at the top: a model that is missing from the tables below, and why
        lines += ["**Skipped.** " + "; ".join(f"`{n}`: {why}" for n, why in report["skipped"].items()), ""]
    if head and head.get("deployment"):
        lines += [f"**Deployment.** {head['deployment']['sentence']}", ""]
    if run["quick"]:
        lines += ["> QUICK run: few latency runs and/or a slice of the data; smoke numbers, not a benchmark.", ""]
    ds = report["dataset"]
    lines += [
        f"Accuracy on {ds['name']} {ds['split']} ({ds['n']} sentences). GFLOPs: {report['flops_convention']}; "
        f"4-bit models are counted through their fp32 twin. GFLOPs/sent: mean at each sentence's real length. "
        f"Size: weight files on disk in MiB. Latency: CPU, median of {run['latency']['runs']} runs after "
        f"{run['latency']['warmup']} warm-up, {run['threads']} torch threads, {run['device']}.",
        "",
    ]
    header = (["model", "bits", "accuracy (%)", "95% interval"] + [f"acc {Path(p).name} (%)" for p in files]
              + ["GFLOPs", "GFLOPs/sent", "params (M)", "size (MiB)"]
              + [f"latency {k.replace('_', ' ')} (ms)" for k in batch_keys]
              + ["layers", "heads", "FFN neurons", "notes"])
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header) - 1)) + "|---|")
    for name, r in models.items():
        notes = []
        if r["bits"] == 4:
            notes.append(r["gflops_source"])
        if r.get("stale"):
            notes.append("STALE (upstream rebuilt)")
        if not r.get("complete", True):
            notes.append("INCOMPLETE (no metadata.json)")
        label = display_label(name)
        row = ([f"`{name}`" + (f": {label}" if label != name else ""), str(r["bits"]),
                f"{r['accuracy'] * 100:.2f}", f"[{r['accuracy_ci'][0] * 100:.1f}, {r['accuracy_ci'][1] * 100:.1f}]"]
               + [f"{r['eval_files'].get(p, float('nan')) * 100:.2f}" for p in files]
               + [f"{r['gflops']:.4g}", f"{r['gflops_per_sentence']:.4g}", f"{r['params'] / 1e6:.2f}",
                  f"{r['size_mb']:.4g}"]
               + [f"{r['latency_ms'].get(k, float('nan')):.4g}" for k in batch_keys]
               + [str(r["layers"]), str(r["heads"]), str(r["ffn_neurons"]), "; ".join(notes)])
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines += frontier_table(report, batch_keys)
    lines += length_table(report) if report.get("frontier") else []  # after the frontier, else after comparisons
    lines += artifact_table(report, batch_keys)
    lines += comparison_table(report)
    lines += [] if report.get("frontier") else length_table(report)
    if report.get("skipped") or report.get("warnings"):
        lines += ["## Warnings", ""]
        lines += [f"- {w}" for w in report.get("warnings", [])]
        lines += [f"- `{n}` skipped: {why}" for n, why in report.get("skipped", {}).items()]
        lines.append("")
    lines += [f"Run: preset {run['preset']}, git {run['git_commit']}, created {run['created']}, "
              f"{run['wall_time_s']:.0f} s.", ""]
    return "\n".join(lines)


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.2g}"


def _seed_mean(spread: dict, digits: int = 2) -> str:
    """'88.88' for one seed, '88.88 ± 0.31 (3 seeds)' for several (± = sample s.d. across seeds)."""
    if spread["n_seeds"] < 2:
        return f"{spread['mean']:.{digits}f}"
    return f"{spread['mean']:.{digits}f} ± {spread['std']:.{digits}f} ({spread['n_seeds']} seeds)"


def _versus(c: dict) -> str:
    return f"{c['diff_points']:+.2f} [{c['ci_low_points']:+.2f}, {c['ci_high_points']:+.2f}], p {_p(c['mcnemar_p'])}"


def _versus_seeds(v: dict) -> str:
    if not v:
        return ""
    per_seed = v["per_seed"]
    if len(per_seed) == 1:
        return _versus(per_seed[0])
    spread = v["diff_points_seed_spread"]
    return (f"{spread['mean']:+.2f} ± {spread['std']:.2f} over {len(per_seed)} seeds; per seed p "
            + ", ".join(_p(c["mcnemar_p"]) for c in per_seed))


def _versus_rival(row: dict) -> str:
    """ours - magnitude: one seed as a paired test; several as the per-seed differences and the spread verdict."""
    several = row.get("vs_magnitude_seeds") or {}
    if len(several.get("per_seed") or ()) < 2:
        return _versus(row["vs_magnitude"]) if row.get("vs_magnitude") else ""
    verdict = {True: "more than the seed spread", False: "NOT more than the seed spread", None: ""}[
        several["beats_by_more_than_seed_spread"]]
    return (_versus_seeds(several) + f"; means differ by {several['mean_difference_points']:+.2f} vs seed s.d. "
            f"{several['largest_seed_sd_points']:.2f}: {verdict}")


def _more_seeds(n_seeds: int) -> str:
    """' (+2 seeds)' after a seed group's first model; '' for one seed."""
    others = n_seeds - 1
    return f" (+{others} seed{'s' if others > 1 else ''})" if others else ""


def _speedup(row: dict, batch_keys) -> str:
    """The speed-up at the largest batch; when timed paired, the first seed's 95% interval in brackets."""
    speed = row.get("speedup_vs_student") or {}
    big = batch_keys[-1] if batch_keys else None
    if big not in speed:
        return ""
    detail = (row.get("speedup_detail") or {}).get(big) or {}
    if not detail.get("paired"):
        return f"{speed[big]:.2f}x (unpaired)"
    spread = detail["seed_spread"]
    sd = f" ± {spread['std']:.2f}" if spread["n_seeds"] >= 2 else ""
    return f"{speed[big]:.2f}{sd}x" + _bracket(detail["per_seed"][0]["ci"])


def _bracket(ci) -> str:
    """' [1.40, 1.51]' for a speed-up interval; '' when there is none (too few timed runs)."""
    return f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""


def frontier_table(report: dict, batch_keys) -> list:
    """The frontier (ours vs the magnitude baseline, fp32 and 4-bit, by target) and the seed groups."""
    front, groups = report.get("frontier"), report.get("seed_groups") or {}
    lines = []
    if front:
        lines += ["## Accuracy-compute frontier", "",
                  "One row per pruned model (seed group) with a sparsity target: ours = gradual Taylor pruning (a "
                  "frontier branch, or a full stage-8 run), baseline = one-shot weight-magnitude pruning with the same "
                  "short recovery. GFLOPs cut: measured, against student_model. Accuracy: mean ± sample s.d. ACROSS "
                  "TRAINING SEEDS where a group has several (seed-to-seed spread); the bracketed interval next to it "
                  "is the 95% bootstrap interval OVER SENTENCES of the first seed's model (sentence sampling). "
                  "vs student: paired on the same sentences against student_model (fp32 rows) or "
                  "distilled_quantized_student (4-bit rows): difference in points [95% paired-bootstrap interval], "
                  "exact McNemar p. ours - magnitude: the same paired test against the baseline at the same target "
                  "and precision (with several seeds: mean ± s.d. of the per-seed differences, each seed paired "
                  "with the baseline of the same seed, and whether the difference of the seed means exceeds the "
                  "larger seed-to-seed s.d.). Latency: PyTorch, as in the table above; speed-up at the largest batch "
                  "over the student of the same precision: each model's timed runs alternate one by one with the "
                  "student's, and the speed-up is the median of the per-run ratios (mean ± s.d. over seeds); the "
                  "bracket is its distribution-free 95% interval over the timed runs, for the first seed's model "
                  "(timing noise on this machine, not seed spread).", "",
                  "| target | model | method | bits | GFLOPs cut | accuracy (%) | 95% interval | vs student (points) | "
                  "ours - magnitude (points) | " + " | ".join(f"latency {k.replace('_', ' ')} (ms)" for k in batch_keys)
                  + " | speed-up |", "|---:|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * (len(batch_keys) + 1)]
        for row in front["rows"]:
            low, high = row["accuracy_ci_per_seed"][row["members"][0]]
            cut = row.get("gflops_reduction_vs_student")
            extra = _more_seeds(row["n_seeds"])
            mode = " (full run)" if row["mode"] in ("single", "sweep") else ""
            lines.append(
                f"| {100 * row['sparsity_target']:.0f}% | `{row['group']}`{extra} | "
                f"{front['methods'].get(row['method'], row['method'])}{mode} | {row['bits']} | "
                + (f"{100 * cut:.1f}%" if cut is not None else "") + f" | {_seed_mean(row['accuracy_seed_spread'])} | "
                f"[{low:.1f}, {high:.1f}] | {_versus_seeds(row.get('vs_student'))} | "
                + _versus_rival(row) + " | "
                + " | ".join(f"{row['latency_ms'][k]:.4g}" if k in row["latency_ms"] else "" for k in batch_keys)
                + f" | {_speedup(row, batch_keys)} |")
        runs = sorted(front.get("frontier_runs", {}).items(), key=lambda kv: (str(kv[1]["seed"]), kv[0]))
        for sweep_id, run in runs:
            lines.append(f"\nFrontier run {sweep_id} (seed {run['seed']}): {run['wall_time_s']:.0f} s wall time for "
                         f"the whole sweep (one gradual run with a branch per target, plus the baseline), "
                         f"{run.get('recovery_fraction')} epoch of recovery per point; details in "
                         f"models/frontier.json.")
        lines.append("")
    several = {g: e for g, e in groups.items() if e["n_seeds"] >= 2}
    if several:
        lines += ["## Seeds", "",
                  "Models that differ only by training seed. mean ± s.d.: across seeds (seed-to-seed spread); "
                  "each seed's [95% interval] is over sentences (sentence sampling).", "",
                  "| seed group | seeds | accuracy (%) mean ± s.d. | min - max | each seed: accuracy [95% interval] | "
                  "vs student (points) |", "|---|---|---:|---:|---|---:|"]
        for group, e in several.items():
            spread = e["accuracy_seed_spread"]
            per_seed = "; ".join(f"{s}: {report['models'][n]['accuracy'] * 100:.2f} "
                                 f"[{e['accuracy_ci_per_seed'][n][0]:.1f}, {e['accuracy_ci_per_seed'][n][1]:.1f}]"
                                 for n, s in zip(e["members"], e["seeds"]))
            lines.append(f"| `{group}` | {', '.join(str(s) for s in e['seeds'])} | {_seed_mean(spread)} | "
                         f"{spread['min']:.2f} - {spread['max']:.2f} | {per_seed} | "
                         f"{_versus_seeds(e.get('vs_student'))} |")
        lines.append("")
    return lines


def _words(bucket: dict) -> str:
    """'12-19 words', '5 words', or 'empty'."""
    if not bucket["words"]:
        return "empty"
    low, high = bucket["words"]
    return f"{low} words" if low == high else f"{low}-{high} words"


def _length_sentence(length: dict, frontier: bool) -> str:
    """What the buckets are (ranges and counts) and what the interval means, above the table."""
    buckets = ", ".join(f"{b['name']} {_words(b)} ({b['n']} sentences)" for b in length["buckets"])
    return (f"Buckets: the word-count quartiles of the {length['n']} validation sentences (whitespace-split words, not "
            f"tokens; sentences of equal length share a bucket): {buckets}. Accuracy in % on each bucket's sentences"
            + (" (mean over a row's training seeds; fp32 rows only)" if frontier else "") + ". Q4 vs student: "
            + ("the first seed's model" if frontier else "each pruned model") + " paired against student_model on "
            "the longest bucket's sentences only: difference in points [95% paired-bootstrap interval over the "
            "sentences within the bucket: sentence-sampling uncertainty, not seed spread], exact McNemar p.")


def _length_rows(report: dict, length: dict) -> list:
    """(first cells, bucket accuracies, vs-student entry or None) per table row."""
    if length["frontier_rows"]:
        methods = report["frontier"]["methods"]
        student = length["models"].get("student_model")
        reference = ([(["0%", "`student_model`", "unpruned student (the reference)"], student["accuracy_points"],
                       None)] if student else [])
        return reference + [([f"{100 * row['sparsity_target']:.0f}%", f"`{row['group']}`{_more_seeds(row['n_seeds'])}",
                            methods.get(row["method"], row["method"])], row["accuracy_points_mean"], row["vs_student"])
                          for row in length["frontier_rows"] if row["bits"] == 32]
    versus = {v["model"]: v for v in length["vs_student"]}
    return [([f"`{name}`", str(report["models"][name]["bits"])], length["models"][name]["accuracy_points"],
             versus.get(name)) for name in report["models"] if name in length["models"]]


def length_table(report: dict) -> list:
    """Accuracy by sentence length: one row per fp32 frontier row (both methods), or per model without a frontier;
    the four bucket accuracies and the difference against the student in the longest bucket."""
    length = report.get("by_length")
    if not length:
        return []
    frontier = bool(length["frontier_rows"])
    first = ["target", "model", "method"] if frontier else ["model", "bits"]
    header = first + [f"{b['name']}: {_words(b)} (%)" for b in length["buckets"]] + ["Q4 vs student (points)"]
    lines = ["## Accuracy by sentence length (validation)", "", _length_sentence(length, frontier), "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---:" if i == 0 and frontier else "---" for i in
                                                           range(len(first))) + "|" + "---:|" * 5]
    for cells, accuracies, versus in _length_rows(report, length):
        longest = versus["per_bucket"][-1] if versus else None
        lines.append("| " + " | ".join(cells + ["" if a is None else f"{a:.1f}" for a in accuracies]
                                       + [_versus(longest) if longest else ""]) + " |")
    return lines + [""]


def artifact_table(report: dict, batch_keys) -> list:
    """Every runnable artifact of every model, timed on the same inputs and threads in this run."""
    run = report["run"]
    cpu = run.get("cpu")
    big = batch_keys[-1] if batch_keys else None
    lines = ["## Deployment artifacts", "",
             f"Each artifact measured by running it: accuracy on the same {report['dataset']['n']} sentences (95% "
             f"bootstrap interval), size of its weight file(s), CPU latency on the same inputs with "
             f"{run['threads']} threads" + (f" on {cpu_words(cpu)}" if cpu else "") + ". PyTorch 4-bit is "
             "bitsandbytes NF4 (dequantized to the compute dtype on every forward); ONNX int8 is ONNX Runtime "
             "dynamic quantization. Speed-up: timed paired, run by run, next to the artifact named (the student "
             "of the same precision, or the student's export of the same kind): the median ratio of their times "
             "[distribution-free 95% interval over the runs].", "",
             "| model | artifact | runtime | accuracy (%) | 95% interval | size (MiB) | "
             + " | ".join(f"latency {k.replace('_', ' ')} (ms)" for k in batch_keys)
             + (f" | speed-up at {big.replace('_', ' ')} |" if big else " |"),
             "|---|---|---|---:|---:|---:|" + "---:|" * len(batch_keys) + ("---|" if big else "")]
    for name, r in report["models"].items():
        for artifact, a in r.get("artifacts", {}).items():
            low, high = a["accuracy_ci"]
            lines.append(f"| `{name}` | {a['precision']} | {a['runtime']} | {a['accuracy'] * 100:.2f} | "
                         f"[{low * 100:.1f}, {high * 100:.1f}] | {a['size_mb']:.4g} | "
                         + " | ".join(f"{a['latency_ms'].get(k, float('nan')):.4g}" for k in batch_keys)
                         + (f" | {_artifact_speedup(a, artifact, big)} |" if big else " |"))
    return lines + [""]


def _artifact_speedup(a: dict, artifact: str, big: str) -> str:
    """'1.44x [1.40, 1.51] vs `student_model`' for an artifact timed paired at batch `big`; '' otherwise."""
    paired = (a.get("speedup_vs_reference") or {}).get(big)
    if not paired:
        return ""
    return f"{paired['speedup']:.2f}x{_bracket(paired['ci'])} vs `{artifact_label(paired['reference'], artifact)}`"


def comparison_table(report: dict) -> list:
    comps = report.get("comparisons", [])
    if not comps:
        return []
    lines = ["## Paired comparisons", "", report["comparison_convention"] + ".", "",
             "| comparison | evaluation | a | b | a - b (points) | 95% interval | only a right | only b right | "
             "McNemar p | |", "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for c in comps:
        p = "< 0.001" if c["mcnemar_p"] < 0.001 else f"{c['mcnemar_p']:.2g}"
        lines.append(f"| {c['kind']} | {Path(c['evaluation']).name} | `{artifact_label(c['a'], c['a_artifact'])}` | "
                     f"`{artifact_label(c['b'], c['b_artifact'])}` | {c['diff_points']:+.2f} | "
                     f"[{c['ci_low_points']:+.2f}, {c['ci_high_points']:+.2f}] | {c['only_a_right']} | "
                     f"{c['only_b_right']} | {p} | {'significant' if c['significant'] else 'not significant'} |")
    return lines + [""]


def write_text(text: str, path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
