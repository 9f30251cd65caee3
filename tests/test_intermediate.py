"""Stage 2's intermediate-layer distillation (common/distillation.py: INTERMEDIATE_WEIGHT) on tiny models: the loss,
its layer map, its place in the KD loss, and eager attention only while training."""

import pytest
import torch
from transformers import BertForSequenceClassification

from common.config import ConfigError
from common.data import encode, make_loader, model_inputs
from common.distillation import (IntermediateDistillation, eager_attention, intermediate_layer_map, intermediate_loss,
                                 kd_loss, kd_loss_fn, student_from_teacher_layers)
from common.modeling import load_model
from conftest import save_tiny, tiny_bert_config, tiny_sentences


@pytest.fixture
def teacher4():
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(num_hidden_layers=4)).eval()


def padded_batch(tokenizer):
    rows = tiny_sentences(6, seed=6) + [("good", 1)]
    encoded = encode(tokenizer, rows)
    return next(iter(make_loader(encoded, len(rows))))


def outputs(model, batch):
    return model(**model_inputs(batch), output_hidden_states=True, output_attentions=True)


def test_intermediate_loss_is_zero_only_for_a_student_that_copies_the_mapped_layers(teacher4, tiny_tokenizer):
    batch = padded_batch(tiny_tokenizer)
    assert (batch["attention_mask"] == 0).any()
    copy = student_from_teacher_layers(teacher4, (0, 1)).eval()
    other = student_from_teacher_layers(teacher4, (0, 2)).eval()
    assert intermediate_layer_map(copy, teacher4) == [0, 1] and intermediate_layer_map(other, teacher4) == [0, 2]
    with eager_attention(teacher4, copy, other):
        target = outputs(teacher4, batch)
        same = intermediate_loss(outputs(copy, batch), target, [0, 1], batch["attention_mask"])
        assert same.item() == pytest.approx(0, abs=1e-10)
        wrong = intermediate_loss(outputs(copy, batch), target, [0, 2], batch["attention_mask"])
        assert wrong.item() > 1e-6
        loss = intermediate_loss(outputs(other, batch), target, [0, 2], batch["attention_mask"])
        assert loss.item() > 1e-6
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in other.parameters())
    assert teacher4.config._attn_implementation == "sdpa"  # switched back
    with pytest.raises(ValueError, match="eager attention"):
        intermediate_loss(outputs(copy, batch), target, [0, 1], batch["attention_mask"])


def test_kd_loss_fn_adds_the_weighted_intermediate_term(teacher4, tiny_tokenizer):
    batch = padded_batch(tiny_tokenizer)
    student = student_from_teacher_layers(teacher4, (0, 2)).eval()
    cached = torch.randn(len(batch["idx"]), 2)
    plain = kd_loss_fn(cached, 2.0, 0.5)(student, batch)
    with eager_attention(teacher4, student):
        term = intermediate_loss(outputs(student, batch), outputs(teacher4, batch), [0, 2], batch["attention_mask"])
        both = kd_loss_fn(cached, 2.0, 0.5, IntermediateDistillation(teacher4, [0, 2], 3.0))(student, batch)
    assert plain.item() == pytest.approx(kd_loss(student(**model_inputs(batch)).logits, cached[batch["idx"]],
                                                 batch["labels"], 2.0, 0.5).item(), rel=1e-6)
    assert both.item() == pytest.approx(plain.item() + 3.0 * term.item(), rel=1e-4)


def test_layer_map_is_uniform_without_recorded_layers_and_refuses_other_widths(teacher4, tiny_distilbert):
    assert intermediate_layer_map(tiny_distilbert, teacher4) == [1, 3]  # 2 of 4 layers, ending at the last
    torch.manual_seed(0)
    narrow = BertForSequenceClassification(tiny_bert_config(hidden_size=16, num_attention_heads=4))
    with pytest.raises(ConfigError, match="hidden"):
        intermediate_layer_map(narrow, teacher4)


def test_a_student_saved_after_intermediate_training_loads_like_any_other(tmp_path, teacher4):
    student = student_from_teacher_layers(teacher4, (0, 2))
    with eager_attention(student):
        assert student.config._attn_implementation == "eager"
    save_tiny(student, tmp_path / "s")
    assert load_model(tmp_path / "s").config._attn_implementation == "sdpa"
