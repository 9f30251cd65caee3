"""final_report.png, a view of final_report.json: `plot_report` lays the figure out, one function draws each panel."""

import re
import textwrap
from pathlib import Path

from common.paths import STAGE_FOLDERS, STUDENT_SEED_RE, parse_pruned_name
from common.report.compare import METHOD_WORDS
from common.report.discover import BASELINE, FINAL, FIXED_LABELS, write_atomic

FAMILY_COLORS = {"teacher": "#6b6b6b", "student": "#1f77b4", "pruned": "#e6550d"}
METHOD_COLORS = {"taylor": FAMILY_COLORS["pruned"], "magnitude": "#756bb1"}  # ours / the magnitude baseline
MAX_MARKER_AREA = 1000.0  # pt^2 of the largest model on disk
STUDENTS = {32: STAGE_FOLDERS["student"], 4: BASELINE}  # the model each precision is timed next to (measure)


def _color(r: dict) -> str:
    if r.get("family") == "pruned" and r.get("pruning_method") == "magnitude":
        return METHOD_COLORS["magnitude"]
    return FAMILY_COLORS.get(r.get("family"), "#555555")


def _label(r: dict) -> str:
    return r["label"] + (" (stale)" if r.get("stale") else "") + ("" if r.get("complete", True) else " (incomplete)")


def _labelled(name: str) -> bool:
    """The pipeline's own models get a text label (sweep, frontier and seed points are marked by their target)."""
    return name in FIXED_LABELS or not (parse_pruned_name(name) or STUDENT_SEED_RE.match(name))


def _curves(groups: dict) -> dict:
    """{(method, bits): [seed groups]}: frontier lines from the student down (frontier points only, where any)."""
    curves = {}
    for g in groups.values():
        if g["family"] == "pruned" and g["method"] in METHOD_COLORS:
            curves.setdefault((g["method"], g["bits"]), []).append(g)
    out = {}
    for (method, bits), points in curves.items():
        if any(g["mode"] == "frontier" for g in points):
            points = [g for g in points if g["mode"] == "frontier"]
        start = [groups[STUDENTS[bits]]] if STUDENTS[bits] in groups else []
        out[(method, bits)] = start + sorted(points, key=lambda g: -g["gflops"])
    return out


def _scale_x(ax, xs) -> None:
    import matplotlib.ticker  # in the body: matplotlib is slow to import and only the chart needs it

    low, high = min(xs), max(xs)
    if low > 0 and high / low > 3:  # far apart: a log axis keeps the close points apart
        ax.set_xscale("log")
        ax.set_xlim(low / 1.3, high * 1.3)
        nice = [m * 10.0 ** e for e in range(-4, 6) for m in (1, 1.5, 2, 3, 5, 7)]
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator([t for t in nice if low / 1.3 <= t <= high * 1.3]))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    else:
        span = (high - low) or high or 1.0
        ax.set_xlim(max(0.0, low - 0.15 * span), high + 0.15 * span)


def _accuracy_panel(ax, report: dict, model_x, group_x, more=()) -> list:
    """Accuracy against x = model_x(name) -> (x, 95% interval or None) or None, group_x(seed group) -> x or None:
    marker area = size on disk, circle fp32, diamond 4-bit, thin bars = 95% intervals, frontier lines through the
    seed-group means with +-1 s.d. across seeds. `more`: (x, y) the axes must hold too. Returns _place_labels items."""
    models, groups = report["models"], report["seed_groups"]
    biggest = max(r["size_mb"] for r in models.values()) or 1.0
    area = {n: max(r["size_mb"] / biggest * MAX_MARKER_AREA, 15.0) for n, r in models.items()}
    xs_all, ys_all = [x for x, _ in more], [y for _, y in more]
    for (method, bits), points in _curves(groups).items():
        pts = [(group_x(g), g["accuracy_seed_spread"]["mean"], g) for g in points if group_x(g) is not None]
        if len(pts) >= 2:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-" if bits == 32 else "--", color=METHOD_COLORS[method],
                    alpha=0.65, lw=1.6, zorder=1)
        for x, y, g in pts:
            if g["target_sparsity"] is not None:
                ax.annotate(f"{round(100 * g['target_sparsity'])}", (x, y), xytext=(5, 5 if bits == 32 else -10),
                            textcoords="offset points", fontsize=6.5, color=METHOD_COLORS[method], zorder=5)
    for name in sorted(models, key=lambda n: -area[n]):  # big markers first, small ones stay visible on top
        if model_x(name) is None:
            continue
        r, (x, ci) = models[name], model_x(name)
        color, four, y = _color(r), r["bits"] == 4, r["accuracy"] * 100
        ax.scatter(x, y, s=area[name], marker="D" if four else "o", facecolor="white" if four else color,
                   edgecolor=color, linewidth=2.0 if four else 0.8, alpha=1.0 if four else 0.6, zorder=3 if four else 2)
        low, high = (100 * v for v in r["accuracy_ci"])  # 95% bootstrap interval over sentences
        ax.errorbar(x, y, yerr=[[y - low], [high - y]], xerr=[[x - ci[0]], [ci[1] - x]] if ci else None, fmt="none",
                    ecolor=color, elinewidth=1.0, alpha=0.45, capsize=3, zorder=1)
        xs_all += [x, *(ci or ())]
        ys_all += [y, low, high]
    for g in groups.values():  # seed-to-seed spread where a group has several seeds
        if g["n_seeds"] >= 2 and group_x(g) is not None:
            mean, std = g["accuracy_seed_spread"]["mean"], g["accuracy_seed_spread"]["std"]
            ax.errorbar(group_x(g), mean, yerr=std, fmt="_", color="black", markersize=12, elinewidth=2.2, capsize=5,
                        capthick=2.0, zorder=4)
            ys_all += [mean - std, mean + std]
    if xs_all:
        _scale_x(ax, xs_all)
        yspan = max(max(ys_all) - min(ys_all), 1.0)
        ax.set_ylim(min(ys_all) - 0.08 * yspan, max(ys_all) + 0.08 * yspan)
    ax.grid(alpha=0.3)
    ax.set_ylabel(f"accuracy on {report['dataset']['name'].upper()} {report['dataset']['split']} (%)")
    return [(model_x(n)[0], models[n]["accuracy"] * 100, _label(models[n]), (area[n] ** 0.5) / 2,
             "below" if models[n]["bits"] == 4 else "above")
            for n in sorted(models, key=lambda n: (models[n]["bits"] == 4, -models[n]["gflops"]))
            if _labelled(n) and model_x(n) is not None]


def _gflops_panel(ax, report: dict) -> list:
    """Accuracy vs GFLOPs (4-bit models at their fp32 twin's count)."""
    items = _accuracy_panel(ax, report, lambda n: (report["models"][n]["gflops"], None), lambda g: g["gflops"])
    seq = re.search(r"sequence length (\d+)", report["flops_convention"])
    ax.set_xlabel(f"GFLOPs per forward pass (fvcore, batch 1, {seq.group(1) if seq else '?'} tokens; "
                  f"4-bit counted on its fp32 twin)" + ("; log scale" if ax.get_xscale() == "log" else ""))
    ax.set_title("Accuracy vs compute (up and to the left is better)", fontsize=11)
    return items


def _speedup_panel(ax, report: dict, big: str) -> tuple:
    """Accuracy vs the PAIRED speed-up over the student of the same precision at batch `big` (x bar: its 95% interval
    over the timed runs); the students at 1x, a model without one left out with a note; triangles: the ONNX int8
    exports against the student's (at 1x). Returns (label items, whether any ONNX point was drawn)."""
    models = report["models"]

    def paired(r: dict, artifact: str = "pytorch"):
        return r["artifacts"].get(artifact, {}).get("speedup_vs_reference", {}).get(big)

    def model_x(name: str):
        r, p = models[name], paired(models[name])
        if name == STUDENTS.get(r["bits"]):
            return 1.0, None
        return (p["speedup"], p["ci"]) if p and p["reference"] == STUDENTS.get(r["bits"]) else None

    def group_x(g: dict):
        speed, detail = g.get("speedup_vs_student") or {}, (g.get("speedup_detail") or {}).get(big) or {}
        if g["members"][0] == STUDENTS.get(g["bits"]):
            return 1.0
        return speed[big] if detail.get("paired") and speed["reference"] == STUDENTS.get(g["bits"]) else None

    onnx_students, onnx = {p["reference"] for r in models.values() if (p := paired(r, "onnx_int8"))}, []
    for name, r in models.items():
        if name in onnx_students or paired(r, "onnx_int8"):
            p = paired(r, "onnx_int8") if name not in onnx_students else {"speedup": 1.0, "ci": None}
            onnx.append((name, r["artifacts"]["onnx_int8"]["accuracy"] * 100, p["speedup"], p["ci"]))
    items = _accuracy_panel(ax, report, model_x, group_x, [(v, y) for _, y, x, ci in onnx for v in (x, *(ci or ()))])
    for name, y, x, ci in onnx:  # the CPU serving artifact of the same model: where a user would deploy it
        color = FAMILY_COLORS.get(models[name]["family"], "#555555")
        ax.scatter(x, y, s=60, marker="^", facecolor=color, edgecolor="black", linewidth=0.6, zorder=4)
        if ci:
            ax.errorbar(x, y, xerr=[[x - ci[0]], [ci[1] - x]], fmt="none", ecolor=color, elinewidth=1.0, alpha=0.45,
                        capsize=3, zorder=1)
        if name == FINAL:
            ax.annotate("final, ONNX int8", (x, y), xytext=(0, -14), textcoords="offset points", ha="center",
                        fontsize=8, fontweight="bold")
    ax.axvline(1.0, color="#999999", lw=0.8, ls=":", zorder=0)
    left_out = [n for n in models if model_x(n) is None]
    if left_out:
        ax.text(0.01, 0.01, textwrap.fill("not placed (no paired speed-up over the student of its precision): "
                                          + ", ".join(left_out), 110), transform=ax.transAxes, fontsize=6.5,
                color="#555555")
    threads = report["run"]["threads"]
    ax.set_xlabel(f"speed-up over the student (paired, {big.replace('_', ' ')}; {threads} thread"
                  f"{'s' if threads != 1 else ''}; triangles: ONNX int8 vs the student's)"
                  + ("; log scale" if ax.get_xscale() == "log" else ""))
    ax.set_title("Accuracy vs paired speed-up over the student (up and to the right is better)", fontsize=11)
    return items, bool(onnx)


def _place_labels(ax, fig, items):
    """Label each (x, y, text, marker radius in points, "above" | "below") at the first spot around it (preferred side
    first, then ring by ring further out) that overlaps no marker or earlier label and stays inside the axes."""
    from matplotlib.transforms import Bbox  # in the body: matplotlib is slow to import (chart only)

    renderer, to_px = fig.canvas.get_renderer(), fig.dpi / 72.0
    frame = ax.get_window_extent(renderer)
    taken = []  # the markers themselves, then each label placed
    for x, y, _, radius, _ in items:
        (px, py), r = ax.transData.transform((x, y)), radius * to_px * 0.8
        taken.append(Bbox([[px - r, py - r], [px + r, py + r]]))

    def label(x, y, text, offset, ha, va, leader):
        return ax.annotate(text, (x, y), xytext=offset, textcoords="offset points", ha=ha, va=va, fontsize=8,
                           fontweight="bold" if text.endswith(("(final)", "(baseline)")) else "normal", zorder=5,
                           bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.75),
                           arrowprops=dict(arrowstyle="-", lw=0.6, color="#777777", shrinkA=0, shrinkB=2)
                           if leader else None)

    for x, y, text, radius, prefer in items:
        v, best = (1 if prefer == "above" else -1), None  # best: (clashes, offset, ha, va, leader, box)
        for ring, (dx, dy) in ((r, d) for r in range(6) for d in [(0, v), (1, 0), (-1, 0), (0, -v), (1, v), (-1, v),
                                                                   (1, -v), (-1, -v)]):
            gap = radius + 2 + 12 * ring
            offset = (dx * gap * (0.8 if dy else 1.0), dy * gap)
            ha, va = ("center", "left", "right")[dx], ("center", "bottom", "top")[dy]
            ann = label(x, y, text, offset, ha, va, leader=False)  # measured without its leader line
            box = ann.get_window_extent(renderer)
            ann.remove()
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            clashes = sum(box.overlaps(other) for other in taken) + (0 if inside else 100)
            if best is None or clashes < best[0]:
                best = (clashes, offset, ha, va, ring > 0, box)
            if clashes == 0:
                break
        label(x, y, text, *best[1:5])
        taken.append(best[5])


def _legend(fig, report: dict, onnx: bool, top: float) -> None:
    """The legend of the two accuracy panels, below them (`top`: its top, as a fraction of the figure height)."""
    from matplotlib.lines import Line2D  # in the body: matplotlib is slow to import (chart only)

    models, groups = report["models"], report["seed_groups"]
    handles = [Line2D([], [], marker="o", ls="", markerfacecolor="#999999", markeredgecolor="#999999", alpha=0.7,
                      markersize=9, label="fp32"),
               Line2D([], [], marker="D", ls="", markerfacecolor="white", markeredgecolor="#555555",
                      markeredgewidth=2, markersize=8, label="4-bit (bitsandbytes NF4)")]
    handles += [Line2D([], [], marker="s", ls="", color=c, markersize=9, label="pruned (ours)" if f == "pruned" else f)
                for f, c in FAMILY_COLORS.items() if any(r["family"] == f for r in models.values())]
    if any(r.get("pruning_method") == "magnitude" for r in models.values()):
        handles.append(Line2D([], [], marker="s", ls="", color=METHOD_COLORS["magnitude"], markersize=9,
                              label="pruned by magnitude (baseline)"))
    handles += [Line2D([], [], ls="-" if bits == 32 else "--", color=METHOD_COLORS[method], alpha=0.8,
                       label=f"{METHOD_WORDS.get(method, method)}, {'fp32' if bits == 32 else '4-bit'}")
                for (method, bits), points in sorted(_curves(groups).items(), key=lambda kv: (kv[0][0] != "taylor",
                                                                                              -kv[0][1]))
                if len(points) >= 2]
    if onnx:
        handles.append(Line2D([], [], marker="^", ls="", markerfacecolor="#999999", markeredgecolor="black",
                              markersize=8, label="ONNX Runtime int8 export (right panel)"))
    handles.append(Line2D([], [], color="#777777", marker="|", markersize=10, lw=1,
                          label="thin bars: 95% intervals (accuracy: over sentences; speed-up: over timed runs)"))
    if any(g["n_seeds"] >= 2 for g in groups.values()):
        handles.append(Line2D([], [], color="black", lw=2.2, marker="_", markersize=12,
                              label="thick bar: mean +-1 s.d. across seeds"))
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, top), ncol=5, fontsize=8, frameon=False,
               title="marker area = size on disk; small numbers = % fewer encoder GFLOPs targeted", title_fontsize=8)


def _length_panel(ax, by_length: dict, method: str) -> None:
    """Accuracy by length bucket of one method's fp32 frontier rows (seed means) and of the student (black)."""
    import matplotlib.pyplot as plt  # (matplotlib: chart only)

    buckets, shades = by_length["buckets"], plt.get_cmap("YlOrRd" if method == "taylor" else "PuBu")
    student = by_length["models"].get(STAGE_FOLDERS["student"], {}).get("accuracy_points")
    rows = sorted((r for r in by_length["frontier_rows"] if r["method"] == method and r["bits"] == 32
                   and r["target_sparsity"] is not None), key=lambda r: r["target_sparsity"])

    def line(values, fmt, **style) -> list:  # an empty bucket has no value
        pts = [(x, y) for x, y in enumerate(values) if y is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], fmt, **style)
        return pts

    for i, row in enumerate(rows):
        color = shades(0.35 + 0.65 * i / max(len(rows) - 1, 1))
        pts = line(row["accuracy_points_mean"], "-o", color=color, lw=1.4, markersize=3.5)
        if pts:
            ax.annotate(f"{round(100 * row['target_sparsity'])}", pts[-1], xytext=(4, 0), textcoords="offset points",
                        va="center", fontsize=6.5, color=color)
    if student:
        line(student, "-s", color="black", lw=2.2, markersize=4, label="student")
        ax.legend(loc="lower left", fontsize=8, frameon=False)
    ax.set_xticks(range(len(buckets)))
    ax.set_xticklabels([f"{b['name']}: " + (f"{b['words'][0]}-{b['words'][1]} words" if b.get("words") else "empty")
                        + f" (n={b['n']})" for b in buckets], fontsize=8)  # a bucket is empty where lengths tie
    ax.set_xlim(-0.3, len(buckets) - 0.6)
    ax.set_ylabel("accuracy (%), mean over seeds")
    ax.set_title(f"Accuracy by sentence length: {METHOD_WORDS.get(method, method)}, fp32", fontsize=11)
    ax.grid(axis="y", alpha=0.3)


def plot_report(report: dict, path) -> None:
    """Accuracy vs GFLOPs and vs paired speed-up, and accuracy by length (frontier reports). Sizes and latencies are
    in final_report.md's tables."""
    import matplotlib  # in the body: matplotlib is slow to import and only the chart needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # (matplotlib: chart only, see above)

    models, length = report["models"], report.get("by_length") or {}
    batch_keys = sorted({k for r in models.values() for k in r["latency_ms"]}, key=lambda k: int(k.split("_")[1]))
    methods = [m for m in METHOD_COLORS if any(r["method"] == m and r["bits"] == 32
                                               for r in length.get("frontier_rows") or [])]
    # in inches: title, the two accuracy panels, their legend, accuracy by length
    title_h, top_h, legend_h, length_h = 1.2, 4.8, 1.6, 4.2 if methods else 0.0
    height = title_h + top_h + legend_h + length_h + 0.3
    fig = plt.figure(figsize=(16, height))
    top = fig.add_gridspec(1, 2, left=0.05, right=0.99, top=1 - title_h / height,
                           bottom=1 - (title_h + top_h) / height, wspace=0.16)
    if methods:
        middle = fig.add_gridspec(1, 2, left=0.05, right=0.99, top=1 - (title_h + top_h + legend_h) / height,
                                  bottom=1 - (title_h + top_h + legend_h + length_h - 0.9) / height, wspace=0.16)
        for i, method in enumerate(methods):
            _length_panel(fig.add_subplot(middle[i]), length, method)
    ax_flops, ax_speed = fig.add_subplot(top[0]), fig.add_subplot(top[1])
    flops_items = _gflops_panel(ax_flops, report)
    speed_items, onnx = _speedup_panel(ax_speed, report, batch_keys[-1]) if batch_keys else ([], False)
    _legend(fig, report, onnx, 1 - (title_h + top_h + 0.5) / height)
    head = report.get("headline")
    quick = "   [QUICK run: smoke numbers, not a benchmark]" if report["run"]["quick"] else ""
    fig.suptitle("Distill-Prune-Quantize on SST-2" + quick, fontsize=13, y=1 - 0.15 / height)
    fig.text(0.5, 1 - 0.5 / height, textwrap.fill(head["sentence"] if head else report.get("headline_note", ""), 190),
             ha="center", va="top", fontsize=9.5, style="italic")
    fig.canvas.draw()  # labels are placed against the final layout
    _place_labels(ax_flops, fig, flops_items)
    _place_labels(ax_speed, fig, speed_items)
    write_atomic(Path(path), lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
