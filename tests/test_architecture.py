"""The shape of common/: every module imports on its own, and module-level imports form no cycle.

A function-body import is allowed only to keep a slow library (transformers, accelerate, bitsandbytes, onnx,
onnxruntime, fvcore, datasets, matplotlib) off the import path, with a comment saying so; never to hide a cycle
between project modules, which this file would then not see.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

COMMON = Path(__file__).resolve().parents[1] / "common"


def module_name(path: Path) -> str:
    """common/stage.py -> "stage"; a package's modules too: common/report/__init__.py -> "report",
    common/report/measure.py -> "report.measure"."""
    parts = path.relative_to(COMMON).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


PATHS = {module_name(p): p for p in COMMON.rglob("*.py") if p != COMMON / "__init__.py"}
MODULES = sorted(PATHS)


def common_module(name: str):
    """The module of common/ that a dotted name imports ("common.report.measure.load_model" -> "report.measure"),
    or None."""
    parts = name.split(".")
    if parts[0] != "common":
        return None
    for end in range(len(parts), 1, -1):
        if ".".join(parts[1:end]) in PATHS:
            return ".".join(parts[1:end])
    return None


def project_imports(path: Path) -> dict:
    """{"module": [common modules imported at module level], "body": [common modules imported in function bodies]}."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = {"module": set(), "body": set()}
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found = {m for m in map(common_module, names) if m}
        out["module" if id(node) in top else "body"] |= found
    return out


def test_module_level_imports_of_common_form_no_cycle():
    graph = {m: project_imports(PATHS[m])["module"] for m in MODULES}
    state = {}  # 1: on the current path, 2: done

    def visit(m, path):
        if state.get(m) == 2:
            return
        if state.get(m) == 1:
            cycle = path[path.index(m):] + [m]
            pytest.fail("import cycle in common/: " + " -> ".join(cycle))
        state[m] = 1
        for n in sorted(graph[m]):
            visit(n, path + [m])
        state[m] = 2

    for m in MODULES:
        visit(m, [])


def test_no_project_module_is_imported_in_a_function_body():
    hidden = {m: sorted(found) for m in MODULES if (found := project_imports(PATHS[m])["body"])}
    assert not hidden, f"import these at module level (a cycle must be removed, not hidden): {hidden}"


def test_the_shipped_loader_never_imports_the_project():
    # copied verbatim into model folders, it must load without this project
    for name in ("modeling_dpq.py", "modeling_dpq_4bit.py"):
        imports = project_imports(COMMON / name)
        assert not imports["module"] and not imports["body"], name


def test_each_module_imports_alone_in_a_fresh_interpreter():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    # one fresh interpreter per module, a few at a time (the slow part is importing torch)
    procs = {}
    failures = {}
    pending = list(MODULES)
    while pending or procs:
        while pending and len(procs) < 4:
            m = pending.pop(0)
            procs[m] = subprocess.Popen([sys.executable, "-c", f"import common.{m}"], cwd=COMMON.parent, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        m, p = next(iter(procs.items()))
        out, _ = p.communicate(timeout=120)
        del procs[m]
        if p.returncode:
            failures[m] = out.strip().splitlines()[-1:]
    assert not failures, f"modules that fail to import on their own: {failures}"


def test_a_bert_shaped_family_is_one_entry_in_families(tmp_path):
    """RoBERTa (`roberta.encoder.layer`, BERT's block) is only an entry in common.modeling_dpq.FAMILIES: pruned,
    saved, and loaded back by the project's loader and by transformers with trust_remote_code, same logits."""
    from transformers import AutoModelForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

    from common.flops import measure_encoder_gflops
    from common.modeling import load_model, save_model
    from common.modeling_dpq import FAMILIES, family_of, get_layout
    from common.pruning.selection import kept_units, prune_units
    from conftest import VOCAB, make_tokenizer

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, num_labels=2, pad_token_id=0)
    model = RobertaForSequenceClassification(config).eval()
    assert family_of(model) is FAMILIES["roberta"]
    before = measure_encoder_gflops(model, 16)
    prune_units(model, heads={0: [1, 3]})  # two heads of layer 0
    assert get_layout(model) == {"heads": [2, 4], "ffn": [64, 64]} and kept_units(model)["heads"][0] == [0, 2]
    assert measure_encoder_gflops(model, 16) < before
    folder = tmp_path / "pruned_roberta"
    save_model(model, make_tokenizer(tmp_path / "tokenizer"), folder)
    inputs = {"input_ids": torch.tensor([[2, 5, 16, 27, 30, 3, 0, 0], [2, 14, 25, 31, 33, 8, 37, 3]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])}
    with torch.no_grad():
        expected = model(**inputs).logits
        for loaded in (load_model(folder),
                       AutoModelForSequenceClassification.from_pretrained(str(folder), trust_remote_code=True)):
            assert get_layout(loaded) == {"heads": [2, 4], "ffn": [64, 64]}
            assert torch.allclose(loaded(**inputs).logits, expected, atol=1e-6)
    assert type(loaded).__name__ == "DPQRobertaForSequenceClassification"
