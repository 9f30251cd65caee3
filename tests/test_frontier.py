"""Seeds, the single-run frontier and the magnitude baseline (8_pruning_with_finetuning.py FRONTIER=True / SEEDS,
common.pruning.frontier), their 4-bit twins (9_quantize_pruned_model.py) and the report's aggregation (common.report), on a
tiny random BERT pipeline built here (tiny SST-2-like data, 2-layer student, 3-layer teacher)."""

import json
import re
import shutil
import subprocess

import pytest
import torch

from common.flops import measure_encoder_gflops
from common.modeling_dpq import block_parts
from common.pruning import frontier as frontier_module
from common.pruning.importance import magnitude_importance
from common.pruning.schedule import Schedule, cubic_step, gradual_prune, pruning_schedule
from common.pruning.selection import kept_units, prune_to_target, unit_flops
from conftest import (REPO, run_script, save_tiny, tiny_bert_config, tiny_sentences, write_glue_tsv,
                      write_tiny_teacher_and_student)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fvcore imports torch.jit.script

STAGE = "8_pruning_with_finetuning.py"
FAST = ("TRAIN_LIMIT=64", "BATCH_SIZE=8", "PRUNE_STEPS=2", "EVALS_PER_EPOCH=1", "PRUNE_LR=1e-3",
        "RECOVERY_LR=5e-4")
TARGETS = (0.2, 0.5, 0.8)  # the tiny student can lose ~87% of its encoder GFLOPs (every head, half the FFN)
REPORT_ARGS = ("QUICK=True", "LATENCY_RUNS=2", "WARMUP_RUNS=1", "MAX_LENGTH=64", "FLOPS_SEQ_LEN=64",
               "EVAL_BATCH_SIZE=64", "THREADS=1")
SEQ = 32


def _tiny_pipeline(root, mp):
    """data/sst2 from the real download stage, tiny teacher_model and student_model folders under root/models."""
    from transformers import BertForSequenceClassification

    for key, folder in (("MODELS_DIR", "models"), ("DATA_DIR", "data"), ("REPORT_DIR", "report")):
        mp.setenv(key, str(root / folder))
    mp.setenv("PRESET", "minilm")
    mp.delenv("QUICK", raising=False)
    glue = root / "glue_sst2"
    write_glue_tsv(glue / "train.tsv", tiny_sentences(400, seed=1))
    write_glue_tsv(glue / "dev.tsv", tiny_sentences(60, seed=2))
    mp.setenv("SST2_DIR", str(glue))
    torch.manual_seed(0)
    source = save_tiny(BertForSequenceClassification(tiny_bert_config()).eval(), root / "tiny_bert")
    run_script("download_model.py", f"TEACHER_SOURCE={source}")
    write_tiny_teacher_and_student()
    return root / "models"


@pytest.fixture(scope="module")
def frontier(tmp_path_factory):
    """ONE stage-8 frontier invocation (3 targets, ours + magnitude, seeds 42 and 43), stage 9 (4-bit twins of every
    pruned folder) and the report over all of it; the schedules gradual_prune was called with are kept."""
    root = tmp_path_factory.mktemp("frontier")
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        models = _tiny_pipeline(root, mp)

        def counted(*args, **kwargs):
            calls.append(args[4])  # the Schedule
            return gradual_prune(*args, **kwargs)

        mp.setattr(frontier_module, "gradual_prune", counted)
        results = run_script(STAGE, "FRONTIER=True", f"FRONTIER_TARGETS={TARGETS}", "SEEDS=(42, 43)",
                             "AUGMENT_PAIRS=16", *FAST)  # RECOVERY_EPOCHS: the frontier's 0.25
        mp.setattr(frontier_module, "gradual_prune", gradual_prune)
        quantized = run_script("9_quantize_pruned_model.py", 'QUANTIZE=("student", "sweep")', "ONNX=()")
        report = run_script("7_evaluate_and_generate_report.py", *REPORT_ARGS)
        yield {"root": root, "models": models, "results": results, "calls": calls, "quantized": quantized,
               "report": report}


def _meta(folder):
    return json.loads((folder / "metadata.json").read_text())


def test_frontier_is_one_gradual_run_with_a_branch_per_target(frontier):
    models, calls = frontier["models"], frontier["calls"]
    # one gradual run per seed, told to stop at every earlier target on its way to the last
    assert len(calls) == 2
    assert all(c.target_sparsity == 0.8 and c.milestones == (0.2, 0.5) and c.steps_per_epoch == 2 for c in calls)
    summary = json.loads((models / "frontier.json").read_text())
    assert summary["targets"] == list(TARGETS) and summary["seeds"] == [42, 43]
    assert summary["methods"] == ["taylor", "magnitude"] and summary["wall_time_s"] > 0
    settings = summary["settings"]
    assert settings["recovery_lr"] == 5e-4  # given on the command line: wins over the frontier's default
    assert settings["recovery_epochs"] == 0.25 and settings["recovery_keep"] == "last"  # the frontier's defaults
    assert summary["augment_pairs"] == 16
    passes = summary["training_passes_per_seed"]
    assert passes == {"gradual_run": 1, "branch_recoveries": 0.75, "baseline_recoveries": 0.75, "total": 2.5}
    for seed, suffix in ((42, ""), (43, "_seed43")):
        run = summary["runs"][str(seed)]
        assert run["gradual_runs"] == 1 and run["wall_time_s"] >= run["gradual_run_s"] > 0
        hits = [e for e in run["trajectory"] if e["milestone"]]
        assert [e["target_sparsity"] for e in hits] == [0.2, 0.5]  # each earlier target hit exactly by one event
        assert run["trajectory"][-1]["target_sparsity"] == 0.8
        steps = [e["step"] for e in run["trajectory"]]
        assert steps == sorted(set(steps))  # one event per training step
        gflops = []
        for target in TARGETS:
            folder = models / f"pruned_model_s{round(100 * target)}{suffix}"
            meta = _meta(folder)
            r = meta["results"]
            assert meta["seed"] == seed and r["seed"] == seed and r["mode"] == "frontier" and r["method"] == "taylor"
            assert r["target_sparsity"] == target and r["measured_sparsity"] >= target
            assert r["frontier"]["sweep_id"] == run["sweep_id"]
            assert r["frontier"]["sweep_wall_time_s"] == run["wall_time_s"]  # the whole sweep, added at its end
            if target < 0.8:  # a branch of the run: saved at the event that hit its target
                assert r["frontier"]["branch_step"] == next(e["step"] for e in hits if e["target_sparsity"] == target)
            assert r["train_sentences"] == 64 + 16  # the training rows and the joined pairs
            assert r["recovery_batches"] == 3  # a quarter of the 10 batches of an epoch, rounded up
            assert r["keep"] == "last" and r["kept_state"].startswith(("recovery", "pruning"))
            versus = r["last_vs_best"]  # the last step unless another state is significantly better on held-out
            assert ("(last)" in r["kept_state"]) == (versus["only_best"] <= versus["only_last"] or versus["p"] >= 0.05)
            gflops.append(r["encoder_gflops_after"])
        assert gflops == sorted(gflops, reverse=True) and len(set(gflops)) == len(gflops)
        point = {p["target_sparsity"]: p for p in run["points"]["taylor"]}
        assert set(point) == set(TARGETS) and all(point[t]["measured_sparsity"] >= t for t in TARGETS)


def test_frontier_summary_keeps_earlier_seeds_made_the_same_way(frontier, tmp_path):
    """`SEEDS=(43,)` after a run of 42 and 43 keeps seed 42's entry in frontier.json, but only while its folders are
    the ones it wrote and the frontier settings are the same."""
    earlier_runs = frontier_module.earlier_frontier_runs
    old = json.loads((frontier["models"] / "frontier.json").read_text())
    new = dict(old, runs={"43": old["runs"]["43"]})
    path = tmp_path / "frontier.json"
    path.write_text(json.dumps(old))
    assert earlier_runs(path, new) == {"42": old["runs"]["42"]}
    other = dict(new, settings=dict(new["settings"], recovery_epochs=0.5))
    assert earlier_runs(path, other) == {}  # made another way: not comparable
    assert earlier_runs(tmp_path / "missing.json", new) == {}
    rewritten = dict(old, runs={"42": dict(old["runs"]["42"], sweep_id="another")})  # folders rewritten since
    path.write_text(json.dumps(rewritten))
    assert earlier_runs(path, new) == {}


def test_magnitude_baseline_folders(frontier):
    models = frontier["models"]
    for seed, suffix in ((42, ""), (43, "_seed43")):
        ours_batches = None
        for target in TARGETS:
            r = _meta(models / f"pruned_magnitude_s{round(100 * target)}{suffix}")["results"]
            assert r["method"] == "magnitude" and r["seed"] == seed and r["measured_sparsity"] >= target
            assert len(r["trajectory"]) == 1  # one shot, no gradual schedule
            ours = _meta(models / f"pruned_model_s{round(100 * target)}{suffix}")["results"]
            assert r["recovery_batches"] == ours["recovery_batches"]  # the same recovery budget
            ours_batches = ours["recovery_batches"]
        assert ours_batches == 3  # a quarter of (64 rows + 16 pairs) / 8, rounded up
    # stage 9 made a 4-bit twin of every fp32 pruned folder
    names = {p.name for p in models.iterdir() if p.is_dir()}
    for name in [n for n in names if n.startswith("pruned_") and not n.endswith("_quantized")]:
        assert f"{name}_quantized" in names, name
    assert set(frontier["quantized"]) >= {"pruned_magnitude_s50_seed43_quantized", "pruned_model_s80_quantized"}


def test_report_aggregates_seeds_and_draws_both_frontiers(frontier):
    report = json.loads((frontier["root"] / "report" / "final_report.json").read_text())
    models = report["models"]
    assert {"pruned_model_s50_seed43", "pruned_magnitude_s80", "pruned_magnitude_s20_seed43_quantized"} <= set(models)
    assert all(models[n]["family"] == "pruned" for n in models if n.startswith("pruned_"))
    assert models["pruned_magnitude_s50"]["pruning_method"] == "magnitude"
    assert models["pruned_model_s50_seed43"]["seed"] == 43
    order = report["model_order"]
    assert order.index("pruned_model_s20") < order.index("pruned_model_s20_seed43") < order.index(
        "pruned_magnitude_s20") < order.index("pruned_model_s50")

    group = report["seed_groups"]["pruned_model_s50"]
    assert group["members"] == ["pruned_model_s50", "pruned_model_s50_seed43"] and group["seeds"] == [42, 43]
    spread = group["accuracy_seed_spread"]
    accuracies = [100 * models[n]["accuracy"] for n in group["members"]]
    assert spread["n_seeds"] == 2 and spread["mean"] == pytest.approx(sum(accuracies) / 2)
    assert spread["std"] == pytest.approx(abs(accuracies[0] - accuracies[1]) / 2 ** 0.5)
    assert set(group["accuracy_ci_per_seed"]) == set(group["members"])
    assert [c["model"] for c in group["vs_student"]["per_seed"]] == group["members"]
    assert group["vs_student"]["reference"] == "student_model"
    twins = report["seed_groups"]["pruned_model_s50_quantized"]
    assert twins["seeds"] == [42, 43]  # a 4-bit twin carries the training seed of its fp32 source
    assert twins["vs_student"]["reference"] == "distilled_quantized_student"
    assert "seed-to-seed" in report["seed_convention"] and "over the validation sentences" in report["seed_convention"]
    from common.report.discover import seed_group

    assert seed_group("pruned_model_seed43_quantized") == "pruned_quantized_final"  # pruned_model's 4-bit twin
    assert seed_group("student_model_seed43") == "student_model"
    paired = {c["a"] for c in report["comparisons"] if c["kind"] == "pruned vs student"}
    assert {"pruned_model_s50_seed43", "pruned_magnitude_s80"} <= paired

    rows = report["frontier"]["rows"]
    kinds = {(r["target_sparsity"], r["method"], r["bits"]) for r in rows}
    assert kinds == {(t, m, b) for t in TARGETS for m in ("taylor", "magnitude") for b in (32, 4)}
    assert all(r["n_seeds"] == 2 for r in rows)
    for row in rows:
        if row["method"] == "taylor":
            assert row["vs_magnitude"]["reference"].startswith("pruned_magnitude")
            several = row["vs_magnitude_seeds"]  # each seed paired with the baseline of the same seed
            assert [("_seed43" in c["model"], "_seed43" in c["reference"]) for c in several["per_seed"]] \
                == [(False, False), (True, True)]
            rival = next(r for r in rows if r["method"] == "magnitude" and r["bits"] == row["bits"]
                         and r["target_sparsity"] == row["target_sparsity"])
            margin = row["accuracy_seed_spread"]["mean"] - rival["accuracy_seed_spread"]["mean"]
            assert several["mean_difference_points"] == pytest.approx(margin, abs=1e-3)
            assert several["beats_by_more_than_seed_spread"] == (margin > max(row["accuracy_seed_spread"]["std"],
                                                                              rival["accuracy_seed_spread"]["std"]))
    assert all(r["gflops_reduction_vs_student"] > 0 for r in rows)
    for row in rows:  # measured: each member timed run by run next to the student of its precision, seeds averaged
        speed = row["speedup_vs_student"]
        assert speed["reference"] == ("student_model" if row["bits"] == 32 else "distilled_quantized_student")
        for k in row["latency_ms"]:
            paired = [models[n]["speedup_vs_reference"][k] for n in row["members"]]
            assert all(p["reference"] == speed["reference"] and p["runs"] == 2 and p["ci"] is None for p in paired)
            assert speed[k] == pytest.approx(sum(p["speedup"] for p in paired) / len(paired), abs=1e-3)
            assert row["speedup_detail"][k]["paired"]
            spread = row["speedup_detail"][k]["seed_spread"]  # the speed-up's spread across the two seeds
            assert spread["n_seeds"] == 2 and spread["mean"] == pytest.approx(speed[k], abs=1e-3)
    assert models["student_model"]["speedup_vs_reference"] == {}  # the reference is timed alone
    assert models["distilled_quantized_student"]["speedup_vs_reference"]["batch_32"]["reference"] == "student_model"
    assert len(report["frontier"]["frontier_runs"]) == 2

    md = (frontier["root"] / "report" / "final_report.md").read_text()
    assert "## Accuracy-compute frontier" in md and "## Seeds" in md and "(2 seeds)" in md
    assert "magnitude one-shot (baseline)" in md and "ours - magnitude" in md and "the seed spread" in md
    assert re.search(r"\| \d+\.\d\d ± \d+\.\d\dx \|", md)  # speed-up: mean ± s.d. over the two seeds (2 runs: no interval)
    png = frontier["root"] / "report" / "final_report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the chart's accuracy-by-length panel: one line per fp32 row of the method (seed means), plus the student
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.report.chart import _length_panel

    length = report["by_length"]
    fig, ax = plt.subplots()
    _length_panel(ax, length, "magnitude")
    ours = sorted((r for r in length["frontier_rows"] if r["method"] == "magnitude" and r["bits"] == 32),
                  key=lambda r: r["target_sparsity"])
    drawn = [list(line.get_ydata()) for line in ax.get_lines()]
    assert drawn == [[y for y in r["accuracy_points_mean"] if y is not None] for r in ours] \
        + [[y for y in length["models"]["student_model"]["accuracy_points"] if y is not None]]
    assert len(ax.get_xticklabels()) == len(length["buckets"]) == 4
    plt.close(fig)


def test_magnitude_ranking_removes_the_smallest_norm_units(tiny_bert):
    """Hand-made weights: head 2 of layer 1 and the odd FFN neurons of layer 0 have the smallest weights."""
    from common.modeling_dpq import encoder_layers

    with torch.no_grad():
        for layer in encoder_layers(tiny_bert):
            parts = block_parts(layer)
            for lin in (parts.query, parts.key, parts.value, parts.attn_out, parts.ffn_in, parts.ffn_out):
                lin.weight.fill_(1.0)
        parts = block_parts(encoder_layers(tiny_bert)[1])
        for lin in (parts.query, parts.key, parts.value):
            lin.weight[16:24] = 0.1  # head 2 = rows 16..23 (head size 8)
        parts.attn_out.weight[:, 16:24] = 0.1
        parts = block_parts(encoder_layers(tiny_bert)[0])
        parts.ffn_in.weight[1::2] = 0.5
        parts.ffn_out.weight[:, 1::2] = 0.5
    imp = magnitude_importance(tiny_bert)
    assert imp["heads"][1].tolist() == pytest.approx([4 * 8 * 32.0, 4 * 8 * 32.0, 4 * 8 * 32 * 0.01, 4 * 8 * 32.0])
    assert imp["ffn"][0][:2].tolist() == pytest.approx([64.0, 64 * 0.25])

    cost = unit_flops(tiny_bert, SEQ)
    base = measure_encoder_gflops(tiny_bert, SEQ)
    result = prune_to_target(tiny_bert, imp, base - cost["head"][1] / 1e9, seq_len=SEQ)
    assert result["removed_heads"] == {1: [2]} and result["removed_ffn"] == {}
    imp = magnitude_importance(tiny_bert)  # current numbering after the removal
    result = prune_to_target(tiny_bert, imp, measure_encoder_gflops(tiny_bert, SEQ)
                                     - 32 * cost["ffn_neuron"][0] / 1e9, seq_len=SEQ)
    assert result["removed_ffn"] == {0: 32} and result["removed_heads"] == {}
    assert kept_units(tiny_bert)["ffn"][0] == list(range(0, 64, 2))


def test_schedule_places_an_event_exactly_at_each_milestone():
    events = pruning_schedule(2100, 20, 0.95, 0.8, milestones=(0.2, 0.35, 0.5, 0.65, 0.8, 0.9))
    steps, targets = zip(*events)
    assert all(a < b for a, b in zip(steps, steps[1:])) and steps[-1] == 1680
    assert all(a < b for a, b in zip(targets, targets[1:])) and targets[-1] == pytest.approx(0.95)
    assert {0.2, 0.35, 0.5, 0.65, 0.8, 0.9} <= set(targets)
    at = dict(zip(targets, steps))
    assert at[0.5] == round(cubic_step(0.5, 1680, 0.95))  # where the cubic curve crosses 50%
    tight = pruning_schedule(8, 2, 0.8, 0.8, milestones=(0.2, 0.5))
    assert [t for _, t in tight][:2] == [0.2, 0.5] and len({s for s, _ in tight}) == len(tight)
    with pytest.raises(ValueError, match="do not fit"):
        pruning_schedule(2, 4, 0.8, 0.8, milestones=(0.2, 0.5))
    with pytest.raises(ValueError, match="milestones"):
        pruning_schedule(100, 4, 0.5, milestones=(0.6,))


def test_seeds_write_one_folder_each_in_stages_8_and_2_and_bad_settings_are_refused(tmp_path):
    from common.config import ConfigError

    with pytest.MonkeyPatch.context() as mp:
        models = _tiny_pipeline(tmp_path, mp)
        results = run_script(STAGE, "SEEDS=(42, 7)", "TARGET_SPARSITY=0.3", "RECOVERY_EPOCHS=0", "AUGMENT_PAIRS=16",
                             *FAST)
        assert set(results) == {"pruned_model", "pruned_model_seed7"}
        # 64 training rows + 16 joined pairs labelled by the teacher, whose logits are cached beside the training set's
        assert [r["train_sentences"] for r in results.values()] == [80, 80]
        cached = [torch.load(p, weights_only=True) for p in (models / "cache").glob("teacher_logits_*.pt")]
        assert [c["logits"].shape[0] for c in cached if c["key_parts"]["tokenization"].get("augment")] == [16]
        assert [_meta(models / n)["seed"] for n in ("pruned_model", "pruned_model_seed7")] == [42, 7]
        assert all(_meta(models / n)["results"]["mode"] == "single" for n in results)
        for args, match in ((("FRONTIER=True", "FRONTIER_TARGETS=(0.2, 0.95)"), "out of reach"),
                            (("FRONTIER=True", "FRONTIER_TARGETS=(0.2, 0.201)"), "same whole percent"),
                            (("FRONTIER=True", "FRONTIER_METHODS=('random',)"), "FRONTIER_METHODS"),
                            (("FRONTIER=True", "RECOVERY_EPOCHS=2"), "RECOVERY_EPOCHS=2.0: must be a number in"),
                            (("FRONTIER=True", "PRUNE_TARGETS=(0.2,)"), "PRUNE_TARGETS"),
                            (("SEEDS=(1, 1)",), "SEEDS"), (("AUGMENT_PAIRS=-5",), "AUGMENT_PAIRS"),
                            (("FRONTIER=True", "RECOVERY_KEEP=first"), "RECOVERY_KEEP"),
                            (("AUGMENT_ROWS=3",), "unknown key 'AUGMENT_ROWS'")):  # retired: tag screens-2026-12
            with pytest.raises(ConfigError, match=match):
                run_script(STAGE, *args, *FAST)
        assert not (models / "pruned_model_s20").exists()  # refused before any work

        student_args = ("STUDENT_LAYERS=(0, 2)", "EPOCHS=1", "TRAIN_LIMIT=64", "BATCH_SIZE=8", "EVALS_PER_EPOCH=1")
        results = run_script("2_distill_student.py", "SEEDS=(42, 43)", *student_args)
        assert set(results) == {"student_model", "student_model_seed43"}
        assert [_meta(models / n)["seed"] for n in ("student_model", "student_model_seed43")] == [42, 43]
        assert [_meta(models / n)["results"]["seed"] for n in results] == [42, 43]


def test_make_frontier_names_the_stages():
    make = shutil.which("make")
    text = (REPO / "Makefile").read_text()
    assert "\nfrontier: setup\n" in text
    if make:  # dry run: prints the commands, runs nothing
        out = subprocess.run([make, "-n", "-C", str(REPO), "frontier"], capture_output=True, text=True).stdout
    else:
        out = text.split("\nfrontier: setup\n", 1)[1]
    stages = ["8_pruning_with_finetuning.py FRONTIER=True", "9_quantize_pruned_model.py",
              "7_evaluate_and_generate_report.py"]
    assert all(s in out for s in stages) and [out.index(s) for s in stages] == sorted(out.index(s) for s in stages)


def test_gradual_run_goes_on_from_the_recovered_branch(tiny_bert):
    """The run adopts each branch as the callback left it (iterative prune-recover). The callback marks the first
    branch (classifier bias +100, far more than a few steps at lr 1e-3 can move) and reads the mark back in the
    second branch."""
    from common.training import cross_entropy_loss
    from common.data import make_loader

    data = _rows(tiny_bert.config.vocab_size)
    train_loader, heldout = make_loader(data, 8, shuffle=True, seed=1), make_loader(data, 32)
    seen = []

    def on_milestone(step, target, branch, run):
        seen.append(float(branch.classifier.bias.detach().mean()))
        if target == 0.2:
            with torch.no_grad():
                branch.classifier.bias += 100.0

    torch.manual_seed(0)
    run = gradual_prune(tiny_bert.train(), train_loader, heldout, cross_entropy_loss,
                        Schedule(0.6, epochs=1, steps_per_epoch=2, lr=1e-3, milestones=(0.2, 0.4), seq_len=SEQ),
                        on_milestone=on_milestone)
    assert len(seen) == 2 and abs(seen[0]) < 5 and seen[1] > 50
    assert abs(float(tiny_bert.classifier.bias.detach().mean())) > 50
    assert [e["target_sparsity"] for e in run.trajectory if e.get("continued_from_branch")] == [0.2, 0.4]


def _rows(vocab: int, n: int = 64, seed: int = 0):
    from common.data import Encoded

    gen = torch.Generator().manual_seed(seed)
    ids = [[2] + torch.randint(5, vocab, (int(k),), generator=gen).tolist() + [3]
           for k in torch.randint(3, 10, (n,), generator=gen)]
    return Encoded(input_ids=ids, labels=torch.arange(n) % 2)


def test_train_keep_last_leaves_the_last_step_and_hands_back_the_best_state(tiny_bert):
    from common.data import make_loader
    from common.training import TrainHook, correct_rows, cross_entropy_loss, train

    class AtEnd(TrainHook):
        def on_end(self, loop):
            self.state = {k: v.clone() for k, v in loop.unwrapped.state_dict().items()}

    data = _rows(tiny_bert.config.vocab_size)
    train_loader, heldout = make_loader(data, 8, shuffle=True, seed=1), make_loader(data, 32)
    with pytest.raises(ValueError, match="keep must be"):
        train(tiny_bert, train_loader, heldout, epochs=1, lr=1e-3, keep="worst")
    torch.manual_seed(0)
    hook = AtEnd()
    result = train(tiny_bert.train(), train_loader, heldout, cross_entropy_loss, epochs=2, lr=1e-3, evals_per_epoch=2,
                   hook=hook, keep="last")
    assert all(torch.equal(v, hook.state[k]) for k, v in tiny_bert.state_dict().items())
    assert torch.equal(correct_rows(tiny_bert, heldout), result.last_correct)
    assert result.history[-1]["step"] == 2 * len(train_loader)
    assert result.best_state is not None and result.best_correct.float().mean().item() == result.best_accuracy
    assert round(result.best_accuracy, 5) == max(h["heldout_accuracy"] for h in result.history)


@pytest.mark.parametrize("breaks", [False, True])
def test_recovery_keeps_the_last_state_unless_another_is_significantly_better(tiny_bert, breaks):
    """keep="last": a recovery that changes nothing keeps its last step (no held-out row tells the states apart); one
    that breaks the model (trained towards the opposite of every held-out label) gives back the state before it."""
    from common.data import make_loader
    from common.pruning.run import Job, PruneSettings, recover
    from common.training import predict_logits

    data = _rows(tiny_bert.config.vocab_size)
    tiny_bert.eval()
    data.labels = predict_logits(tiny_bert, make_loader(data, 32)).argmax(-1)  # the model gets every row right
    before = predict_logits(tiny_bert, make_loader(data, 32))

    def loss_fn(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if not breaks:
            return 0.0 * logits.sum()
        return torch.nn.functional.cross_entropy(logits, 1 - batch["labels"])

    settings = PruneSettings(prune_epochs=1, prune_steps=1, end_fraction=0.8, prune_lr=1e-3, recovery_epochs=2,
                             recovery_lr=1e-2, recovery_keep="last", weight_decay=0.0, warmup_ratio=0.0,
                             evals_per_epoch=2)
    job = Job(settings, constants={}, data={}, loss_fn=loss_fn, tokenizer=None, student_dir=None, teacher_dir=None,
              reference={}, rows={})
    torch.manual_seed(0)
    loaders = {"heldout": make_loader(data, 32)}
    out = recover(job, tiny_bert, loaders, make_loader(data, 8, shuffle=True, seed=1), 2, "test")
    assert out["keep"] == "last" and out["recovery_batches"] == 2 * 8
    if breaks:
        assert out["kept_state"] == "pruning" and out["last_vs_best"]["p"] < 0.05
        assert out["heldout_accuracy"] == 1.0
        assert torch.allclose(predict_logits(tiny_bert, make_loader(data, 32)), before)
    else:
        assert out["kept_state"] == "recovery step 16 (last)"
        assert out["last_vs_best"]["only_best"] == out["last_vs_best"]["only_last"] == 0
