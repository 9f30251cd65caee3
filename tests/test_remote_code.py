"""Pruned and 4-bit folders load WITHOUT this project (common/modeling_dpq.py shipped into them, `auto_map` in
config.json): `AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)` in a fresh,
isolated interpreter that cannot import `common` gives the same logits as `common.modeling.load_model(folder)`.

One subprocess loads every folder of both families (a fresh interpreter costs seconds importing transformers).
Tiny models use hidden 64 / FFN 128 (bnb's 4-bit CPU kernels want even in_features), as in test_quantization.py."""

import ast
import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (AutoModelForSequenceClassification, BertForSequenceClassification,
                          DistilBertForSequenceClassification)

from common.modeling import load_model, save_model
from common.modeling_dpq import AUTO_CLASS, CODE_FILE, CODE_FILES, LAYOUT_KEY, dpq_model_classes, get_layout
from common.modeling_dpq_4bit import QUANT_KEY
from common.pruning.selection import prune_units
from common.quantization import quantize_model, save_quantized
from conftest import REPO, make_tokenizer, tiny_bert_config, tiny_distilbert_config

SOURCE = REPO / "common" / "modeling_dpq.py"
SOURCES = {name: REPO / "common" / name for name in CODE_FILES}  # what every pruned or 4-bit folder ships
KINDS = ("bert", "distilbert")
CASES = ("pruned_fp32", "pruned_4bit", "unpruned_4bit")
TOLERANCE = {"pruned_fp32": 1e-5, "pruned_4bit": 1e-4, "unpruned_4bit": 1e-4}
REMOTE_CLASS = {"bert": "DPQBertForSequenceClassification", "distilbert": "DPQDistilBertForSequenceClassification"}
# layer 0 keeps 1 head of 4 and 96 FFN neurons; layer 1 keeps no head and the floor of 32 FFN neurons
PRUNE = {"heads": {0: [1, 2, 3], 1: [0, 1, 2, 3]}, "ffn": {0: list(range(32)), 1: list(range(96))}}
INPUTS = {"input_ids": [[2, 5, 16, 27, 30, 3, 0, 0], [2, 14, 25, 31, 33, 8, 37, 3]],
          "attention_mask": [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]]}

# Runs in `python -I` (no script dir / cwd / PYTHONPATH on sys.path) with cwd = a temporary folder.
CHILD = textwrap.dedent("""
    import json, sys
    try:
        import common
    except ImportError:
        pass
    else:
        raise SystemExit(f"the project is importable in the child: {common.__file__}")
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.set_num_threads(1)
    spec = json.loads(sys.argv[1])
    inputs = {k: torch.tensor(v) for k, v in spec["inputs"].items()}
    out = {}
    for name, folder in spec["folders"]:  # fp32 folders first: they must not need bitsandbytes
        model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
        with torch.no_grad():
            logits = model(**inputs).logits
        out[name] = {"logits": logits, "class": type(model).__name__, "module": type(model).__module__,
                     "training": model.training, "bitsandbytes_imported": "bitsandbytes" in sys.modules,
                     "linear4bit": sum(type(m).__name__ == "QuantLinear4bit" for m in model.modules())}
    torch.save(out, spec["out"])
""")


def build(kind: str):
    torch.manual_seed(0)
    if kind == "bert":
        return BertForSequenceClassification(tiny_bert_config(hidden_size=64, intermediate_size=128)).eval()
    return DistilBertForSequenceClassification(tiny_distilbert_config(dim=64, hidden_dim=128)).eval()


def inputs():
    return {k: torch.tensor(v) for k, v in INPUTS.items()}


@torch.no_grad()
def logits_of(model):
    return model.eval()(**inputs()).logits


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{(kind, case): folder} for the three cases that ship code, plus (kind, "unpruned_fp32")."""
    root = tmp_path_factory.mktemp("remote_code")
    tokenizer = make_tokenizer(root / "tokenizer")
    out = {}
    for kind in KINDS:
        model = build(kind)
        pruned = copy.deepcopy(model)
        prune_units(pruned, **PRUNE)
        out[kind, "unpruned_fp32"] = root / f"{kind}_unpruned_fp32"
        save_model(model, tokenizer, out[kind, "unpruned_fp32"])
        out[kind, "pruned_fp32"] = root / f"{kind}_pruned_fp32"
        save_model(pruned, tokenizer, out[kind, "pruned_fp32"])
        out[kind, "pruned_4bit"] = root / f"{kind}_pruned_4bit"
        save_quantized(quantize_model(copy.deepcopy(pruned)), tokenizer, out[kind, "pruned_4bit"])
        out[kind, "unpruned_4bit"] = root / f"{kind}_unpruned_4bit"
        save_quantized(quantize_model(copy.deepcopy(model)), tokenizer, out[kind, "unpruned_4bit"])
    return out


@pytest.fixture(scope="module")
def remote(folders, tmp_path_factory):
    """What the isolated child saw for every (kind, case): logits, class, ... (one subprocess for all)."""
    work = tmp_path_factory.mktemp("child")
    order = [(kind, case) for case in CASES for kind in KINDS]  # pruned_fp32 of both kinds first
    spec = {"inputs": INPUTS, "out": str(work / "remote.pt"),
            "folders": [[f"{kind}/{case}", str(folders[kind, case])] for kind, case in order]}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(work / "hf_modules"), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, "-I", "-c", CHILD, json.dumps(spec)], cwd=work, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"child failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return torch.load(work / "remote.pt")


def test_shipped_files_are_self_contained():
    """Import only what any transformers install has (bitsandbytes through importlib, lazily), never `common`; the
    loader's one relative import is its sibling shipped file, the bitsandbytes modules."""
    from transformers.dynamic_module_utils import get_imports, get_relative_imports

    for name, path in SOURCES.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
            elif isinstance(node, ast.ImportFrom):
                assert name == CODE_FILE and node.module == "modeling_dpq_4bit", f"{name}: relative import"
        assert "common" not in imported
        assert imported <= {"importlib", "json", "logging", "shutil", "dataclasses", "pathlib", "torch",
                            "safetensors", "transformers"}, imported
    # transformers' own scan of a remote-code file: nothing beyond torch / transformers / safetensors to install
    assert set(get_imports(SOURCE)) - set(sys.stdlib_module_names) == {"torch", "safetensors", "transformers"}
    assert get_relative_imports(SOURCE) == ["modeling_dpq_4bit"]
    assert get_relative_imports(SOURCES["modeling_dpq_4bit.py"]) == []


def test_code_is_shipped_with_pruned_and_4bit_folders_only(folders):
    for kind in KINDS:
        plain = folders[kind, "unpruned_fp32"]
        config = json.loads((plain / "config.json").read_text())
        assert "auto_map" not in config and not (plain / CODE_FILE).exists()
        loaded = AutoModelForSequenceClassification.from_pretrained(str(plain))  # plain from_pretrained still works
        assert torch.equal(logits_of(loaded), logits_of(load_model(plain)))
        for case in CASES:
            folder = folders[kind, case]
            config = json.loads((folder / "config.json").read_text())
            assert config["auto_map"] == {AUTO_CLASS: f"modeling_dpq.{REMOTE_CLASS[kind]}"}
            assert all((folder / name).read_bytes() == path.read_bytes() for name, path in SOURCES.items())  # verbatim
            assert bool(config.get(LAYOUT_KEY)) == case.startswith("pruned")
            assert bool(config.get(QUANT_KEY)) == case.endswith("4bit")
        # without trust_remote_code transformers uses its own class: the pruned folder fails loudly
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            AutoModelForSequenceClassification.from_pretrained(str(folders[kind, "pruned_fp32"]))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_folder_loads_without_the_project_with_the_same_logits(folders, remote, kind, case):
    folder = folders[kind, case]
    expected = logits_of(load_model(folder))
    got = remote[f"{kind}/{case}"]
    assert got["class"] == REMOTE_CLASS[kind]
    assert got["module"].startswith("transformers_modules.")  # the shipped copy, not the project's file
    assert got["training"] is False
    assert got["logits"].shape == expected.shape
    diff = (got["logits"] - expected).abs().max().item()
    assert diff <= TOLERANCE[case], f"{kind} {case}: max abs logit difference {diff}"
    if case == "pruned_fp32":
        assert got["bitsandbytes_imported"] is False  # fp32 folders load without bitsandbytes
        assert got["linear4bit"] == 0
    else:
        assert got["linear4bit"] == (9 if case == "pruned_4bit" else 13)  # encoder (4 empty ones skipped) + head


def test_dpq_class_from_pretrained_options(folders):
    """The shipped classes, used directly: same model as load_model; documented options; loud on the rest."""
    classes = dpq_model_classes()
    bert = classes["DPQBertForSequenceClassification"]
    folder = folders["bert", "pruned_fp32"]
    model = bert.from_pretrained(str(folder), trust_remote_code=True, device_map="cpu", dtype="auto")
    assert type(model) is bert and not model.training
    assert get_layout(model) == {"heads": [1, 0], "ffn": [96, 32]}
    assert torch.equal(logits_of(model), logits_of(load_model(folder)))
    assert bert.from_pretrained(str(folder), torch_dtype=torch.bfloat16).classifier.weight.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="unsupported arguments"):
        bert.from_pretrained(str(folder), not_an_option=1)
    with pytest.raises(ValueError, match="4-bit folder"):
        bert.from_pretrained(str(folders["bert", "pruned_4bit"]), dtype=torch.bfloat16)
    distil = classes["DPQDistilBertForSequenceClassification"].from_pretrained(
        str(folders["distilbert", "unpruned_4bit"]))
    assert torch.equal(logits_of(distil), logits_of(load_model(folders["distilbert", "unpruned_4bit"])))
