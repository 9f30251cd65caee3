"""Stages 1 and 2 on tiny random models: teacher fine-tuning, the student built from teacher layers,
the KD loss, the teacher-logit cache, the ablation, both presets, and clear errors out of order."""

import pytest
import torch
from transformers import BertForSequenceClassification

from common.config import ConfigError
from common.data import encode, make_loader, load_sst2_splits
from common.distillation import kd_loss, student_from_teacher_layers, teacher_logits_for
from common.modeling import load_model, load_tokenizer
from common.modeling_dpq import encoder_layers
from common.stage import StageError, read_metadata
from common.training import evaluate
from conftest import run_script, save_tiny, tiny_bert_config, tiny_sentences

FAST = ("BATCH_SIZE=16", "EVALS_PER_EPOCH=1", "LR=3e-3")


@pytest.fixture
def tiny_teacher_4layer(tmp_path):
    torch.manual_seed(0)
    return save_tiny(BertForSequenceClassification(tiny_bert_config(num_hidden_layers=4)), tmp_path / "t4")


@pytest.fixture
def downloaded(workspace, glue_dir, monkeypatch, tiny_teacher_4layer):
    monkeypatch.setenv("SST2_DIR", str(glue_dir))
    run_script("download_model.py", f"TEACHER_SOURCE={tiny_teacher_4layer}")
    return workspace


def validation_loader(folder):
    tokenizer = load_tokenizer(folder)
    return make_loader(encode(tokenizer, load_sst2_splits()["validation"]), 32, pad_id=tokenizer.pad_token_id)


def test_teacher_trains_saves_and_reloads_to_its_recorded_accuracy(downloaded):
    results = run_script("1_train_teacher.py", "EPOCHS=3", *FAST)
    folder = downloaded / "models" / "teacher_model"
    meta = read_metadata(folder)
    assert meta["results"]["validation_accuracy"] == results["validation_accuracy"]
    assert meta["upstream"]["pretrained_teacher"]["run_id"] == read_metadata(
        downloaded / "models" / "pretrained_teacher")["run_id"]
    assert meta["seed"] == 42 and meta["config"]["EPOCHS"] == 3 and meta["wall_time_s"] >= 0
    assert len(meta["results"]["history"]) == 3  # one held-out check per epoch
    assert results["validation_accuracy"] > 0.8    # the toy task is learnable
    assert evaluate(load_model(folder), validation_loader(folder)) == pytest.approx(results["validation_accuracy"])
    # self-contained: plain from_pretrained and the tokenizer load from the folder alone
    assert BertForSequenceClassification.from_pretrained(str(folder)).config.num_labels == 2


def test_stages_out_of_order_say_what_to_run(workspace):
    with pytest.raises(StageError, match="download_model.py"):
        run_script("1_train_teacher.py")
    with pytest.raises(StageError, match="1_train_teacher.py"):
        run_script("2_distill_student.py")


def test_student_takes_every_other_teacher_layer(tiny_teacher_4layer):
    teacher = load_model(tiny_teacher_4layer)
    student = student_from_teacher_layers(teacher, (0, 2))
    assert student.config.num_hidden_layers == 2 and len(encoder_layers(student)) == 2
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for s_index, t_index in enumerate((0, 2)):
        for name, value in encoder_layers(student)[s_index].state_dict().items():
            assert torch.equal(value, t_state[f"bert.encoder.layer.{t_index}.{name}"])
    for key in ("bert.embeddings.word_embeddings.weight", "bert.pooler.dense.weight", "classifier.weight"):
        assert torch.equal(s_state[key], t_state[key])
    with pytest.raises(ValueError, match="distinct indices"):
        student_from_teacher_layers(teacher, (0, 4))


def test_kd_loss_is_zero_only_when_logits_match():
    logits = torch.randn(8, 2)
    labels = torch.randint(0, 2, (8,))
    assert kd_loss(logits, logits.clone(), labels, temperature=2.0, alpha=1.0).item() == pytest.approx(0, abs=1e-6)
    assert kd_loss(logits, logits + torch.tensor([1.0, -1.0]), labels, 2.0, 1.0).item() > 1e-3
    mixed = kd_loss(logits, logits.clone(), labels, 2.0, 0.5)
    assert mixed.item() == pytest.approx(0.5 * torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)


def test_teacher_logit_cache_is_reused_rebuilt_and_never_trusted_blindly(tmp_path, tiny_bert_dir, monkeypatch):
    import common.modeling

    encoded = encode(load_tokenizer(tiny_bert_dir), tiny_sentences(40, seed=5))
    cache = tmp_path / "cache"
    first = teacher_logits_for(tiny_bert_dir, encoded, cache)
    expected = load_model(tiny_bert_dir)(**{"input_ids": torch.tensor([encoded.input_ids[0]])}).logits[0]
    assert torch.allclose(first[0], expected, atol=1e-5)
    assert len(list(cache.glob("*.pt"))) == 1

    real_load = common.modeling.load_model
    monkeypatch.setattr(common.modeling, "load_model", lambda *a, **k: pytest.fail("cache not reused"))
    assert torch.equal(teacher_logits_for(tiny_bert_dir, encoded, cache), first)
    monkeypatch.setattr(common.modeling, "load_model", real_load)

    # a different teacher (same folder, new weights) must not reuse the old logits
    torch.manual_seed(1)
    save_tiny(BertForSequenceClassification(tiny_bert_config()), tiny_bert_dir)
    second = teacher_logits_for(tiny_bert_dir, encoded, cache)
    assert not torch.allclose(first, second) and len(list(cache.glob("*.pt"))) == 2

    # a corrupt cache file is rebuilt, not used
    path = sorted(cache.glob("*.pt"), key=lambda p: p.stat().st_mtime)[-1]
    path.write_bytes(b"not a torch file")
    assert torch.equal(teacher_logits_for(tiny_bert_dir, encoded, cache), second)


def test_distill_and_ablation_write_their_own_folders(downloaded):
    run_script("1_train_teacher.py", "EPOCHS=3", *FAST)
    results = run_script("2_distill_student.py", "STUDENT_LAYERS=(0, 2)", "EPOCHS=2", *FAST)
    folder = downloaded / "models" / "student_model"
    meta = read_metadata(folder)
    assert meta["results"]["student_layers"] == [0, 2] and meta["results"]["distilled"] is True
    assert meta["results"]["gap_points"] == pytest.approx(
        100 * (meta["results"]["teacher_validation_accuracy"] - meta["results"]["validation_accuracy"]), abs=1e-3)
    student = load_model(folder)
    assert student.config.num_hidden_layers == 2
    assert evaluate(student, validation_loader(folder)) == pytest.approx(results["validation_accuracy"])
    assert len(list((downloaded / "models" / "cache").glob("teacher_logits_*.pt"))) == 1
    # the same seed gives the same student whether the teacher logits were computed (first run) or read from the
    # cache (this run): nothing drawn from the random generators depends on the cache
    first = student.state_dict()
    again = run_script("2_distill_student.py", "STUDENT_LAYERS=(0, 2)", "EPOCHS=2", *FAST)
    assert again["validation_accuracy"] == results["validation_accuracy"]
    assert all(torch.equal(first[k], v) for k, v in load_model(folder).state_dict().items())
    meta = read_metadata(folder)

    run_script("2_distill_student.py", "DISTILL=False", "STUDENT_LAYERS=(0, 2)", "EPOCHS=1", *FAST)
    ablation = read_metadata(downloaded / "models" / "student_model_nodistill")
    assert ablation["results"]["distilled"] is False
    assert ablation["config"]["INTERMEDIATE_WEIGHT"] == 0.0  # the default's teacher terms are off in the ablation
    assert read_metadata(folder)["run_id"] == meta["run_id"]  # the real student was not overwritten


def test_bert_preset_with_a_distilbert_student(workspace, glue_dir, monkeypatch, tiny_bert_dir, tiny_distilbert_dir):
    monkeypatch.setenv("SST2_DIR", str(glue_dir))
    monkeypatch.setenv("PRESET", "bert")
    run_script("download_model.py", f"TEACHER_SOURCE={tiny_bert_dir}", f"STUDENT_SOURCE={tiny_distilbert_dir}")
    run_script("1_train_teacher.py", "EPOCHS=1", *FAST)
    run_script("2_distill_student.py", "EPOCHS=1", *FAST)
    student = load_model(workspace / "models" / "student_model")
    assert type(student).__name__ == "DistilBertForSequenceClassification"
    meta = read_metadata(workspace / "models" / "student_model")
    assert meta["results"]["preset"] == "bert" and meta["config"]["INTERMEDIATE_WEIGHT"] == 0.0

    monkeypatch.setenv("PRESET", "minilm")  # a teacher made for another preset is refused
    with pytest.raises(StageError, match="preset 'bert'"):
        run_script("2_distill_student.py")


def test_distill_with_intermediate_layers_records_what_it_used(downloaded, monkeypatch):
    import common.distillation

    calls = []
    real_loss = common.distillation.intermediate_loss
    monkeypatch.setattr(common.distillation, "intermediate_loss", lambda *a: calls.append(1) or real_loss(*a))
    run_script("1_train_teacher.py", "EPOCHS=1", *FAST)
    results = run_script("2_distill_student.py", "STUDENT_LAYERS=(0, 2)", "EPOCHS=1", *FAST)  # on by default
    folder = downloaded / "models" / "student_model"
    meta = read_metadata(folder)
    config, recorded = meta["config"], meta["results"]
    assert config["INTERMEDIATE_WEIGHT"] == 1.0
    assert recorded["train_sentences"] == len(load_sst2_splits()["train"])
    assert recorded["intermediate_layer_map"] == [0, 2]
    assert len(calls) == meta["results"]["history"][-1]["step"]  # one intermediate term per training step
    student = load_model(folder)
    assert student.config._attn_implementation == "sdpa"  # eager attention was for training only
    assert evaluate(student, validation_loader(folder)) == pytest.approx(results["validation_accuracy"])

    for bad, key in ((("INTERMEDIATE_WEIGHT=-1",), "INTERMEDIATE_WEIGHT"),
                     (("DISTILL=False", "INTERMEDIATE_WEIGHT=1"), "DISTILL=False")):
        with pytest.raises(ConfigError, match=key):
            run_script("2_distill_student.py", *bad)
    assert read_metadata(folder)["run_id"] == meta["run_id"]  # refused before anything was written
