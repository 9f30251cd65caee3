"""Structured pruning that physically removes attention heads and FFN neurons (every family in
common.modeling_dpq.FAMILIES: BERT, DistilBERT, RoBERTa).

Units
- A head is sliced out of the query/key/value rows and the attention-output columns; the module's head
  count is updated (`num_attention_heads`/`all_head_size` for BERT-shaped blocks, `n_heads` for DistilBERT). The
  attention forward infers the head count from the tensor shape, so a layer may keep 0 heads: its
  attention block then outputs the output bias only, and the model still runs and trains.
- An FFN neuron is a row of the first FFN Linear and a column of the second.
- With `head_dim_step` > 0 (off by default) a layer's heads can also be NARROWED: one step removes `head_dim_step`
  query/key dimensions and as many value dimensions from every head of the layer (each head its own least
  important ones; `common.modeling_dpq.keep_head_dims`), down to `head_dim_step` dimensions per head. The query/key
  side (rows of query and key: terms of q.k, scaled by 1/sqrt of the ORIGINAL head size) and the value side (rows of
  value, columns of the attention output) are chosen separately. Widths stay multiples of
  `ffn_granularity(original width)` = gcd(original width, 32): 32 for every real model (bitsandbytes CPU
  kernels need out_features % 32 == 0), 32 for the tiny test models (FFN 64). Each layer keeps at least
  one such block of neurons.

Layout
`get_layout(model)` = {"heads": [kept heads per layer], "ffn": [FFN width per layer]}. Every structural
change writes it into `model.config.dpq_layout` (common.modeling.LAYOUT_KEY), so `save_pretrained` stores it
and `common.modeling.load_model` rebuilds the model on an unpruned skeleton shrunk to the layout
(`common.modeling_dpq.shrink_to_layout`, the same slicing as here; `common.modeling_dpq.config_is_pruned` says
whether a config's layout removes anything). The config keeps the ORIGINAL head count and FFN width, so a plain
`from_pretrained` on a pruned folder fails with a size mismatch instead of loading a wrong model;
`common.modeling.save_model` ships common/modeling_dpq.py with a pruned folder, so that
`from_pretrained(folder, trust_remote_code=True)` loads it outside this project. Which original heads/neurons a
model kept is `kept_units(model)` (bookkeeping on the layer modules, for metadata; not needed to load).

Importance (first-order Taylor, per example)
Removing a unit is setting a gate g on its output to 0. dL/dg at g=1 is the sum of weight x gradient over
the unit's output weights (attention-output columns of a head, second-FFN-layer column of a neuron), which
equals the sum over tokens of activation x dL/d(activation) at the input of that Linear. `TaylorImportance`
computes it PER EXAMPLE with hooks during the ordinary backward pass (no extra passes) and accumulates
- "fisher" (default): (dL/dg)^2, the empirical Fisher of the gate, i.e. the second-order (Fisher) estimate of
  the loss increase when the unit is removed (Molchanov et al. 2019 "Importance estimation for neural network
  pruning"; Kwon et al. 2022 "A fast post-training pruning framework for transformers", heads + FFN neurons
  under a FLOPs budget), or
- "abs": |dL/dg| (Molchanov et al. 2017; Michel et al. 2019 for heads).
Heads and neurons are thus scored in the same unit (estimated loss change), so they can be ranked globally by
importance per FLOP saved. Measured on a fine-tuned 3-layer MiniLM student (one-shot, no retraining, 1,347
held-out sentences, 85.3% before): "fisher" kept 85.2 / 84.3 / 84.0% at 20 / 35 / 50% fewer encoder GFLOPs,
"abs" 84.7 / 83.5 / 81.8%: |dL/dg| under-rates heads (large perturbations, where the squared term matters)
and removes most of them.

Baseline importance
`magnitude_importance(model)`: the squared L2 norm of each unit's weights (no data), for the one-shot magnitude
baseline; `prune_to_target` ranks it per FLOP exactly as it ranks Taylor importance.

Frontier
`gradual_prune(..., milestones=(0.2, 0.35, ...), on_milestone=callback)` passes through every milestone on its
way to the final sparsity (events placed where the cubic schedule crosses each one, so each is hit exactly) and
hands the callback a copy of the model at that point (a branch, e.g. for a short recovery on
`partial_epoch_loader`); the run itself goes on from the un-recovered model, or with `continue_from_branch=True` from
the branch as the callback left it (recovered).

Training loop
`gradual_prune` is `common.training.train` (the project's one loop, Accelerate) with the `GradualPruning` hook:
importance accumulated by TaylorImportance's hooks during the ordinary backward passes, pruning events on the
cubic schedule, and after each event "structure changed" (train rebuilds AdamW, the lr schedule and the DDP
wrapper). Under several processes (torchrun) the importance is summed over the processes before ranking, so every
process removes the same units.

FLOPs follow common.flops (fvcore, one multiply-add = 1 FLOP, batch 1, sequence length 128). The per-unit
costs below only rank units; every target check and reported number is measured with common.flops.
"""

import collections
import copy
import itertools
import math
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader

from common.data import LengthGroupedSampler
from common.flops import SEQ_LEN, measure_encoder_gflops
from common.modeling import LAYOUT_KEY, encoder_layers
# the block anatomy, head size / count and the slicing live in common/modeling_dpq.py (the loader shipped with every
# pruned folder): one copy, used here to prune and there to shrink a skeleton to a saved layout
from common.modeling_dpq import BlockParts as _Parts
from common.modeling_dpq import block_parts as _parts
from common.modeling_dpq import (embeddings_module, get_layout, head_sizes, hidden_size, keep_ffn_neurons,
                                 keep_head_dims, keep_heads, keep_hidden_dims, kept_record, original_sizes)
from common.modeling_dpq import head_size as _head_size
from common.modeling_dpq import num_heads as _num_heads
from common.stage import logger
from common.training import TrainHook, evaluate, train

FFN_MULTIPLE = 32  # FFN widths stay multiples of gcd(original width, FFN_MULTIPLE)
CRITERIA = ("fisher", "abs")  # per-example gate gradient squared (default) or absolute


# ----------------------------------------------------------------------------------------------------
# Model anatomy (the rest is in common.modeling_dpq)


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


def remove_heads(model, layer_idx: int, heads) -> None:
    """Physically remove heads (indices in the layer's CURRENT numbering) from one layer."""
    p = _parts(encoder_layers(model)[layer_idx])
    n = _num_heads(p)
    keep = _keep_index(n, heads)
    if len(keep) == n:
        return
    keep_heads(model, layer_idx, keep)  # slices q/k/v rows and attention-output columns, updates the head count
    _write_layout(model)


def remove_ffn_neurons(model, layer_idx: int, neurons) -> None:
    """Physically remove FFN neurons (indices in the layer's CURRENT numbering) from one layer.

    The resulting width must stay a multiple of `ffn_granularity(original width)`.
    """
    p = _parts(encoder_layers(model)[layer_idx])
    width = p.ffn_in.out_features
    keep = _keep_index(width, neurons)
    if len(keep) == width:
        return
    _, _, of, _ = original_sizes(model.config)
    g = ffn_granularity(of)
    if len(keep) % g:
        raise ValueError(f"layer {layer_idx}: FFN width {len(keep)} is not a multiple of {g}")
    keep_ffn_neurons(model, layer_idx, keep)
    _write_layout(model)


def remove_head_dims(model, layer_idx: int, qk, v) -> None:
    """Narrow every head of one layer: `qk[h]` / `v[h]` are the query/key and value dimensions (current numbering within
    head h) to remove; every head must lose as many of each (one head size per layer), and keep at least one."""
    p = _parts(encoder_layers(model)[layer_idx])
    n, d = _num_heads(p), _head_size(p)
    if len(qk) != n or len(v) != n:
        raise ValueError(f"layer {layer_idx}: head dimensions given for {len(qk)} / {len(v)} heads, the layer has {n}")
    qk_keep = [_keep_index(d, dims) for dims in qk]
    v_keep = [_keep_index(d, dims) for dims in v]
    sizes = {len(k) for k in qk_keep + v_keep}
    if n == 0 or sizes == {d}:
        return
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"layer {layer_idx}: every head must keep the same number (at least 1) of query/key and of "
                         f"value dimensions, got {sorted(sizes)}")
    keep_head_dims(model, layer_idx, torch.stack(qk_keep), torch.stack(v_keep))
    _write_layout(model)


def remove_hidden_dims(model, dims) -> None:
    """Physically remove hidden dimensions (indices in the CURRENT numbering) from the residual stream
    (`common.modeling_dpq.keep_hidden_dims`); at least one must stay."""
    width = hidden_size(model)
    keep = _keep_index(width, dims)
    if len(keep) == width:
        return
    if len(keep) == 0:
        raise ValueError("the residual stream must keep at least one hidden dimension")
    keep_hidden_dims(model, keep)
    _write_layout(model)


def prune_units(model, heads: dict | None = None, ffn: dict | None = None, head_dims: dict | None = None,
                hidden=None) -> None:
    """Remove {layer: [head indices]}, {layer: [neuron indices]}, {layer: {"qk": [[dims] per head], "v": [[dims]
    per head]}} and [hidden dimensions] (current numbering) at once; head dimensions are removed before the heads
    (both numbered as now)."""
    if hidden:
        remove_hidden_dims(model, hidden)
    for layer_idx, dims in (head_dims or {}).items():
        remove_head_dims(model, int(layer_idx), dims["qk"], dims["v"])
    for layer_idx, units in (heads or {}).items():
        remove_heads(model, int(layer_idx), units)
    for layer_idx, units in (ffn or {}).items():
        remove_ffn_neurons(model, int(layer_idx), units)


# ----------------------------------------------------------------------------------------------------
# Layout: what a pruned model looks like, and rebuilding it on an unpruned skeleton


def _write_layout(model) -> None:
    setattr(model.config, LAYOUT_KEY, get_layout(model))


def kept_units(model) -> dict:
    """Original indices kept: {"heads": [[...] per layer], "ffn": [[...] per layer]} (for metadata), plus, once any
    head was narrowed, "qk_dims" / "v_dims": per layer, per kept head, its original dimensions, and once the residual
    stream was narrowed, "hidden": its original dimensions kept."""
    oh, od, of, _ = original_sizes(model.config)
    out = {"heads": [], "ffn": []}
    records = [kept_record(layer, oh, of) for layer in encoder_layers(model)]
    for kept in records:
        out["heads"].append(list(kept["heads"]))
        out["ffn"].append(list(kept["ffn"]))
    if any("qk_dims" in kept for kept in records):
        for key in ("qk_dims", "v_dims"):
            out[key] = [kept.get(key) or [list(range(od)) for _ in kept["heads"]] for kept in records]
    hidden = getattr(embeddings_module(model), "_dpq_kept_hidden", None)
    if hidden is not None:
        out["hidden"] = list(hidden)
    return out


# ----------------------------------------------------------------------------------------------------
# FLOP cost of one unit (fvcore convention, same as common.flops); used only to rank units


LAYER_NORM_FLOPS = 5  # fvcore's count per element of an affine LayerNorm (two per block)


def _hidden_dim_flops(seq_len: int, heads, sizes, ffn) -> list:
    """What one hidden dimension costs in each block: its column of query, key, value and the first FFN Linear, its
    row of the attention-output and second FFN Linear (L (4 n d + 2 f)) and its two LayerNorm entries."""
    return [seq_len * (4 * n * d + 2 * f + 2 * LAYER_NORM_FLOPS) for n, d, f in zip(heads, sizes, ffn)]


def unit_flops(model, seq_len: int = SEQ_LEN) -> dict:
    """FLOPs one head / one head dimension / one FFN neuron costs per layer, and one hidden dimension costs in all of
    them, at batch 1 (fvcore: 1 multiply-add = 1 FLOP).

    head (of the layer's current head size d): q, k, v projections (3 L H d) + attention output (L d H) + Q K^T and
    P V (2 L^2 d); head_dim: one query/key dimension and one value dimension of ONE head (4 L H + 2 L^2), so a head
    costs d of them; neuron: one row of the first FFN Linear and one column of the second (2 L H); H is the CURRENT
    hidden size. hidden: one hidden dimension's share of each layer (`_hidden_dim_flops`); it costs their sum.
    """
    hidden = hidden_size(model)
    head_dim = 4 * seq_len * hidden + 2 * seq_len * seq_len
    neuron = 2 * seq_len * hidden
    sizes = head_sizes(model)
    layout = get_layout(model)
    return {"head": [head_dim * d for d in sizes], "head_dim": [head_dim] * len(sizes),
            "ffn_neuron": [neuron] * len(sizes),
            "hidden": _hidden_dim_flops(seq_len, layout["heads"], sizes, layout["ffn"])}


# ----------------------------------------------------------------------------------------------------
# First-order Taylor importance


def _example_gates(saved: torch.Tensor, grad: torch.Tensor, dtype=None) -> torch.Tensor:
    """[batch, features] d(example loss)/d gate from a hooked tensor and its gradient: activation x gradient summed over
    the tokens, x batch size because the loss is a batch mean (`dtype`: cast before that product)."""
    gate = (saved * grad.detach()).flatten(1, -2).sum(1)
    return (gate if dtype is None else gate.to(dtype)) * saved.shape[0]


class TaylorImportance:
    """Accumulates per-head and per-neuron first-order Taylor importance during backward passes.

    with TaylorImportance(model) as imp:
        loss_fn(model, batch).backward()      # any number of batches, e.g. inside the training loop
    imp.heads[layer][h], imp.ffn[layer][n]    # sum over examples of (dL/d gate)^2 (current numbering)
    imp.qk[layer][h * d + j], imp.v[layer][h * d + j]   # the same for dimension j of head h (query/key, value side)
    imp.hidden[j]                                       # hidden dimension j (with hidden=True; else None)

    dL/d gate is per example: the loss must be a mean over the batch (it is rescaled by the batch size).
    criterion "fisher" sums its square, "abs" its absolute value (see the module docstring). Hooks sit on the
    attention-output and second FFN Linear of every layer, and on the query Linear's output for the query/key
    dimensions (the gate of dimension j multiplies q_j k_j, so dL/dg = sum over tokens of q_j dL/dq_j); with
    `hidden=True` also on the output of every LayerNorm that writes the residual stream (the embeddings' and two per
    block): one gate per hidden dimension multiplies all of them (CoFi's hidden mask), so its dL/dg is the sum over
    those outputs and tokens of x_j dL/dx_j, squared (or absolute) per example once the backward pass has reached the
    embeddings. Module objects survive physical pruning; call `reset()`
    after a structural change (indices shift) to start a new estimate. Forward passes without grad (evaluation)
    contribute nothing. Under several processes `all_reduce(accelerator)` sums the scores of all of them.
    """

    def __init__(self, model, criterion: str = "fisher", hidden: bool = False):
        if criterion not in CRITERIA:
            raise ValueError(f"unknown importance criterion {criterion!r}; use one of {', '.join(CRITERIA)}")
        self.model = model
        self.criterion = criterion
        self.with_hidden = hidden
        self._handles = []
        for i, layer in enumerate(encoder_layers(model)):
            p = _parts(layer)
            self._handles.append(p.attn_out.register_forward_pre_hook(self._hook("heads", i, p)))
            self._handles.append(p.ffn_out.register_forward_pre_hook(self._hook("ffn", i, p)))
            self._handles.append(p.query.register_forward_hook(self._query_hook(i)))
            if hidden:
                for norm in (p.attn_norm, p.out_norm):
                    self._handles.append(norm.register_forward_hook(self._hidden_hook(last=False)))
        if hidden:  # the embeddings' LayerNorm comes first in the forward pass, so its gradient arrives last
            self._handles.append(embeddings_module(model).LayerNorm.register_forward_hook(self._hidden_hook(last=True)))
        self.reset()

    def reset(self) -> None:
        layout = get_layout(self.model)
        device = next(self.model.parameters()).device
        self.heads = [torch.zeros(h, dtype=torch.float64, device=device) for h in layout["heads"]]
        self.ffn = [torch.zeros(w, dtype=torch.float64, device=device) for w in layout["ffn"]]
        widths = [h * d for h, d in zip(layout["heads"], head_sizes(self.model))]
        self.qk = [torch.zeros(w, dtype=torch.float64, device=device) for w in widths]
        self.v = [torch.zeros(w, dtype=torch.float64, device=device) for w in widths]
        self.hidden = (torch.zeros(hidden_size(self.model), dtype=torch.float64, device=device) if self.with_hidden
                       else None)
        self._hidden_gate = None  # this batch's dL/dg per example, summed over the LayerNorm outputs seen so far
        self.examples = 0

    def _score(self, gate: torch.Tensor) -> torch.Tensor:
        """[batch, units] gate derivatives -> [units] summed score (squared or absolute, per example)."""
        return (gate.abs() if self.criterion == "abs" else gate.pow(2)).sum(0).to(torch.float64)

    def _query_hook(self, layer_idx: int):
        def hook(module, args, output):
            if not (torch.is_grad_enabled() and output.requires_grad) or output.shape[-1] == 0:
                return None
            saved = output.detach()

            def grad_hook(grad):
                gate = _example_gates(saved, grad)
                self.qk[layer_idx] += self._score(gate)

            output.register_hook(grad_hook)
            return None

        return hook

    def _hidden_hook(self, last: bool):
        def hook(module, args, output):
            if not (torch.is_grad_enabled() and output.requires_grad):
                return None
            saved = output.detach()

            def grad_hook(grad):
                gate = _example_gates(saved, grad, torch.float64)
                self._hidden_gate = gate if self._hidden_gate is None else self._hidden_gate + gate
                if last:
                    self.hidden += self._score(self._hidden_gate)
                    self._hidden_gate = None

            output.register_hook(grad_hook)
            return None

        return hook

    def _hook(self, kind: str, layer_idx: int, parts: _Parts):
        def pre_hook(module, args):
            x = args[0]
            if not (torch.is_grad_enabled() and x.requires_grad) or x.shape[-1] == 0:
                return None
            saved = x.detach()
            if kind == "ffn" and layer_idx == 0:  # every layer keeps FFN neurons: count examples once
                self.examples += saved.shape[0]

            def grad_hook(grad):
                gate = _example_gates(saved, grad)
                if kind == "heads":
                    self.v[layer_idx] += self._score(gate)  # one gate per value dimension
                    gate = gate.view(gate.shape[0], -1, _head_size(parts)).sum(-1)
                target = self.heads if kind == "heads" else self.ffn
                target[layer_idx] += self._score(gate)

            x.register_hook(grad_hook)
            return None

        return pre_hook

    def all_reduce(self, accelerator) -> None:
        """Sum the scores (and example counts) over every process, so that all of them rank the same units; a no-op
        on one process."""
        if accelerator.num_processes == 1:
            return
        groups = (self.heads, self.ffn, self.qk, self.v)
        extra = [self.hidden] if self.with_hidden else []
        flat = torch.cat([t for group in groups for t in group] + extra
                         + [torch.tensor([self.examples], dtype=torch.float64, device=self.heads[0].device)])
        flat = accelerator.reduce(flat, reduction="sum")
        parts = list(flat[:-1].split([len(t) for group in groups for t in group] + [len(t) for t in extra]))
        n = len(self.heads)
        self.heads, self.ffn, self.qk, self.v = (parts[k * n:(k + 1) * n] for k in range(4))
        if self.with_hidden:
            self.hidden = parts[-1]
        self.examples = int(flat[-1].item())

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def magnitude_importance(model) -> dict:
    """Weight-magnitude importance, the one-shot baseline's: no data, no gradients.

    {"heads": [per layer], "ffn": [per layer], "qk": [per layer], "v": [per layer]} in the current numbering, the
    format `removal_order` and `prune_to_target` take (as they take a TaylorImportance). A head scores the squared L2
    norm of its weights: its rows of the query, key and value weights and its columns of the attention-output weight;
    an FFN neuron the squared L2 norm of its row of the first FFN weight and its column of the second; a head's
    query/key dimension its rows of query and key, its value dimension its row of value and column of the attention
    output (biases not counted). Squared,
    so that a block of neurons (removal_order sums its neurons) scores the squared norm of all its weights, as a
    head does; within one unit type the order is that of the L2 norm. Ranked per FLOP like Taylor importance.
    """
    heads, ffn, qk, v = [], [], [], []
    with torch.no_grad():
        for layer in encoder_layers(model):
            p = _parts(layer)
            n, d = _num_heads(p), _head_size(p)
            rows = {name: lin.weight.detach().double().pow(2).sum(1)
                    for name, lin in (("q", p.query), ("k", p.key), ("v", p.value))}
            out = p.attn_out.weight.detach().double().pow(2).sum(0)
            heads.append((rows["q"] + rows["k"] + rows["v"] + out).view(n, d).sum(1).cpu())
            qk.append((rows["q"] + rows["k"]).cpu())
            v.append((rows["v"] + out).cpu())
            ffn.append((p.ffn_in.weight.detach().double().pow(2).sum(1)
                        + p.ffn_out.weight.detach().double().pow(2).sum(0)).cpu())
    return {"heads": heads, "ffn": ffn, "qk": qk, "v": v}


IMPORTANCE_METHODS = ("taylor", "magnitude")  # how units are ranked: data-driven (gradual_prune) or weights only


def estimate_importance(model, batches, loss_fn, max_batches: int | None = None,
                        criterion: str = "fisher") -> TaylorImportance:
    """Taylor importance over `batches` (forward + backward, no weight update; eval mode, grads cleared)."""
    was_training = model.training
    model.eval()
    imp = TaylorImportance(model, criterion)
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
    finally:
        imp.close()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return imp


# ----------------------------------------------------------------------------------------------------
# Choosing what to remove, and pruning to a measured GFLOPs target


@dataclass(order=True)
class _Candidate:
    score: float  # importance per FLOP saved
    order: int  # tie-break: keeps the FFN blocks of a layer in ascending importance
    kind: str = field(compare=False)  # "head", "ffn", "dims" (one step of head narrowing) or "hidden" (hidden dims)
    layer: int = field(compare=False)  # -1 for "hidden" (every layer)
    units: list | dict = field(compare=False)  # current indices; "dims": {"qk": [[...] per head], "v": [[...] per head]}
    flops: int = field(compare=False)
    importance: float = field(compare=False)


def _importance_by_layer(model, importance) -> dict:
    """{"heads": [...], "ffn": [...]} (and "qk", "v" where given): float64 CPU tensors per layer, and "hidden" (one
    tensor) where given, after checking they match the model's layout."""
    if isinstance(importance, TaylorImportance):
        importance = {"heads": importance.heads, "ffn": importance.ffn, "qk": importance.qk, "v": importance.v,
                      **({"hidden": importance.hidden} if importance.hidden is not None else {})}
    kinds = [kind for kind in ("heads", "ffn", "qk", "v") if kind in importance]
    out = {kind: [torch.as_tensor(v, dtype=torch.float64).cpu() for v in importance[kind]] for kind in kinds}
    if importance.get("hidden") is not None:
        out["hidden"] = torch.as_tensor(importance["hidden"], dtype=torch.float64).cpu()
        if len(out["hidden"]) != hidden_size(model):
            raise ValueError("importance does not match the model's current layout (reset it after pruning)")
    layout = get_layout(model)
    widths = [h * d for h, d in zip(layout["heads"], head_sizes(model))]
    if ([len(h) for h in out["heads"]] != layout["heads"] or [len(f) for f in out["ffn"]] != layout["ffn"]
            or any([len(t) for t in out[kind]] != widths for kind in ("qk", "v") if kind in out)):
        raise ValueError("importance does not match the model's current layout (reset it after pruning)")
    return out


def _removable_units(model, importance: dict, seq_len: int, min_ffn_blocks: int, head_dim_step: int = 0,
                     hidden_step: int = 0) -> list:
    """[(kind, layer, units, flops)]: every layer's heads one at a time, then every layer's FFN blocks of
    `ffn_granularity(original width)` neurons, the least important by `importance["ffn"]` first, leaving
    `min_ffn_blocks` blocks per layer; with `head_dim_step` > 0 then every layer's narrowing steps: each removes from
    every head its `head_dim_step` least important query/key dimensions (`importance["qk"]`) and value dimensions
    (`importance["v"]`) not removed by the steps before, down to `head_dim_step` dimensions per head; with
    `hidden_step` > 0 then blocks of `hidden_step` hidden dimensions, the least important by `importance["hidden"]`
    first, leaving at least one block (and the hidden size modulo the step). The candidates every order ranks, in
    this fixed order (their tie-break)."""
    _, _, of, _ = original_sizes(model.config)
    g = ffn_granularity(of)
    cost = unit_flops(model, seq_len)
    units = [("head", layer, [h], cost["head"][layer])
             for layer, imp in enumerate(importance["heads"]) for h in range(len(imp))]
    for layer, imp in enumerate(importance["ffn"]):
        ranked = torch.argsort(imp, stable=True).tolist()
        units += [("ffn", layer, ranked[b * g:(b + 1) * g], cost["ffn_neuron"][layer] * g)
                  for b in range(max(len(ranked) // g - min_ffn_blocks, 0))]
    if head_dim_step:
        if "qk" not in importance or "v" not in importance:
            raise ValueError("head_dim_step needs per-dimension importance ('qk' and 'v')")
        step = head_dim_step
        for layer, (n, d) in enumerate(zip(get_layout(model)["heads"], head_sizes(model))):
            if n == 0:
                continue
            qk = torch.argsort(importance["qk"][layer].view(n, d), dim=1, stable=True)
            v = torch.argsort(importance["v"][layer].view(n, d), dim=1, stable=True)
            units += [("dims", layer, {"qk": qk[:, b * step:(b + 1) * step].tolist(),
                                       "v": v[:, b * step:(b + 1) * step].tolist()},
                       cost["head_dim"][layer] * step * n)
                      for b in range(max((d - step) // step, 0))]
    if hidden_step:
        if "hidden" not in importance:
            raise ValueError("hidden_step needs hidden-dimension importance ('hidden': TaylorImportance(hidden=True))")
        ranked = torch.argsort(importance["hidden"], stable=True).tolist()
        units += [("hidden", -1, ranked[b * hidden_step:(b + 1) * hidden_step], sum(cost["hidden"]) * hidden_step)
                  for b in range(max(len(ranked) // hidden_step - 1, 0))]
    return units


def _unit_importance(importance: dict, kind: str, layer: int, units) -> float:
    """The summed importance of one candidate (a head, an FFN block, a narrowing step over every head, or a block of
    hidden dimensions)."""
    if kind == "hidden":
        return float(importance["hidden"][units].sum())
    if kind == "dims":
        d = len(importance["qk"][layer]) // len(units["qk"])
        return float(sum(importance["qk"][layer][h * d + j] for h, dims in enumerate(units["qk"]) for j in dims)
                     + sum(importance["v"][layer][h * d + j] for h, dims in enumerate(units["v"]) for j in dims))
    return float(importance["heads" if kind == "head" else "ffn"][layer][units].sum())


def removal_order(model, importance, seq_len: int = SEQ_LEN, min_ffn_blocks: int = 1, head_dim_step: int = 0,
                  hidden_step: int = 0) -> list:
    """Every removable unit, least important per FLOP first.

    `importance` is a TaylorImportance or {"heads": [...], "ffn": [...]} per layer (current numbering; with "qk" and
    "v" for `head_dim_step`), e.g. `magnitude_importance(model)`.
    Heads are single units (a layer may lose them all). FFN neurons go in blocks of
    `ffn_granularity(original width)`, the least important neurons of a layer first; each layer keeps at
    least `min_ffn_blocks` blocks. `head_dim_step` > 0 adds the narrowing steps of every layer's heads, `hidden_step`
    > 0 blocks of hidden dimensions (`_removable_units`; "hidden" importance needed).
    """
    importance = _importance_by_layer(model, importance)
    candidates = []
    units = _removable_units(model, importance, seq_len, min_ffn_blocks, head_dim_step, hidden_step)
    for order, (kind, layer, kept, flops) in enumerate(units):
        total = _unit_importance(importance, kind, layer, kept)
        candidates.append(_Candidate(total / flops, order, kind, layer, kept, flops, total))
    return sorted(candidates)


class _Zeroed:
    """Inside the block, the given input features of Linear modules are zero: {module: tensor of feature indices}
    (the attention-output columns of a head, the second-FFN-layer columns of neurons). A forward pre-hook, so the
    weights are untouched."""

    def __init__(self, features: dict):
        self.features = features
        self.handles = []

    def __enter__(self):
        for module, index in self.features.items():
            self.handles.append(module.register_forward_pre_hook(
                lambda mod, args, index=index: (args[0].index_fill(-1, index.to(args[0].device), 0.0), *args[1:])))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []


def ablation_order(model, batches, loss_fn, importance, seq_len: int = SEQ_LEN, min_ffn_blocks: int = 1,
                   accelerator=None) -> list:
    """Every removable unit, least important per FLOP first, by its MEASURED loss increase when it is removed.

    The same candidates as `removal_order` (heads one at a time; FFN neurons in blocks of
    `ffn_granularity(original width)`, in the order of `importance`, the Taylor estimate, within each layer), each
    scored by the mean of `loss_fn` over `batches` with the unit zeroed minus the mean without (eval mode, no
    gradients; the same batches for every candidate, so the comparison is paired). A layer's FFN blocks are zeroed
    cumulatively (the first block, the first two, ...), each scored by what it adds, raised where needed to at
    least the score of the block before it, so a layer's blocks still go in their Taylor order. Heads are scored
    one at a time; units removed together at one event interact, which this ignores, as the Taylor estimate does.

    Near the end of a gradual run few, large units are left, and removing one is far from the small perturbation a
    first- or second-order (Taylor / Fisher) estimate describes; measuring it costs one forward pass per candidate
    and batch. Under several processes the scores are averaged over the processes (`accelerator.reduce`), so every
    process ranks the same numbers.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("ablation_order needs at least one batch")
    units = _removable_units(model, _importance_by_layer(model, importance), seq_len, min_ffn_blocks)
    layers = encoder_layers(model)
    trials, zeroed = [], {}  # per unit {module: input features zeroed}; the FFN neurons zeroed so far per layer
    for kind, layer, kept, _ in units:
        p = _parts(layers[layer])
        if kind == "head":
            d = _head_size(p)
            trials.append({p.attn_out: torch.arange(kept[0] * d, (kept[0] + 1) * d)})
        else:
            zeroed[layer] = zeroed.get(layer, []) + kept
            trials.append({p.ffn_out: torch.tensor(zeroed[layer])})
    was_training = model.training
    model.eval()
    losses = []
    try:
        with torch.no_grad():
            def mean_loss():
                return sum(float(loss_fn(model, batch)) for batch in batches) / len(batches)

            base = mean_loss()
            for features in trials:
                with _Zeroed(features):
                    losses.append(mean_loss() - base)
    finally:
        model.train(was_training)
    deltas = torch.tensor(losses, dtype=torch.float64)
    if accelerator is not None and accelerator.num_processes > 1:
        deltas = accelerator.reduce(deltas.to(accelerator.device), reduction="mean").cpu()
    candidates, previous = [], {}
    for order, ((kind, layer, kept, flops), delta) in enumerate(zip(units, deltas.tolist())):
        score = delta
        if kind == "ffn":  # cumulative: this block's share is what it adds to the blocks before it
            before = previous.get(layer)
            score = delta if before is None else max(delta - before[0], before[1])
            previous[layer] = (delta, score)
        candidates.append(_Candidate(score / flops, order, kind, layer, kept, flops, score))
    return sorted(candidates)


def _by_layer(chosen) -> tuple:
    """({layer: heads}, {layer: FFN neurons}, {layer: {"qk": [[dims] per head], "v": [[dims] per head]}}, [hidden
    dimensions])."""
    heads, ffn, dims, hidden = {}, {}, {}, []
    for c in chosen:
        if c.kind == "hidden":
            hidden.extend(c.units)
        elif c.kind == "dims":
            merged = dims.setdefault(c.layer, {"qk": [[] for _ in c.units["qk"]], "v": [[] for _ in c.units["v"]]})
            for side in ("qk", "v"):
                for h, extra in enumerate(c.units[side]):
                    merged[side][h].extend(extra)
        else:
            (heads if c.kind == "head" else ffn).setdefault(c.layer, []).extend(c.units)
    return heads, ffn, dims, hidden


def _saving(c, geometry: dict) -> float:
    """FLOPs candidate `c` saves given the candidates chosen before it in the same call: a head costs in proportion
    to its layer's head size and a narrowing step in proportion to its layer's head count, both of which earlier
    choices may have cut (`geometry[layer]` = [heads, head size, FFN width] at the call's start and now); the part of
    a head, narrowing step or FFN block that reads or writes the residual stream in proportion to the hidden size,
    and a block of hidden dimensions by the layout now (`geometry["hidden"]` = hidden size at the start and now,
    `geometry["seq_len"]`). Updated here."""
    if c.kind == "hidden":
        now = [sizes[1] for layer, sizes in geometry.items() if isinstance(layer, int)]  # every layer, in order
        flops = len(c.units) * sum(_hidden_dim_flops(geometry["seq_len"], *zip(*now)))
        geometry["hidden"][1] -= len(c.units)
        return flops
    start, now = geometry[c.layer]
    h_start, h_now = geometry["hidden"]
    lost = 4 * geometry["seq_len"] * (h_start - h_now)  # per head dimension, in q, k, v and the attention output
    if c.kind == "head":
        flops = c.flops * now[1] / start[1]
        if lost:
            flops -= lost * now[1]
        now[0] -= 1
    elif c.kind == "dims":
        flops = c.flops * now[0] / start[0]
        if lost:
            flops -= lost * now[0] * len(c.units["qk"][0])
        now[1] -= len(c.units["qk"][0])
    else:
        flops = c.flops * h_now / h_start if lost else c.flops
        now[2] -= len(c.units)
    return flops


def prune_to_target(model, importance, target_encoder_gflops: float, seq_len: int = SEQ_LEN,
                    min_ffn_blocks: int = 1, order: list | None = None, head_dim_step: int = 0,
                    hidden_step: int = 0) -> dict:
    """Remove the least important units per FLOP until the MEASURED encoder GFLOPs <= the target.

    Units are chosen from the predicted cost of each unit, then the model is measured with common.flops;
    if the measurement is still above the target (it should not be: the prediction matches fvcore), the
    next units are removed one at a time and measured again. `order` (e.g. `ablation_order`): the candidates,
    least important per FLOP first, instead of `removal_order(model, importance, ..., head_dim_step, hidden_step)`.
    Returns what was removed per layer (ORIGINAL head indices, number of FFN neurons, dimensions removed from each
    head), the number of hidden dimensions removed and the measured encoder GFLOPs.
    Raises ValueError when the target cannot be reached (every removable unit gone).
    """
    before = measure_encoder_gflops(model, seq_len)
    original_heads = kept_units(model)["heads"]
    if order is None:
        order = removal_order(model, importance, seq_len, min_ffn_blocks, head_dim_step, hidden_step)
    order = list(order)
    need = (before - target_encoder_gflops) * 1e9
    layout, sizes = get_layout(model), head_sizes(model)
    geometry = {layer: ((n, d, f), [n, d, f]) for layer, (n, d, f) in enumerate(zip(layout["heads"], sizes,
                                                                                   layout["ffn"]))}
    geometry["hidden"] = [hidden_size(model)] * 2
    geometry["seq_len"] = seq_len
    chosen, saved = [], 0
    for c in order:
        if saved >= need - 1:  # 1 FLOP of slack for float rounding of GFLOPs
            break
        chosen.append(c)
        saved += _saving(c, geometry)
    pending = order[len(chosen):]
    prune_units(model, *_by_layer(chosen))  # indices in this call's starting numbering, one go per layer
    measured = measure_encoder_gflops(model, seq_len)
    while measured > target_encoder_gflops + 1e-9:
        if not pending:
            raise ValueError(
                f"cannot reach {target_encoder_gflops:.4f} encoder GFLOPs: at {measured:.4f} with every "
                "removable unit gone"
            )
        c = pending.pop(0)
        _remove_one_more(model, chosen, c)
        chosen.append(c)
        saved += _saving(c, geometry)
        measured = measure_encoder_gflops(model, seq_len)
    heads, ffn, dims, hidden = _by_layer(chosen)
    return {
        "removed_heads": {layer: sorted(original_heads[layer][u] for u in units)
                          for layer, units in sorted(heads.items())},
        "removed_ffn": {layer: len(units) for layer, units in sorted(ffn.items())},
        "removed_head_dims": {layer: len(d["qk"][0]) for layer, d in sorted(dims.items())},
        "removed_hidden": len(hidden),
        "encoder_gflops_before": before,
        "encoder_gflops": measured,
        "predicted_flops_saved": int(round(saved)),
    }


def reachable_sparsity(model, seq_len: int = SEQ_LEN, min_ffn_blocks: int = 1, hidden_step: int = 0) -> float:
    """The largest encoder-GFLOPs sparsity pruning can reach (every head and all but `min_ffn_blocks` FFN
    blocks per layer removed; with `hidden_step` the residual stream down to its last block), measured on a copy."""
    shell = copy.deepcopy(model)
    before = measure_encoder_gflops(shell, seq_len)
    layout = get_layout(shell)
    _, _, of, _ = original_sizes(shell.config)
    keep = ffn_granularity(of) * min_ffn_blocks
    for i, (h, w) in enumerate(zip(layout["heads"], layout["ffn"])):
        remove_heads(shell, i, range(h))
        remove_ffn_neurons(shell, i, range(min(keep, w), w))
    width = hidden_size(shell)
    if hidden_step and width > hidden_step:
        remove_hidden_dims(shell, range(hidden_step + width % hidden_step, width))
    return 1 - measure_encoder_gflops(shell, seq_len) / before


def _shift(units, gone) -> list:
    """Indices `units` of a numbering from which `gone` were removed since, in the numbering now."""
    return [u - sum(1 for r in gone if r < u) for u in units]


def _remove_one_more(model, chosen, c) -> None:
    """Remove candidate `c` (indices in the numbering before `chosen` were removed) from the model."""
    if c.kind == "hidden":
        remove_hidden_dims(model, _shift(c.units, _by_layer(chosen)[3]))
        return
    if c.kind == "dims":
        _, _, dims, _ = _by_layer([e for e in chosen if e.layer == c.layer])
        gone_heads = {u for e in chosen if e.kind == "head" and e.layer == c.layer for u in e.units}
        done = dims.get(c.layer, {"qk": [[] for _ in c.units["qk"]], "v": [[] for _ in c.units["v"]]})
        left = [h for h in range(len(c.units["qk"])) if h not in gone_heads]
        remove_head_dims(model, c.layer, *([_shift(c.units[side][h], done[side][h]) for h in left]
                                           for side in ("qk", "v")))
        return
    gone = sorted(u for e in chosen if e.kind == c.kind and e.layer == c.layer for u in e.units)
    current = _shift(c.units, gone)
    if c.kind == "head":
        remove_heads(model, c.layer, current)
    else:
        remove_ffn_neurons(model, c.layer, current)


# ----------------------------------------------------------------------------------------------------
# Schedule


# Every schedule runs from `initial` (the sparsity the run starts at: 0 for the model the sparsity is measured
# against; NEGATIVE for a larger one, e.g. -1 for a teacher with twice the student's encoder GFLOPs when the
# sparsity is measured against the student) to `final_sparsity`.


def _check_range(sparsity: float, final_sparsity: float, initial: float) -> None:
    if not initial <= sparsity <= final_sparsity:
        raise ValueError(f"sparsity {sparsity} is outside the schedule's range {initial}..{final_sparsity}")


def cubic_sparsity(step: float, total_steps: float, final_sparsity: float, initial: float = 0.0) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - t/T)^3, s_i at t=0, s_f from t=T on."""
    if total_steps <= 0:
        return final_sparsity
    t = min(max(step / total_steps, 0.0), 1.0)
    return final_sparsity + (initial - final_sparsity) * (1.0 - t) ** 3


def cubic_step(sparsity: float, total_steps: float, final_sparsity: float, initial: float = 0.0) -> float:
    """Where the cubic schedule reaches `sparsity` (the inverse of cubic_sparsity):
    T (1 - ((s_f - s) / (s_f - s_i))^(1/3))."""
    _check_range(sparsity, final_sparsity, initial)
    return total_steps * (1.0 - ((final_sparsity - sparsity) / (final_sparsity - initial)) ** (1.0 / 3.0))


def geometric_sparsity(step: float, total_steps: float, final_sparsity: float, initial: float = 0.0) -> float:
    """s_t = 1 - (1 - s_i) ((1 - s_f) / (1 - s_i))^(t/T): every equal stretch of steps removes the same FRACTION of
    what is left (as in iterative pruning by rounds). Against the cubic curve (to 95%): the same start, more of the
    run between about 65% and 90% (80% at 54% of the schedule instead of 46%), less in the cubic curve's slow
    approach to the end."""
    if total_steps <= 0:
        return final_sparsity
    t = min(max(step / total_steps, 0.0), 1.0)
    return 1.0 - (1.0 - initial) * ((1.0 - final_sparsity) / (1.0 - initial)) ** t


def geometric_step(sparsity: float, total_steps: float, final_sparsity: float, initial: float = 0.0) -> float:
    """Where the geometric schedule reaches `sparsity`: T log((1 - s) / (1 - s_i)) / log((1 - s_f) / (1 - s_i))."""
    _check_range(sparsity, final_sparsity, initial)
    return total_steps * math.log((1.0 - sparsity) / (1.0 - initial)) / math.log(
        (1.0 - final_sparsity) / (1.0 - initial))


SCHEDULES = {"cubic": (cubic_sparsity, cubic_step), "geometric": (geometric_sparsity, geometric_step)}


def pruning_schedule(total_train_steps: int, prune_steps: int, final_sparsity: float,
                     end_fraction: float = 0.8, milestones=(), schedule: str = "cubic",
                     initial_sparsity: float = 0.0) -> list:
    """[(train step, sparsity target)] for `prune_steps` pruning events spread evenly over the first
    `end_fraction` of training (the rest lets the model settle); the last event reaches `final_sparsity`.
    `schedule` names the curve the targets follow (SCHEDULES: "cubic", Zhu & Gupta 2017, or "geometric"), from
    `initial_sparsity` (the starting model's own: 0, or negative for a model larger than the one the sparsity is
    measured against) at step 0.

    `milestones` (sparsities below `final_sparsity`) add events that hit each of them EXACTLY, placed where the
    curve crosses them (a frontier run branches there). Every event gets its own training step: a regular
    event due at the step of a later one is dropped, two milestones due together are a step apart. Raises
    ValueError when the events do not fit in the training steps.
    """
    if prune_steps < 1:
        raise ValueError("prune_steps must be >= 1")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r}: one of {', '.join(SCHEDULES)}")
    curve, crossing = SCHEDULES[schedule]
    if not initial_sparsity < final_sparsity:
        raise ValueError(f"the run starts at sparsity {initial_sparsity:.4f}, not below its final {final_sparsity}")
    bad = [m for m in milestones if not initial_sparsity < m <= final_sparsity]
    if bad:
        raise ValueError(f"milestones {bad} must lie in ({initial_sparsity:g}, {final_sparsity}] (the start and the "
                         f"final sparsity)")
    end = max(1, int(round(total_train_steps * end_fraction)))
    by_target = {}
    for k in range(1, prune_steps + 1):
        step = max(1, int(round(end * k / prune_steps)))
        by_target[curve(k, prune_steps, final_sparsity, initial_sparsity)] = step
    for m in milestones:
        if m < final_sparsity:
            by_target[m] = max(1, int(round(crossing(m, end, final_sparsity, initial_sparsity))))
    required = set(milestones) | {final_sparsity}
    events = []
    for target in sorted(by_target):  # the curve rises: by target = by step
        step = by_target[target]
        while events and events[-1][0] >= step and events[-1][1] not in required:
            events.pop()  # a regular event superseded by a later one due at the same step
        if events and events[-1][0] >= step:
            step = events[-1][0] + 1
        events.append((step, target))
    if events[-1][0] > total_train_steps:
        raise ValueError(f"{len(events)} pruning events ({len(required) - 1} milestones) do not fit in "
                         f"{total_train_steps} training steps: use fewer pruning steps or more training data")
    return events


# ----------------------------------------------------------------------------------------------------
# Gradual pruning while training


@dataclass
class PruneRun:
    trajectory: list = field(default_factory=list)  # one dict per pruning event (and step 0)
    history: list = field(default_factory=list)  # training loss every `log_every` steps
    base_encoder_gflops: float = 0.0
    milestones: list = field(default_factory=list)  # {"step", "sparsity_target", "branch_s"} per milestone branched
    wall_time_s: float = 0.0  # the whole run, branches included


def gradual_prune(model, train_loader, heldout_loader, loss_fn, *, target_sparsity: float, epochs: int,
                  prune_steps: int, lr: float, weight_decay: float = 0.01, warmup_ratio: float = 0.06,
                  end_fraction: float = 0.8, max_grad_norm: float = 1.0, seq_len: int = SEQ_LEN,
                  base_encoder_gflops: float | None = None, criterion: str = "fisher",
                  milestones=(), on_milestone=None, continue_from_branch: bool = False,
                  schedule: str = "cubic", ablation_from: float = 0.0, ablation_batches: int = 32,
                  head_dim_step: int = 0, min_ffn_blocks: int = 1, hidden_step: int = 0,
                  desc: str = "prune") -> PruneRun:
    """Train with `loss_fn` while pruning to `target_sparsity` (fraction fewer MEASURED encoder GFLOPs).

    `prune_steps` pruning events per epoch are spread over the first `end_fraction` of training; the
    sparsity target of each follows the cubic schedule (or `schedule`: SCHEDULES). Taylor importance is
    accumulated on the training batches since the previous event (under `loss_fn`), units go by importance per
    FLOP (prune_to_target), then the importance is reset and AdamW and the lr schedule (linear warmup and decay
    over the whole run) are rebuilt for the new parameters. Held-out accuracy is measured after every event.

    This is `common.training.train` (the one training loop) with a `GradualPruning` hook, no held-out model
    selection. Under several processes (torchrun) each process trains on its share of the batches, the importance
    scores are summed across processes before ranking, so every process removes the same units, and the model is
    prepared again (DDP rebuilt) after every event.

    `base_encoder_gflops`: the encoder GFLOPs the sparsity is measured against (default: the model's own). A model
    larger than that starts at a negative sparsity (a 6-layer teacher measured against its 3-layer student: -1),
    and the schedule runs from there to `target_sparsity`.

    Frontier: `milestones` (sparsities up to `target_sparsity`) get events of their own that hit them exactly
    (`pruning_schedule`); right after each, `on_milestone(step, target, branch, run)` is called with `branch` a
    deep copy of the model at that point (no importance hooks attached; the callback may train and save it)
    and `run` this PruneRun so far (`run.trajectory[-1]` is the milestone's entry). The random-number state is
    restored after the callback, so the main run continues from the un-recovered model exactly as it would
    without branches. With `continue_from_branch=True` the run instead goes on from the branch as the callback left
    it (e.g. recovered): its weights are loaded into the model (same layout), so each later milestone starts from
    a model that was recovered at every earlier one (iterative prune-recover; the training cost is the same).

    `ablation_from` > 0: events whose target is at least that sparsity rank the units by their measured loss
    increase on the last `ablation_batches` training batches (`ablation_order`, under `loss_fn`) instead of the
    Taylor estimate alone (which still orders the FFN neurons within a layer). 0: the Taylor estimate everywhere.

    `head_dim_step` > 0: heads may also be narrowed, `head_dim_step` query/key and value dimensions per head at a time
    (`removal_order`), ranked per FLOP with the heads and FFN blocks. Not combined with `ablation_from`.

    `min_ffn_blocks`: FFN blocks of `ffn_granularity(original width)` neurons every layer keeps (1: 32 neurons of
    MiniLM's 1536); 0 lets a layer lose its whole FFN, so a layer that also lost every head costs only its two
    LayerNorms and biases.

    `hidden_step` > 0: the residual stream may also be narrowed, `hidden_step` hidden dimensions at a time (one gate
    per dimension on every LayerNorm output, TaylorImportance(hidden=True)), ranked per FLOP with the other units.
    Not combined with `ablation_from`.
    """
    started = time.time()
    hook = GradualPruning(heldout_loader, target_sparsity=target_sparsity, prune_steps=prune_steps * epochs,
                          end_fraction=end_fraction, seq_len=seq_len, base_encoder_gflops=base_encoder_gflops,
                          criterion=criterion, milestones=milestones, on_milestone=on_milestone,
                          continue_from_branch=continue_from_branch, schedule=schedule, desc=desc,
                          data_epoch=getattr(train_loader.batch_sampler, "epoch", 0), ablation_from=ablation_from,
                          ablation_batches=ablation_batches, loss_fn=loss_fn, head_dim_step=head_dim_step,
                          min_ffn_blocks=min_ffn_blocks, hidden_step=hidden_step)
    train(model, train_loader, heldout_loader, loss_fn, epochs=epochs, lr=lr, weight_decay=weight_decay,
          warmup_ratio=warmup_ratio, evals_per_epoch=0, max_grad_norm=max_grad_norm, desc=desc, hook=hook)
    # every event ran: the measured sparsity reached the schedule's final target
    hook.run.wall_time_s = round(time.time() - started, 1)
    return hook.run


class GradualPruning(TrainHook):
    """The pruning schedule as a `common.training.train` hook (see `gradual_prune`, which is how it is used).

    on_start: measure the base GFLOPs, place the events (`pruning_schedule` over the loop's steps), record step 0 and
    attach TaylorImportance to the model. on_step: keep a loss record every 50 steps; at an event, sum the importance
    across processes, prune to the event's target (`prune_to_target`), reset the importance, record the event, hand
    a milestone's branch to `on_milestone`, and report that the structure changed (train rebuilds AdamW, the lr
    schedule and the DDP wrapper). on_end: detach the importance hooks.
    """

    def __init__(self, heldout_loader, *, target_sparsity: float, prune_steps: int, end_fraction: float = 0.8,
                 seq_len: int = SEQ_LEN, base_encoder_gflops: float | None = None, criterion: str = "fisher",
                 milestones=(), on_milestone=None, continue_from_branch: bool = False, schedule: str = "cubic",
                 desc: str = "prune", data_epoch: int = 0, ablation_from: float = 0.0, ablation_batches: int = 32,
                 loss_fn=None, head_dim_step: int = 0, min_ffn_blocks: int = 1, hidden_step: int = 0):
        if ablation_from and (loss_fn is None or ablation_batches < 1):
            raise ValueError("ablation_from > 0 needs loss_fn and ablation_batches >= 1")
        if head_dim_step < 0 or (head_dim_step and ablation_from):
            raise ValueError("head_dim_step must be >= 0 (0: whole heads only), and is not combined with ablation_from")
        if min_ffn_blocks < 0:
            raise ValueError("min_ffn_blocks must be >= 0 (0: a layer may lose its whole FFN)")
        if hidden_step < 0 or (hidden_step and ablation_from):
            raise ValueError("hidden_step must be >= 0 (0: the hidden size stays), and is not combined with "
                             "ablation_from")
        self.head_dim_step, self.min_ffn_blocks, self.hidden_step = head_dim_step, min_ffn_blocks, hidden_step
        self.ablation_from, self.loss_fn = ablation_from, loss_fn
        self.recent = collections.deque(maxlen=ablation_batches if ablation_from else 0)  # for ablation_order
        self.heldout_loader = heldout_loader
        self.data_epoch = data_epoch
        self.target_sparsity, self.prune_steps, self.end_fraction = target_sparsity, prune_steps, end_fraction
        self.seq_len, self.base, self.criterion = seq_len, base_encoder_gflops, criterion
        self.milestones, self.on_milestone, self.desc = tuple(milestones), on_milestone, desc
        self.continue_from_branch, self.schedule = continue_from_branch, schedule
        self.branch_at = set(milestones) if on_milestone else set()
        self.run = PruneRun()
        self.importance = None
        self.pending = []
        self.last_entry = None
        self.running_loss = None  # moving average over the whole run (train's restarts every epoch)

    def on_start(self, loop) -> None:
        # The loop this hook replaced iterated the raw DataLoader, whose shuffle goes on from the epochs earlier runs
        # drew on it (a sweep's later targets); Accelerate's loader restarts at epoch 0 unless told: go on as before.
        loop.loader.set_epoch(self.data_epoch)
        model = loop.unwrapped
        gflops = measure_encoder_gflops(model, self.seq_len)
        self.base = self.base or gflops
        self.run.base_encoder_gflops = self.base
        initial = 1 - gflops / self.base  # 0 unless the sparsity is measured against another model
        initial = 0.0 if abs(initial) < 1e-9 else initial
        self.pending = pruning_schedule(loop.total_steps, self.prune_steps, self.target_sparsity, self.end_fraction,
                                        self.milestones, self.schedule, initial_sparsity=initial)
        self.record(model, 0, initial)
        self.importance = TaylorImportance(model, self.criterion, hidden=bool(self.hidden_step))

    def on_epoch_start(self, loop) -> None:
        # One number drawn from torch's global RNG per epoch, as the loop this hook replaced did (creating its progress
        # bar over the raw DataLoader drew one): dropout then gets the same masks as before, so a seed gives the same
        # pruning run, numbers included, as in the README's measured results.
        torch.empty((), dtype=torch.int64).random_()

    def on_step(self, loop) -> bool:
        changed = False
        self.last_entry = None
        self.running_loss = (loop.loss if self.running_loss is None
                             else 0.98 * self.running_loss + 0.02 * loop.loss)
        if self.ablation_from:
            self.recent.append(loop.batch)
        if self.pending and loop.step >= self.pending[0][0]:  # one event per step (pruning_schedule)
            _, target = self.pending.pop(0)
            self.prune(loop, target)
            changed = True
        if loop.step % 50 == 0 or loop.step == loop.total_steps:
            self.run.history.append({"step": loop.step, "loss": round(self.running_loss, 5)})
        return changed

    def prune(self, loop, target: float) -> None:
        model = loop.unwrapped
        self.importance.all_reduce(loop.accelerator)  # every process ranks the same (summed) scores
        ablate = bool(self.ablation_from) and target >= self.ablation_from - 1e-9
        order = (ablation_order(model, self.recent, self.loss_fn, self.importance, self.seq_len,
                                min_ffn_blocks=self.min_ffn_blocks, accelerator=loop.accelerator) if ablate else None)
        removed = prune_to_target(model, self.importance, (1 - target) * self.base, self.seq_len,
                                  min_ffn_blocks=self.min_ffn_blocks, order=order, head_dim_step=self.head_dim_step,
                                  hidden_step=self.hidden_step)
        removed["ranked_by"] = "ablation" if ablate else "taylor"
        self.importance.reset()
        self.last_entry = self.record(model, loop.step, target, removed)
        if target in self.branch_at:
            self.importance.close()  # the copy must not carry hooks that feed this run's importance
            branch = copy.deepcopy(model)
            self.importance = TaylorImportance(model, self.criterion, hidden=bool(self.hidden_step))
            state = _rng_state()
            branch_started = time.time()
            self.on_milestone(loop.step, target, branch, self.run)
            if self.continue_from_branch:  # go on from the branch as the callback left it (recovered)
                model.load_state_dict(branch.state_dict())
                self.run.trajectory[-1]["continued_from_branch"] = True
            del branch
            _set_rng_state(state)
            self.run.milestones.append({"step": loop.step, "sparsity_target": target,
                                        "branch_s": round(time.time() - branch_started, 1)})

    def on_end(self, loop) -> None:
        if self.importance is not None:
            self.importance.close()

    def postfix(self, loop):
        if self.last_entry is None:
            return {"loss": f"{self.running_loss:.4f}", "lr": f"{loop.scheduler.get_last_lr()[0]:.1e}"}
        return {"loss": f"{self.running_loss:.4f}", "sparsity": f"{self.last_entry['sparsity']:.3f}"}

    def record(self, model, step, target, removed=None) -> dict:
        gflops = measure_encoder_gflops(model, self.seq_len)
        accuracy = evaluate(model, self.heldout_loader)
        entry = {"step": step, "sparsity_target": round(target, 5), "encoder_gflops": round(gflops, 6),
                 "sparsity": round(1 - gflops / self.base, 5), "heldout_accuracy": round(accuracy, 5),
                 "parameters": sum(p.numel() for p in model.parameters()), "layout": get_layout(model)}
        if removed is not None:
            entry["removed_heads"] = {str(k): v for k, v in removed["removed_heads"].items()}
            entry["removed_ffn"] = {str(k): v for k, v in removed["removed_ffn"].items()}
            if removed["removed_head_dims"]:
                entry["removed_head_dims"] = {str(k): v for k, v in removed["removed_head_dims"].items()}
            if removed["removed_hidden"]:
                entry["removed_hidden"] = removed["removed_hidden"]
            entry["ranked_by"] = removed["ranked_by"]
        if target in self.branch_at:
            entry["milestone"] = True
        self.run.trajectory.append(entry)
        logger.info(f"[{self.desc}] step {step}: target {target:.3f}, measured sparsity {entry['sparsity']:.3f} "
                    f"({gflops:.4f} encoder GFLOPs), heads {entry['layout']['heads']}, "
                    f"FFN {entry['layout']['ffn']}"
                    + (f", head size {entry['layout']['head_size']}" if "head_size" in entry["layout"] else "")
                    + (f", hidden {entry['layout']['hidden']}" if "hidden" in entry["layout"] else "")
                    + f", held-out accuracy {accuracy:.4f}")
        return entry


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------
# Frontier helpers: a fraction of an epoch for the short recovery of each branch


class PartialEpoch:
    """Batch sampler: the first `n_batches` batches of a fresh length-grouped shuffle of the data (seeded), i.e. a
    fraction of an epoch. Same batches (same seed) for every model given the same budget."""

    def __init__(self, lengths, batch_size: int, n_batches: int, seed: int):
        self.sampler = LengthGroupedSampler(lengths, batch_size, shuffle=True, seed=seed)
        self.batch_size = batch_size
        self.n_batches = max(1, min(n_batches, len(self.sampler)))

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.n_batches)

    def __len__(self):
        return self.n_batches


def partial_epoch_loader(train_loader, fraction: float, seed: int):
    """A loader over `fraction` of an epoch of `train_loader`'s data (at least one batch), shuffled with `seed`:
    the short recovery of a frontier branch (and of the baseline at the same target: same seed, same batches)."""
    dataset = train_loader.dataset
    batch_size = train_loader.batch_sampler.batch_size
    n_batches = math.ceil(fraction * len(train_loader))
    sampler = PartialEpoch(dataset.lengths, batch_size, n_batches, seed)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=train_loader.collate_fn)
