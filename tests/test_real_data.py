"""The one real-data test: the packaged pretrained MiniLM on a small slice of the real SST-2, through the
actual stage scripts in QUICK mode (about 2,000 training sentences, one epoch), scored on the full GLUE
validation set (872 sentences). Skipped with a reason where ../shared/data/sst2 is absent."""

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
    results = {"teacher": run_script("1_train_teacher.py"), "student": run_script("2_distill_student.py")}
    yield root / "models", results
    torch.set_num_threads(threads)
    patch.undo()


def test_real_teacher_learns_sst2_from_2000_sentences(real_pipeline):
    models, results = real_pipeline
    meta = read_metadata(models / "teacher_model")
    assert meta["results"]["quick"] is True and meta["results"]["train_sentences"] == 2000
    assert results["teacher"]["validation_accuracy"] > 0.80


def test_real_student_keeps_three_teacher_layers_and_learns(real_pipeline):
    models, results = real_pipeline
    student = load_model(models / "student_model")
    assert student.config.num_hidden_layers == 3 and student.config.hidden_size == 384
    assert results["student"]["validation_accuracy"] > 0.75
