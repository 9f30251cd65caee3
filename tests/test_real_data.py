"""The one real-data test: the packaged pretrained MiniLM on a small slice of the real SST-2, through every
stage script in QUICK mode (about 2,000 training sentences, one epoch), scored on the full GLUE validation
set (872 sentences): download, teacher, student, structured pruning, 4-bit, report. Skipped with a reason
where ../shared/data/sst2 is absent."""

import os

import pytest
import torch

from common.modeling import load_model
from common.stage import read_metadata
from conftest import run_script


@pytest.fixture(scope="module")
def real_pipeline(tmp_path_factory):
    from conftest import SHARED_SST2

    if not (SHARED_SST2 / "train.tsv").is_file():
        pytest.skip(f"real SST-2 not found at {SHARED_SST2} (the shared data folder beside the checkout)")
    root = tmp_path_factory.mktemp("real")
    patch = pytest.MonkeyPatch()
    patch.setenv("MODELS_DIR", str(root / "models"))
    patch.setenv("DATA_DIR", str(root / "data"))
    patch.setenv("SST2_DIR", str(SHARED_SST2))
    patch.setenv("PRESET", "minilm")
    patch.setenv("QUICK", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))  # a real-size model: use the cores
    run_script("download_model.py")
    patch.setenv("REPORT_DIR", str(root / "report"))
    results = {"teacher": run_script("1_train_teacher.py"), "student": run_script("2_distill_student.py")}
    run_script("8_pruning_with_finetuning.py")
    run_script("9_quantize_pruned_model.py")
    run_script("7_evaluate_and_generate_report.py")
    yield root / "models", results, root / "report"
    torch.set_num_threads(threads)
    patch.undo()


def test_real_teacher_learns_sst2_from_2000_sentences(real_pipeline):
    models, results, _ = real_pipeline
    meta = read_metadata(models / "teacher_model")
    assert meta["results"]["quick"] is True and meta["results"]["train_sentences"] == 2000
    assert results["teacher"]["validation_accuracy"] > 0.80


def test_real_student_keeps_three_teacher_layers_and_learns(real_pipeline):
    models, results, _ = real_pipeline
    student = load_model(models / "student_model")
    assert student.config.num_hidden_layers == 3 and student.config.hidden_size == 384
    assert results["student"]["validation_accuracy"] > 0.75


def test_real_pipeline_prunes_quantizes_and_reports(real_pipeline):
    import json

    from bitsandbytes.nn import Linear4bit

    from common.modeling_dpq import encoder_layers, get_layout

    models, _, report_dir = real_pipeline
    pruned = load_model(models / "pruned_model")
    layout = get_layout(pruned)
    assert sum(layout["heads"]) < 3 * 12 or sum(layout["ffn"]) < 3 * 1536  # units really removed
    assert all(width % 32 == 0 for width in layout["ffn"])
    final = load_model(models / "pruned_quantized_final")
    assert any(isinstance(m, Linear4bit) for m in encoder_layers(final)[0].modules())
    assert not isinstance(final.classifier, Linear4bit)

    report = json.loads((report_dir / "final_report.json").read_text())
    assert report["run"]["quick"] is True
    assert report["models"]["pruned_model"]["gflops"] < 0.85 * report["models"]["student_model"]["gflops"]
    assert report["models"]["pruned_quantized_final"]["size_mb"] < 0.35 * report["models"]["student_model"]["size_mb"]
    assert 0.15 < report["headline"]["gflops_reduction"] < 0.3
    assert (report_dir / "final_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the CPU serving artifact of the final model: kept (>= 97% agreement with its fp32 source), run and timed
    onnx = read_metadata(models / "pruned_quantized_final")["results"]["onnx"]
    assert onnx["artifacts"]["onnx_int8"]["prediction_agreement"] >= 0.97
    final = report["models"]["pruned_quantized_final"]["artifacts"]
    assert set(final) == {"pytorch", "onnx_fp32", "onnx_int8"}
    assert final["onnx_fp32"]["accuracy"] == report["models"]["pruned_model"]["accuracy"]
    assert report["headline"]["deployment"]["final"]["model"] in ("pruned_model", "pruned_quantized_final")
