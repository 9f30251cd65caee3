"""What to remove, and removing it until the MEASURED encoder GFLOPs reach a target.

Units: a head (rows of query/key/value, columns of the attention output; a layer may lose every head) and a block of
`ffn_granularity(original width)` FFN neurons (32 for every real model: bitsandbytes' CPU kernels want widths that are
multiples of 32), the least important neurons of a layer first; every layer keeps one block. The slicing is the
loader's (common.modeling_dpq), so a pruned folder reloads through the same code; every structural change writes the
layout into `model.config.dpq_layout`.

Ranking: every unit by importance per FLOP it saves (`unit_flops`, fvcore's convention: one multiply-add = 1 FLOP,
batch 1, sequence length 128), globally across layers and unit types. The per-unit costs only rank units; the target
is checked by measuring the model with common.flops.
"""

import copy
import math
from dataclasses import dataclass, field

import torch

from common.flops import SEQ_LEN, measure_encoder_gflops
from common.modeling_dpq import (LAYOUT_KEY, block_parts, encoder_layers, get_layout, head_size, keep_ffn_neurons,
                                 keep_heads, kept_record, num_heads, original_sizes)
from common.pruning.importance import TaylorImportance

FFN_MULTIPLE = 32  # FFN widths stay multiples of gcd(original width, FFN_MULTIPLE)
FFN_FLOOR = 1  # FFN blocks every layer keeps (a floor of 0 was screened: no gain; docs/experiments.md)


def ffn_granularity(original_width: int, multiple: int = FFN_MULTIPLE) -> int:
    """FFN widths stay multiples of this: 32 whenever the original width is a multiple of 32."""
    return math.gcd(original_width, multiple)


# ----------------------------------------------------------------------------------------------------
# Physical removal


def _keep_index(current: int, remove) -> torch.Tensor:
    remove = sorted(set(int(i) for i in remove))
    if remove and (remove[0] < 0 or remove[-1] >= current):
        raise IndexError(f"unit index out of range 0..{current - 1}: {remove}")
    drop = set(remove)
    return torch.tensor([i for i in range(current) if i not in drop], dtype=torch.long)


def _write_layout(model) -> None:
    setattr(model.config, LAYOUT_KEY, get_layout(model))


def remove_heads(model, layer_idx: int, heads) -> None:
    """Physically remove heads (indices in the layer's CURRENT numbering) from one layer."""
    n = num_heads(block_parts(encoder_layers(model)[layer_idx]))
    keep = _keep_index(n, heads)
    if len(keep) < n:
        keep_heads(model, layer_idx, keep)
        _write_layout(model)


def remove_ffn_neurons(model, layer_idx: int, neurons) -> None:
    """Physically remove FFN neurons (indices in the layer's CURRENT numbering) from one layer; the width left must
    stay a multiple of `ffn_granularity(original width)`."""
    width = block_parts(encoder_layers(model)[layer_idx]).ffn_in.out_features
    keep = _keep_index(width, neurons)
    if len(keep) == width:
        return
    g = ffn_granularity(original_sizes(model.config)[2])
    if len(keep) % g:
        raise ValueError(f"layer {layer_idx}: FFN width {len(keep)} is not a multiple of {g}")
    keep_ffn_neurons(model, layer_idx, keep)
    _write_layout(model)


def prune_units(model, heads: dict | None = None, ffn: dict | None = None) -> None:
    """Remove {layer: [head indices]} and {layer: [neuron indices]} (current numbering) at once."""
    for layer_idx, units in (heads or {}).items():
        remove_heads(model, int(layer_idx), units)
    for layer_idx, units in (ffn or {}).items():
        remove_ffn_neurons(model, int(layer_idx), units)


def kept_units(model) -> dict:
    """Original indices kept: {"heads": [[...] per layer], "ffn": [[...] per layer]} (for metadata)."""
    oh, _, of, _ = original_sizes(model.config)
    records = [kept_record(layer, oh, of) for layer in encoder_layers(model)]
    return {"heads": [list(r["heads"]) for r in records], "ffn": [list(r["ffn"]) for r in records]}


# ----------------------------------------------------------------------------------------------------
# Ranking


def unit_flops(model, seq_len: int = SEQ_LEN) -> dict:
    """FLOPs one head / one FFN neuron costs, per layer, at batch 1 (fvcore: 1 multiply-add = 1 FLOP): a head of size
    d costs its q, k, v projections (3 L H d), its share of the attention output (L d H) and Q K^T and P V (2 L^2 d);
    a neuron its row of the first FFN Linear and column of the second (2 L H)."""
    hidden = original_sizes(model.config)[3]
    sizes = [head_size(block_parts(layer)) for layer in encoder_layers(model)]
    return {"head": [(4 * seq_len * hidden + 2 * seq_len * seq_len) * d for d in sizes],
            "ffn_neuron": [2 * seq_len * hidden] * len(sizes)}


@dataclass(order=True)
class Candidate:
    score: float  # importance per FLOP saved
    order: int  # tie-break: keeps the FFN blocks of a layer in ascending importance
    kind: str = field(compare=False)  # "head" or "ffn"
    layer: int = field(compare=False)
    units: list = field(compare=False)  # current indices
    flops: int = field(compare=False)
    importance: float = field(compare=False)


def _importance_by_layer(model, importance) -> dict:
    """{"heads": [...], "ffn": [...]}: float64 CPU tensors per layer, after checking they match the layout."""
    if isinstance(importance, TaylorImportance):
        importance = {"heads": importance.heads, "ffn": importance.ffn}
    out = {kind: [torch.as_tensor(v, dtype=torch.float64).cpu() for v in importance[kind]] for kind in ("heads", "ffn")}
    layout = get_layout(model)
    if [len(h) for h in out["heads"]] != layout["heads"] or [len(f) for f in out["ffn"]] != layout["ffn"]:
        raise ValueError("importance does not match the model's current layout (reset it after pruning)")
    return out


def removal_order(model, importance, seq_len: int = SEQ_LEN) -> list:
    """Every removable unit (a `Candidate`), least important per FLOP first: each layer's heads one at a time, then
    each layer's FFN blocks, the least important neurons first, leaving `FFN_FLOOR` blocks per layer (that fixed order
    breaks ties). `importance`: a TaylorImportance or {"heads": [...], "ffn": [...]} per layer, current numbering
    (e.g. `common.pruning.importance.magnitude_importance(model)`)."""
    importance = _importance_by_layer(model, importance)
    g = ffn_granularity(original_sizes(model.config)[2])
    cost = unit_flops(model, seq_len)
    units = [("head", layer, [h], cost["head"][layer])
             for layer, imp in enumerate(importance["heads"]) for h in range(len(imp))]
    for layer, imp in enumerate(importance["ffn"]):
        ranked = torch.argsort(imp, stable=True).tolist()
        units += [("ffn", layer, ranked[b * g:(b + 1) * g], cost["ffn_neuron"][layer] * g)
                  for b in range(max(len(ranked) // g - FFN_FLOOR, 0))]
    candidates = []
    for order, (kind, layer, kept, flops) in enumerate(units):
        total = float(importance["heads" if kind == "head" else "ffn"][layer][kept].sum())
        candidates.append(Candidate(total / flops, order, kind, layer, kept, flops, total))
    return sorted(candidates)


# ----------------------------------------------------------------------------------------------------
# Pruning to a measured target


def _by_layer(chosen) -> tuple:
    """({layer: heads}, {layer: FFN neurons}) of candidates (indices in one numbering)."""
    heads, ffn = {}, {}
    for c in chosen:
        (heads if c.kind == "head" else ffn).setdefault(c.layer, []).extend(c.units)
    return heads, ffn


def _shift(units, gone) -> list:
    """Indices `units` of a numbering from which `gone` were removed since, in the numbering now."""
    return [u - sum(1 for r in gone if r < u) for u in units]


def _remove_one_more(model, chosen, c) -> None:
    """Remove candidate `c` (indices in the numbering before `chosen` were removed) from the model."""
    gone = sorted(u for e in chosen if e.kind == c.kind and e.layer == c.layer for u in e.units)
    (remove_heads if c.kind == "head" else remove_ffn_neurons)(model, c.layer, _shift(c.units, gone))


def prune_to_target(model, importance, target_encoder_gflops: float, seq_len: int = SEQ_LEN) -> dict:
    """Remove the least important units per FLOP until the MEASURED encoder GFLOPs <= the target.

    Units are chosen from their predicted cost, then the model is measured with common.flops; if it is still above
    the target (it should not be: the prediction matches fvcore), the next units are removed one at a time and
    measured again. Returns the ORIGINAL head indices and the number of FFN neurons removed per layer, the measured
    encoder GFLOPs and the predicted FLOPs saved. Raises ValueError when every removable unit is gone first."""
    before = measure_encoder_gflops(model, seq_len)
    original_heads = kept_units(model)["heads"]
    order = removal_order(model, importance, seq_len)
    need = (before - target_encoder_gflops) * 1e9
    chosen, saved = [], 0
    for c in order:
        if saved >= need - 1:  # 1 FLOP of slack for float rounding of GFLOPs
            break
        chosen.append(c)
        saved += c.flops
    pending = order[len(chosen):]
    prune_units(model, *_by_layer(chosen))  # indices in this call's starting numbering, one go per layer
    measured = measure_encoder_gflops(model, seq_len)
    while measured > target_encoder_gflops + 1e-9:
        if not pending:
            raise ValueError(f"cannot reach {target_encoder_gflops:.4f} encoder GFLOPs: at {measured:.4f} with every "
                             f"removable unit gone")
        c = pending.pop(0)
        _remove_one_more(model, chosen, c)
        chosen.append(c)
        saved += c.flops
        measured = measure_encoder_gflops(model, seq_len)
    heads, ffn = _by_layer(chosen)
    return {"removed_heads": {layer: sorted(original_heads[layer][u] for u in units)
                              for layer, units in sorted(heads.items())},
            "removed_ffn": {layer: len(units) for layer, units in sorted(ffn.items())},
            "encoder_gflops_before": before, "encoder_gflops": measured, "predicted_flops_saved": int(round(saved))}


def reachable_sparsity(model, seq_len: int = SEQ_LEN) -> float:
    """The largest encoder-GFLOPs sparsity pruning can reach (every head and all but `FFN_FLOOR` FFN blocks per layer
    removed), measured on a copy."""
    shell = copy.deepcopy(model)
    before = measure_encoder_gflops(shell, seq_len)
    keep = ffn_granularity(original_sizes(shell.config)[2]) * FFN_FLOOR
    for i, (h, w) in enumerate(zip(*get_layout(shell).values())):
        remove_heads(shell, i, range(h))
        remove_ffn_neurons(shell, i, range(min(keep, w), w))
    return 1 - measure_encoder_gflops(shell, seq_len) / before
