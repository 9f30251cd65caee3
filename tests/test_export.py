"""CPU serving artifacts (common/export.py) and predict.py on tiny BERT and DistilBERT classifiers, pruned (uneven
heads, a layer with no head and no FFN neuron left) and unpruned: the ONNX fp32 graph gives PyTorch's logits at any
batch size and length, the int8 export agrees on most predictions, bad or missing exports give one line naming the
file, and predict prints one line per sentence."""

import copy
import io
import json
import subprocess
import sys

import pytest
import torch

from common import export
from common.data import encode, make_loader
from common.modeling import load_tokenizer
from common.modeling_dpq import get_layout
from common.pruning.selection import prune_units
from common.training import predict_logits
from conftest import REPO, tiny_sentences
from test_quantization import KINDS, PRUNE, build, train_briefly


@pytest.fixture(scope="module")
def models(tokenizer_dir):
    """{(kind, pruned): fp32 model trained a few steps}; pruned = layer 0 keeps 1 head, layer 1 no head and no FFN."""
    tokenizer = load_tokenizer(tokenizer_dir)
    out = {}
    for kind in KINDS:
        trained = train_briefly(build(kind), tokenizer)
        out[kind, False] = trained
        pruned = copy.deepcopy(trained)
        prune_units(pruned, **PRUNE)
        out[kind, True] = pruned.eval()
    return out


def loader_for(tokenizer_dir, n=64, batch_size=16):
    tokenizer = load_tokenizer(tokenizer_dir)
    return make_loader(encode(tokenizer, tiny_sentences(n, seed=5)), batch_size, pad_id=tokenizer.pad_token_id)


@pytest.mark.parametrize("pruned", [False, True], ids=["unpruned", "pruned"])
@pytest.mark.parametrize("kind", KINDS)
def test_onnx_fp32_gives_pytorch_logits_at_any_batch_and_length(models, kind, pruned, tmp_path):
    model = models[kind, pruned]
    if pruned:
        assert get_layout(model) == {"heads": [1, 0], "ffn": [96, 32]}  # layer 1: no head left
    path = tmp_path / "model.onnx"
    export.export_fp32(model, path)
    runner = export.OnnxClassifier(path, threads=1)
    torch.manual_seed(1)
    for batch, length in ((1, 3), (1, 20), (5, 11), (7, 33)):
        ids = torch.randint(5, model.config.vocab_size, (batch, length))
        mask = torch.ones_like(ids)
        if batch > 1:
            mask[1:, length // 2:] = 0  # padded rows, as in every batch of mixed lengths
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask).logits
        got = torch.from_numpy(runner.logits(ids, mask))
        assert got.shape == (batch, 2)
        assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_export_folder_checks_int8_and_int4_against_the_source(models, kind, tokenizer_dir, tmp_path):
    model = models[kind, True]
    loader = loader_for(tokenizer_dir)
    reference = predict_logits(model, loader)
    kinds = ("fp32", "int8", "int4") if kind == "bert" else ("fp32", "int8")
    record = export.export_folder(model, load_tokenizer(tokenizer_dir), tmp_path, kinds, reference_logits=reference,
                                  labels=loader.dataset.labels, loader=loader, min_agreement=0.9, log=lambda *_: None)
    onnx_dir = tmp_path / export.ONNX_DIR
    assert json.loads((onnx_dir / export.MANIFEST).read_text()) == json.loads(json.dumps(record))
    assert set(record["artifacts"]) == {export.artifact_name(k) for k in kinds} and not record["rejected"]
    assert load_tokenizer(onnx_dir).vocab_size == load_tokenizer(tokenizer_dir).vocab_size and record["labels"] == {"0": "LABEL_0", "1": "LABEL_1"}
    assert record["artifacts"]["onnx_fp32"]["max_abs_logit_diff"] < 1e-4
    assert record["artifacts"]["onnx_fp32"]["prediction_agreement"] == 1.0
    for name, result in record["artifacts"].items():
        assert result["prediction_agreement"] >= 0.9  # int8 / int4 agree on most predictions
        assert result["bytes"] == (onnx_dir / result["file"]).stat().st_size
        # the recorded accuracy is what the file gives when run again
        logits = export.onnx_predict_logits(export.OnnxClassifier(onnx_dir / result["file"]), loader)
        assert (logits.argmax(-1) == loader.dataset.labels).float().mean().item() == pytest.approx(result["accuracy"])
    assert export.exported_artifacts(tmp_path) == {n: onnx_dir / r["file"] for n, r in record["artifacts"].items()}


def _embedding_storage(path) -> dict:
    """{op type of the node that reads the word-embedding table: dtype of that table} of an ONNX file."""
    import onnx

    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    out = {}
    for node in graph.node:
        if node.op_type in ("Gather", "GatherBlockQuantized") and "word_embeddings" in node.name:
            table = inits.get(node.input[0])
            if table is not None:
                out[node.op_type] = onnx.helper.tensor_dtype_to_np_dtype(table.data_type).name
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_int4_export_holds_the_embedding_tables_in_4_bits(models, kind, tmp_path):
    model = models[kind, True]
    export.export_fp32(model, tmp_path / "model.onnx")
    export.quantize_int8(tmp_path / "model.onnx", tmp_path / "model_int8.onnx")
    export.quantize_int4(tmp_path / "model.onnx", tmp_path / "model_int4.onnx")
    assert _embedding_storage(tmp_path / "model.onnx") == {"Gather": "float32"}
    assert _embedding_storage(tmp_path / "model_int8.onnx") == {"Gather": "uint8"}
    assert _embedding_storage(tmp_path / "model_int4.onnx") == {"GatherBlockQuantized": "uint4"}
    parts = {name: export.onnx_bytes_by_part(tmp_path / f"{name}.onnx") for name in ("model", "model_int8", "model_int4")}
    rows = model.config.vocab_size + model.config.max_position_embeddings
    # stored bytes: 4 per fp32 value, 1 per int8 value (+ scales), half a byte per 4-bit value (+ scales)
    assert parts["model"]["embeddings"] >= 4 * rows * model.config.hidden_size
    assert parts["model"]["embeddings"] > parts["model_int8"]["embeddings"] > parts["model_int4"]["embeddings"]
    assert parts["model_int4"]["embeddings"] < 0.75 * rows * model.config.hidden_size
    assert parts["model_int4"]["encoder"] < parts["model_int8"]["encoder"]


def test_exports_that_do_not_match_are_not_kept(models, tokenizer_dir, tmp_path, monkeypatch):
    model = models["bert", True]
    loader = loader_for(tokenizer_dir, n=32)
    reference = predict_logits(model, loader)
    kwargs = dict(reference_logits=reference, labels=loader.dataset.labels, loader=loader, log=lambda *_: None)
    tokenizer = load_tokenizer(tokenizer_dir)
    # int8 held to an impossible agreement: removed, the reason recorded, fp32 kept
    record = export.export_folder(model, tokenizer, tmp_path / "a", ("fp32", "int8"), min_agreement=1.01, **kwargs)
    assert set(record["artifacts"]) == {"onnx_fp32"} and "below the 101.0% required" in \
        record["rejected"]["onnx_int8"]["reason"]
    assert not (tmp_path / "a" / "onnx" / "model_int8.onnx").exists()
    # fp32 off from PyTorch: refused, nothing left behind
    monkeypatch.setattr(export, "FP32_TOLERANCE", -1.0)
    with pytest.raises(export.ExportError, match="differ from PyTorch"):
        export.export_folder(model, tokenizer, tmp_path / "b", ("fp32", "int8"), min_agreement=0.0, **kwargs)
    assert not (tmp_path / "b" / "onnx").exists()
    with pytest.raises(ValueError, match="unknown ONNX artifact"):
        export.export_folder(model, tokenizer, tmp_path / "c", ("int3",), min_agreement=0.0, **kwargs)


def test_corrupt_or_missing_exports_give_one_line_naming_the_file(models, tokenizer_dir, tmp_path):
    model = models["distilbert", False]
    loader = loader_for(tokenizer_dir, n=16)
    export.export_folder(model, load_tokenizer(tokenizer_dir), tmp_path, ("fp32", "int8"),
                         reference_logits=predict_logits(model, loader), labels=loader.dataset.labels, loader=loader,
                         min_agreement=0.0, log=lambda *_: None)
    onnx_dir = tmp_path / "onnx"
    data = (onnx_dir / "model_int8.onnx").read_bytes()
    (onnx_dir / "model_int8.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(export.ExportError, match="model_int8.onnx cannot be loaded by ONNX Runtime"):
        export.OnnxClassifier(onnx_dir / "model_int8.onnx")
    (onnx_dir / "model_int8.onnx").unlink()
    with pytest.raises(export.ExportError, match="model_int8.onnx is listed in export.json but missing"):
        export.exported_artifacts(tmp_path)
    (onnx_dir / export.MANIFEST).write_text("{not json")
    with pytest.raises(export.ExportError, match="export.json is unreadable"):
        export.read_manifest(tmp_path)
    assert export.read_manifest(tmp_path / "elsewhere") is None  # no export at all is not an error


# ------------------------------------------------------------------------------------------------------------
# predict.py


@pytest.fixture(scope="module")
def predict_folder(models, tokenizer_dir, tmp_path_factory):
    """A pruned model folder with an onnx/ export, as stage 9 leaves the final model."""
    from common.modeling import save_model

    folder = tmp_path_factory.mktemp("final")
    model = models["bert", True]
    save_model(model, load_tokenizer(tokenizer_dir), folder)
    loader = loader_for(tokenizer_dir, n=32)
    export.export_folder(model, load_tokenizer(tokenizer_dir), folder, ("fp32", "int8"),
                         reference_logits=predict_logits(model, loader), labels=loader.dataset.labels, loader=loader,
                         min_agreement=0.0, log=lambda *_: None)
    return folder


def run_predict(*args, stdin=""):
    """predict.main in this process; stdin as text, or as bytes (then read as a real stdin is: a text stream over
    a byte buffer)."""
    import runpy

    namespace = runpy.run_path(str(REPO / "predict.py"), run_name="dpq_test")
    out = io.StringIO()
    stdin = io.TextIOWrapper(io.BytesIO(stdin)) if isinstance(stdin, bytes) else io.StringIO(stdin)
    results = namespace["main"](list(args), stdin=stdin, stdout=out)
    return results, out.getvalue().splitlines(), namespace


def test_predict_prints_one_line_per_sentence_from_folder_onnx_file_and_stdin(predict_folder, tmp_path):
    sentences = ["a great and lovely film", "a dull , boring story"]
    # a folder that ships onnx/model_int8.onnx runs it; --pytorch runs the folder; the same labels come out
    onnx_results, lines, _ = run_predict("--model", str(predict_folder), *sentences)
    assert len(lines) == 2 and [line.split("\t")[2] for line in lines] == sentences
    for line in lines:
        label, prob, _ = line.split("\t")
        assert label in ("LABEL_0", "LABEL_1") and 0.5 <= float(prob) <= 1.0
    torch_results, _, _ = run_predict("--model", str(predict_folder), "--pytorch", *sentences)
    assert [r[0] for r in torch_results] == [r[0] for r in onnx_results]
    fp32_results, _, _ = run_predict("--model", str(predict_folder / "onnx" / "model.onnx"), *sentences)
    assert [r[1] for r in fp32_results] == pytest.approx([r[1] for r in torch_results], abs=1e-4)
    # stdin and --file: one sentence per line, blank lines skipped
    _, lines, _ = run_predict("--model", str(predict_folder), stdin="good film\n\nawful plot\n")
    assert [line.split("\t")[2] for line in lines] == ["good film", "awful plot"]
    text = tmp_path / "in.txt"
    text.write_text("\ufefffun story\nugly acting\nsmart plot\n", encoding="utf-8")  # a BOM is accepted
    _, lines, _ = run_predict("--model", str(predict_folder), "--file", str(text))
    assert [line.split("\t")[2] for line in lines] == ["fun story", "ugly acting", "smart plot"]


def test_predict_refuses_bad_input_in_one_line(predict_folder, tmp_path):
    def refused(*args, stdin=""):
        with pytest.raises(ValueError) as info:  # predict.PredictError (a fresh class per runpy load)
            run_predict(*args, stdin=stdin)
        assert type(info.value).__name__ == "PredictError"
        return str(info.value)

    for args, message in ((["--model", str(tmp_path / "nothing"), "good"], "does not exist"),
                          (["--model", str(tmp_path / "x.onnx"), "good"], "no such ONNX file"),
                          (["--model", str(predict_folder), "--file", str(tmp_path / "none.txt")], "no such file"),
                          (["--model", str(predict_folder), "good", "--file", "x"], "not both")):
        assert message in refused(*args)
    assert "empty input" in refused("--model", str(predict_folder), stdin="\n \n")
    # bytes that are not UTF-8: refused alike from --file and from stdin, saying what to do
    not_utf8 = "not UTF-8 text (invalid continuation byte at byte 3): convert it to UTF-8"
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9 ok\n")
    assert refused("--model", str(predict_folder), "--file", str(latin1)) == f"--file {latin1}: {not_utf8}"
    assert refused("--model", str(predict_folder), stdin=b"caf\xe9 ok\n") == f"stdin: {not_utf8}"
    # the command itself, stdin piped in: exit 1, one line, no traceback
    done = subprocess.run([sys.executable, str(REPO / "predict.py"), "--model", str(predict_folder)], cwd=tmp_path,
                          input=b"caf\xe9 ok\n", capture_output=True, timeout=120,
                          env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    stderr = done.stderr.decode()
    assert done.returncode == 1 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == f"error: stdin: {not_utf8}"
    # a corrupt export: the command itself exits 1 with one line naming the file, no traceback
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    done = subprocess.run([sys.executable, str(REPO / "predict.py"), "--model", str(broken), "good"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {broken} cannot be loaded by ONNX Runtime")
