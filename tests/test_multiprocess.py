"""Training stages under several processes: `torchrun --nproc_per_node 2 <stage>` on CPU (gloo), tiny models.

Each process records what its main() returned (env DPQ_PROCESS_RECORDS, common.stage.record_process_results); the
test checks that both processes really ran as a 2-process group, ended with the same model (same pruned layout,
same accuracies), and that exactly one complete folder was written (only the main process writes under models/).
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed

from conftest import REPO, run_script, write_tiny_teacher_and_student

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available: torchrun cannot start a CPU process group")

SMALL = ("TRAIN_LIMIT=128", "BATCH_SIZE=16", "EVALS_PER_EPOCH=1")


def torchrun(script: str, args, records, timeout: int = 240) -> float:
    """Run a stage script as 2 CPU processes with torchrun; returns the wall time."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", DPQ_PROCESS_RECORDS=str(records), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / script), *args]
    started = time.time()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, "\n".join(line for line in (done.stdout + done.stderr).splitlines()
                                             if "it/s]" not in line and "s/it]" not in line)[-6000:]
    return time.time() - started


def records_of(records) -> list:
    found = sorted(records.glob("rank*.json"))
    assert [p.name for p in found] == ["rank0.json", "rank1.json"], "torchrun did not run 2 processes"
    out = [json.loads(p.read_text()) for p in found]
    assert [r["world_size"] for r in out] == [2, 2]
    return out


def only_complete_folders(models) -> list:
    """The folders under models/; fails on a partial, aside or lock leftover."""
    leftovers = [p.name for p in models.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"leftovers in models/: {leftovers}"
    return sorted(p.name for p in models.iterdir() if (p / "metadata.json").is_file())


@pytest.fixture
def tiny_pipeline(workspace, glue_dir, monkeypatch, tiny_bert_dir):
    """data/sst2 (download stage) and tiny teacher_model and student_model folders (sequence length 128 fits)."""
    monkeypatch.setenv("SST2_DIR", str(glue_dir))
    run_script("download_model.py", f"TEACHER_SOURCE={tiny_bert_dir}")
    write_tiny_teacher_and_student()
    return workspace


def test_stage_8_with_two_processes_prunes_the_same_units_and_writes_one_folder(tiny_pipeline):
    from common.modeling import load_model
    from common.modeling_dpq import get_layout
    from common.stage import read_metadata

    records = tiny_pipeline / "records"
    # each process accumulates Taylor importance on its own batches; the scores are summed across them
    wall = torchrun("8_pruning_with_finetuning.py", ["TARGET_SPARSITY=0.3", "PRUNE_STEPS=2", "PRUNE_LR=1e-3",
                                                     "RECOVERY_LR=5e-4", *SMALL], records)
    main, other = records_of(records)
    layouts = [r["results"]["layout"] for r in (main, other)]
    print(f"2-process stage 8: {wall:.1f} s, layouts rank 0 {layouts[0]}, rank 1 {layouts[1]}")
    assert layouts[0] == layouts[1]
    for key in ("trajectory", "validation_accuracy", "heldout_accuracy", "kept_heads", "measured_sparsity"):
        assert main["results"][key] == other["results"][key], key
    events = main["results"]["trajectory"][1:]
    assert len(events) == 2 and events[-1]["sparsity"] >= 0.3
    # 128 sentences in batches of 16 = 8 batches, 4 per process: the schedule counts this process's steps
    assert [e["step"] for e in events] == [2, 3]
    models = tiny_pipeline / "models"
    assert only_complete_folders(models) == ["pretrained_teacher", "pruned_model", "student_model", "teacher_model"]
    folder = models / "pruned_model"
    assert read_metadata(folder)["results"]["layout"] == layouts[0] == get_layout(load_model(folder))


def test_stage_2_with_two_processes_trains_one_student(tiny_pipeline):
    from common.stage import read_metadata

    records = tiny_pipeline / "records"
    torchrun("2_distill_student.py", ["STUDENT_LAYERS=(0, 2)", "EPOCHS=1", "LR=1e-3", *SMALL], records)
    main, other = records_of(records)
    for key in ("validation_accuracy", "heldout_accuracy", "best_step", "parameters"):
        assert main["results"][key] == other["results"][key], key
    # the same model on both (held-out checks agree); the loss in the history is each process's own batches'
    assert ([(h["step"], h["heldout_accuracy"]) for h in main["results"]["history"]]
            == [(h["step"], h["heldout_accuracy"]) for h in other["results"]["history"]])
    assert main["results"]["history"][-1]["step"] == 4  # 8 batches split between 2 processes
    models = tiny_pipeline / "models"
    assert "student_model" in only_complete_folders(models)
    assert read_metadata(models / "student_model")["results"]["validation_accuracy"] == main["results"][
        "validation_accuracy"]
    assert (models / "cache").is_dir() and len(list((models / "cache").glob("teacher_logits_*.pt"))) == 1


def test_frontier_with_two_processes_branches_alike_and_writes_each_folder_once(tiny_pipeline):
    """FRONTIER=True under torchrun: both processes take the same pruning decisions and recover every branch (ours
    and the baseline's) to the same model; only the main process writes the folders and models/frontier.json."""
    from common.stage import read_metadata

    records = tiny_pipeline / "records"
    torchrun("8_pruning_with_finetuning.py", ["FRONTIER=True", "FRONTIER_TARGETS=(0.2, 0.4)", "PRUNE_STEPS=2",
                                              "RECOVERY_EPOCHS=0.5", "AUGMENT_PAIRS=0", "PRUNE_LR=1e-3",
                                              "RECOVERY_LR=5e-4", *SMALL], records, timeout=400)
    main, other = records_of(records)
    names = ["pruned_magnitude_s20", "pruned_magnitude_s40", "pruned_model_s20", "pruned_model_s40"]
    assert sorted(main["results"]) == sorted(other["results"]) == names
    for name in names:
        for key in ("layout", "kept_heads", "measured_sparsity", "validation_accuracy", "heldout_accuracy",
                    "heldout_accuracy_before_recovery"):
            assert main["results"][name][key] == other["results"][name][key], (name, key)
    models = tiny_pipeline / "models"
    assert only_complete_folders(models) == sorted(["pretrained_teacher", "student_model", "teacher_model", *names])
    summary = json.loads((models / "frontier.json").read_text())
    assert list(summary["runs"]) == ["42"]
    for name in names:
        meta = read_metadata(models / name)["results"]
        assert meta["validation_accuracy"] == main["results"][name]["validation_accuracy"]
        assert meta["frontier"]["sweep_id"] == summary["runs"]["42"]["sweep_id"]
