"""Stages 1 and 2 on tiny random models: teacher fine-tuning, the student built from teacher layers,
the KD loss, the teacher-logit cache, the ablation, both presets, and clear errors out of order."""

import copy

import pytest
import torch
from transformers import BertForSequenceClassification

from common.data import encode, make_loader, load_sst2_splits
from common.distillation import kd_loss, student_from_teacher_layers, teacher_logits_for
from common.modeling import encoder_layers, load_model, load_tokenizer
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



def test_kd_loss_weighs_each_example_and_length_weights_average_one(tiny_bert):
    """weights scale each example's loss before the batch mean (not renormalised within the batch); all ones give
    the plain loss; length_weights are token count ** power over the training set's mean of it."""
    from common.distillation import length_norm, length_weights

    torch.manual_seed(0)
    logits, teacher = torch.randn(4, 2), torch.randn(4, 2)
    labels = torch.tensor([0, 1, 1, 0])
    for alpha in (0.5, 1.0):
        plain = kd_loss(logits, teacher, labels, 2.0, alpha).item()
        assert kd_loss(logits, teacher, labels, 2.0, alpha, torch.ones(4)).item() == pytest.approx(plain, rel=1e-5)
        only_first = kd_loss(logits, teacher, labels, 2.0, alpha, torch.tensor([4.0, 0, 0, 0])).item()
        assert only_first == pytest.approx(kd_loss(logits[:1], teacher[:1], labels[:1], 2.0, alpha).item(), rel=1e-5)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0], [1] * 8])  # 2 and 8 real tokens
    assert length_weights(mask, 1.0, 5.0).tolist() == pytest.approx([0.4, 1.6])
    assert length_weights(mask, 0.5, 3.0).tolist() == pytest.approx([2 ** 0.5 / 3, 8 ** 0.5 / 3])
    assert length_weights(mask, 0.0, 1.0).tolist() == [1.0, 1.0]
    ids = [[101, 7, 102], [101, 102], [101, 5, 6, 7, 8, 9, 102]]  # 3, 2, 7 tokens
    for power in (0.5, 1.0, 2.0):
        masks = [torch.ones(1, len(x)) for x in ids]
        norm = length_norm(ids, power)
        assert sum(length_weights(m, power, norm).item() for m in masks) / len(ids) == pytest.approx(1.0)
    # kd_loss_fn: the weights come from each row's real tokens (padding not counted)
    from common.distillation import kd_loss_fn
    from common.data import model_inputs
    batch = {"input_ids": torch.randint(5, tiny_bert.config.vocab_size, (2, 8)), "attention_mask": mask,
             "labels": torch.tensor([0, 1]), "idx": torch.tensor([1, 3])}
    fn = kd_loss_fn(teacher, 2.0, 0.5, length_power=1.0, length_norm_value=5.0)
    out = tiny_bert.eval()(**model_inputs(batch)).logits
    expected = kd_loss(out, teacher[[1, 3]], batch["labels"], 2.0, 0.5, torch.tensor([0.4, 1.6]))
    assert fn(tiny_bert, batch).item() == pytest.approx(expected.item(), rel=1e-5)
    assert fn(tiny_bert, batch).item() != pytest.approx(kd_loss_fn(teacher, 2.0, 0.5)(tiny_bert, batch).item())


def test_layer_wise_loss_by_hand_and_against_the_unpruned_reference(tiny_bert):
    """hidden_states_loss: relative squared error over real tokens, averaged over layers; kd_loss_fn adds it with its
    weight (0 against an identical model), and refuses a weight without a reference."""
    from common.distillation import hidden_states_loss, kd_loss_fn

    ref = (torch.ones(1, 3, 2), torch.full((1, 3, 2), 2.0))
    out = (torch.zeros(1, 3, 2), torch.tensor([[[2.0, 2.0], [2.0, 4.0], [9.0, 9.0]]]))
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding: never counted
    # layer 1: 4 / 4 = 1; layer 2: (0 + 0 + 0 + 4) / (4 * 4) = 0.25
    assert hidden_states_loss(out, ref, mask).item() == pytest.approx((1 + 0.25) / 2)
    assert hidden_states_loss(ref, ref, mask).item() == 0

    batch = {"input_ids": torch.randint(5, tiny_bert.config.vocab_size, (4, 6)),
             "attention_mask": torch.ones(4, 6, dtype=torch.long), "labels": torch.tensor([0, 1, 0, 1]),
             "idx": torch.arange(4)}
    teacher = torch.randn(4, 2)
    plain = kd_loss_fn(teacher, 2.0, 0.5)(tiny_bert, batch)
    same = kd_loss_fn(teacher, 2.0, 0.5, reference=copy.deepcopy(tiny_bert), hidden_weight=3.0)(tiny_bert, batch)
    assert same.item() == pytest.approx(plain.item(), abs=1e-6)  # identical model: the layer term is 0
    other = copy.deepcopy(tiny_bert)
    with torch.no_grad():
        other.bert.encoder.layer[0].output.dense.bias[0] += 1.0  # one feature (LayerNorm cancels a uniform shift)
    extra = kd_loss_fn(teacher, 2.0, 0.5, reference=other, hidden_weight=3.0)(tiny_bert, batch) - plain
    assert extra.item() > 1e-3
    with pytest.raises(ValueError, match="reference"):
        kd_loss_fn(teacher, 2.0, 0.5, hidden_weight=1.0)


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
    assert read_metadata(folder)["run_id"] == meta["run_id"]  # the real student was not overwritten


def test_bert_preset_with_a_distilbert_student(workspace, glue_dir, monkeypatch, tiny_bert_dir, tiny_distilbert_dir):
    monkeypatch.setenv("SST2_DIR", str(glue_dir))
    monkeypatch.setenv("PRESET", "bert")
    run_script("download_model.py", f"TEACHER_SOURCE={tiny_bert_dir}", f"STUDENT_SOURCE={tiny_distilbert_dir}")
    run_script("1_train_teacher.py", "EPOCHS=1", *FAST)
    run_script("2_distill_student.py", "EPOCHS=1", *FAST)
    student = load_model(workspace / "models" / "student_model")
    assert type(student).__name__ == "DistilBertForSequenceClassification"
    assert read_metadata(workspace / "models" / "student_model")["results"]["preset"] == "bert"

    monkeypatch.setenv("PRESET", "minilm")  # a teacher made for another preset is refused
    with pytest.raises(StageError, match="preset 'bert'"):
        run_script("2_distill_student.py")
