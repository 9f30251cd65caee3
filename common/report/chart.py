"""final_report.png: `plot_report` and its helpers (labels, colors, panels)."""

import os
import re
import textwrap
from pathlib import Path

from common.paths import STAGE_FOLDERS, STUDENT_SEED_RE, parse_pruned_name
from common.report.compare import METHOD_WORDS, seed_groups
from common.report.discover import BASELINE, FINAL, FIXED_LABELS, display_label


FAMILY_COLORS = {"teacher": "#6b6b6b", "student": "#1f77b4", "pruned": "#e6550d"}
METHOD_COLORS = {"taylor": FAMILY_COLORS["pruned"], "magnitude": "#756bb1"}  # ours / the magnitude baseline
MAX_MARKER_AREA = 1000.0  # pt^2 of the largest model on disk


def _color(r: dict) -> str:
    if r.get("family") == "pruned" and r.get("pruning_method") == "magnitude":
        return METHOD_COLORS["magnitude"]
    return FAMILY_COLORS.get(r.get("family"), "#555555")


def _curves(groups: dict) -> dict:
    """{(method, bits): [seed group entries]}: the frontier lines through the seed-group means, from the student of
    that precision (student_model / distilled_quantized_student) down to the smallest model; frontier points only
    where a frontier run exists for that method (else every pruned group of it)."""
    starts = {32: STAGE_FOLDERS["student"], 4: BASELINE}
    curves = {}
    for g in groups.values():
        if g["family"] == "pruned" and g["method"] in METHOD_COLORS:
            curves.setdefault((g["method"], g["bits"]), []).append(g)
    out = {}
    for (method, bits), points in curves.items():
        if any(g["mode"] == "frontier" for g in points):
            points = [g for g in points if g["mode"] == "frontier"]
        start = [groups[starts[bits]]] if starts[bits] in groups else []
        out[(method, bits)] = start + sorted(points, key=lambda g: -g["gflops"])
    return out


def _labelled(name: str) -> bool:
    """Models that get a text label on the chart: the pipeline's own (sweep, frontier, seed and baseline points are
    drawn as lines and marked with their target instead)."""
    return name in FIXED_LABELS or not (parse_pruned_name(name) or STUDENT_SEED_RE.match(name))


def _scale_x(ax, xs) -> None:
    import matplotlib.ticker  # in the body: matplotlib is slow to import and only the chart needs it

    xspan = (max(xs) - min(xs)) or max(xs) or 1.0
    if min(xs) > 0 and max(xs) / min(xs) > 3:  # teacher far right: a log axis keeps the pruned points apart
        ax.set_xscale("log")
        ax.set_xlim(min(xs) / 1.3, max(xs) * 1.3)
        nice = [m * 10.0 ** e for e in range(-4, 6) for m in (1, 1.5, 2, 3, 5, 7)]
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(
            [t for t in nice if min(xs) / 1.3 <= t <= max(xs) * 1.3]))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    else:
        ax.set_xlim(max(0.0, min(xs) - 0.15 * xspan), max(xs) + 0.15 * xspan)


def _accuracy_panel(ax, models: dict, groups: dict, x_of, area: dict, labels: dict) -> list:
    """Accuracy against one cost (x_of: record -> x, or None when not measured) for every model: marker area = size on
    disk, circle fp32, diamond 4-bit, thin bar = 95% bootstrap interval over sentences; frontier lines through the
    seed-group means, thick capped bar = +-1 s.d. across seeds. Returns the label items for _place_labels."""
    ys_all, xs_all = [], []
    for (method, bits), points in _curves(groups).items():
        pts = [(x_of(g), g["accuracy_seed_spread"]["mean"], g) for g in points if x_of(g) is not None]
        if len(pts) >= 2:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-" if bits == 32 else "--", color=METHOD_COLORS[method],
                    alpha=0.65, lw=1.6, zorder=1)
        for x, y, g in pts:
            if g["sparsity_target"] is not None:
                ax.annotate(f"{round(100 * g['sparsity_target'])}", (x, y), xytext=(5, 5 if bits == 32 else -10),
                            textcoords="offset points", fontsize=6.5, color=METHOD_COLORS[method], zorder=5)
    for name in sorted(models, key=lambda n: -area[n]):  # big markers first, small ones stay visible on top
        r = models[name]
        x = x_of(r)
        if x is None:
            continue
        color, four, y = _color(r), r["bits"] == 4, r["accuracy"] * 100
        ax.scatter(x, y, s=area[name], marker="D" if four else "o", facecolor="white" if four else color,
                   edgecolor=color, linewidth=2.0 if four else 0.8, alpha=1.0 if four else 0.6, zorder=3 if four else 2)
        xs_all.append(x)
        ys_all.append(y)
        if r.get("accuracy_ci"):  # 95% bootstrap interval over sentences
            low, high = (100 * v for v in r["accuracy_ci"])
            ax.errorbar(x, y, yerr=[[y - low], [high - y]], fmt="none", ecolor=color, elinewidth=1.0, alpha=0.45,
                        capsize=3, zorder=1)
            ys_all += [low, high]
    for g in groups.values():  # seed-to-seed spread where a group has several seeds
        x = x_of(g)
        if g["n_seeds"] >= 2 and x is not None:
            spread = g["accuracy_seed_spread"]
            ax.errorbar(x, spread["mean"], yerr=spread["std"], fmt="_", color="black", markersize=12,
                        elinewidth=2.2, capsize=5, capthick=2.0, zorder=4)
            ys_all += [spread["mean"] - spread["std"], spread["mean"] + spread["std"]]
    if xs_all:
        _scale_x(ax, xs_all)
        yspan = max(max(ys_all) - min(ys_all), 1.0)
        ax.set_ylim(min(ys_all) - 0.08 * yspan, max(ys_all) + 0.08 * yspan)
    ax.grid(alpha=0.3)
    return [(x_of(models[n]), models[n]["accuracy"] * 100, labels[n], (area[n] ** 0.5) / 2,
             "below" if models[n]["bits"] == 4 else "above")
            for n in sorted(models, key=lambda n: (models[n]["bits"] == 4, -models[n]["gflops"]))
            if _labelled(n) and x_of(models[n]) is not None]


def _place_labels(ax, fig, items):
    """Annotate points without clutter: try positions around each point (its preferred side first, then
    right, left, the other side, diagonals), moving further out step by step, and keep the first one that
    overlaps no marker and no earlier label and stays inside the axes. A label not right next to its point
    gets a thin leader line.

    items: (x, y, text, marker radius in points, prefer "above" | "below")."""
    renderer = fig.canvas.get_renderer()
    to_px = fig.dpi / 72.0
    frame = ax.get_window_extent(renderer)
    taken = []
    for x, y, _, radius, _ in items:  # the markers themselves
        px, py = ax.transData.transform((x, y))
        r = radius * to_px * 0.8
        taken.append(matplotlib_bbox(px - r, py - r, px + r, py + r))

    def label(x, y, text, offset, ha, va, leader):
        bold = text.endswith(("(final)", "(baseline)"))
        return ax.annotate(text, (x, y), xytext=offset, textcoords="offset points", ha=ha, va=va, fontsize=8,
                           fontweight="bold" if bold else "normal", zorder=5,
                           bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.75),
                           arrowprops=dict(arrowstyle="-", lw=0.6, color="#777777", shrinkA=0, shrinkB=2)
                           if leader else None)

    for x, y, text, radius, prefer in items:
        v = 1 if prefer == "above" else -1
        directions = [(0, v), (1, 0), (-1, 0), (0, -v), (1, v), (-1, v), (1, -v), (-1, -v)]
        best = None  # (clashes, offset, ha, va, leader, box)
        for ring in range(6):
            for dx, dy in directions:
                gap = radius + 2 + 12 * ring
                offset = (dx * gap * (0.8 if dy else 1.0), dy * gap)
                ha = "center" if dx == 0 else ("left" if dx > 0 else "right")
                va = "center" if dy == 0 else ("bottom" if dy > 0 else "top")
                ann = label(x, y, text, offset, ha, va, leader=False)  # measured without its leader line
                box = ann.get_window_extent(renderer)
                ann.remove()
                inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
                clashes = sum(box.overlaps(other) for other in taken) + (0 if inside else 100)
                if best is None or clashes < best[0]:
                    best = (clashes, offset, ha, va, ring > 0, box)
                if clashes == 0:
                    break
            if best[0] == 0:
                break
        label(x, y, text, *best[1:5])
        taken.append(best[5])


def matplotlib_bbox(x0, y0, x1, y1):
    from matplotlib.transforms import Bbox  # in the body: matplotlib is slow to import (chart only)

    return Bbox([[x0, y0], [x1, y1]])


def _length_panel(ax, by_length: dict, method: str) -> None:
    """Accuracy per sentence-length bucket (validation word-count quartiles) of one method's fp32 frontier rows, mean
    over seeds, one line per target from light (least pruned) to dark, against the fp32 student (black)."""
    import matplotlib.pyplot as plt  # (matplotlib: chart only)

    buckets = by_length["buckets"]
    xs = list(range(len(buckets)))
    student = by_length["models"].get(STAGE_FOLDERS["student"], {}).get("accuracy_points")
    rows = sorted((r for r in by_length["frontier_rows"] if r["method"] == method and r["bits"] == 32
                   and r["sparsity_target"] is not None), key=lambda r: r["sparsity_target"])
    shades = plt.get_cmap("YlOrRd" if method == "taylor" else "PuBu")

    def line(values, fmt, **style) -> list:
        """Plot the buckets that have a value (an empty bucket has none); returns the points drawn."""
        pts = [(x, y) for x, y in zip(xs, values) if y is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], fmt, **style)
        return pts

    for i, row in enumerate(rows):
        color = shades(0.35 + 0.65 * i / max(len(rows) - 1, 1))
        pts = line(row["accuracy_points_mean"], "-o", color=color, lw=1.4, markersize=3.5)
        if pts:
            ax.annotate(f"{round(100 * row['sparsity_target'])}", pts[-1], xytext=(4, 0), textcoords="offset points",
                        va="center", fontsize=6.5, color=color)
    if student:
        line(student, "-s", color="black", lw=2.2, markersize=4, label="student")
        ax.legend(loc="lower left", fontsize=8, frameon=False)
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{b['name']}: " + (f"{b['words'][0]}-{b['words'][1]} words" if b.get("words") else "empty")
                        + f" (n={b['n']})" for b in buckets], fontsize=8)  # a bucket is empty where lengths tie
    ax.set_xlim(-0.3, len(xs) - 0.6)
    ax.set_ylabel("accuracy (%), mean over seeds")
    ax.set_title(f"Accuracy by sentence length: {METHOD_WORDS.get(method, method)}, fp32", fontsize=11)
    ax.grid(axis="y", alpha=0.3)


def plot_report(report: dict, path) -> None:
    """Top: accuracy vs GFLOPs and accuracy vs measured CPU latency at the largest batch timed (marker area = size on
    disk, circle = fp32, diamond = 4-bit; frontier lines for ours and the magnitude baseline, fp32 solid, 4-bit
    dashed; thin bars = 95% bootstrap interval over sentences, thick capped bars = +-1 s.d. across seeds).
    Middle (when the report has frontier rows): accuracy by sentence length, one panel per pruning method.
    Bottom: per-model size and latency bars."""
    import matplotlib  # in the body: matplotlib is slow to import and only the chart needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # (matplotlib: chart only, see above)
    from matplotlib.lines import Line2D  # (matplotlib: chart only)

    models = report["models"]
    groups = report.get("seed_groups") or seed_groups(models, report["run"]["latency"]["seed"])
    names = list(models)
    labels = {n: display_label(n) + (" (stale)" if models[n].get("stale") else "")
              + ("" if models[n].get("complete", True) else " (incomplete)") for n in names}
    batch_keys = sorted({k for r in models.values() for k in r["latency_ms"]}, key=lambda k: int(k.split("_")[1]))
    big = batch_keys[-1] if batch_keys else None

    length = report.get("by_length") or {}
    length_methods = [m for m in METHOD_COLORS if any(r["method"] == m and r["bits"] == 32
                                                      for r in length.get("frontier_rows") or [])]
    # geometry in inches: title, the two accuracy panels, their legend, accuracy by length (frontier reports only),
    # the bars (one row per model)
    title_h, top_h, legend_h, bar_h, bottom_h = 1.2, 4.8, 1.6, max(2.6, 0.32 * len(names)), 0.6
    length_h = 4.2 if length_methods else 0.0
    height = title_h + top_h + legend_h + length_h + bar_h + bottom_h
    fig = plt.figure(figsize=(16, height))
    top = fig.add_gridspec(1, 2, left=0.05, right=0.99, top=1 - title_h / height,
                           bottom=1 - (title_h + top_h) / height, wspace=0.16)
    if length_methods:
        middle = fig.add_gridspec(1, 2, left=0.05, right=0.99, top=1 - (title_h + top_h + legend_h) / height,
                                  bottom=1 - (title_h + top_h + legend_h + length_h - 0.9) / height, wspace=0.16)
        for i, method in enumerate(length_methods):
            _length_panel(fig.add_subplot(middle[i]), length, method)
    bottom = fig.add_gridspec(1, 2, left=0.17, right=0.99, top=(bar_h + bottom_h) / height,
                              bottom=bottom_h / height, wspace=0.05)
    ax, ax_speed = fig.add_subplot(top[0]), fig.add_subplot(top[1])
    ax_size = fig.add_subplot(bottom[0])
    ax_lat = fig.add_subplot(bottom[1], sharey=ax_size)

    biggest = max(r["size_mb"] for r in models.values()) or 1.0
    area = {n: max(r["size_mb"] / biggest * MAX_MARKER_AREA, 15.0) for n, r in models.items()}
    seq = re.search(r"sequence length (\d+)", report["flops_convention"])
    accuracy_words = (f"accuracy on {report['dataset']['name'].upper()} {report['dataset']['split']} (%)")
    flops_items = _accuracy_panel(ax, models, groups, lambda r: r["gflops"], area, labels)
    ax.set_xlabel(f"GFLOPs per forward pass (fvcore, batch 1, {seq.group(1) if seq else '?'} tokens; "
                  f"4-bit counted on its fp32 twin)" + ("; log scale" if ax.get_xscale() == "log" else ""))
    ax.set_ylabel(accuracy_words)
    ax.set_title("Accuracy vs compute (up and to the left is better)", fontsize=11)
    speed_items = _accuracy_panel(ax_speed, models, groups, lambda r: r["latency_ms"].get(big) if big else None,
                                  area, labels)
    onnx_points = [(n, r["artifacts"]["onnx_int8"]) for n, r in models.items()
                   if big and big in r.get("artifacts", {}).get("onnx_int8", {}).get("latency_ms", {})]
    for name, a in onnx_points:  # the CPU serving artifact of the same model: where a user would deploy it
        color = FAMILY_COLORS.get(models[name]["family"], "#555555")
        ax_speed.scatter(a["latency_ms"][big], a["accuracy"] * 100, s=60, marker="^", facecolor=color,
                         edgecolor="black", linewidth=0.6, zorder=4)
        if name == FINAL:
            ax_speed.annotate("final, ONNX int8", (a["latency_ms"][big], a["accuracy"] * 100), xytext=(0, -14),
                              textcoords="offset points", ha="center", fontsize=8, fontweight="bold")
    if onnx_points:
        low = min(a["latency_ms"][big] for _, a in onnx_points)
        left, right = ax_speed.get_xlim()
        if low < left:
            ax_speed.set_xlim(low / 1.3, right)
    threads = report["run"]["threads"]
    ax_speed.set_xlabel(f"CPU latency at {big.replace('_', ' ') if big else '?'}, median ms "
                        f"({threads} thread{'s' if threads != 1 else ''}; triangles: ONNX Runtime int8)"
                        + ("; log scale" if ax_speed.get_xscale() == "log" else ""))
    ax_speed.set_ylabel(accuracy_words)
    ax_speed.set_title("Accuracy vs measured latency (up and to the left is better)", fontsize=11)

    handles = [
        Line2D([], [], marker="o", ls="", markerfacecolor="#999999", markeredgecolor="#999999", alpha=0.7,
               markersize=9, label="fp32"),
        Line2D([], [], marker="D", ls="", markerfacecolor="white", markeredgecolor="#555555",
               markeredgewidth=2, markersize=8, label="4-bit (bitsandbytes NF4)"),
    ]
    handles += [Line2D([], [], marker="s", ls="", color=c, markersize=9, label="pruned (ours)" if f == "pruned" else f)
                for f, c in FAMILY_COLORS.items() if any(r["family"] == f for r in models.values())]
    if any(r.get("pruning_method") == "magnitude" for r in models.values()):
        handles.append(Line2D([], [], marker="s", ls="", color=METHOD_COLORS["magnitude"], markersize=9,
                              label="pruned by magnitude (baseline)"))
    for (method, bits), points in sorted(_curves(groups).items(), key=lambda kv: (kv[0][0] != "taylor", -kv[0][1])):
        if len(points) >= 2:
            handles.append(Line2D([], [], ls="-" if bits == 32 else "--", color=METHOD_COLORS[method], alpha=0.8,
                                  label=f"{METHOD_WORDS.get(method, method)}, {'fp32' if bits == 32 else '4-bit'}"))
    if onnx_points:
        handles.append(Line2D([], [], marker="^", ls="", markerfacecolor="#999999", markeredgecolor="black",
                              markersize=8, label="ONNX Runtime int8 export (right panel)"))
    handles.append(Line2D([], [], color="#777777", marker="|", markersize=10, lw=1,
                          label="thin bar: 95% bootstrap interval over sentences"))
    if any(g["n_seeds"] >= 2 for g in groups.values()):
        handles.append(Line2D([], [], color="black", lw=2.2, marker="_", markersize=12,
                              label="thick bar: mean +-1 s.d. across seeds"))
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1 - (title_h + top_h + 0.5) / height),
               ncol=5, fontsize=8, frameon=False,
               title="marker area = size on disk; small numbers = % fewer encoder GFLOPs targeted", title_fontsize=8)

    # Bottom: size and latency per model, in table order (top to bottom)
    rows = list(range(len(names)))[::-1]
    colors = [_color(models[n]) for n in names]
    sizes = [models[n]["size_mb"] for n in names]
    bars = ax_size.barh(rows, sizes, color=colors, alpha=0.85, edgecolor="white", height=0.7)
    for bar, n in zip(bars, names):
        if models[n]["bits"] == 4:
            bar.set_hatch("////")
    for y, v in zip(rows, sizes):
        ax_size.text(v, y, f" {v:.3g}", va="center", fontsize=8)
    ax_size.set_yticks(rows)
    ax_size.set_yticklabels([f"{labels[n]}\n{n}" if labels[n] != n else n for n in names], fontsize=8)
    ax_size.set_ylim(-0.6, len(names) - 0.4)
    ax_size.set_xlabel("weight files on disk (MiB)")
    ax_size.set_xlim(0, max(sizes) * 1.25)
    ax_size.set_title("Size on disk (hatched = 4-bit)", fontsize=11)
    ax_size.grid(axis="x", alpha=0.3)

    height_bar = 0.7 / max(len(batch_keys), 1)
    shades = [0.4, 0.95, 0.7, 0.25]
    longest = 0.0
    for i, key in enumerate(batch_keys):
        offset = ((len(batch_keys) - 1) / 2 - i) * height_bar
        values = [models[n]["latency_ms"].get(key, 0.0) for n in names]
        longest = max([longest] + values)
        ax_lat.barh([y + offset for y in rows], values, height=height_bar, color=colors,
                    alpha=shades[i % len(shades)], edgecolor="white")
        for y, v in zip(rows, values):
            ax_lat.text(v, y + offset, f" {v:.3g}", va="center", fontsize=7)
    ax_lat.set_xlim(0, (longest or 1.0) * 1.25)
    ax_lat.tick_params(axis="y", labelleft=False)
    ax_lat.set_xlabel(f"CPU latency, median ms per forward pass ({threads} thread{'s' if threads != 1 else ''})")
    ax_lat.set_title("Latency: " + ", ".join(f"{k.replace('_', ' ')} ({'light' if i == 0 else 'dark'})"
                                             for i, k in enumerate(batch_keys)), fontsize=11)
    ax_lat.grid(axis="x", alpha=0.3)

    head = report.get("headline")
    subtitle = head["sentence"] if head else report.get("headline_note", "")
    quick = "   [QUICK run: smoke numbers, not a benchmark]" if report["run"]["quick"] else ""
    fig.suptitle("Distill-Prune-Quantize on SST-2" + quick, fontsize=13, y=1 - 0.15 / height)
    fig.text(0.5, 1 - 0.5 / height, _wrap(subtitle, 190), ha="center", va="top", fontsize=9.5, style="italic")
    fig.canvas.draw()  # labels are placed against the final layout
    _place_labels(ax, fig, flops_items)
    _place_labels(ax_speed, fig, speed_items)
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width))
