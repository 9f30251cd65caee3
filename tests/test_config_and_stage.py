"""Constants and overrides (common.config), atomic stage folders and metadata (common.stage)."""

import json

import pytest

from common.config import ConfigError, apply_defaults, as_dict, constants, parse_overrides
from common.stage import StageError, is_stale, require_stage, stage_output
from conftest import REPO

DEFAULTS = {"EPOCHS": 2, "LR": 1e-4, "DISTILL": True, "PRESET": "minilm", "LAYERS": (0, 2, 4), "QUICK": False}


def test_overrides_are_typed_and_reported():
    cfg = parse_overrides(DEFAULTS, ["EPOCHS=3", "LR=5e-5", "DISTILL=False", "LAYERS=(1, 3)"], quiet=True)
    assert (cfg.EPOCHS, cfg.LR, cfg.DISTILL, cfg.LAYERS) == (3, 5e-5, False, (1, 3))
    assert cfg.OVERRIDDEN == {"EPOCHS", "LR", "DISTILL", "LAYERS"}
    assert parse_overrides(DEFAULTS, ["LR=1"], quiet=True).LR == 1.0  # int accepted where a float is expected
    assert "OVERRIDDEN" not in as_dict(cfg) and as_dict(cfg)["LAYERS"] == [1, 3]


@pytest.mark.parametrize("arg, message", [
    ("EPOCS=3", "unknown key 'EPOCS'"),
    ("EPOCHS=three", "not a valid int"),
    ("EPOCHS=2.5", "expected int"),
    ("DISTILL=maybe", "expected a boolean"),
    ("EPOCHS", "is not KEY=VALUE"),
    ("PRESET=gpt", "not a preset"),
])
def test_bad_overrides_are_refused(arg, message):
    with pytest.raises(ConfigError, match=message):
        parse_overrides(DEFAULTS, [arg], quiet=True)


def test_defaults_by_situation_apply_in_order_and_never_undo_an_explicit_override():
    table = {"bert": {"LR": 2e-5}, "quick": {"EPOCHS": 1, "LR": 1.0}, "frontier": {"EPOCHS": 7},
             "quick frontier": {"LAYERS": (1,)}, "bert quick": {"LR": 3.0}}
    cfg = parse_overrides(dict(DEFAULTS, QUICK=True, FRONTIER=False), ["EPOCHS=5"], quiet=True)
    apply_defaults(cfg, table)
    assert (cfg.EPOCHS, cfg.LR, cfg.LAYERS) == (5, 1.0, (0, 2, 4))  # quick only: not bert, not frontier
    cfg = parse_overrides(dict(DEFAULTS, QUICK=True, FRONTIER=True), ["PRESET=bert"], quiet=True)
    apply_defaults(cfg, table)
    assert (cfg.EPOCHS, cfg.LR, cfg.LAYERS) == (7, 3.0, (1,))  # every entry holds; later ones win


def test_constants_takes_upper_case_scalars_only():
    ns = {"EPOCHS": 1, "DEFAULTS_FOR": {"quick": {"EPOCHS": 1}}, "helper": 3, "_PRIVATE": 2}
    assert constants(ns) == {"EPOCHS": 1}


@pytest.mark.parametrize("script", ["download_model.py", "1_train_teacher.py", "2_distill_student.py",
                                    "8_pruning_with_finetuning.py", "9_quantize_pruned_model.py",
                                    "7_evaluate_and_generate_report.py"])
def test_settable_keys_are_exactly_the_scripts_own_constants_block(script):
    """Imported names (SEQ_LEN, CRITERIA, MANIFEST, a module imported as F) are not settable."""
    import runpy

    from common.config import block_names

    namespace = runpy.run_path(str(REPO / script), run_name="dpq_test")
    keys = set(constants(namespace))
    assert keys == {n for n in block_names(REPO / script) if not isinstance(namespace[n], dict)}
    assert {"PRESET", "SEED"} <= keys and not keys & {"F", "MANIFEST", "SEQ_LEN", "CRITERIA", "FLOPS_CONVENTION",
                                                       "METADATA", "LEARNING_RATE", "FRONTIER_SUMMARY"}
    with pytest.raises(ConfigError, match="unknown key 'SEQ_LEN'"):
        parse_overrides(constants(namespace), ["SEQ_LEN=64"], quiet=True)


def test_stage_output_is_atomic_and_keeps_the_old_folder_on_failure(tmp_path):
    final = tmp_path / "teacher_model"
    with stage_output(final, "teacher", {"EPOCHS": 1}, seed=7) as out:
        (out.dir / "weights.bin").write_text("v1")
        out.results = {"accuracy": 0.5}
    meta = require_stage(final, "teacher")
    assert meta["seed"] == 7 and meta["results"] == {"accuracy": 0.5} and meta["config"] == {"EPOCHS": 1}
    assert (final / "stage.log").read_text().strip()

    with pytest.raises(RuntimeError, match="boom"):
        with stage_output(final, "teacher", {}, seed=7) as out:
            (out.dir / "weights.bin").write_text("v2, half written")
            raise RuntimeError("boom")
    assert (final / "weights.bin").read_text() == "v1"            # the earlier output is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["teacher_model"]  # no temporary folder left behind

    with stage_output(final, "teacher", {}, seed=7) as out:
        (out.dir / "weights.bin").write_text("v2")
    assert (final / "weights.bin").read_text() == "v2"
    assert require_stage(final, "teacher")["run_id"] != meta["run_id"]


def test_require_stage_names_the_script_to_run(tmp_path):
    with pytest.raises(StageError, match="run `python 1_train_teacher.py` first"):
        require_stage(tmp_path / "teacher_model", "teacher")
    half = tmp_path / "student_model"
    half.mkdir()
    with pytest.raises(StageError, match="did not finish.*2_distill_student.py"):
        require_stage(half, "student")


def test_downstream_notices_a_rebuilt_upstream(tmp_path):
    teacher = tmp_path / "teacher_model"
    with stage_output(teacher, "teacher", {}, seed=0):
        pass
    with stage_output(tmp_path / "student_model", "student", {}, seed=0) as out:
        out.add_upstream(teacher, "teacher")
    student_meta = json.loads((tmp_path / "student_model" / "metadata.json").read_text())
    assert student_meta["upstream"]["teacher"]["folder"] == "teacher_model"  # relative to the models root
    assert is_stale(student_meta, tmp_path) == []
    with stage_output(teacher, "teacher", {}, seed=0):
        pass
    assert is_stale(student_meta, tmp_path) == ["teacher_model rebuilt since"]


def test_a_killed_stage_leaves_no_partial_folder(tmp_path):
    import signal
    import subprocess
    import sys

    script = tmp_path / "stage_script.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from common.stage import run_main, stage_output\n"
        "def main():\n"
        f"    with stage_output({str(tmp_path / 'out')!r}, 'teacher', {{}}, 0) as out:\n"
        "        (out.dir / 'w.bin').write_text('half')\n"
        "        print('started', flush=True)\n"
        "        time.sleep(60)\n"
        "run_main(main)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:  # the stage logs its start first
        if line.strip() == "started":
            break
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 130
    assert list(tmp_path.glob(".out.partial-*")) == [] and not (tmp_path / "out").exists()

    # a partial folder from a run killed outright (SIGKILL) is removed by the next run (its owner pid is gone;
    # names from before pids were recorded count as ownerless)
    leftover = tmp_path / ".out.partial-deadbeef"
    leftover.mkdir()
    with stage_output(tmp_path / "out", "teacher", {}, seed=0):
        pass
    assert not leftover.exists() and (tmp_path / "out" / "metadata.json").is_file()
