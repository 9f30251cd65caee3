"""7_evaluate_and_generate_report.py and common/report/ on a tiny pipeline built here: a 3-layer teacher, a
2-layer student, physically pruned students (default + one sweep point) and 4-bit twins, tiny SST-2 data."""

import json
import os
import runpy
import shutil

import pytest
import torch

from conftest import (REPO, run_script, save_tiny, tiny_bert_config, tiny_distilbert_config, tiny_sentences,
                      write_glue_tsv)

# THREADS=1: two threads on a shared 2-core machine make each tiny forward wait ~0.3 s on the other thread
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fvcore imports torch.jit.script

RUN_ARGS = ("QUICK=True", "LATENCY_RUNS=2", "WARMUP_RUNS=1", "MAX_LENGTH=64", "FLOPS_SEQ_LEN=64",
            "EVAL_BATCH_SIZE=64", "THREADS=1")
ORDER = ["teacher_model", "student_model", "distilled_quantized_student", "pruned_model", "pruned_quantized_final",
         "pruned_model_s50", "pruned_model_s50_quantized"]
MODEL_KEYS = {"accuracy", "eval_files", "gflops", "gflops_per_sentence", "params", "size_mb", "bits",
              "latency_ms", "layers", "heads", "ffn_neurons"}


def _stage_folder(folder, stage, build, upstream=(), results=None):
    """Write a model folder the way stages do (atomic, metadata.json last, upstream and results recorded)."""
    from common.stage import stage_output

    with stage_output(folder, stage, {"TEST": True}, 0) as out:
        for source, source_stage in upstream:
            out.add_upstream(source, source_stage)
        out.results.update(results or {})
        build(out.dir)
    return folder


def validation_rows():
    """The tiny validation set: 48 toy sentences lengthened by 0-7 filler words (5 to 12 words, six of each), so
    the word-count quartiles are 6, 8 and 10 and each length bucket holds 12 sentences."""
    return [(" ".join([sentence] + ["very"] * (i % 8)), label)
            for i, (sentence, label) in enumerate(tiny_sentences(48, seed=2))]


def _prepare_data(root):
    from common.data import MANIFEST, manifest_for

    folder = root / "data" / "sst2"
    write_glue_tsv(folder / "train.tsv", tiny_sentences(40, seed=1))
    write_glue_tsv(folder / "validation.tsv", validation_rows())
    (folder / MANIFEST).write_text(json.dumps(manifest_for(folder, "test")))


def export_tiny(model, tokenizer, folder):
    from common.data import encode, make_loader
    from common.export import export_folder
    from common.training import predict_logits

    loader = make_loader(encode(tokenizer, validation_rows()), 16, pad_id=tokenizer.pad_token_id)
    return export_folder(model, tokenizer, folder, ("fp32", "int8"), reference_logits=predict_logits(model, loader),
                         labels=loader.dataset.labels, loader=loader, min_agreement=0.0)


def build_tiny_pipeline(root):
    """models/ with every folder the report expects, plus a pruning sweep point and its 4-bit twin."""
    from transformers import BertForSequenceClassification

    from common.modeling import load_model, load_tokenizer
    from common.pruning.selection import prune_units
    from common.quantization import quantize_model, save_quantized

    models = root / "models"
    _prepare_data(root)

    def fresh(config, seed):
        torch.manual_seed(seed)
        return BertForSequenceClassification(config).eval()

    teacher = _stage_folder(models / "teacher_model", "teacher",
                            lambda d: save_tiny(fresh(tiny_bert_config(num_hidden_layers=3), 0), d))
    student = _stage_folder(models / "student_model", "student",
                            lambda d: save_tiny(fresh(tiny_bert_config(), 1), d), [(teacher, "teacher")])

    def pruned(heads, ffn):
        def build(d):
            model = load_model(student)
            prune_units(model, heads=heads, ffn=ffn)
            save_tiny(model, d)
        return build

    pruned_default = _stage_folder(models / "pruned_model", "pruned", pruned({0: [0]}, {1: range(32)}),
                                   [(student, "student")])
    sweep = _stage_folder(models / "pruned_model_s50", "pruned", pruned({0: [0, 1], 1: [0, 1]}, {0: range(32)}),
                          [(student, "student")], results={"target_sparsity": 0.504})  # stage 8 names it _s50

    def quantized(source, onnx=False):
        def build(d):
            save_quantized(quantize_model(load_model(source), embedding_bits=8), load_tokenizer(source), d)
            if onnx:  # the CPU serving artifacts stage 9 writes: onnx/model.onnx and model_int8.onnx
                export_tiny(load_model(source), load_tokenizer(source), d)
        return build

    _stage_folder(models / "distilled_quantized_student", "student_quantized", quantized(student, onnx=True),
                  [(student, "student")])
    _stage_folder(models / "pruned_quantized_final", "pruned_quantized", quantized(pruned_default, onnx=True),
                  [(pruned_default, "pruned")])
    _stage_folder(models / "pruned_model_s50_quantized", "pruned_quantized", quantized(sweep),
                  [(sweep, "pruned")])
    return models


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The tiny pipeline and ONE report run over it (shared by the checks below)."""
    root = tmp_path_factory.mktemp("pipeline")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MODELS_DIR", str(root / "models"))
        mp.setenv("DATA_DIR", str(root / "data"))
        mp.setenv("REPORT_DIR", str(root / "report"))
        mp.delenv("QUICK", raising=False)
        build_tiny_pipeline(root)
        extra = write_glue_tsv(root / "extra.tsv", tiny_sentences(10, seed=3))
        report = run_script("7_evaluate_and_generate_report.py", *RUN_ARGS, "--eval-file", str(extra))
        yield {"root": root, "report": report, "out": root / "report", "extra": str(extra)}


def test_report_json_has_the_issue_shape_and_plausible_values(pipeline):
    text = (pipeline["out"] / "final_report.json").read_text()
    report = json.loads(text)
    assert text == json.dumps(report, indent=2, sort_keys=True) + "\n"  # sorted keys, indented
    assert set(report) >= {"run", "dataset", "flops_convention", "models", "headline"}
    assert set(report["run"]) >= {"preset", "quick", "created", "git_commit", "device", "threads", "versions"}
    assert report["run"]["quick"] is True and report["run"]["threads"] == 1
    assert report["dataset"] == {"name": "sst2", "split": "validation", "n": 48}
    assert "1 multiply-add = 1 FLOP" in report["flops_convention"]

    models = report["models"]
    assert set(models) == set(ORDER) and report["model_order"] == ORDER == list(pipeline["report"]["models"])
    for name, r in models.items():
        assert MODEL_KEYS <= set(r), name
        assert 0.0 <= r["accuracy"] <= 1.0
        assert set(r["eval_files"]) == {pipeline["extra"]} and 0.0 <= r["eval_files"][pipeline["extra"]] <= 1.0
        assert r["gflops"] > r["gflops_per_sentence"] > 0  # real sentences are shorter than 64 tokens
        assert r["bits"] in (4, 32) and r["size_mb"] > 0 and r["params"] > 0
        assert set(r["latency_ms"]) == {"batch_1", "batch_32"} and all(v > 0 for v in r["latency_ms"].values())
        assert r["complete"] and not r["stale"] and r["gflops_length_fit_exact"]

    teacher, student, pruned, sweep = (models[n] for n in ("teacher_model", "student_model", "pruned_model",
                                                            "pruned_model_s50"))
    assert (teacher["layers"], student["layers"]) == (3, 2)
    assert teacher["gflops"] > student["gflops"] > pruned["gflops"] > sweep["gflops"]
    assert student["params"] > pruned["params"] > sweep["params"]
    assert (student["heads"], student["ffn_neurons"]) == (8, 128)
    assert (pruned["heads_per_layer"], pruned["ffn_per_layer"]) == ([3, 4], [64, 32])
    assert (sweep["heads_per_layer"], sweep["ffn_per_layer"]) == ([2, 2], [32, 64])

    for fp32, q4 in (("student_model", "distilled_quantized_student"), ("pruned_model", "pruned_quantized_final"),
                     ("pruned_model_s50", "pruned_model_s50_quantized")):
        a, b = models[fp32], models[q4]
        assert (a["bits"], b["bits"]) == (32, 4)
        assert b["size_mb"] < a["size_mb"]
        assert b["gflops"] == a["gflops"] and b["gflops_source"].startswith(f"fp32 twin rebuilt from {q4}")
        assert b["params"] == a["params"]  # logical count, not the packed 4-bit storage
        assert (b["heads_per_layer"], b["ffn_per_layer"]) == (a["heads_per_layer"], a["ffn_per_layer"])
    # the target recorded in metadata.json, not the one the folder name rounds it to; the 4-bit twin's through its
    # fp32 source's metadata (stage 9 records none)
    assert models["pruned_model_s50"]["target_sparsity"] == models["pruned_model_s50_quantized"]["target_sparsity"] \
        == 0.504 and "sparsity_target" not in models["pruned_model_s50"]
    assert {(r["group"], r["target_sparsity"]) for r in report["frontier"]["rows"]} == {
        ("pruned_model_s50", 0.504), ("pruned_model_s50_quantized", 0.504)}

    head = report["headline"]
    assert head["baseline"] == "distilled_quantized_student" and head["final"] == "pruned_quantized_final"
    assert set(head) >= {"gflops_reduction", "accuracy_drop_points", "size_reduction", "latency_speedup_batch_32"}
    expected = 1 - models["pruned_quantized_final"]["gflops"] / models["distilled_quantized_student"]["gflops"]
    assert head["gflops_reduction"] == pytest.approx(expected, abs=1e-4) and head["gflops_reduction"] > 0
    assert pipeline["report"]["headline"] == head
    # the final model was timed run by run next to the baseline: the headline's speed-up is that paired one
    paired = models["pruned_quantized_final"]["speedup_vs_reference"]["batch_32"]
    assert paired["reference"] == "distilled_quantized_student" and head["latency_speedup_batch_32"] == \
        pytest.approx(paired["speedup"], abs=1e-3)
    assert head["speedup_interval"] is None  # 2 timed runs (QUICK): too few for a 95% interval
    assert models["teacher_model"]["speedup_vs_reference"]["batch_1"]["reference"] == "student_model"


def test_chart_and_markdown_are_written(pipeline):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png = pipeline["out"] / "final_report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = plt.imread(str(png))
    assert image.shape[0] > 300 and image.shape[1] > 600
    md = (pipeline["out"] / "final_report.md").read_text()
    assert "**Headline.** pruned_quantized_final needs" in md
    for name in pipeline["report"]["models"]:
        assert f"`{name}`" in md


@pytest.mark.parametrize("content", [None, "sentence\tlabel\na fine film\t7\n", "text\tlabel\nok\t1\n"])
def test_bad_eval_file_fails_clearly_before_any_model_is_loaded(pipeline, tmp_path, monkeypatch, capsys, content):
    from common.data import DataError
    from common.report import measure
    from common.stage import run_main

    monkeypatch.setenv("MODELS_DIR", str(pipeline["root"] / "models"))
    monkeypatch.setenv("DATA_DIR", str(pipeline["root"] / "data"))
    monkeypatch.setenv("REPORT_DIR", str(tmp_path / "out"))
    monkeypatch.setattr(measure, "load_model", lambda *a: pytest.fail("a model was loaded despite a bad --eval-file"))
    path = tmp_path / "reviews.tsv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match="reviews.tsv"):
        run_script("7_evaluate_and_generate_report.py", *RUN_ARGS, "--eval-file", str(path))

    # as a command: message on stderr, non-zero exit, nothing written
    namespace = runpy.run_path(str(REPO / "7_evaluate_and_generate_report.py"), run_name="dpq_test")
    monkeypatch.setattr("sys.argv", ["7_evaluate_and_generate_report.py", *RUN_ARGS, f"--eval-file={path}"])
    with pytest.raises(SystemExit) as exit_info:
        run_main(namespace["main"])
    assert exit_info.value.code == 1
    assert "reviews.tsv" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_half_made_and_stale_folders(pipeline, tmp_path, monkeypatch, caplog):
    from common.stage import StageError

    models = tmp_path / "models"
    shutil.copytree(pipeline["root"] / "models" / "student_model", models / "student_model")
    shutil.copytree(pipeline["root"] / "models" / "pruned_model", models / "pruned_model")
    shutil.copytree(pipeline["root"] / "models" / "pruned_model_s50", models / "pruned_model_s50")
    (models / "pruned_model_s50" / "metadata.json").unlink()  # half-made
    meta = json.loads((models / "pruned_model" / "metadata.json").read_text())
    meta["upstream"]["student"]["folder"] = str(models / "student_model")
    meta["upstream"]["student"]["run_id"] = "an-older-run"  # its student was rebuilt since
    (models / "pruned_model" / "metadata.json").write_text(json.dumps(meta))
    monkeypatch.setenv("MODELS_DIR", str(models))
    monkeypatch.setenv("DATA_DIR", str(pipeline["root"] / "data"))
    monkeypatch.setenv("REPORT_DIR", str(tmp_path / "out"))

    with caplog.at_level("WARNING", logger="dpq"):
        report = run_script("7_evaluate_and_generate_report.py", *RUN_ARGS)
    assert list(report["models"]) == ["student_model", "pruned_model", "pruned_model_s50"]
    for missing in ("teacher_model", "distilled_quantized_student", "pruned_quantized_final"):
        assert any(missing in w and "skipped" in w for w in report["warnings"])
        assert missing in caplog.text
    assert report["models"]["pruned_model"]["stale"] is True
    assert report["models"]["pruned_model_s50"]["complete"] is False
    assert report["headline"] is None and "pruned_quantized_final" in report["headline_note"]
    saved = json.loads((tmp_path / "out" / "final_report.json").read_text())
    assert saved["headline"] is None and saved["headline_note"]
    assert "STALE" in (tmp_path / "out" / "final_report.md").read_text()
    assert (tmp_path / "out" / "final_report.png").stat().st_size > 0

    shutil.rmtree(models)
    models.mkdir()
    with pytest.raises(StageError, match="no model folders"):
        run_script("7_evaluate_and_generate_report.py", *RUN_ARGS)


def test_target_sparsity_is_read_from_metadata_not_the_rounded_folder_name(tmp_path):
    """pruned_model_s20 whose metadata.json says 0.204 is reported as 0.204; its 4-bit twin takes its own recorded
    target, else its fp32 source's (through its upstream record); only a half-made folder falls back to its name."""
    from common.report.discover import pruning_fields

    fp32, twin, half = (tmp_path / n for n in ("pruned_model_s20", "pruned_model_s20_quantized", "pruned_model_s30"))
    for folder in (fp32, twin, half):
        folder.mkdir()
    meta = {"results": {"target_sparsity": 0.204, "mode": "frontier"}}
    (fp32 / "metadata.json").write_text(json.dumps(meta))
    twin_meta = {"upstream": {"pruned": {"stage": "pruned", "folder": "pruned_model_s20"}}, "results": {}}
    assert pruning_fields(fp32.name, fp32, meta)["target_sparsity"] == 0.204
    assert pruning_fields(twin.name, twin, twin_meta)["target_sparsity"] == 0.204
    assert pruning_fields(twin.name, twin, dict(twin_meta, results={"target_sparsity": 0.21}))["target_sparsity"] == 0.21
    assert pruning_fields(half.name, half, {})["target_sparsity"] == 0.3
    assert pruning_fields("pruned_model_s40", tmp_path / "pruned_model_s40", {"results": {}})["target_sparsity"] is None


def test_command_line_parsing():
    from common.config import ConfigError

    split = runpy.run_path(str(REPO / "7_evaluate_and_generate_report.py"), run_name="dpq_test")["split_eval_files"]
    assert split(["--eval-file", "a.tsv", "QUICK=1", "--eval-file=b.tsv"]) == (["a.tsv", "b.tsv"], ["QUICK=1"])
    with pytest.raises(ConfigError, match="needs a path"):
        split(["--eval-file"])
    with pytest.raises(ConfigError, match="unknown flag"):
        split(["--evalfile", "x"])
    with pytest.raises(ConfigError, match="LATENCY_RUNS"):
        run_script("7_evaluate_and_generate_report.py", "LATENCY_RUNS=3")


def test_busy_machine_is_judged_by_cores_busy_now_not_by_the_load_average():
    """Right after an earlier stage ends the 1-minute load average is still high while the CPU is idle (`make
    frontier` runs the report straight after stage 9): the cores other processes keep busy now decide, the load
    average only where /proc/stat is missing."""
    from common.report.measure import busy_cores, machine_busy

    cores = os.cpu_count() or 1
    assert machine_busy([2.0 * cores, 1, 1], busy=0.0) == ""  # a job that just ended: not busy
    assert "busy" in machine_busy([0.0, 0, 0], busy=0.9 * cores)  # busy now, whatever the load average says
    assert "load average" in machine_busy([2.0 * cores, 1, 1], busy=None) and machine_busy([0.1, 0, 0]) == ""
    now = busy_cores(0.2)
    assert now is None or 0.0 <= now <= cores


def test_architecture_and_flops_curve_on_pruned_distilbert():
    from transformers import DistilBertForSequenceClassification

    from common.flops import count_flops
    from common.pruning.selection import prune_units
    from common.report.measure import FlopsCurve, architecture, latency_indices

    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(tiny_distilbert_config()).eval()
    prune_units(model, heads={1: [0, 1, 2, 3]}, ffn={0: range(32)})
    arch = architecture(model)
    assert (arch["layers"], arch["heads_per_layer"], arch["ffn_per_layer"]) == (2, [4, 0], [32, 64])
    curve = FlopsCurve(lambda: model, ref_len=40)
    assert curve.exact
    assert curve.gflops(21) == count_flops(model, seq_len=21) / 1e9

    sentences = [s for s, _ in tiny_sentences(50, seed=0)]
    assert latency_indices(sentences, 32, seed=0) == latency_indices(sentences, 32, seed=0)
    assert len(latency_indices(sentences, 1, seed=0)) == 1


def test_fp32_twin_is_rebuilt_from_the_4bit_folders_config(pipeline):
    """A 4-bit folder's FLOPs come from an fp32 model rebuilt from its config: the same matmuls as its fp32 source."""
    from common.flops import count_flops
    from common.modeling import load_model
    from common.report.measure import architecture, fp32_twin

    models = pipeline["root"] / "models"
    twin = fp32_twin(models / "pruned_quantized_final")
    assert architecture(twin)["heads_per_layer"] == [3, 4]
    assert count_flops(twin, seq_len=20) == count_flops(load_model(models / "pruned_model"), seq_len=20)


def test_every_artifact_is_measured_and_compared_with_its_source(pipeline):
    """ONNX exports are run (accuracy, size, latency on the same inputs as PyTorch), paired against the fp32 model
    they came from; the headline adds the deployment line and names the CPU."""
    report = json.loads((pipeline["out"] / "final_report.json").read_text())
    models = report["models"]
    final, student = models["pruned_quantized_final"], models["student_model"]
    assert set(final["artifacts"]) == {"pytorch", "onnx_fp32", "onnx_int8"}
    assert set(student["artifacts"]) == {"pytorch"}
    folder = pipeline["root"] / "models" / "pruned_quantized_final"
    for artifact, record in final["artifacts"].items():
        assert set(record["latency_ms"]) == {"batch_1", "batch_32"} and record["latency_ms"]["batch_1"] > 0
        assert record["accuracy_ci"][0] <= record["accuracy"] <= record["accuracy_ci"][1]
        assert len(record["correct"]) == report["dataset"]["n"]
        assert record["accuracy"] == pytest.approx(record["correct"].count("1") / len(record["correct"]), abs=1e-6)
        if artifact != "pytorch":
            assert record["size_bytes"] == (folder / record["file"]).stat().st_size
        # where the bytes are: every stored tensor in one part; the files add only a header / the graph's structure
        parts = record["size_by_part"]
        assert set(parts) == {"embeddings", "encoder", "rest"} and all(v > 0 for v in parts.values())
        if artifact == "pytorch":  # safetensors: 8 bytes of header length, the header, then the tensors
            weights = folder / "model.safetensors"
            header = int.from_bytes(weights.read_bytes()[:8], "little")
            assert sum(parts.values()) == weights.stat().st_size - 8 - header
        else:
            assert sum(parts.values()) < record["size_bytes"]
    int8, fp32 = (final["artifacts"][a]["size_by_part"] for a in ("onnx_int8", "onnx_fp32"))
    assert int8["embeddings"] < fp32["embeddings"] / 3 and int8["encoder"] < fp32["encoder"] / 3  # int8 weights
    assert final["artifacts"]["onnx_int8"]["size_bytes"] < final["artifacts"]["onnx_fp32"]["size_bytes"]
    # each export timed run by run next to the student's export of the same kind; the student's own exports alone
    for artifact in ("onnx_fp32", "onnx_int8"):
        paired = final["artifacts"][artifact]["speedup_vs_reference"]
        assert set(paired) == {"batch_1", "batch_32"}
        assert all(p["reference"] == "distilled_quantized_student" and p["speedup"] > 0 for p in paired.values())
        assert models["distilled_quantized_student"]["artifacts"][artifact]["speedup_vs_reference"] == {}
    assert final["artifacts"]["pytorch"]["speedup_vs_reference"]["batch_32"]["reference"] == \
        "distilled_quantized_student"
    markdown = (pipeline["out"] / "final_report.md").read_text()
    assert "vs `distilled_quantized_student [onnx_int8]` |" in markdown and "embeddings / encoder / rest" in markdown
    # the fp32 export predicts what its PyTorch source predicts: the paired test finds no disagreement
    fp32 = [c for c in report["comparisons"] if (c["a"], c["a_artifact"], c["evaluation"])
            == ("pruned_quantized_final", "onnx_fp32", "validation")]
    assert len(fp32) == 1 and fp32[0]["b"] == "pruned_model" and fp32[0]["b_artifact"] == "pytorch"
    assert (fp32[0]["only_a_right"], fp32[0]["only_b_right"], fp32[0]["mcnemar_p"]) == (0, 0, 1.0)
    kinds = {c["kind"] for c in report["comparisons"]}
    assert kinds == {"headline: final vs standard 4-bit", "student vs teacher", "pruned vs student",
                     "4-bit vs its fp32 source", "export vs its fp32 source"}
    assert {c["evaluation"] for c in report["comparisons"]} == {"validation", pipeline["extra"]}
    head = report["headline"]
    assert "95% interval" in head["sentence"] and "McNemar p" in head["sentence"]
    assert "no native bf16" in head["sentence"] or "native bf16" in head["sentence"]
    deploy = head["deployment"]
    assert deploy["final"]["model"] in ("pruned_model", "pruned_quantized_final")
    assert deploy["student"]["model"] in ("student_model", "distilled_quantized_student")
    assert set(deploy["speedup"]) == {"batch_1", "batch_32"}
    # chosen on medians timed apart, then timed again run by run next to each other (2 runs: no interval)
    assert deploy["speedup_timing"] == "paired" and deploy["speedup_interval"] == {"batch_1": None, "batch_32": None}
    cpu = report["run"]["cpu"]
    assert cpu["name"] and isinstance(cpu["bf16_native"], bool)
    markdown = (pipeline["out"] / "final_report.md").read_text()
    assert "**Deployment.**" in markdown and "## Deployment artifacts" in markdown
    assert "## Paired comparisons" in markdown and "`pruned_quantized_final [onnx_int8]`" in markdown


def test_report_gives_accuracy_by_sentence_length(pipeline):
    """by_length: word-count quartile buckets covering every validation sentence, each model's accuracy per bucket
    (adding up to its accuracy), each pruned model against the student per bucket, and the Markdown section."""
    report = json.loads((pipeline["out"] / "final_report.json").read_text())
    length, n = report["by_length"], report["dataset"]["n"]
    assert "words" in length["convention"] and "not tokens" in length["convention"]
    assert (length["n"], length["evaluation"], length["edges_words"]) == (n, "validation", [6, 8, 10])
    assert [b["n"] for b in length["buckets"]] == [12, 12, 12, 12] and sum(b["n"] for b in length["buckets"]) == n
    assert [b["words"] for b in length["buckets"]] == [[5, 6], [7, 8], [9, 10], [11, 12]]
    assert set(length["models"]) == set(ORDER)
    for name, r in report["models"].items():
        points = length["models"][name]["accuracy_points"]
        assert sum(p * b["n"] for p, b in zip(points, length["buckets"])) / n == pytest.approx(100 * r["accuracy"])

    overall = {c["a"]: c for c in report["comparisons"] if c["kind"] == "pruned vs student"
               and c["evaluation"] == "validation"}
    assert {v["model"] for v in length["vs_student"]} == set(overall) == {"pruned_model", "pruned_model_s50"}
    for versus in length["vs_student"]:
        assert versus["reference"] == "student_model"
        buckets = versus["per_bucket"]
        assert [c["n"] for c in buckets] == [12] * 4
        assert all(c["ci_low_points"] <= c["diff_points"] <= c["ci_high_points"] for c in buckets)
        assert sum(c["diff_points"] for c in buckets) / 4 == pytest.approx(overall[versus["model"]]["diff_points"])

    rows = length["frontier_rows"] or []
    assert [(r["group"], r["bits"]) for r in rows] == [(r["group"], r["bits"]) for r in report["frontier"]["rows"]]
    markdown = (pipeline["out"] / "final_report.md").read_text()
    section = markdown.split("## Accuracy by sentence length (validation)")[1]
    assert "Q1 5-6 words (12 sentences)" in section and "Q4 11-12 words (12 sentences)" in section
    assert "| Q4: 11-12 words (%) | Q4 vs student (points) |" in section



def test_paired_timing_alternates_runs_and_takes_the_median_ratio(monkeypatch):
    """time_paired on a fake clock: each call advances it by its cost. The reference costs 2.0-4.0x the model per
    round, and a slow stretch of the machine doubles both costs in rounds 4-5. Runs alternate (model first in even
    rounds), the speed-up is the median of the per-round ratios (the slow stretch falls on both, so it cancels), and
    10 rounds give the 2nd smallest and 2nd largest ratio as the 95% interval; 5 rounds give none."""
    from common.report import measure

    ratios = [3.0, 3.0, 2.5, 3.0, 3.0, 3.0, 3.5, 3.0, 2.0, 4.0]
    slow = [1, 1, 1, 1, 2, 2, 1, 1, 1, 1]
    clock, calls = [0.0], []

    class Fake:
        def __init__(self, name, costs):
            self.name, self.costs = name, iter(costs)

        def __call__(self, **inputs):
            calls.append(self.name)
            clock[0] += next(self.costs)

    def fakes():
        return (Fake("model", [1.0] + slow),  # one warm-up run, then the timed ones
                Fake("reference", [1.0] + [r * s for r, s in zip(ratios, slow)]))

    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock[0])
    inputs = {"input_ids": torch.zeros(2, 5, dtype=torch.long)}
    model, reference = fakes()
    detail = measure.time_paired(model, inputs, reference, inputs, runs=10, warmup=1)
    assert calls[:2] == ["model", "reference"]
    assert [calls[2 + 2 * i: 4 + 2 * i] for i in range(10)] == [
        ["model", "reference"] if i % 2 == 0 else ["reference", "model"] for i in range(10)]
    assert detail["speedup"] == pytest.approx(3.0) and detail["speedup_ci"] == pytest.approx([2.5, 3.5])
    assert detail["speedup_coverage"] == pytest.approx(1 - 22 / 1024)
    assert detail["median_ms"] == pytest.approx(1000.0) and detail["reference_median_ms"] == pytest.approx(3000.0)
    model, reference = fakes()
    assert measure.time_paired(model, inputs, reference, inputs, runs=5, warmup=1)["speedup_ci"] is None


def test_headline_speedup_is_the_paired_one_with_its_interval():
    """The final model timed run by run next to the baseline: the headline takes that median ratio and its
    interval, not the ratio of the two models' medians (timed apart); without pairing it falls back to that ratio."""
    from common.report.compare import headline

    record = {"gflops": 1.0, "accuracy": 0.9, "size_mb": 1.0, "stale": False,
              "latency_ms": {"batch_1": 1.0, "batch_32": 10.0}}
    paired = {"batch_32": {"reference": "distilled_quantized_student", "speedup": 2.5, "ci": [2.25, 2.75],
                           "coverage": 0.9785, "runs": 10, "median_ms": 12.0, "reference_median_ms": 30.5}}
    models = {"distilled_quantized_student": dict(record, gflops=2.0, latency_ms={"batch_1": 2.0, "batch_32": 30.0}),
              "pruned_quantized_final": dict(record, speedup_vs_reference=paired)}
    cpu = {"name": "cpu", "logical_cores": 2, "flags": [], "bf16_native": False}
    head, _ = headline(models, cpu=cpu)
    assert head["latency_speedup_batch_32"] == 2.5 and head["speedup_interval"] == [2.25, 2.75]
    assert "runs 2.50x as fast at batch 32" in head["sentence"]
    # the two medians of that paired run, not those timed apart (10 vs 30 ms), which could even disagree
    assert ("(timed paired, run by run: median 12 vs 30.5 ms, 95% interval of the speed-up [2.25, 2.75])"
            in head["sentence"])
    # the deployment line: the pair timed again, next to each other, replaces the ratio of medians timed apart
    from common.report.compare import deployment

    for name, ms in (("pruned_model", 4.0), ("student_model", 20.0)):
        models[name] = dict(record, artifacts={"pytorch": {"latency_ms": {"batch_32": ms}, "accuracy": 0.9,
                                                           "size_mb": 1.0}})
    timing = {"final": {"model": "pruned_model", "artifact": "pytorch"},
              "student": {"model": "student_model", "artifact": "pytorch"},
              "speedup": {"batch_32": {"speedup": 4.5, "ci": [4.25, 4.75], "coverage": 0.98, "runs": 10,
                                       "median_ms": 4.4, "reference_median_ms": 19.0}}}
    models["pruned_quantized_final"]["artifacts"] = models["distilled_quantized_student"]["artifacts"] = {}
    deploy = deployment(models, cpu, timing)
    assert deploy["speedup"] == {"batch_32": 4.5} and deploy["speedup_timing"] == "paired"
    assert ("4.50x as fast at batch 32 (timed paired, run by run: median 4.4 vs 19 ms, 95% interval of the speed-up "
            "[4.25, 4.75])") in deploy["sentence"]
    timing["student"]["artifact"] = "onnx_int8"  # timed for another pair: not used
    assert deployment(models, cpu, timing)["speedup"] == {"batch_32": 5.0}
    del models["pruned_quantized_final"]["speedup_vs_reference"]
    head, _ = headline(models, cpu=cpu)
    assert head["latency_speedup_batch_32"] == 3.0 and "speedup_interval" not in head
    assert "(median 10 vs 30 ms, timed apart)" in head["sentence"] and "timed paired" not in head["sentence"]
