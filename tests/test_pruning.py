"""Structured pruning (common/pruning/) on tiny random BERT and DistilBERT classifiers.

Tiny models have max_position_embeddings 64, so FLOPs are measured at sequence length 32 here.
"""

import copy

import pytest
import torch

from common.flops import measure_encoder_gflops
from common.modeling import count_parameters, load_model
from common.modeling_dpq import LAYOUT_KEY, block_parts, encoder_layers, get_layout, shrink_to_layout
from common.pruning import selection
from common.pruning.importance import TaylorImportance, estimate_importance
from common.pruning.schedule import cubic_sparsity, pruning_schedule
from common.pruning.selection import (ffn_granularity, kept_units, prune_to_target, prune_units, reachable_sparsity,
                                      remove_ffn_neurons, remove_heads, unit_flops)
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
        parts = block_parts(layer)
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
    prune_units(tiny, heads, ffn)
    assert get_layout(tiny) == {"heads": [2, 3], "ffn": [32, 32]}
    assert getattr(tiny.config, LAYOUT_KEY) == {"heads": [2, 3], "ffn": [32, 32]}
    assert kept_units(tiny)["heads"] == [[0, 2], [1, 2, 3]]
    assert kept_units(tiny)["ffn"][0] == list(range(1, 64, 2))
    with torch.no_grad():
        torch.testing.assert_close(tiny(**inputs()).logits, reference(**inputs()).logits, atol=1e-5, rtol=0)


def test_params_and_measured_flops_fall_by_expected_amounts(tiny):
    hidden, d = 32, 8
    params, gflops = count_parameters(tiny), measure_encoder_gflops(tiny, SEQ)
    cost = unit_flops(tiny, SEQ)
    prune_units(tiny, heads={1: [0, 1, 2]}, ffn={0: list(range(32))})
    per_head = 3 * (hidden * d + d) + hidden * d  # q/k/v rows with bias + attention-output columns
    per_neuron = hidden + 1 + hidden  # first-FFN row with bias + second-FFN column
    assert count_parameters(tiny) == params - 3 * per_head - 32 * per_neuron
    expected = 3 * cost["head"][1] + 32 * cost["ffn_neuron"][0]
    assert (gflops - measure_encoder_gflops(tiny, SEQ)) * 1e9 == pytest.approx(expected, abs=1)


def test_layer_with_zero_heads_runs_trains_and_scores(tiny):
    remove_heads(tiny, 0, [0, 1, 2, 3])
    assert get_layout(tiny)["heads"] == [0, 4]
    tiny.train()
    with TaylorImportance(tiny) as imp:
        ce_loss(tiny, inputs()).backward()
    assert imp.heads[0].numel() == 0 and imp.heads[1].shape == (4,)
    assert torch.isfinite(tiny.classifier.weight.grad).all()
    assert (imp.ffn[0] > 0).all()


def test_ffn_width_must_stay_a_multiple_of_32(tiny):
    assert ffn_granularity(64) == 32 and ffn_granularity(1536) == 32
    assert ffn_granularity(37) == 1
    with pytest.raises(ValueError, match="multiple of 32"):
        remove_ffn_neurons(tiny, 0, [5])


@pytest.mark.parametrize("name", MODELS)
def test_save_and_load_model_reproduce_logits(name, request, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = request.getfixturevalue(name)
    prune_units(model, heads={0: [2], 1: [0, 1, 2, 3]}, ffn={1: list(range(10, 42))})
    folder = save_tiny(model, tmp_path / "pruned")
    loaded = load_model(folder)  # strict load_state_dict: no missing or unexpected keys
    assert get_layout(loaded) == get_layout(model)
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
    assert get_layout(tiny) == {"heads": [1, 0], "ffn": [32, 64]}


def test_importance_is_the_per_example_gate_gradient(tiny):
    """dL/d gate, taken per example and squared (the hooks see a batch of 2 with a mean loss; the reference runs each
    example alone): a head's = sum of weight x grad over its attention-output columns; an FFN neuron's over its
    second-layer column."""
    model = tiny
    batch = dict(inputs(batch=2), labels=torch.tensor([1, 0]))

    def loss(m, b):
        return torch.nn.functional.cross_entropy(
            m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])

    imp = estimate_importance(model, [batch], loss)
    expected = {kind: [torch.zeros(n), torch.zeros(n)] for kind, n in (("heads", 4), ("ffn", 64))}
    for row in range(2):
        model.zero_grad()
        loss(model, {k: v[row:row + 1] for k, v in batch.items()}).backward()
        for i, layer in enumerate(encoder_layers(model)):
            parts = block_parts(layer)
            gates = {"heads": (parts.attn_out.weight * parts.attn_out.weight.grad).sum(0).view(4, 8).sum(1),
                     "ffn": (parts.ffn_out.weight * parts.ffn_out.weight.grad).sum(0)}
            for kind, gate in gates.items():
                expected[kind][i] += gate.pow(2).detach()
    for kind in expected:
        for i in range(2):
            torch.testing.assert_close(getattr(imp, kind)[i].float(), expected[kind][i], atol=1e-8, rtol=1e-4)
    assert imp.examples == 2


def test_ranking_removes_least_important_per_flop(tiny_bert):
    importance = {"heads": [[5.0, 5.0, 5.0, 5.0], [5.0, 5.0, 0.0, 5.0]],
                  "ffn": [[1.0] * 64, [1.0] * 64]}
    target = measure_encoder_gflops(tiny_bert, SEQ) - unit_flops(tiny_bert, SEQ)["head"][1] / 1e9
    result = prune_to_target(tiny_bert, importance, target, seq_len=SEQ)
    assert result["removed_heads"] == {1: [2]} and result["removed_ffn"] == {}
    assert kept_units(tiny_bert)["heads"][1] == [0, 1, 3]


@pytest.mark.parametrize("name", MODELS)
def test_prune_to_measured_target(name, request):
    model = request.getfixturevalue(name)
    base = measure_encoder_gflops(model, SEQ)
    for sparsity in (0.2, 0.45):
        imp = estimate_importance(model, [inputs(s) for s in range(3)], ce_loss)
        result = prune_to_target(model, imp, (1 - sparsity) * base, seq_len=SEQ)
        measured = measure_encoder_gflops(model, SEQ)
        assert measured == pytest.approx(result["encoder_gflops"])
        assert measured <= (1 - sparsity) * base + 1e-9
        assert measured > (1 - sparsity - 0.25) * base  # stops soon after the target (coarse tiny units)
        layout = get_layout(model)
        assert all(w % 32 == 0 and w >= 32 for w in layout["ffn"])
    with torch.no_grad():
        assert model(**inputs()).logits.shape == (3, 2)


def test_target_out_of_reach_is_an_error(tiny_bert):
    imp = {"heads": [[1.0] * 4] * 2, "ffn": [[1.0] * 64] * 2}
    with pytest.raises(ValueError, match="cannot reach"):
        prune_to_target(tiny_bert, imp, 0.0, seq_len=SEQ)


def test_cubic_schedule_reaches_target():
    assert cubic_sparsity(0, 10, 0.5) == 0.0
    assert cubic_sparsity(10, 10, 0.5) == pytest.approx(0.5)
    assert cubic_sparsity(15, 10, 0.5) == pytest.approx(0.5)
    assert cubic_sparsity(5, 10, 0.5) == pytest.approx(0.5 * (1 - 0.5 ** 3))
    events = pruning_schedule(total_train_steps=100, prune_steps=4, final_sparsity=0.2)
    steps, targets = zip(*events)
    assert list(steps) == sorted(steps) and steps[-1] == 80
    assert all(a < b for a, b in zip(targets, targets[1:])) and targets[-1] == pytest.approx(0.2)
    assert targets[0] > 0.2 / 4  # cubic: prunes fastest early


def test_measurement_not_prediction_decides(tiny_distilbert, monkeypatch):
    """If the per-unit costs underestimated, pruning keeps removing units until the MEASURED target holds."""
    real = unit_flops

    def underestimate(model, seq_len):
        cost = real(model, seq_len)
        return {k: [c // 4 for c in v] for k, v in cost.items()}

    monkeypatch.setattr(selection, "unit_flops", underestimate)
    base = measure_encoder_gflops(tiny_distilbert, SEQ)
    imp = estimate_importance(tiny_distilbert, [inputs()], ce_loss)
    reference = get_layout(tiny_distilbert)
    result = prune_to_target(tiny_distilbert, imp, 0.6 * base, seq_len=SEQ)
    assert measure_encoder_gflops(tiny_distilbert, SEQ) <= 0.6 * base + 1e-9
    removed = sum(len(v) for v in result["removed_heads"].values())
    assert removed == sum(reference["heads"]) - sum(get_layout(tiny_distilbert)["heads"])
    kept = kept_units(tiny_distilbert)["heads"]
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
    assert r["trajectory"][-1]["target_sparsity"] == r["target_sparsity"] == pytest.approx(0.3)
    assert all(w % 32 == 0 for w in r["layout"]["ffn"])
    assert r["keep"] == "best" and "last_vs_best" not in r  # RECOVERY_KEEP of single runs
    model = load_model(folder)
    assert get_layout(model) == r["layout"] == json_config(folder)[LAYOUT_KEY]
    assert [len(h) for h in r["kept_heads"]] == r["layout"]["heads"]
    assert measure_encoder_gflops(model) == pytest.approx(r["encoder_gflops_after"])
    tokenizer = load_tokenizer(folder)
    loader = make_loader(encode(tokenizer, load_sst2_splits()["validation"]), 32, pad_id=tokenizer.pad_token_id)
    assert evaluate(model, loader) == pytest.approx(r["validation_accuracy"])
    with pytest.raises(RuntimeError):
        AutoModelForSequenceClassification.from_pretrained(str(folder))
    assert (folder / "kept_units.json").is_file() and (folder / "stage.log").is_file()
    assert load_model(student_dir).num_parameters() == r["parameters_before"]  # input untouched


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
    with pytest.raises(ConfigError, match=r"TARGET_SPARSITY=1.5: must be a number in \(0, 1\)"):
        run_script(STAGE, "TARGET_SPARSITY=1.5")
    with pytest.raises(ConfigError, match="out of reach: removing every head and all but 32 FFN neurons per layer"):
        run_script(STAGE, "TARGET_SPARSITY=0.95", *FAST)
    with pytest.raises(ConfigError, match="RECOVERY_EPOCHS=1.5: must be 0, a fraction of an epoch below 1, or a whole"):
        run_script(STAGE, "RECOVERY_EPOCHS=1.5")
    with pytest.raises(ConfigError, match="PRUNE_TARGETS=.*no two in the same whole percent"):
        run_script(STAGE, "PRUNE_TARGETS=(0.2, 0.204)")
    with pytest.raises(ConfigError, match="unknown key 'HEAD_DIM_STEP'"):  # retired: git tag screens-2026-12
        run_script(STAGE, "HEAD_DIM_STEP=8")
    from transformers import BertForSequenceClassification
    from conftest import tiny_bert_config

    # the teacher was rebuilt after the student was distilled from it
    write_stage(BertForSequenceClassification(tiny_bert_config()), stage_dir("teacher"), "teacher")
    with pytest.raises(StageError, match="2_distill_student.py"):
        run_script(STAGE)
    assert not (workspace / "models" / "pruned_model").exists()


def test_reachable_sparsity_is_measured_on_a_copy(tiny_bert):
    limit = reachable_sparsity(tiny_bert, SEQ)
    assert get_layout(tiny_bert) == {"heads": [4, 4], "ffn": [64, 64]}  # model untouched
    imp = {"heads": [[1.0] * 4] * 2, "ffn": [[1.0] * 64] * 2}
    base = measure_encoder_gflops(tiny_bert, SEQ)
    prune_to_target(tiny_bert, imp, (1 - limit) * base, seq_len=SEQ)
    assert get_layout(tiny_bert) == {"heads": [0, 0], "ffn": [32, 32]}


def test_stage_recovers_a_seeded_fraction_of_an_epoch(pipeline, workspace):
    """RECOVERY_EPOCHS below 1: the recovery runs once over a seeded part of an epoch (as a frontier point's)."""
    from conftest import run_script

    pipeline("bert")
    r = run_script(STAGE, "TARGET_SPARSITY=0.3", "RECOVERY_EPOCHS=0.5", *FAST)
    assert r["recovery_batches"] == 1  # half of the 2 batches of 64 sentences


def test_a_folder_with_a_retired_layout_is_refused_naming_the_tag(tiny_bert, tmp_path):
    """Narrowed heads or hidden size (options retired to git tag screens-2026-12): one line naming the tag."""
    import json

    from common.modeling import UnreadableModel

    folder = save_tiny(tiny_bert, tmp_path / "narrowed")
    config = json.loads((folder / "config.json").read_text())
    for layout in ({"heads": [4, 4], "ffn": [64, 64], "head_size": [8, 4]},
                   {"heads": [4, 4], "ffn": [64, 64], "hidden": 16}):
        (folder / "config.json").write_text(json.dumps(dict(config, **{LAYOUT_KEY: layout})))
        with pytest.raises(UnreadableModel, match="screens-2026-12") as err:
            load_model(folder)
        assert "\n" not in str(err.value) and str(folder) in str(err.value)
    with pytest.raises(ValueError, match="git tag screens-2026-12"):
        shrink_to_layout(tiny_bert, {"heads": [4, 4], "ffn": [64, 64], "head_size": [8, 4]})



def test_stage_with_the_training_vocabulary_writes_a_smaller_folder_that_stage_9_serves(pipeline, workspace,
                                                                                        monkeypatch):
    """VOCAB="train": the folder keeps the training text's ids (plus specials, character pieces, VOCAB_EXTRA more),
    its tokenizer and embeddings agree, it is paired against the same model with the full vocabulary, and stage 9's
    4-bit and ONNX forms of it run."""
    import json

    from common.modeling import load_tokenizer
    from common.stage import read_metadata
    from common.vocab import check_vocabulary
    from conftest import VOCAB, run_script

    pipeline("bert")
    r = run_script(STAGE, "TARGET_SPARSITY=0.3", "VOCAB=train", "VOCAB_EXTRA=2", *FAST)
    folder = workspace / "models" / "pruned_model"
    vocab = r["vocabulary"]
    kept = json.loads((folder / "kept_units.json").read_text())["vocab"]
    assert vocab["original_size"] == len(VOCAB) and vocab["kept_size"] == len(kept) < len(VOCAB)
    assert vocab["kept_by_reason"]["extra"] == 2 and kept == sorted(kept) and len(VOCAB) - 1 not in kept  # "noir"
    assert check_vocabulary(folder) == len(kept) == len(load_tokenizer(folder))
    assert load_model(folder).config.vocab_size == len(kept)
    for split in ("validation", "heldout"):
        versus = vocab[f"{split}_vs_full_vocabulary"]
        assert 0 <= versus["mcnemar_p"] <= 1 and versus["accuracy_a"] == pytest.approx(
            versus["accuracy_b"] + versus["diff_points"] / 100)
    assert r["validation_accuracy"] == pytest.approx(vocab["validation_vs_full_vocabulary"]["accuracy_a"])
    assert read_metadata(folder)["config"]["VOCAB"] == "train"
    run_script("9_quantize_pruned_model.py", 'QUANTIZE=("pruned",)')
    final = workspace / "models" / "pruned_quantized_final"
    assert check_vocabulary(final) == len(kept) == len(load_tokenizer(final / "onnx"))  # the serving tokenizer
    served = read_metadata(final)["results"]
    assert served["onnx"]["artifacts"]["onnx_fp32"]["accuracy"] == pytest.approx(r["validation_accuracy"])
    monkeypatch.setenv("REPORT_DIR", str(workspace / "report"))
    report = run_script("7_evaluate_and_generate_report.py", "QUICK=True", "LATENCY_RUNS=2", "WARMUP_RUNS=1",
                        "MAX_LENGTH=64", "FLOPS_SEQ_LEN=64", "THREADS=1", "MODELS=pruned_model")
    assert report["models"]["pruned_model"]["vocabulary"] == vocab  # the report says what the vocabulary cost
