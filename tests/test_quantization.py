"""4-bit quantization (common/quantization.py, 9_quantize_pruned_model.py) on tiny BERT and DistilBERT classifiers,
unpruned and pruned: what becomes 4-bit, exact save -> reload, agreement with the fp32 source, the CPU repack
guard, and the stage script end to end.

Tiny models use hidden 64 / FFN 128 (bnb's 4-bit CPU kernels want even in_features), and are trained for a
few steps on the toy sentiment task so that their predictions mean something (a random tiny classifier's
logits sit so close together that any noise flips them)."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertForSequenceClassification, DistilBertForSequenceClassification

from common.data import encode, load_sst2_splits, make_loader, model_inputs
from common.modeling import load_model, load_tokenizer, weight_bytes
from common.modeling_dpq import encoder_linear_names, get_layout, head_dense_name, read_state_dict, word_embedding_name
from common.modeling_dpq_4bit import QUANT_KEY, quant_classes
from common.pruning.selection import prune_units
from common.quantization import (check_quantized, load_quantized, precision_map, quantize_model,
                                 resolve_compute_dtype, save_quantized)
from common.stage import StageError, read_metadata
from common.training import predict_logits
from conftest import (run_script, save_tiny, tiny_bert_config, tiny_distilbert_config, tiny_sentences,
                      write_stage)

STAGE = "9_quantize_pruned_model.py"
KINDS = ("bert", "distilbert")
# layer 0 keeps 1 head of 4 and 96 FFN neurons; layer 1 keeps no head and the floor of 32 FFN neurons
PRUNE = {"heads": {0: [1, 2, 3], 1: [0, 1, 2, 3]}, "ffn": {0: list(range(32)), 1: list(range(96))}}


def build(kind: str):
    torch.manual_seed(0)
    if kind == "bert":
        return BertForSequenceClassification(tiny_bert_config(hidden_size=64, intermediate_size=128))
    return DistilBertForSequenceClassification(tiny_distilbert_config(dim=64, hidden_dim=128))


def train_briefly(model, tokenizer, steps: int = 30):
    loader = make_loader(encode(tokenizer, tiny_sentences(256, seed=1)), 32, shuffle=True, seed=0,
                         pad_id=tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    step = 0
    while step < steps:
        for batch in loader:
            loss = F.cross_entropy(model(**model_inputs(batch)).logits, batch["labels"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step == steps:
                break
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine two threads oversubscribe (x8 slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(one_thread, tokenizer_dir):
    """{kind: fp32 model trained for a few steps} (shared by the tests of this file; copy before changing)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    return {kind: train_briefly(build(kind), tokenizer) for kind in KINDS}


def fp32_model(trained, kind: str, pruned: bool):
    model = copy.deepcopy(trained[kind])
    if pruned:
        prune_units(model, **PRUNE)
    return model


@pytest.fixture(scope="module")
def eval_loader(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    return make_loader(encode(tokenizer, tiny_sentences(96, seed=5)), 32, pad_id=tokenizer.pad_token_id)


def bnb_nn():
    import bitsandbytes

    return bitsandbytes.nn


def assert_quantized_structure(model, pruned: bool, embedding=8, head_4bit=True):
    linear4 = bnb_nn().Linear4bit
    names = encoder_linear_names(model)
    assert len(names) == 6 * model.config.num_hidden_layers  # q, k, v, attention out, FFN in, FFN out
    four_bit = [n for n in names if isinstance(model.get_submodule(n), linear4)]
    empty = [n for n in names if n not in four_bit]
    # every encoder Linear is 4-bit, except the attention Linears of a layer whose heads were all pruned (0 weights)
    assert all(model.get_submodule(n).weight.numel() == 0 for n in empty)
    assert len(empty) == (4 if pruned else 0)
    head = model.get_submodule(head_dense_name(model))
    assert isinstance(head, linear4) == head_4bit
    for n in four_bit:
        module = model.get_submodule(n)
        assert module.support_avx512bf16_for_cpu is False
        assert module.weight.dtype == torch.uint8 and module.weight.quant_state is not None
        assert not getattr(module.weight.quant_state, "packing_format_for_cpu", False)
    assert type(model.classifier) is nn.Linear and model.classifier.weight.dtype == torch.float32
    embedding_module = model.get_submodule(word_embedding_name(model))
    expected = {8: bnb_nn().Embedding8bit, 4: bnb_nn().Embedding4bit, 32: nn.Embedding}[embedding]
    assert isinstance(embedding_module, expected)


@pytest.mark.parametrize("pruned", [False, True], ids=["unpruned", "pruned"])
@pytest.mark.parametrize("kind", KINDS)
def test_quantized_folder_reloads_exactly_and_agrees_with_fp32(trained, tokenizer_dir, eval_loader, tmp_path,
                                                                kind, pruned):
    fp32 = fp32_model(trained, kind, pruned)
    fp32_logits = predict_logits(fp32, eval_loader)
    model = quantize_model(copy.deepcopy(fp32))
    before = predict_logits(model, eval_loader)  # a forward BEFORE saving: the CPU repack trap would strike here
    folder = tmp_path / "q"
    save_quantized(model, load_tokenizer(tokenizer_dir), folder)

    reloaded = load_model(folder)  # the project's one loader dispatches on config.dpq_quantization
    assert type(reloaded) is type(fp32)
    assert_quantized_structure(reloaded, pruned)
    assert get_layout(reloaded) == get_layout(fp32)
    after = predict_logits(reloaded, eval_loader)
    assert torch.equal(before, after)
    agreement = (after.argmax(-1) == fp32_logits.argmax(-1)).float().mean().item()
    assert agreement >= 0.9, f"4-bit predictions agree with fp32 on only {agreement:.0%}"
    assert (after - fp32_logits).abs().max().item() > 0  # it really is a different (quantized) model

    # self-contained folder, settings recorded, and a second save after forwards writes identical tensors
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    settings = json.loads((folder / "config.json").read_text())[QUANT_KEY]
    assert settings["quant_type"] == "nf4" and settings["embedding_bits"] == 8 and settings["classifier"] == "fp32"
    save_quantized(reloaded, None, tmp_path / "again")
    first, second = read_state_dict(folder), read_state_dict(tmp_path / "again")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_fp4_double_quant_4bit_embedding_fp32_head_bf16_compute(trained, tokenizer_dir, eval_loader, tmp_path):
    fp32 = fp32_model(trained, "bert", pruned=True)
    model = quantize_model(copy.deepcopy(fp32), quant_type="fp4", double_quant=True, embedding_bits=4,
                           quantize_head=False, compute_dtype=torch.bfloat16)
    save_quantized(model, None, tmp_path / "before_forward")
    before = predict_logits(model, eval_loader)
    save_quantized(model, load_tokenizer(tokenizer_dir), tmp_path / "q")
    reloaded = load_model(tmp_path / "q")
    assert_quantized_structure(reloaded, pruned=True, embedding=4, head_4bit=False)
    assert reloaded.bert.encoder.layer[0].intermediate.dense.weight.quant_state.nested  # double quantization
    assert torch.equal(before, predict_logits(reloaded, eval_loader))
    agreement = (before.argmax(-1) == predict_logits(fp32, eval_loader).argmax(-1)).float().mean().item()
    assert agreement >= 0.9
    # a forward changes nothing that is saved (bnb would cast a bias to the compute dtype in place)
    first, second = read_state_dict(tmp_path / "before_forward"), read_state_dict(tmp_path / "q")
    assert all(torch.equal(first[k], second[k]) and first[k].dtype == second[k].dtype for k in first)
    parts = precision_map(reloaded)
    assert parts["encoder_linear_weights"]["storage"].startswith("fp4 4-bit")
    assert "8-bit (double quant)" in parts["encoder_linear_weights"]["storage"]
    assert parts["word_embeddings"]["storage"].startswith("fp4 4-bit")
    # biases of the 4-bit layers are stored in the compute dtype, LayerNorm and classifier biases in fp32
    assert set(parts["biases"]["storage"].split("; ")) == {"bfloat16", "float32"}
    assert parts["head_dense_weights"]["storage"] == "float32"
    assert resolve_compute_dtype("auto", "cpu") in ("bfloat16", "float32")
    assert resolve_compute_dtype("float32", "cpu") == "float32"


def test_precision_map_accounts_for_the_bytes(trained, tmp_path):
    fp32 = fp32_model(trained, "distilbert", pruned=False)
    model = quantize_model(copy.deepcopy(fp32))
    size = save_quantized(model, None, tmp_path / "q")
    parts = precision_map(model)
    assert parts["classifier"] == {"storage": "float32", "parameters": 130, "bytes": 520}
    assert parts["word_embeddings"]["storage"] == "int8 per row + fp32 row scale"
    vocab, dim = fp32.config.vocab_size, fp32.config.dim
    assert parts["word_embeddings"]["bytes"] == vocab * dim + 4 * vocab
    linear = parts["encoder_linear_weights"]
    assert linear["parameters"] == 2 * (4 * 64 * 64 + 2 * 64 * 128)
    assert linear["bytes"] < 0.6 * linear["parameters"] + 2000  # 0.5 byte per weight + absmax + small extras
    total = sum(p["bytes"] for p in parts.values())
    assert total <= size <= total + 20_000  # the rest is the safetensors header
    assert sum(p["parameters"] for p in parts.values()) == sum(p.numel() for p in fp32.parameters())
    assert size < 0.45 * weight_bytes(save_tiny(fp32, tmp_path / "fp32"))


def test_cpu_repack_guard_and_bad_folders(trained, tmp_path):
    model = quantize_model(copy.deepcopy(trained["bert"]))
    QuantLinear4bit = quant_classes()[0]
    layer = model.bert.encoder.layer[0].attention.self.query
    assert isinstance(layer, QuantLinear4bit)
    layer.support_avx512bf16_for_cpu = True
    with pytest.raises(RuntimeError, match="support_avx512bf16_for_cpu"):
        check_quantized(model)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model)
    plain = save_tiny(copy.deepcopy(trained["bert"]), tmp_path / "plain")
    with pytest.raises(ValueError, match="not a quantized folder"):
        load_quantized(plain)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_quantized(tmp_path / "nothing")


# ------------------------------------------------------------------------------------------------------------
# the stage script


@pytest.fixture
def prepared(workspace, glue_dir, monkeypatch, tiny_bert_dir):
    """data/sst2 written by the real download stage."""
    monkeypatch.setenv("SST2_DIR", str(glue_dir))
    run_script("download_model.py", f"TEACHER_SOURCE={tiny_bert_dir}")
    return workspace


def test_stage_quantizes_final_baseline_and_sweep(prepared, trained):
    from common.paths import stage_dir

    models = prepared / "models"
    student = write_stage(fp32_model(trained, "bert", False), stage_dir("student"), "student")
    pruned = fp32_model(trained, "bert", True)
    write_stage(pruned, stage_dir("pruned"), "pruned", [(student, "student")])
    write_stage(pruned, models / "pruned_model_s50", "pruned", [(student, "student")])

    results = run_script(STAGE)
    assert set(results) == {"distilled_quantized_student", "pruned_quantized_final", "pruned_model_s50_quantized"}
    validation = load_sst2_splits()["validation"]
    for name, source, stage in (("distilled_quantized_student", "student_model", "student_quantized"),
                                ("pruned_quantized_final", "pruned_model", "pruned_quantized"),
                                ("pruned_model_s50_quantized", "pruned_model_s50", "pruned_quantized")):
        folder = models / name
        meta = read_metadata(folder)
        r = meta["results"]
        assert r == results[name] and meta["stage"] == stage
        assert [u["folder"] for u in meta["upstream"].values()] == [source]  # relative to the models root
        assert r["source_folder"] == str(models / source)
        assert r["bytes_on_disk"] == weight_bytes(folder) and r["size_vs_source"] < 0.6
        assert r["size_vs_fp32_student"] == round(weight_bytes(folder) / weight_bytes(student), 4)
        assert r["quantization"]["quant_type"] == "nf4" and r["reload_max_abs_logit_diff"] == 0
        assert r["precision_map"]["classifier"]["storage"] == "float32"
        model = load_model(folder)
        tokenizer = load_tokenizer(folder)
        loader = make_loader(encode(tokenizer, validation), 32, pad_id=tokenizer.pad_token_id)
        accuracy = (predict_logits(model, loader).argmax(-1) == loader.dataset.labels).float().mean().item()
        assert accuracy == pytest.approx(r["validation_accuracy"])
        assert r["accuracy_diff_points"] == round(100 * (accuracy - r["source_validation_accuracy"]), 3)
        assert r["prediction_agreement"] >= 0.9
        assert (r["layout"] is not None) == (source != "student_model")
        assert (folder / "stage.log").is_file()
        # the CPU serving artifacts of the same source, checked against it before they were kept
        onnx = r["onnx"]
        assert set(onnx["artifacts"]) == {"onnx_fp32", "onnx_int8"} and not onnx["rejected"]
        assert onnx["artifacts"]["onnx_fp32"]["max_abs_logit_diff"] < 1e-3
        assert onnx["artifacts"]["onnx_fp32"]["source_accuracy"] == pytest.approx(r["source_validation_accuracy"])
        assert onnx["artifacts"]["onnx_int8"]["prediction_agreement"] >= 0.97
        assert json.loads((folder / "onnx" / "export.json").read_text()) == onnx
        assert (folder / "onnx" / "model_int8.onnx").stat().st_size == onnx["artifacts"]["onnx_int8"]["bytes"]

    # a second run keeps every output made from the same source run with the same settings, data and code ...
    run_ids = {name: read_metadata(models / name)["run_id"] for name in results}
    again = run_script(STAGE, 'QUANTIZE=("sweep",)')
    assert again == {"pruned_model_s50_quantized": results["pruned_model_s50_quantized"]}
    assert read_metadata(models / "pruned_model_s50_quantized")["run_id"] == run_ids["pruned_model_s50_quantized"]
    # ... and makes it again when a setting changed, its source was rebuilt, or REDO=True
    for args in (("BLOCKSIZE=64",), ("REDO=True",)):
        run_script(STAGE, 'QUANTIZE=("sweep",)', *args)
        now = read_metadata(models / "pruned_model_s50_quantized")
        assert now["run_id"] != run_ids["pruned_model_s50_quantized"]
        run_ids["pruned_model_s50_quantized"] = now["run_id"]
    assert now["results"]["quantization"]["blocksize"] == 32
    write_stage(pruned, models / "pruned_model_s50", "pruned", [(student, "student")])
    run_script(STAGE, 'QUANTIZE=("sweep",)')
    assert read_metadata(models / "pruned_model_s50_quantized")["run_id"] != run_ids["pruned_model_s50_quantized"]
    assert read_metadata(models / "distilled_quantized_student")["run_id"] == run_ids["distilled_quantized_student"]


def test_stage_refuses_missing_inputs_and_bad_settings(prepared, trained):
    from common.config import ConfigError
    from common.paths import stage_dir

    with pytest.raises(StageError, match="2_distill_student.py"):
        run_script(STAGE)
    student = write_stage(fp32_model(trained, "bert", False), stage_dir("student"), "student")
    with pytest.raises(StageError, match="8_pruning_with_finetuning.py"):
        run_script(STAGE)
    write_stage(fp32_model(trained, "bert", True), prepared / "models" / "pruned_model_s50", "pruned",
                [(student, "student")])
    with pytest.raises(StageError, match="QUANTIZE="):  # a sweep without pruned_model: says how to run it
        run_script(STAGE)
    with pytest.raises(ConfigError, match="QUANT_TYPE"):
        run_script(STAGE, "QUANT_TYPE=int3")
    with pytest.raises(ConfigError, match="QUANTIZE"):
        run_script(STAGE, "QUANTIZE=('teacher',)")
    # pruned_model made from a student that was rebuilt since: the pair no longer belongs together
    write_stage(fp32_model(trained, "bert", True), stage_dir("pruned"), "pruned", [(student, "student")])
    write_stage(fp32_model(trained, "bert", False), stage_dir("student"), "student")
    with pytest.raises(StageError, match="8_pruning_with_finetuning.py` again"):
        run_script(STAGE)
    assert not any((prepared / "models").glob("*quantized*"))
