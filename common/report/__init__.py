"""The final report: every number measured on the saved model folders, then final_report.json, .png and .md.

`generate` finds the model folders (`discover`), measures each one loaded through the project's one loader
(`measure`: accuracy, GFLOPs, size, what is kept, the CPU latency of every artifact timed run by run next to the
student of its precision), and assembles final_report.json (`compare`: paired comparisons, seed groups, frontier,
accuracy by sentence length from `length`, headline). `chart` (final_report.png) and `markdown` (final_report.md)
are views of that JSON: they read the report dict and compute nothing of their own. Module-level imports run one
way (discover <- measure <- length <- compare <- chart / markdown <- this file); names are imported from the module
that defines them.
"""

import logging
import time
from pathlib import Path

from common.paths import STAGE_FOLDERS
from common.report.chart import plot_report
from common.report.compare import build_report, deployment_pair
from common.report.discover import (BASELINE, REPORT_JSON, REPORT_MD, REPORT_PNG, discover_models, recorded_preset,
                                    write_atomic)
from common.report.markdown import markdown_report
from common.report.measure import (SkipModel, busy_cores, load_average, machine_busy, measure_model, time_pair,
                                   timing_references)
from common.stage import StageError, json_dump

logger = logging.getLogger("dpq")


def generate(models_root, *, validation, dataset: dict, eval_files: dict, settings: dict, out_dir,
             preset: str, quick: bool, constants: dict, names=None) -> dict:
    """Discover, measure, and write final_report.json/.png/.md into `out_dir`; return the report."""
    started = time.time()
    found, notes = discover_models(models_root, names)
    for note in notes:
        logger.warning(f"[report] {note}")
    if not found:
        raise StageError(f"no model folders found in {models_root}: run the pipeline first "
                         f"(download_model.py, 1_train_teacher.py, 2_distill_student.py, ...)")
    preset = recorded_preset(found, preset, notes)
    settings = dict(settings, load_average=load_average(), busy_cores=busy_cores())
    busy = machine_busy(settings["load_average"], settings["busy_cores"])
    if busy:
        notes.append(busy)
        logger.warning(f"[report] {busy}")
    measured, skipped = measure_all(found, validation, eval_files, settings)
    models = {name: measured[name] for name, _ in found if name in measured}  # in discovery order
    if not models:
        raise StageError(f"none of the model folders in {models_root} could be measured: {skipped}")
    for name, r in models.items():
        needs = [u for u in r.get("upstream", []) if u in skipped]
        if needs:  # measured on its own; what it was compared with or counted through is gone
            r["warnings"].append(f"made from {', '.join(needs)}, which was skipped; GFLOPs: {r['gflops_source']}")
        notes += [f"{name}: {w}" for w in r["warnings"]]
    deploy_timing, pair = None, deployment_pair(models)
    if pair:  # the fastest artifacts were chosen on medians timed apart; their speed-up is timed again, paired
        (fn, fa), (sn, sa) = pair
        deploy_timing = {"final": {"model": fn, "artifact": fa}, "student": {"model": sn, "artifact": sa},
                         **time_pair((models[fn]["folder"], fa), (models[sn]["folder"], sa), validation, settings)}
    report = build_report(models, sentences=[s for s, _ in validation], settings=settings, dataset=dataset,
                          eval_files=eval_files, preset=preset, quick=quick, skipped=skipped, notes=notes,
                          constants=constants, wall_time_s=time.time() - started, deploy_timing=deploy_timing)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / REPORT_JSON, lambda tmp: json_dump(report, tmp))
    plot_report(report, out_dir / REPORT_PNG)
    write_atomic(out_dir / REPORT_MD, lambda tmp: tmp.write_text(markdown_report(report)))
    logger.info(f"[report] wrote {out_dir / REPORT_JSON}, {REPORT_PNG}, {REPORT_MD}")
    if report["headline"]:
        logger.info(f"[report] {report['headline']['sentence']}")
    else:
        logger.warning(f"[report] {report['headline_note']}")
    return report


def measure_all(found, validation, eval_files: dict, settings: dict):
    """({name: record}, {name: why skipped}): the students first (fp32, then 4-bit), each kept loaded as the timing
    reference of its precision while the rest are measured."""
    refs, flops_curves, measured, skipped, references = {STAGE_FOLDERS["student"]: 32, BASELINE: 4}, {}, {}, {}, {}
    for name, folder in sorted(found, key=lambda item: list(refs).index(item[0]) if item[0] in refs else len(refs)):
        try:
            measured[name] = measure_model(name, folder, validation=validation, eval_files=eval_files,
                                           settings=settings, flops_curves=flops_curves,
                                           references=references)
        except SkipModel as err:
            logger.warning(f"[report] {name}: skipped, {err}")
            skipped[name] = str(err)
            continue
        if name in refs and measured[name]["bits"] == refs[name]:
            references.update(timing_references(name, folder, validation, settings, refs[name]))
    return measured, skipped
