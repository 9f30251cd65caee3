"""No run that exits 0 loses a good model; every bad input gets one line that says what to do.

Each test reproduces one way a run used to go wrong (a nonsense constant replacing a trained model, sweep targets
sharing a folder, log lines lost before the stage folder opened, staleness judged on absolute paths / one level
deep / without the data, one unreadable model stopping everything, two runs of one stage at once, awkward file
encodings, the report labelled with the wrong preset) and checks the new behaviour on tiny models and data."""

import hashlib
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification

from common.config import ConfigError
from common.data import DataError, read_glue_tsv
from common.stage import StageError, is_stale, read_metadata, require_fresh, run_main, stage_output
from conftest import REPO, run_script, tiny_bert_config, tiny_sentences, write_glue_tsv, write_stage

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fvcore imports torch.jit.script


def checksum(folder) -> str:
    """sha256 over every file of a folder (names and bytes): equal before and after means untouched."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def run_cli(script, *args, monkeypatch, capsys):
    """A stage run as from the command line (run_main, sys.argv) that fails: (exit code, stdout, stderr)."""
    namespace = runpy.run_path(str(REPO / script), run_name="dpq_test")
    monkeypatch.setattr(sys, "argv", [script, *args])
    capsys.readouterr()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit_info:
            run_main(namespace["main"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def tiny_bert(seed=0, **overrides):
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(max_position_embeddings=128, **overrides)).eval()


@pytest.fixture
def downloaded(workspace, glue_dir, monkeypatch, tiny_bert_dir):
    """data/sst2 and pretrained_teacher written by the real download stage, from tiny data and a tiny BERT."""
    monkeypatch.setenv("SST2_DIR", str(glue_dir))
    run_script("download_model.py", f"TEACHER_SOURCE={tiny_bert_dir}")
    return workspace


# ------------------------------------------------------------------------------------------------------------
# 1. a nonsense constant is refused before anything is loaded; nothing is written


@pytest.mark.parametrize("script, arg", [
    ("download_model.py", "SEED=-1"),
    ("1_train_teacher.py", "EPOCHS=0"),
    ("1_train_teacher.py", "LR=0"),
    ("1_train_teacher.py", "LR=1.5"),
    ("1_train_teacher.py", "MAX_LENGTH=0"),
    ("1_train_teacher.py", "BATCH_SIZE=0"),
    ("1_train_teacher.py", "TRAIN_LIMIT=-5"),
    ("1_train_teacher.py", "WARMUP_RATIO=1.5"),
    ("1_train_teacher.py", "EVALS_PER_EPOCH=0"),
    ("2_distill_student.py", "TEMPERATURE=0"),
    ("2_distill_student.py", "ALPHA=1.5"),
    ("2_distill_student.py", "EPOCHS=0"),
    ("2_distill_student.py", "STUDENT_LAYERS=()"),
    ("2_distill_student.py", "STUDENT_LAYERS=(0, 0)"),
    ("2_distill_student.py", "SEEDS=(42, 42)"),
    ("8_pruning_with_finetuning.py", "PRUNE_LR=0"),
    ("8_pruning_with_finetuning.py", "RECOVERY_EPOCHS=-1"),
    ("8_pruning_with_finetuning.py", "PRUNE_STEPS=0"),
    ("8_pruning_with_finetuning.py", "BATCH_SIZE=0"),
    ("8_pruning_with_finetuning.py", "FRONTIER_TARGETS=(0.2, 1.5)"),
    ("9_quantize_pruned_model.py", "EVAL_BATCH_SIZE=0"),
    ("9_quantize_pruned_model.py", "MAX_LENGTH=4"),
    ("9_quantize_pruned_model.py", "QUANT_TYPE=int3"),
    ("9_quantize_pruned_model.py", "ONNX=('int2',)"),
    ("7_evaluate_and_generate_report.py", "LATENCY_BATCH_SIZES=(0,)"),
    ("7_evaluate_and_generate_report.py", "VALIDATION_LIMIT=-1"),
    ("7_evaluate_and_generate_report.py", "FLOPS_SEQ_LEN=0"),
])
def test_every_stage_refuses_a_nonsense_constant_before_loading_anything(workspace, script, arg):
    key = arg.split("=")[0]
    # the workspace is empty: a check made after loading would fail on the missing inputs instead
    with pytest.raises(ConfigError, match=rf"^{key}=.*: must be ") as err:
        run_script(script, arg)
    assert "\n" not in str(err.value)
    assert not (workspace / "models").exists() and not (workspace / "data").exists()


def test_a_nonsense_constant_never_replaces_a_trained_teacher(downloaded, monkeypatch, capsys):
    from common.paths import stage_dir

    teacher = write_stage(tiny_bert(), stage_dir("teacher"), "teacher")
    before = checksum(teacher)
    for arg, key_range in (("EPOCHS=0", "EPOCHS=0: must be an integer >= 1"),
                           ("LR=0", "LR=0.0: must be a number in (0, 1)"),
                           ("MAX_LENGTH=0", "MAX_LENGTH=0: must be an integer from 8 to 512"),
                           ("BATCH_SIZE=0", "BATCH_SIZE=0: must be an integer >= 1"),
                           ("TRAIN_LIMIT=-5", "TRAIN_LIMIT=-5: must be an integer >= 0")):
        code, _, err = run_cli("1_train_teacher.py", arg, monkeypatch=monkeypatch, capsys=capsys)
        assert code == 1 and key_range in one_error_line(err)
    assert checksum(teacher) == before


# ------------------------------------------------------------------------------------------------------------
# 2. sweep targets that would share a folder


def test_sweep_targets_sharing_a_folder_are_refused_before_any_work(workspace):
    from common.paths import models_root

    existing = write_stage(tiny_bert(), models_root() / "pruned_model_s20", "pruned")
    before = checksum(existing)
    for targets in ("(0.2, 0.204)", "(0.5, 0.2, 0.5)"):
        with pytest.raises(ConfigError, match=r"PRUNE_TARGETS=.*: must be .*no two in the same whole percent"):
            run_script("8_pruning_with_finetuning.py", f"PRUNE_TARGETS={targets}")
    assert checksum(existing) == before
    assert sorted(p.name for p in models_root().iterdir()) == ["pruned_model_s20"]


# ------------------------------------------------------------------------------------------------------------
# 3. lines logged before the stage folder opens: on screen and in its stage.log


def test_lines_logged_before_the_folder_opens_reach_its_stage_log(tmp_path, capsys):
    from common.stage import logger, setup_logging

    setup_logging()
    logger.info("found 3 inputs")
    with stage_output(tmp_path / "out", "teacher", {}, 0):
        logger.info("inside")
    log = (tmp_path / "out" / "stage.log").read_text()
    assert log.index("found 3 inputs") < log.index("inside")
    assert "found 3 inputs" in capsys.readouterr().out


def test_a_corrupt_teacher_logit_cache_is_rebuilt_and_says_so(downloaded, capsys):
    from common.paths import stage_dir

    write_stage(tiny_bert(), stage_dir("teacher"), "teacher")
    args = ("STUDENT_LAYERS=(0,)", "EPOCHS=1", "TRAIN_LIMIT=32", "BATCH_SIZE=16", "EVALS_PER_EPOCH=1")
    run_script("2_distill_student.py", *args)
    [cache] = (downloaded / "models" / "cache").glob("teacher_logits_*.pt")
    cache.write_bytes(b"not a torch file")
    capsys.readouterr()

    run_script("2_distill_student.py", *args)
    out = capsys.readouterr().out
    log = (stage_dir("student") / "stage.log").read_text()
    for text in (out, log):
        assert f"cache {cache} unreadable" in text and "rebuilding" in text
        assert "student: BertForSequenceClassification" in text  # the parameter-count line, also logged before
    assert torch.load(cache, weights_only=True)["logits"].shape == (32, 2)  # rebuilt


# ------------------------------------------------------------------------------------------------------------
# 4. staleness: relative records, transitive, data tracked


def _chain(root, stages=("teacher", "student", "pruned", "pruned_quantized")):
    """Empty stage folders, each recording the one before as upstream."""
    names = {"teacher": "teacher_model", "student": "student_model", "pruned": "pruned_model",
             "pruned_quantized": "pruned_quantized_final"}
    previous = None
    for stage in stages:
        with stage_output(root / names[stage], stage, {}, 0) as out:
            if previous:
                out.add_upstream(root / names[previous], previous)
        previous = stage
    return {stage: root / names[stage] for stage in stages}


def test_a_copied_models_folder_is_judged_on_its_own_folders(tmp_path):
    original = _chain(tmp_path / "a" / "models", ("teacher", "student"))
    copy = tmp_path / "b" / "models"
    shutil.copytree(tmp_path / "a" / "models", copy)
    student_meta = read_metadata(copy / "student_model")
    assert student_meta["upstream"]["teacher"]["folder"] == "teacher_model"

    with stage_output(original["teacher"], "teacher", {}, 0):  # the ORIGINAL teacher is retrained
        pass
    assert is_stale(student_meta, copy) == []  # the copy is consistent with itself
    assert is_stale(read_metadata(original["student"]), original["student"].parent) == ["teacher_model rebuilt since"]

    # a record written before records were relative (an absolute path into the original tree): the folder of
    # that name under the current root is used
    student_meta["upstream"]["teacher"]["folder"] = str(original["teacher"])
    assert is_stale(student_meta, copy) == []


def test_staleness_passes_down_the_whole_chain(tmp_path):
    from common.report.compare import headline
    from common.report.discover import folder_status

    root = tmp_path / "models"
    folders = _chain(root)
    assert all(is_stale(read_metadata(f), root) == [] for f in folders.values())
    with stage_output(folders["teacher"], "teacher", {}, 0):
        pass
    final_meta = read_metadata(folders["pruned_quantized"])
    assert is_stale(final_meta, root) == ["teacher_model rebuilt since (via pruned_model <- student_model)"]
    with pytest.raises(StageError) as err:
        require_fresh(folders["pruned_quantized"], final_meta, "pruned_quantized")
    assert str(err.value).startswith(f"{folders['pruned_quantized']} is stale (teacher_model rebuilt since")
    assert ("run `python 2_distill_student.py`, then `python 8_pruning_with_finetuning.py`, then "
            "`python 9_quantize_pruned_model.py` again first") in str(err.value)

    # the report marks it, and the headline says so when a headline model is stale
    _, notes = folder_status(folders["pruned_quantized"])
    assert notes[0].startswith("stale: ") and "9_quantize_pruned_model.py" in notes[0]
    record = {"gflops": 1.0, "accuracy": 0.9, "size_mb": 1.0, "latency_ms": {"batch_1": 1.0}, "stale": False}
    models = {"distilled_quantized_student": dict(record, gflops=2.0),
              "pruned_quantized_final": dict(record, stale=True)}
    cpu = {"name": "cpu", "logical_cores": 2, "flags": [], "bf16_native": False}
    head, _ = headline(models, cpu=cpu)
    assert head["stale"] == ["pruned_quantized_final"]
    assert "Caveat: pruned_quantized_final is stale" in head["sentence"]


def test_new_data_marks_every_model_built_on_the_old_data_stale(downloaded, tmp_path, monkeypatch, caplog,
                                                                 tiny_bert_dir):
    from common.paths import stage_dir

    pretrained = read_metadata(stage_dir("pretrained_teacher"))
    with stage_output(stage_dir("teacher"), "teacher", {}, 0) as out:  # a teacher as stage 1 records it
        out.add_upstream(stage_dir("pretrained_teacher"), "pretrained_teacher")
        out.add_data()
        out.results = {"preset": "minilm", "validation_accuracy": 0.5}
    teacher_meta = read_metadata(stage_dir("teacher"))
    assert teacher_meta["data_sha256"] and is_stale(teacher_meta) == []

    # download_model.py again: the same models, other data
    other = tmp_path / "other_sst2"
    write_glue_tsv(other / "train.tsv", tiny_sentences(300, seed=7))
    write_glue_tsv(other / "dev.tsv", tiny_sentences(40, seed=8))
    monkeypatch.setenv("SST2_DIR", str(other))
    with caplog.at_level("WARNING", logger="dpq"):
        run_script("download_model.py", f"TEACHER_SOURCE={tiny_bert_dir}")
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warning) == 1 and warning[0].startswith("WARNING: 1 model folder(s)")
    assert "teacher_model (data/sst2 changed since)" in warning[0] and "`python 1_train_teacher.py`" in warning[0]
    # the pretrained model itself did not change: kept, so nothing else turns stale because of it
    assert read_metadata(stage_dir("pretrained_teacher"))["run_id"] == pretrained["run_id"]

    before = checksum(stage_dir("teacher"))
    with pytest.raises(StageError, match=rf"^{stage_dir('teacher')} is stale \(data/sst2 changed since\): run "
                                         r"`python 1_train_teacher.py` again first$"):
        run_script("2_distill_student.py")
    assert checksum(stage_dir("teacher")) == before and not stage_dir("student").exists()


# ------------------------------------------------------------------------------------------------------------
# 5. an unreadable model folder: one line naming it and its script, found before heavy work


def _truncate(folder):
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


def test_a_truncated_student_stops_pruning_in_one_line_before_teacher_logits(downloaded, monkeypatch, capsys):
    from common.paths import stage_dir

    teacher = write_stage(tiny_bert(), stage_dir("teacher"), "teacher")
    student = write_stage(tiny_bert(1), stage_dir("student"), "student", [(teacher, "teacher")])
    _truncate(student)
    code, _, err = run_cli("8_pruning_with_finetuning.py", "TRAIN_LIMIT=32", monkeypatch=monkeypatch, capsys=capsys)
    line = one_error_line(err)
    assert code == 1 and line.startswith(f"error: {student} cannot be read (SafetensorError")
    assert line.endswith("it is written by `python 2_distill_student.py`; run it again")
    assert not (downloaded / "models" / "cache").exists()  # found before the teacher logits were computed
    assert not stage_dir("pruned").exists()


def test_an_impossible_layout_names_the_folder_and_its_script(downloaded, tmp_path, monkeypatch, capsys):
    from common.modeling import save_model
    from common.paths import stage_dir
    from common.pruning.selection import prune_units
    from conftest import make_tokenizer

    student = write_stage(tiny_bert(1), stage_dir("student"), "student")
    model = tiny_bert(1)
    prune_units(model, heads={0: [0]}, ffn={1: range(32)})
    with stage_output(stage_dir("pruned"), "pruned", {}, 0) as out:
        out.add_upstream(student, "student")
        save_model(model, make_tokenizer(tmp_path / "tokenizer"), out.dir)
        out.results = {"preset": "minilm"}
    config = json.loads((stage_dir("pruned") / "config.json").read_text())
    config["dpq_layout"]["heads"][0] = 9  # more heads than the model has
    (stage_dir("pruned") / "config.json").write_text(json.dumps(config))

    code, _, err = run_cli("9_quantize_pruned_model.py", "QUANTIZE=('pruned',)", monkeypatch=monkeypatch,
                           capsys=capsys)
    line = one_error_line(err)
    assert code == 1 and line.startswith(f"error: {stage_dir('pruned')} cannot be read (ValueError: bad pruning layout")
    assert "`python 8_pruning_with_finetuning.py`" in line
    assert not stage_dir("pruned_quantized").exists()


def test_report_skips_an_unreadable_model_and_still_writes_the_rest(workspace, monkeypatch):
    """Also: the report's preset comes from the models (PRESET=bert on a MiniLM report is a warning only)."""
    from common.data import MANIFEST, manifest_for
    from common.modeling import load_model, load_tokenizer
    from common.paths import stage_dir
    from common.quantization import quantize_model, save_quantized

    data = workspace / "data" / "sst2"
    write_glue_tsv(data / "train.tsv", tiny_sentences(40, seed=1))
    write_glue_tsv(data / "validation.tsv", tiny_sentences(24, seed=2))
    (data / MANIFEST).write_text(json.dumps(manifest_for(data, "test")))
    student = write_stage(tiny_bert(1), stage_dir("student"), "student")
    with stage_output(stage_dir("student_quantized"), "student_quantized", {}, 0) as out:
        out.add_upstream(student, "student")
        save_quantized(quantize_model(load_model(student)), load_tokenizer(student), out.dir)
        out.results = {"preset": "minilm"}
    _truncate(student)
    monkeypatch.setenv("REPORT_DIR", str(workspace / "report"))
    monkeypatch.setenv("PRESET", "bert")

    report = run_script("7_evaluate_and_generate_report.py", "QUICK=True", "LATENCY_RUNS=2", "WARMUP_RUNS=1",
                        "MAX_LENGTH=64", "FLOPS_SEQ_LEN=64", "THREADS=1")
    assert list(report["models"]) == ["distilled_quantized_student"]
    assert f"{student} cannot be read" in report["skipped"]["student_model"]
    assert "2_distill_student.py" in report["skipped"]["student_model"]
    twin = report["models"]["distilled_quantized_student"]
    assert twin["gflops_source"].startswith("fp32 twin rebuilt from distilled_quantized_student")
    assert twin["gflops"] > 0
    saved = json.loads((workspace / "report" / "final_report.json").read_text())
    assert saved["skipped"] == report["skipped"]
    markdown = (workspace / "report" / "final_report.md").read_text()
    assert markdown.index("**Skipped.** `student_model`") < markdown.index("| model |")

    assert report["run"]["preset"] == "minilm"
    assert "PRESET=bert ignored: the models were made with preset minilm" in report["warnings"]


def test_min_latency_runs_is_not_a_settable_constant(workspace):
    with pytest.raises(ConfigError, match="unknown key 'MIN_LATENCY_RUNS'"):
        run_script("7_evaluate_and_generate_report.py", "MIN_LATENCY_RUNS=1")


# ------------------------------------------------------------------------------------------------------------
# 6. two runs of one stage at once


def test_a_second_run_refuses_while_the_first_holds_the_folder(tmp_path):
    final = tmp_path / "models" / "pruned_quantized_final"
    with stage_output(final, "pruned_quantized", {}, 0) as out:
        (out.dir / "w.bin").write_text("good")
    before = checksum(final)
    script = tmp_path / "first_run.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from common.stage import stage_output\n"
        f"with stage_output({str(final)!r}, 'pruned_quantized', {{}}, 0) as out:\n"
        "    (out.dir / 'w.bin').write_text('half')\n"
        "    print('started', flush=True)\n"
        "    time.sleep(120)\n"
    )
    first = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        for line in first.stdout:
            if line.strip() == "started":
                break
        [partial] = final.parent.glob(".pruned_quantized_final.partial-*")
        assert f".partial-{first.pid}-" in partial.name

        with pytest.raises(StageError) as err:
            with stage_output(final, "pruned_quantized", {}, 0):
                pytest.fail("a second run started while the first holds the folder")
        assert str(err.value).startswith(f"{final} is being written by another run (pid {first.pid}")
        assert partial.is_dir() and checksum(final) == before  # neither run's folder was touched
    finally:
        first.kill()  # killed outright: no cleanup of its own
        first.wait(timeout=30)

    assert partial.is_dir()
    with stage_output(final, "pruned_quantized", {}, 0) as out:  # its lock and partial folder are taken over
        (out.dir / "w.bin").write_text("new")
    log = (final / "stage.log").read_text()
    assert f"taking over the lock of pid {first.pid}" in log and f"removing {partial.name}" in log
    assert not partial.exists() and (final / "w.bin").read_text() == "new"
    assert sorted(p.name for p in final.parent.iterdir()) == ["pruned_quantized_final"]


def test_a_partial_folder_whose_owner_is_alive_is_left_alone(tmp_path):
    alive = tmp_path / f".out.partial-{os.getppid()}-abc"  # pytest's parent process: alive
    alive.mkdir()
    with stage_output(tmp_path / "out", "teacher", {}, 0):
        pass
    assert alive.is_dir()


# ------------------------------------------------------------------------------------------------------------
# 7. encodings


def test_bom_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "bom.tsv"
    path.write_bytes(b"\xef\xbb\xbfsentence\tlabel\r\ngood film\t1\r\nbad film\t0\r\n")
    assert read_glue_tsv(path) == [("good film", 1), ("bad film", 0)]


def test_old_mac_cr_only_line_ends_are_read_as_crlf_is(tmp_path):
    """A file with no LF at all ends its lines with CR (old Mac): read it, line numbers as an editor counts them.
    In a file with LF line ends only the CR of a CRLF is dropped; any other CR is text. A file whose header is too
    long to be one (mixed line ends) is refused with the header's start, not the whole file."""
    path = tmp_path / "mac.tsv"
    path.write_bytes(b"\xef\xbb\xbfsentence\tlabel\rgood film\t1\r\rbad film\t0\r")
    assert read_glue_tsv(path) == [("good film", 1), ("bad film", 0)]
    path.write_bytes(b"sentence\tlabel\rgood film\t1\rbad film\t2\r")
    with pytest.raises(DataError, match=r"mac.tsv, line 3: label '2' is not 0 or 1$"):
        read_glue_tsv(path)
    path.write_bytes(b"sentence\tlabel\ngood\rfilm\t1\r\n")
    assert read_glue_tsv(path) == [("good\rfilm", 1)]
    path.write_bytes(b"sentence\tlabel\r" + b"good film\t1\r" * 1000 + b"\n")  # CR lines, then one LF
    with pytest.raises(DataError) as err:
        read_glue_tsv(path)
    assert str(err.value) == (f"{path}, line 1: header is 'sentence\\tlabel\\rgood film\\t1\\rgood film\\t1\\rgood "
                              f"film\\t1\\rgood film'... (12,014 characters), expected 'sentence<TAB>label'")


@pytest.mark.parametrize("content, message", [
    ("sentence\tlabel\ngood\t1\n".encode("utf-16"), "line 1: the file is UTF-16"),
    ("sentence\tlabel\ngood\t1\n".encode("utf-16-le"), "line 1: NUL bytes"),
    (b"sentence\tlabel\ngood\t1\ncaf\xe9 au lait\t1\n", "line 3: byte 0xe9 at column 4 is not UTF-8"),
    (b"sentence\tlabel\n" + b"x" * 300_000 + b"\t1\n", "line 2: 300,002 characters"),
])
def test_undecodable_or_oversized_files_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "reviews.tsv"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        read_glue_tsv(path)
    assert str(err.value).startswith(f"{path}, ") and message in str(err.value) and "\n" not in str(err.value)


def test_download_refuses_a_latin1_dev_file_in_one_line(workspace, glue_dir, monkeypatch, capsys):
    (glue_dir / "dev.tsv").write_bytes(b"sentence\tlabel\nna\xefve\t1\n")
    monkeypatch.setenv("SST2_DIR", str(glue_dir))
    code, _, err = run_cli("download_model.py", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and f"{glue_dir / 'dev.tsv'}, line 2: byte 0xef" in one_error_line(err)
    assert not (workspace / "models").exists()


# ------------------------------------------------------------------------------------------------------------
# run_main: the project's errors in one line, exit 1; anything else keeps its traceback


@pytest.mark.parametrize("error", [
    StageError("first line\nsecond line"), ConfigError("bad key"), DataError("bad file"),
])
def test_run_main_turns_project_errors_into_one_line(error, capsys):
    def main():
        raise error

    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit_info:
            run_main(main)
        assert exit_info.value.code == 1
        assert one_error_line(capsys.readouterr().err) == "error: " + " ".join(str(error).split())
        with pytest.raises(ZeroDivisionError):
            run_main(lambda: 1 / 0)
    finally:
        signal.signal(signal.SIGTERM, previous)
