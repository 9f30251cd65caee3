"""The final report: every number measured on the saved model folders, then JSON, chart and markdown.

For each model folder under the models root (`discover_models`), `measure_model` loads it through the
project's one loader (`common.modeling.load_model`: plain, pruned or 4-bit) and measures:
- accuracy on SST-2 validation (and on every extra GLUE-format TSV given), by running the loaded model;
- GFLOPs (fvcore, batch 1, sequence length 128, attention counted; `common.flops`), and the mean GFLOPs per
  validation sentence at its real tokenized length. fvcore cannot trace bitsandbytes 4-bit layers; a 4-bit
  model runs the same matmuls as its fp32 twin, so the twin is counted and `gflops_source` says which;
- logical parameter count (a packed 4-bit weight counts as its unpacked shape), bytes on disk, bits;
- CPU latency at each batch size: median of N timed forward passes after warm-up, on real validation
  sentences padded to the batch's longest, chosen with a fixed seed (the same sentences for every model).
  The student of each precision (student_model, distilled_quantized_student) is measured first and kept
  loaded; every other PyTorch model's runs are interleaved one by one with its reference's (`time_paired`),
  so its speed-up over the student is the median of paired ratios with a distribution-free 95% interval
  (each ONNX export likewise next to the same export of the student, where it ships one);
- architecture counted from the modules themselves: layers, attention heads kept, FFN neurons kept.

Then `build_report` assembles final_report.json (sorted keys, indented), `headline` compares the final model
with the standard quantized student, `plot_report` draws final_report.png and `markdown_report` writes
final_report.md.

The package, one concern per module (module-level imports run one way: discover <- measure <- length <-
compare <- chart / markdown <- this file):
- `discover`: which folders, in what order, their metadata and staleness, naming helpers;
- `measure`: every number of one folder (architecture, FLOPs, accuracy, latency, exports) and the CPU;
- `length`: accuracy by sentence length (word-count quartiles of the validation set), per model and paired
  against the student within each bucket (the report's `by_length`);
- `compare`: paired comparisons, seed groups, frontier summary, headline, deployment, `build_report`;
- `chart`: final_report.png; `markdown`: final_report.md;
- here: `generate` (discover -> measure -> build -> write) and the names the stage script and tests use.
"""

import logging
import time
from pathlib import Path

from common.paths import STAGE_FOLDERS
from common.report.chart import plot_report
from common.report.compare import build_report, deployment_pair, headline, write_json
from common.report.discover import (BASELINE, REPORT_JSON, REPORT_MD, REPORT_PNG, discover_models, folder_status,
                                    recorded_preset, report_dir, seed_group)
from common.report.markdown import markdown_report, write_text
from common.report.measure import (FlopsCache, FlopsCurve, SkipModel, architecture, busy_cores, fp32_twin,
                                   latency_indices, load_average, load_eval_files, machine_busy, measure_model,
                                   time_pair, timing_references)
from common.stage import StageError

logger = logging.getLogger("dpq")

# What 7_evaluate_and_generate_report.py and the tests use, re-exported from the modules that define them.
__all__ = ["FlopsCurve", "REPORT_JSON", "REPORT_MD", "REPORT_PNG", "architecture", "build_report", "discover_models",
           "folder_status", "fp32_twin", "generate", "headline", "latency_indices", "load_eval_files",
           "markdown_report", "measure_model", "plot_report", "report_dir", "seed_group", "write_json"]


def generate(models_root, *, validation, dataset: dict, eval_files: dict, settings: dict, out_dir,
             preset: str, quick: bool, constants: dict, names=None) -> dict:
    """Discover, measure, and write final_report.json/.png/.md into `out_dir`; return the report."""
    started = time.time()
    found, notes = discover_models(models_root, names)
    for note in notes:
        logger.warning(f"[report] {note}")
    if not found:
        raise StageError(
            f"no model folders found in {models_root}: run the pipeline first "
            f"(download_model.py, 1_train_teacher.py, 2_distill_student.py, ...)"
        )
    preset = recorded_preset(found, preset, notes)
    settings = dict(settings, load_average=load_average(), busy_cores=busy_cores())
    busy = machine_busy(settings["load_average"], settings["busy_cores"])
    if busy:
        notes.append(busy)
        logger.warning(f"[report] {busy}")
    flops_cache = FlopsCache(settings["flops_seq_len"])
    measured, skipped, references = {}, {}, {}
    # measured first, in this order (the 4-bit student is timed next to the fp32 one); the rest next to them
    timing_refs = {STAGE_FOLDERS["student"]: 32, BASELINE: 4}
    first = list(timing_refs)
    for name, folder in sorted(found, key=lambda item: first.index(item[0]) if item[0] in first else len(first)):
        try:
            measured[name] = measure_model(name, folder, validation=validation, eval_files=eval_files,
                                           settings=settings, flops_cache=flops_cache, models_root=models_root,
                                           references=references)
        except SkipModel as err:
            logger.warning(f"[report] {name}: skipped, {err}")
            skipped[name] = str(err)
            continue
        if name in timing_refs and measured[name]["bits"] == timing_refs[name]:
            references.update(timing_references(name, folder, validation, settings, timing_refs[name]))
    references.clear()
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
    write_json(report, out_dir / REPORT_JSON)
    plot_report(report, out_dir / REPORT_PNG)
    write_text(markdown_report(report), out_dir / REPORT_MD)
    logger.info(f"[report] wrote {out_dir / REPORT_JSON}, {REPORT_PNG}, {REPORT_MD}")
    if report["headline"]:
        logger.info(f"[report] {report['headline']['sentence']}")
    else:
        logger.warning(f"[report] {report['headline_note']}")
    return report
