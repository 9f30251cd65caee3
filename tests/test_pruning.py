"""Structured pruning (common/pruning.py) on tiny random BERT and DistilBERT classifiers.

Tiny models have max_position_embeddings 64, so FLOPs are measured at sequence length 32 here.
"""

import copy

import pytest
import torch

from common import pruning
from common.flops import measure_encoder_gflops
from common.modeling import LAYOUT_KEY, count_parameters, encoder_layers, load_model
from common.modeling_dpq import config_is_pruned, shrink_to_layout
from conftest import save_tiny, write_stage

SEQ = 32
MODELS = ["tiny_bert", "tiny_distilbert"]


def inputs(seed=0, batch=3, length=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 30, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # padding in one row
    return {"input_ids": ids, "attention_mask": mask}


def ce_loss(model, batch):
    return torch.nn.functional.cross_entropy(model(**batch).logits, torch.tensor([0, 1, 1]))


def zeroed_copy(model, heads: dict, ffn: dict):
    """The unpruned model with the given heads / FFN neurons switched off by zeroing their output weights."""
    model = copy.deepcopy(model)
    for layer_idx, layer in enumerate(encoder_layers(model)):
        parts = pruning._parts(layer)
        d = parts.attention.attention_head_size
        with torch.no_grad():
            for h in heads.get(layer_idx, []):
                parts.attn_out.weight[:, h * d:(h + 1) * d] = 0
            for n in ffn.get(layer_idx, []):
                parts.ffn_out.weight[:, n] = 0
    return model


@pytest.fixture(params=MODELS)
def tiny(request):
    return request.getfixturevalue(request.param)


def test_removal_equals_zeroing(tiny):
    heads = {0: [1, 3], 1: [0]}
    ffn = {0: list(range(0, 64, 2)), 1: list(range(32, 64))}
    reference = zeroed_copy(tiny, heads, ffn)
    pruning.prune_units(tiny, heads, ffn)
    assert pruning.get_layout(tiny) == {"heads": [2, 3], "ffn": [32, 32]}
    assert getattr(tiny.config, LAYOUT_KEY) == {"heads": [2, 3], "ffn": [32, 32]}
    assert pruning.kept_units(tiny)["heads"] == [[0, 2], [1, 2, 3]]
    assert pruning.kept_units(tiny)["ffn"][0] == list(range(1, 64, 2))
    with torch.no_grad():
        torch.testing.assert_close(tiny(**inputs()).logits, reference(**inputs()).logits, atol=1e-5, rtol=0)


def test_params_and_measured_flops_fall_by_expected_amounts(tiny):
    hidden, d = 32, 8
    params, gflops = count_parameters(tiny), measure_encoder_gflops(tiny, SEQ)
    cost = pruning.unit_flops(tiny, SEQ)
    pruning.prune_units(tiny, heads={1: [0, 1, 2]}, ffn={0: list(range(32))})
    per_head = 3 * (hidden * d + d) + hidden * d  # q/k/v rows with bias + attention-output columns
    per_neuron = hidden + 1 + hidden  # first-FFN row with bias + second-FFN column
    assert count_parameters(tiny) == params - 3 * per_head - 32 * per_neuron
    expected = 3 * cost["head"][1] + 32 * cost["ffn_neuron"][0]
    assert (gflops - measure_encoder_gflops(tiny, SEQ)) * 1e9 == pytest.approx(expected, abs=1)


def test_layer_with_zero_heads_runs_trains_and_scores(tiny):
    pruning.remove_heads(tiny, 0, [0, 1, 2, 3])
    assert pruning.get_layout(tiny)["heads"] == [0, 4]
    tiny.train()
    with pruning.TaylorImportance(tiny) as imp:
        ce_loss(tiny, inputs()).backward()
    assert imp.heads[0].numel() == 0 and imp.heads[1].shape == (4,)
    assert torch.isfinite(tiny.classifier.weight.grad).all()
    assert (imp.ffn[0] > 0).all()


def test_ffn_width_must_stay_a_multiple_of_32(tiny):
    assert pruning.ffn_granularity(64) == 32 and pruning.ffn_granularity(1536) == 32
    assert pruning.ffn_granularity(37) == 1
    with pytest.raises(ValueError, match="multiple of 32"):
        pruning.remove_ffn_neurons(tiny, 0, [5])


@pytest.mark.parametrize("name", MODELS)
def test_save_and_load_model_reproduce_logits(name, request, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = request.getfixturevalue(name)
    pruning.prune_units(model, heads={0: [2], 1: [0, 1, 2, 3]}, ffn={1: list(range(10, 42))})
    folder = save_tiny(model, tmp_path / "pruned")
    loaded = load_model(folder)  # strict load_state_dict: no missing or unexpected keys
    assert pruning.get_layout(loaded) == pruning.get_layout(model)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs()).logits, model(**inputs()).logits)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # size mismatch
        AutoModelForSequenceClassification.from_pretrained(str(folder))


def test_shrink_to_layout_validates(tiny):
    with pytest.raises(ValueError, match="one entry per layer"):
        shrink_to_layout(tiny, {"heads": [1], "ffn": [32]})
    with pytest.raises(ValueError, match="layer 1 heads=5"):
        shrink_to_layout(tiny, {"heads": [1, 5], "ffn": [32, 64]})
    shrink_to_layout(tiny, {"heads": [1, 0], "ffn": [32, 64]})
    assert pruning.get_layout(tiny) == {"heads": [1, 0], "ffn": [32, 64]}


@pytest.mark.parametrize("criterion", pruning.CRITERIA)
def test_importance_is_the_per_example_gate_gradient(tiny, criterion):
    """dL/d gate, taken per example (the hooks see a batch of 2 with a mean loss; the reference runs each example
    alone): a head's = sum of weight x grad over its attention-output columns; an FFN neuron's over its second-layer
    column; a value dimension's over its one attention-output column; a query/key dimension's = sum over tokens of
    q_j dL/dq_j = weight x grad over its query row (bias included)."""
    model = tiny
    batch = dict(inputs(batch=2), labels=torch.tensor([1, 0]))

    def loss(m, b):
        return torch.nn.functional.cross_entropy(
            m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])

    imp = pruning.estimate_importance(model, [batch], loss, criterion=criterion)
    sizes = {"heads": 4, "ffn": 64, "qk": 32, "v": 32}
    expected = {kind: [torch.zeros(n), torch.zeros(n)] for kind, n in sizes.items()}
    for row in range(2):
        model.zero_grad()
        loss(model, {k: v[row:row + 1] for k, v in batch.items()}).backward()
        for i, layer in enumerate(encoder_layers(model)):
            parts = pruning._parts(layer)
            value = (parts.attn_out.weight * parts.attn_out.weight.grad).sum(0)
            gates = {"heads": value.view(4, 8).sum(1),
                     "ffn": (parts.ffn_out.weight * parts.ffn_out.weight.grad).sum(0),
                     "qk": (parts.query.weight * parts.query.weight.grad).sum(1)
                     + parts.query.bias * parts.query.bias.grad,
                     "v": value}
            for kind, gate in gates.items():
                expected[kind][i] += (gate.abs() if criterion == "abs" else gate.pow(2)).detach()
    for kind in sizes:
        for i in range(2):
            torch.testing.assert_close(getattr(imp, kind)[i].float(), expected[kind][i], atol=1e-8, rtol=1e-4)
    assert all(imp.qk[i].abs().sum() > 0 and imp.v[i].abs().sum() > 0 for i in range(2))
    assert imp.examples == 2
    with pytest.raises(ValueError, match="criterion"):
        pruning.TaylorImportance(model, "magnitude")


def test_ranking_removes_least_important_per_flop(tiny_bert):
    importance = {"heads": [[5.0, 5.0, 5.0, 5.0], [5.0, 5.0, 0.0, 5.0]],
                  "ffn": [[1.0] * 64, [1.0] * 64]}
    target = measure_encoder_gflops(tiny_bert, SEQ) - pruning.unit_flops(tiny_bert, SEQ)["head"][1] / 1e9
    result = pruning.prune_to_target(tiny_bert, importance, target, seq_len=SEQ)
    assert result["removed_heads"] == {1: [2]} and result["removed_ffn"] == {}
    assert pruning.kept_units(tiny_bert)["heads"][1] == [0, 1, 3]


@pytest.mark.parametrize("name", MODELS)
def test_prune_to_measured_target(name, request):
    model = request.getfixturevalue(name)
    base = measure_encoder_gflops(model, SEQ)
    for sparsity in (0.2, 0.45):
        imp = pruning.estimate_importance(model, [inputs(s) for s in range(3)], ce_loss)
        result = pruning.prune_to_target(model, imp, (1 - sparsity) * base, seq_len=SEQ)
        measured = measure_encoder_gflops(model, SEQ)
        assert measured == pytest.approx(result["encoder_gflops"])
        assert measured <= (1 - sparsity) * base + 1e-9
        assert measured > (1 - sparsity - 0.25) * base  # stops soon after the target (coarse tiny units)
        layout = pruning.get_layout(model)
        assert all(w % 32 == 0 and w >= 32 for w in layout["ffn"])
    with torch.no_grad():
        assert model(**inputs()).logits.shape == (3, 2)


def test_target_out_of_reach_is_an_error(tiny_bert):
    imp = {"heads": [[1.0] * 4] * 2, "ffn": [[1.0] * 64] * 2}
    with pytest.raises(ValueError, match="cannot reach"):
        pruning.prune_to_target(tiny_bert, imp, 0.0, seq_len=SEQ)


def test_cubic_schedule_reaches_target():
    assert pruning.cubic_sparsity(0, 10, 0.5) == 0.0
    assert pruning.cubic_sparsity(10, 10, 0.5) == pytest.approx(0.5)
    assert pruning.cubic_sparsity(15, 10, 0.5) == pytest.approx(0.5)
    assert pruning.cubic_sparsity(5, 10, 0.5) == pytest.approx(0.5 * (1 - 0.5 ** 3))
    events = pruning.pruning_schedule(total_train_steps=100, prune_steps=4, final_sparsity=0.2)
    steps, targets = zip(*events)
    assert list(steps) == sorted(steps) and steps[-1] == 80
    assert all(a < b for a, b in zip(targets, targets[1:])) and targets[-1] == pytest.approx(0.2)
    assert targets[0] > 0.2 / 4  # cubic: prunes fastest early


def test_schedule_from_a_larger_model_starts_below_zero():
    """Measured against a student with half the GFLOPs, a teacher starts at -1; the curve is the start model's own
    curve (0 -> 0.9 of ITS GFLOPs) seen through 1 - s = 2 (1 - r)."""
    assert pruning.cubic_sparsity(0, 10, 0.8, initial=-1.0) == pytest.approx(-1.0)
    assert pruning.cubic_sparsity(10, 10, 0.8, initial=-1.0) == pytest.approx(0.8)
    for k in range(11):
        for curve in (pruning.cubic_sparsity, pruning.geometric_sparsity):
            assert curve(k, 10, 0.8, initial=-1.0) == pytest.approx(1 - 2 * (1 - curve(k, 10, 0.9)))
    for step in (pruning.cubic_step, pruning.geometric_step):
        assert step(0.5, 100, 0.8, initial=-1.0) == pytest.approx(step(0.75, 100, 0.9))
    events = pruning.pruning_schedule(100, 4, 0.8, milestones=(0.0, 0.5), initial_sparsity=-1.0)
    targets = [t for _, t in events]
    assert targets == sorted(targets) and -1 < targets[0] and {0.0, 0.5} <= set(targets) and targets[-1] == 0.8
    with pytest.raises(ValueError, match="not below"):
        pruning.pruning_schedule(100, 4, 0.8, initial_sparsity=0.8)
    with pytest.raises(ValueError, match="milestones"):
        pruning.pruning_schedule(100, 4, 0.8, milestones=(-1.5,), initial_sparsity=-1.0)


def test_measurement_not_prediction_decides(tiny_distilbert, monkeypatch):
    """If the per-unit costs underestimated, pruning keeps removing units until the MEASURED target holds."""
    real = pruning.unit_flops

    def underestimate(model, seq_len):
        cost = real(model, seq_len)
        return {k: [c // 4 for c in v] for k, v in cost.items()}

    monkeypatch.setattr(pruning, "unit_flops", underestimate)
    base = measure_encoder_gflops(tiny_distilbert, SEQ)
    imp = pruning.estimate_importance(tiny_distilbert, [inputs()], ce_loss)
    reference = pruning.get_layout(tiny_distilbert)
    result = pruning.prune_to_target(tiny_distilbert, imp, 0.6 * base, seq_len=SEQ)
    assert measure_encoder_gflops(tiny_distilbert, SEQ) <= 0.6 * base + 1e-9
    removed = sum(len(v) for v in result["removed_heads"].values())
    assert removed == sum(reference["heads"]) - sum(pruning.get_layout(tiny_distilbert)["heads"])
    kept = pruning.kept_units(tiny_distilbert)["heads"]
    assert all(sorted(set(k)) == k for k in kept)  # original indices stay unique and ordered


# ----------------------------------------------------------------------------------------------------
# The stage script, end to end on a tiny pipeline (tiny data, tiny teacher and student folders)

STAGE = "8_pruning_with_finetuning.py"
FAST = ("TRAIN_LIMIT=64", "BATCH_SIZE=32", "PRUNE_STEPS=2", "EVALS_PER_EPOCH=1", "PRUNE_LR=1e-3",
        "RECOVERY_LR=5e-4")


@pytest.fixture
def pipeline(workspace, glue_dir, monkeypatch, tiny_bert_dir):
    """data/sst2 from the real download stage and a tiny teacher_model; returns the maker of a tiny student_model
    (BERT or DistilBERT)."""
    from conftest import run_script, write_tiny_student, write_tiny_teacher

    monkeypatch.setenv("SST2_DIR", str(glue_dir))
    run_script("download_model.py", f"TEACHER_SOURCE={tiny_bert_dir}")
    write_tiny_teacher()
    return write_tiny_student


def test_stage_prunes_saves_and_reloads(pipeline, workspace):
    from transformers import AutoModelForSequenceClassification

    from common.data import encode, load_sst2_splits, make_loader
    from common.modeling import load_tokenizer
    from common.stage import read_metadata
    from common.training import evaluate
    from conftest import run_script

    student_dir = pipeline("bert")
    results = run_script(STAGE, "TARGET_SPARSITY=0.3", *FAST)
    folder = workspace / "models" / "pruned_model"
    meta = read_metadata(folder)
    r = meta["results"]
    assert r == results and meta["stage"] == "pruned"
    assert set(meta["upstream"]) == {"student", "teacher"}
    assert r["measured_sparsity"] >= 0.3
    assert r["encoder_gflops_after"] <= 0.7 * r["encoder_gflops_before"] + 1e-9
    assert r["parameters_after"] < r["parameters_before"] and r["gflops_after"] < r["gflops_before"]
    assert [e["step"] for e in r["trajectory"]] == [0, 1, 2]  # start + 2 events over 2 training steps
    assert r["trajectory"][-1]["sparsity"] == r["measured_sparsity"]
    assert r["trajectory"][-1]["sparsity_target"] == pytest.approx(0.3)
    assert all(w % 32 == 0 for w in r["layout"]["ffn"])
    assert r["keep"] == "best" and "last_vs_best" not in r  # RECOVERY_KEEP of single runs
    model = load_model(folder)
    assert pruning.get_layout(model) == r["layout"] == json_config(folder)[LAYOUT_KEY]
    assert [len(h) for h in r["kept_heads"]] == r["layout"]["heads"]
    assert measure_encoder_gflops(model) == pytest.approx(r["encoder_gflops_after"])
    tokenizer = load_tokenizer(folder)
    loader = make_loader(encode(tokenizer, load_sst2_splits()["validation"]), 32, pad_id=tokenizer.pad_token_id)
    assert evaluate(model, loader) == pytest.approx(r["validation_accuracy"])
    with pytest.raises(RuntimeError):
        AutoModelForSequenceClassification.from_pretrained(str(folder))
    assert (folder / "kept_units.json").is_file() and (folder / "stage.log").is_file()
    assert load_model(student_dir).num_parameters() == r["parameters_before"]  # input untouched


def test_stage_prunes_the_teacher_to_the_students_gflops(pipeline, workspace):
    """PRUNE_FROM="teacher": the 3-layer teacher is pruned, and every sparsity is counted against the student."""
    from common.config import ConfigError
    from conftest import run_script

    student_dir = pipeline("bert")
    models = workspace / "models"
    r = run_script(STAGE, "PRUNE_FROM=teacher", "TARGET_SPARSITY=0.3", *FAST)
    student_gflops = measure_encoder_gflops(load_model(student_dir))
    teacher_gflops = measure_encoder_gflops(load_model(models / "teacher_model"))
    model = load_model(models / "pruned_model")
    assert r["pruned_from"] == "teacher" and len(encoder_layers(model)) == 3  # the teacher's layers, not the student's
    assert r["student_encoder_gflops"] == pytest.approx(student_gflops)
    assert r["encoder_gflops_before"] == pytest.approx(teacher_gflops)
    assert measure_encoder_gflops(model) == pytest.approx(r["encoder_gflops_after"])
    assert r["encoder_gflops_after"] <= 0.7 * student_gflops + 1e-9
    assert r["measured_sparsity"] == pytest.approx(1 - r["encoder_gflops_after"] / student_gflops, abs=1e-5)
    assert r["trajectory"][0]["sparsity"] == pytest.approx(1 - teacher_gflops / student_gflops, abs=1e-5)  # -0.5
    assert r["trajectory"][-1]["sparsity"] == r["measured_sparsity"] >= 0.3
    with pytest.raises(ConfigError, match="HIDDEN_DISTILL"):
        run_script(STAGE, "PRUNE_FROM=teacher", "HIDDEN_DISTILL=1", *FAST)
    with pytest.raises(ConfigError, match="PRUNE_FROM"):
        run_script(STAGE, "PRUNE_FROM=pretrained", *FAST)


def test_stage_with_ffn_floor_zero_prunes_past_the_floor(pipeline, workspace):
    """FFN_FLOOR=0: a target beyond every head and all but 32 FFN neurons per layer is reached, a layer loses its
    whole FFN, and the folder records the floor it was made with."""
    from common.stage import read_metadata
    from conftest import run_script

    pipeline("bert")
    r = run_script(STAGE, "FFN_FLOOR=0", "TARGET_SPARSITY=0.95", "RECOVERY_EPOCHS=0", *FAST)
    folder = workspace / "models" / "pruned_model"
    model = load_model(folder)
    assert 0 in pruning.get_layout(model)["ffn"] and r["layout"] == pruning.get_layout(model)
    assert r["measured_sparsity"] >= 0.95
    assert read_metadata(folder)["config"]["FFN_FLOOR"] == 0


def json_config(folder):
    import json

    return json.loads((folder / "config.json").read_text())


def test_stage_sweep_writes_one_folder_per_target_for_distilbert(pipeline, workspace):
    from common.stage import read_metadata
    from conftest import run_script

    pipeline("distilbert")
    run_script(STAGE, "PRUNE_TARGETS=(0.25, 0.5)", "RECOVERY_EPOCHS=0", *FAST)
    for name, target in (("pruned_model_s25", 0.25), ("pruned_model_s50", 0.5)):
        r = read_metadata(workspace / "models" / name)["results"]
        assert r["model_class"] == "DistilBertForSequenceClassification"
        assert r["target_sparsity"] == target and r["measured_sparsity"] >= target
    assert not (workspace / "models" / "pruned_model").exists()


def test_stage_refuses_missing_or_mismatched_inputs(pipeline, workspace):
    from common.config import ConfigError
    from common.paths import stage_dir
    from common.stage import StageError
    from conftest import run_script

    with pytest.raises(StageError, match="2_distill_student.py"):
        run_script(STAGE)  # no student yet
    pipeline("bert")
    with pytest.raises(ConfigError, match="between 0 and 1"):
        run_script(STAGE, "TARGET_SPARSITY=1.5")
    with pytest.raises(ConfigError, match="out of reach.*FFN_FLOOR=0 lets"):
        run_script(STAGE, "TARGET_SPARSITY=0.95", *FAST)
    with pytest.raises(ConfigError, match="HIDDEN_STEP=32 does not fit the student's hidden size 32.*none does"):
        run_script(STAGE, "HIDDEN_STEP=32", *FAST)
    with pytest.raises(ConfigError, match="HIDDEN_STEP=32 and ABLATION_FROM=0.5"):
        run_script(STAGE, "HIDDEN_STEP=32", "ABLATION_FROM=0.5", *FAST)
    from transformers import BertForSequenceClassification
    from conftest import tiny_bert_config

    # the teacher was rebuilt after the student was distilled from it
    write_stage(BertForSequenceClassification(tiny_bert_config()), stage_dir("teacher"), "teacher")
    with pytest.raises(StageError, match="2_distill_student.py"):
        run_script(STAGE)
    assert not (workspace / "models" / "pruned_model").exists()


def test_reachable_sparsity_is_measured_on_a_copy(tiny_bert):
    limit = pruning.reachable_sparsity(tiny_bert, SEQ)
    assert pruning.get_layout(tiny_bert) == {"heads": [4, 4], "ffn": [64, 64]}  # model untouched
    imp = {"heads": [[1.0] * 4] * 2, "ffn": [[1.0] * 64] * 2}
    base = measure_encoder_gflops(tiny_bert, SEQ)
    pruning.prune_to_target(tiny_bert, imp, (1 - limit) * base, seq_len=SEQ)
    assert pruning.get_layout(tiny_bert) == {"heads": [0, 0], "ffn": [32, 32]}


def test_ffn_floor_zero_lets_a_layer_lose_its_whole_ffn(tiny_bert):
    """min_ffn_blocks=0: a layer may lose its last FFN block too (by default it keeps 32 neurons), and a layer left with
    no head and no neuron costs only its LayerNorms."""
    base = measure_encoder_gflops(tiny_bert, SEQ)
    floor1, floor0 = pruning.reachable_sparsity(tiny_bert, SEQ), pruning.reachable_sparsity(tiny_bert, SEQ, 0)
    assert floor1 < 0.9 < 0.95 < floor0 < 1
    imp = {"heads": [[5.0] * 4] * 2, "ffn": [[5.0] * 64, [0.0] * 64]}  # layer 1's FFN is worth nothing
    target = base - pruning.unit_flops(tiny_bert, SEQ)["ffn_neuron"][1] * 64 / 1e9
    default = copy.deepcopy(tiny_bert)
    pruning.prune_to_target(default, imp, target, seq_len=SEQ)
    assert pruning.get_layout(default)["ffn"][1] == 32  # the floor holds: something else had to go
    result = pruning.prune_to_target(tiny_bert, imp, target, seq_len=SEQ, min_ffn_blocks=0)
    assert pruning.get_layout(tiny_bert) == {"heads": [4, 4], "ffn": [64, 0]}
    assert result["encoder_gflops"] == pytest.approx(target)
    pruning.prune_to_target(tiny_bert, {"heads": [[1.0] * 4] * 2, "ffn": [[1.0] * 64, []]}, (1 - floor0) * base,
                            seq_len=SEQ, min_ffn_blocks=0)
    assert pruning.get_layout(tiny_bert) == {"heads": [0, 0], "ffn": [0, 0]}
    assert torch.isfinite(tiny_bert(**inputs()).logits).all()


def _mean_loss(model, batches):
    with torch.no_grad():
        return sum(float(ce_loss(model, b)) for b in batches) / len(batches)


def test_ablation_scores_are_the_measured_loss_increase_of_removing_each_unit(tiny):
    """Each head's score is the mean loss with that head physically removed minus without; FFN blocks are removed
    cumulatively in the Taylor order and scored by what each adds (raised to the block before it); the model comes
    back unchanged, in training mode; prune_to_target follows the order it is given."""
    batches = [inputs(s) for s in range(3)]
    imp = pruning.estimate_importance(tiny, batches, ce_loss)
    tiny.train()
    before = copy.deepcopy(tiny.state_dict())
    order = pruning.ablation_order(tiny, batches, ce_loss, imp, seq_len=SEQ, min_ffn_blocks=0)
    assert tiny.training and all(torch.equal(v, before[k]) for k, v in tiny.state_dict().items())
    tiny.eval()
    base = _mean_loss(tiny, batches)
    assert [c.score for c in order] == sorted(c.score for c in order)
    heads = [c for c in order if c.kind == "head"]
    assert len(heads) == 8
    for c in heads:
        removed = copy.deepcopy(tiny)
        pruning.prune_units(removed, {c.layer: c.units})
        assert c.importance == pytest.approx(_mean_loss(removed, batches) - base, abs=1e-5)
        assert c.score == pytest.approx(c.importance / c.flops)
    for layer in range(2):
        first, second = sorted((c for c in order if c.kind == "ffn" and c.layer == layer), key=lambda c: c.order)
        assert first.units == torch.argsort(imp.ffn[layer].cpu(), stable=True)[:32].tolist()
        one, both = copy.deepcopy(tiny), copy.deepcopy(tiny)
        pruning.prune_units(one, ffn={layer: first.units})
        pruning.prune_units(both, ffn={layer: first.units + second.units})
        alone, together = _mean_loss(one, batches) - base, _mean_loss(both, batches) - base
        assert first.importance == pytest.approx(alone, abs=1e-5)
        assert second.importance == pytest.approx(max(together - alone, alone), abs=1e-5)
    target = measure_encoder_gflops(tiny, SEQ) - order[0].flops / 1e9
    result = pruning.prune_to_target(tiny, None, target, seq_len=SEQ, order=order)
    removed = result["removed_heads"] if order[0].kind == "head" else result["removed_ffn"]
    assert list(removed) == [order[0].layer]
    with pytest.raises(ValueError, match="at least one batch"):
        pruning.ablation_order(tiny, [], ce_loss, imp, seq_len=SEQ)


def test_gradual_run_ranks_events_past_ablation_from_by_measured_loss(tiny_bert):
    from common.data import Encoded, make_loader
    from common.training import cross_entropy_loss

    gen = torch.Generator().manual_seed(0)
    ids = [[2] + torch.randint(5, tiny_bert.config.vocab_size, (int(n),), generator=gen).tolist() + [3]
           for n in torch.randint(3, 10, (64,), generator=gen)]
    data = Encoded(input_ids=ids, labels=torch.arange(64) % 2)
    loader, heldout = make_loader(data, 8, shuffle=True, seed=1), make_loader(data, 32)
    torch.manual_seed(0)
    run = pruning.gradual_prune(tiny_bert.train(), loader, heldout, cross_entropy_loss, target_sparsity=0.6, epochs=1,
                                prune_steps=3, lr=1e-3, seq_len=SEQ, ablation_from=0.5, ablation_batches=2)
    ranked = [(e["sparsity_target"] >= 0.5, e["ranked_by"]) for e in run.trajectory if e["step"]]
    assert ranked and all(by == ("ablation" if late else "taylor") for late, by in ranked)
    assert {by for _, by in ranked} == {"ablation", "taylor"}
    assert measure_encoder_gflops(tiny_bert, SEQ) <= 0.4 * run.base_encoder_gflops + 1e-9
    with pytest.raises(ValueError, match="needs loss_fn"):
        pruning.GradualPruning(heldout, target_sparsity=0.5, prune_steps=2, ablation_from=0.3)


def test_set_dropout_changes_every_dropout_layer_but_not_the_config(tiny):
    from common.modeling import set_dropout

    set_dropout(tiny, 0.0)
    assert all(m.p == 0.0 for m in tiny.modules() if isinstance(m, torch.nn.Dropout))
    assert any(isinstance(m, torch.nn.Dropout) for m in tiny.modules())
    assert 0.0 not in {v for k, v in tiny.config.to_dict().items() if "dropout" in k and isinstance(v, float)}
    tiny.train()
    with torch.no_grad():  # no dropout: training mode gives the eval-mode logits
        torch.testing.assert_close(tiny(**inputs()).logits, tiny.eval()(**inputs()).logits)
    with pytest.raises(ValueError, match="dropout probability"):
        set_dropout(tiny, 1.0)


# ----------------------------------------------------------------------------------------------------
# Narrowing heads (head_dim_step): query/key and value dimensions removed from every head of a layer

QK = [[0, 5, 6], [1, 2, 7], [3, 4, 5], [0, 1, 2]]  # per head of a tiny layer (head size 8): dims to remove
V = [[7, 6, 1], [0, 3, 4], [2, 5, 6], [4, 5, 7]]


def narrowed_copy(model, layer_idx: int, qk, v):
    """The unpruned model with the given query/key dimensions (query rows and bias) and value dimensions
    (attention-output columns) of each head of one layer zeroed."""
    model = copy.deepcopy(model)
    parts = pruning._parts(encoder_layers(model)[layer_idx])
    d = parts.attention.attention_head_size
    with torch.no_grad():
        for h, (qk_dims, v_dims) in enumerate(zip(qk, v)):
            for j in qk_dims:
                parts.query.weight[h * d + j] = 0
                parts.query.bias[h * d + j] = 0
            for j in v_dims:
                parts.attn_out.weight[:, h * d + j] = 0
    return model


def test_narrowing_equals_zeroing_and_reloads(tiny, tmp_path):
    """Removing query/key and value dimensions (each head its own) computes what the full heads compute with those
    dimensions zeroed (the 1/sqrt(8) scale is kept); the layout and kept units record it, and the saved folder loads
    (load_model and shrink_to_layout rebuild the same shapes)."""
    reference = zeroed_copy(narrowed_copy(tiny, 1, QK, V), heads={1: [2], 0: [0]}, ffn={})
    pruning.prune_units(tiny, heads={1: [2], 0: [0]}, head_dims={1: {"qk": QK, "v": V}})
    layout = {"heads": [3, 3], "ffn": [64, 64], "head_size": [8, 5]}
    assert pruning.get_layout(tiny) == layout == getattr(tiny.config, LAYOUT_KEY)
    assert config_is_pruned(tiny.config)
    kept = pruning.kept_units(tiny)
    assert kept["heads"] == [[1, 2, 3], [0, 1, 3]]
    assert kept["qk_dims"][1] == [[1, 2, 3, 4, 7], [0, 3, 4, 5, 6], [3, 4, 5, 6, 7]]  # heads 0, 1, 3
    assert kept["v_dims"][1] == [[0, 2, 3, 4, 5], [1, 2, 5, 6, 7], [0, 1, 2, 3, 6]]
    assert kept["qk_dims"][0] == [list(range(8))] * 3
    with torch.no_grad():
        torch.testing.assert_close(tiny(**inputs()).logits, reference(**inputs()).logits, atol=1e-5, rtol=0)
        loaded = load_model(save_tiny(tiny, tmp_path / "narrowed"))
        assert pruning.get_layout(loaded) == layout
        assert torch.equal(loaded(**inputs()).logits, tiny(**inputs()).logits)
    with pytest.raises(ValueError, match="same number"):
        pruning.remove_head_dims(tiny, 0, [[0], [0, 1], [0]], [[0], [0], [0]])
    with pytest.raises(ValueError, match="head_size=9"):
        shrink_to_layout(tiny, {**layout, "head_size": [9, 5]})


def test_unit_flops_follow_the_head_size(tiny):
    """A narrowing step saves (4 L H + 2 L^2) per dimension and head, and a narrowed head costs in proportion."""
    gflops = measure_encoder_gflops(tiny, SEQ)
    cost = pruning.unit_flops(tiny, SEQ)
    assert cost["head"][1] == 8 * cost["head_dim"][1]
    pruning.prune_units(tiny, head_dims={1: {"qk": QK, "v": V}})
    assert (gflops - measure_encoder_gflops(tiny, SEQ)) * 1e9 == pytest.approx(4 * 3 * cost["head_dim"][1], abs=1)
    assert pruning.unit_flops(tiny, SEQ)["head"] == [cost["head"][0], 5 * cost["head_dim"][1]]


def test_prune_to_target_narrows_heads_with_exact_accounting(tiny):
    """With head_dim_step, cheap dimensions go first, each head losing its own least important ones, down to
    head_dim_step per head; heads and narrowing steps of the same layer chosen in one call are costed exactly (the
    prediction equals the measured saving); without head_dim_step nothing is narrowed."""
    g = torch.Generator().manual_seed(3)
    importance = {"heads": [[50.0] * 4, [9.0, 50.0, 50.0, 50.0]], "ffn": [[50.0] * 64, [50.0] * 64],
                  "qk": [torch.rand(32, generator=g) * 0.01, torch.rand(32, generator=g)],
                  "v": [torch.rand(32, generator=g) * 0.01, torch.rand(32, generator=g)]}
    plain = copy.deepcopy(tiny)
    base = measure_encoder_gflops(tiny, SEQ)
    result = pruning.prune_to_target(tiny, importance, 0.55 * base, seq_len=SEQ, head_dim_step=2)
    layout = pruning.get_layout(tiny)
    assert layout["head_size"] == [2, 2] and layout["heads"] == [4, 3] and layout["ffn"] == [64, 64]
    assert result["removed_head_dims"] == {0: 6, 1: 6} and result["removed_heads"] == {1: [0]}
    assert (base - result["encoder_gflops"]) * 1e9 == pytest.approx(result["predicted_flops_saved"], abs=1)
    least = torch.argsort(importance["qk"][0].view(4, 8), dim=1, stable=True)[:, 6:].sort(dim=1).values
    assert pruning.kept_units(tiny)["qk_dims"][0] == least.tolist()  # each head keeps its 2 best dimensions
    with pytest.raises(ValueError, match="per-dimension"):
        pruning.removal_order(plain, {k: importance[k] for k in ("heads", "ffn")}, SEQ, head_dim_step=2)
    pruning.prune_to_target(plain, importance, 0.55 * base, seq_len=SEQ)
    assert "head_size" not in pruning.get_layout(plain)


def test_narrowing_when_the_prediction_falls_short(tiny_bert, monkeypatch):
    """If the per-unit costs were overestimated (the first choice saves too little), narrowing steps are added one at
    a time (in the numbering left by the steps and the head already removed) until the MEASURED target holds."""
    real = pruning.unit_flops
    monkeypatch.setattr(pruning, "unit_flops",
                        lambda model, seq_len: {k: [c * 3 for c in v] for k, v in real(model, seq_len).items()})
    more = []
    monkeypatch.setattr(pruning, "_remove_one_more", lambda model, chosen, c, real=pruning._remove_one_more: (
        more.append(c.kind), real(model, chosen, c)))
    importance = {"heads": [[50.0] * 4, [50.0, 50.0, 1e-4, 50.0]], "ffn": [[50.0] * 64, [50.0] * 64],
                  "qk": [torch.arange(32.0) * 1e-3, torch.arange(32.0).flip(0) * 1e-3],
                  "v": [torch.arange(32.0) * 1e-3, torch.arange(32.0) * 1e-3]}
    reference = copy.deepcopy(tiny_bert)
    base = measure_encoder_gflops(tiny_bert, SEQ)
    pruning.prune_to_target(tiny_bert, importance, 0.7 * base, seq_len=SEQ, head_dim_step=2)
    assert measure_encoder_gflops(tiny_bert, SEQ) <= 0.7 * base + 1e-9
    layout = pruning.get_layout(tiny_bert)
    kept = pruning.kept_units(tiny_bert)
    cut = {i: 8 - size for i, size in enumerate(layout["head_size"])}
    qk = {i: [[j for j in range(8) if j not in dims] for dims in kept["qk_dims"][i]] for i in range(2)}
    v = {i: [[j for j in range(8) if j not in dims] for dims in kept["v_dims"][i]] for i in range(2)}
    assert cut[0] > 0 and cut[1] > 0 and layout["heads"] == [4, 3] and more.count("dims") >= 2
    assert qk[0] == [list(range(cut[0]))] * 4  # layer 0: the lowest dimensions of every head went first
    assert qk[1] == [list(range(8 - cut[1], 8))] * layout["heads"][1]  # layer 1: the highest
    narrowed = narrowed_copy(reference, 0, [list(range(cut[0]))] * 4, v[0])
    removed = [h for h in range(4) if h not in kept["heads"][1]]
    full_qk = {h: list(range(8 - cut[1], 8)) for h in range(4)}
    full_v = {h: list(range(cut[1])) for h in range(4)}
    narrowed = narrowed_copy(narrowed, 1, [full_qk[h] for h in range(4)], [full_v[h] for h in range(4)])
    narrowed = zeroed_copy(narrowed, heads={1: removed}, ffn={})
    with torch.no_grad():
        torch.testing.assert_close(tiny_bert(**inputs()).logits, narrowed(**inputs()).logits, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------
# Narrowing the residual stream (hidden_step / HIDDEN_STEP)

HIDDEN = [3, 4, 10, 17, 20, 21, 28, 31]  # hidden dimensions of a tiny model (32) to remove


def test_hidden_narrowing_costs_what_unit_flops_says_and_reloads(tiny, tmp_path):
    """Removing hidden dimensions slices the embeddings, every block's Linears and LayerNorms and the input of the
    layer before the classifier: the model runs, fvcore measures exactly the predicted saving, the layout and kept
    units record it, the saved folder reloads to the same logits, and shrink_to_layout rebuilds the shapes."""
    gflops = measure_encoder_gflops(tiny, SEQ)
    cost = pruning.unit_flops(tiny, SEQ)["hidden"]
    fresh = copy.deepcopy(tiny)
    pruning.prune_units(tiny, heads={0: [1]}, hidden=HIDDEN)
    layout = {"heads": [3, 4], "ffn": [64, 64], "hidden": 24}
    assert pruning.get_layout(tiny) == layout == getattr(tiny.config, LAYOUT_KEY)
    assert config_is_pruned(tiny.config)
    assert pruning.kept_units(tiny)["hidden"] == [i for i in range(32) if i not in HIDDEN]
    saved = (gflops - measure_encoder_gflops(tiny, SEQ)) * 1e9
    head = pruning.unit_flops(fresh, SEQ)["head"][0]
    assert saved == pytest.approx(len(HIDDEN) * sum(cost) + head - 4 * SEQ * len(HIDDEN) * 8, abs=1)
    assert pruning.unit_flops(tiny, SEQ)["hidden"] == [SEQ * (4 * 3 * 8 + 2 * 64 + 10), SEQ * (4 * 4 * 8 + 2 * 64 + 10)]
    with torch.no_grad():
        logits = tiny(**inputs()).logits
        assert torch.isfinite(logits).all()
        loaded = load_model(save_tiny(tiny, tmp_path / "narrow"))
        assert pruning.get_layout(loaded) == layout
        assert torch.equal(loaded(**inputs()).logits, logits)
    shrink_to_layout(fresh, layout)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in tiny.state_dict().items()}
    with pytest.raises(ValueError, match="hidden=40"):
        shrink_to_layout(fresh, {**layout, "hidden": 40})
    with pytest.raises(ValueError, match="at least one hidden"):
        pruning.remove_hidden_dims(fresh, range(24))


def test_hidden_importance_is_the_per_example_gradient_of_one_shared_gate(tiny):
    """hidden=True: dimension j's score is (dL/dg_j)^2 summed over examples, where ONE gate g_j multiplies dimension j
    of every LayerNorm output that writes the residual stream (the embeddings' and two per block), as in CoFi; the
    reference puts that gate in explicitly and runs each example alone."""
    model = tiny.eval()
    batch = dict(inputs(batch=2), labels=torch.tensor([1, 0]))

    def loss(m, b):
        return torch.nn.functional.cross_entropy(
            m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])

    imp = pruning.TaylorImportance(model, hidden=True)
    loss(model, batch).backward()
    imp.close()
    imp_plain = pruning.TaylorImportance(model)
    assert imp_plain.hidden is None
    imp_plain.close()
    gate = torch.ones(32, requires_grad=True)
    norms = [pruning.embeddings_module(model).LayerNorm]
    norms += [n for layer in encoder_layers(model) for n in (pruning._parts(layer).attn_norm,
                                                              pruning._parts(layer).out_norm)]
    handles = [n.register_forward_hook(lambda mod, args, out: out * gate) for n in norms]
    expected = torch.zeros(32)
    try:
        for row in range(2):
            gate.grad = None
            loss(model, {k: v[row:row + 1] for k, v in batch.items()}).backward()
            expected += gate.grad.pow(2)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(imp.hidden.float(), expected, atol=1e-9, rtol=1e-4)
    assert expected.sum() > 0


def test_prune_to_target_narrows_the_hidden_size_with_exact_accounting(tiny):
    """With hidden_step, blocks of the least important hidden dimensions go per FLOP with heads and FFN blocks (here
    first, and a head of the same call: both costed exactly, the prediction equals the measured saving); one block
    always stays; without hidden importance hidden_step is an error, without hidden_step nothing is narrowed."""
    g = torch.Generator().manual_seed(4)
    importance = {"heads": [[0.0, 50.0, 50.0, 50.0], [50.0] * 4], "ffn": [[50.0] * 64, [50.0] * 64],
                  "hidden": torch.rand(32, generator=g) * 1e-3}
    plain = copy.deepcopy(tiny)
    base = measure_encoder_gflops(tiny, SEQ)
    result = pruning.prune_to_target(tiny, importance, 0.45 * base, seq_len=SEQ, hidden_step=8)
    assert pruning.get_layout(tiny) == {"heads": [3, 4], "ffn": [64, 64], "hidden": 8}  # one block of 8 stays
    assert result["removed_hidden"] == 24 and result["removed_heads"] == {0: [0]}
    assert (base - result["encoder_gflops"]) * 1e9 == pytest.approx(result["predicted_flops_saved"], abs=1)
    best = torch.argsort(importance["hidden"], stable=True)[24:].sort().values.tolist()
    assert pruning.kept_units(tiny)["hidden"] == best
    with pytest.raises(ValueError, match="hidden-dimension importance"):
        pruning.removal_order(plain, {k: importance[k] for k in ("heads", "ffn")}, SEQ, hidden_step=8)
    pruning.prune_to_target(plain, importance, 0.45 * base, seq_len=SEQ)
    assert "hidden" not in pruning.get_layout(plain)


def test_hidden_narrowing_when_the_prediction_falls_short(tiny_bert, monkeypatch):
    """If a hidden dimension's cost were overestimated, hidden blocks are added one at a time (in the numbering the
    blocks removed before them left) until the MEASURED target holds, the least important dimensions first."""
    real = pruning._hidden_dim_flops
    monkeypatch.setattr(pruning, "_hidden_dim_flops", lambda *args: [c * 3 for c in real(*args)])
    more = []
    monkeypatch.setattr(pruning, "_remove_one_more", lambda model, chosen, c, real=pruning._remove_one_more: (
        more.append(c.kind), real(model, chosen, c)))
    importance = {"heads": [[50.0] * 4] * 2, "ffn": [[50.0] * 64] * 2, "hidden": torch.arange(32.0).flip(0) * 1e-4}
    base = measure_encoder_gflops(tiny_bert, SEQ)
    pruning.prune_to_target(tiny_bert, importance, 0.5 * base, seq_len=SEQ, hidden_step=4)
    assert measure_encoder_gflops(tiny_bert, SEQ) <= 0.5 * base + 1e-9
    kept = pruning.kept_units(tiny_bert)["hidden"]
    assert more.count("hidden") >= 1 and kept == list(range(len(kept)))  # the highest dimensions went first


def test_gradual_run_narrows_the_hidden_size_past_every_head_and_neuron(tiny_bert):
    """A target beyond every head and FFN neuron (min_ffn_blocks=0) is reached with hidden_step, by narrowing the
    residual stream during the run; without it, it is out of reach."""
    from common.data import Encoded, make_loader
    from common.training import cross_entropy_loss

    gen = torch.Generator().manual_seed(0)
    ids = [[2] + torch.randint(5, tiny_bert.config.vocab_size, (int(n),), generator=gen).tolist() + [3]
           for n in torch.randint(3, 10, (64,), generator=gen)]
    data = Encoded(input_ids=ids, labels=torch.arange(64) % 2)
    loader, heldout = make_loader(data, 8, shuffle=True, seed=1), make_loader(data, 32)
    whole, narrow = (pruning.reachable_sparsity(tiny_bert, SEQ, 0, step) for step in (0, 8))
    assert whole < narrow < 1 and pruning.get_layout(tiny_bert) == {"heads": [4, 4], "ffn": [64, 64]}
    target = (whole + narrow) / 2
    torch.manual_seed(0)
    run = pruning.gradual_prune(tiny_bert.train(), loader, heldout, cross_entropy_loss, target_sparsity=target,
                                epochs=1, prune_steps=3, lr=1e-3, seq_len=SEQ, min_ffn_blocks=0, hidden_step=8)
    assert measure_encoder_gflops(tiny_bert, SEQ) <= (1 - target) * run.base_encoder_gflops + 1e-9
    assert pruning.get_layout(tiny_bert)["hidden"] < 32 and run.trajectory[-1]["removed_hidden"] > 0
    assert torch.isfinite(tiny_bert(**inputs()).logits).all()
    with pytest.raises(ValueError, match="hidden_step must be"):
        pruning.GradualPruning(heldout, target_sparsity=0.5, prune_steps=2, hidden_step=-1)


def test_importance_all_reduce_sums_every_score_including_the_hidden_ones(tiny):
    """Under several processes every score (heads, FFN, query/key, value, hidden) and the example count are summed and
    split back in place; here two identical processes, so each doubles."""
    class TwoAlike:
        num_processes = 2

        @staticmethod
        def reduce(tensor, reduction):
            assert reduction == "sum"
            return tensor * 2

    imp = pruning.TaylorImportance(tiny.eval(), hidden=True)
    ce_loss(tiny, inputs()).backward()
    imp.close()
    before = {kind: [t.clone() for t in getattr(imp, kind)] for kind in ("heads", "ffn", "qk", "v")}
    hidden, examples = imp.hidden.clone(), imp.examples
    imp.all_reduce(TwoAlike())
    for kind, tensors in before.items():
        assert all(torch.equal(after, 2 * t) for after, t in zip(getattr(imp, kind), tensors))
    assert torch.equal(imp.hidden, 2 * hidden) and hidden.abs().sum() > 0 and imp.examples == 2 * examples == 6
