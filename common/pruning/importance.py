"""How much the loss would suffer without each head and FFN neuron.

First-order Taylor, per example: removing a unit is setting a gate g on its output to 0. dL/dg at g=1 is the sum of
weight x gradient over the unit's output weights (attention-output columns of a head, second-FFN-layer column of a
neuron), which equals the sum over tokens of activation x dL/d(activation) at the input of that Linear.
`TaylorImportance` computes it PER EXAMPLE with hooks during the ordinary backward pass (no extra passes) and sums
(dL/dg)^2: the empirical Fisher of the gate, the second-order estimate of the loss increase when the unit is removed
(Molchanov et al. 2019; Kwon et al. 2022 rank heads and FFN neurons this way under a FLOPs budget). Heads and neurons
are scored in the same unit, so they can be ranked globally per FLOP saved (common.pruning.selection). |dL/dg| was
measured worse (it under-rates heads; docs/experiments.md).

`magnitude_importance(model)`: the one-shot baseline's score, the squared L2 norm of each unit's weights (no data).
"""

import torch

from common.modeling_dpq import block_parts, encoder_layers, get_layout, head_size, num_heads


def _example_gates(saved: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """[batch, features] d(example loss)/d gate from a hooked tensor and its gradient: activation x gradient summed over
    the tokens, x batch size because the loss is a batch mean."""
    return (saved * grad.detach()).flatten(1, -2).sum(1) * saved.shape[0]


class TaylorImportance:
    """Accumulates per-head and per-neuron Taylor / Fisher importance during backward passes.

    with TaylorImportance(model) as imp:
        loss_fn(model, batch).backward()      # any number of batches, e.g. inside the training loop
    imp.heads[layer][h], imp.ffn[layer][n]    # sum over examples of (dL/d gate)^2 (current numbering)

    The loss must be a mean over the batch (the gate derivative is rescaled by the batch size). Hooks sit on the
    inputs of the attention-output and second FFN Linear of every layer. Module objects survive physical pruning;
    call `reset()` after a structural change (indices shift). Forward passes without grad (evaluation) contribute
    nothing. Under several processes `all_reduce(accelerator)` sums the scores of all of them.
    """

    def __init__(self, model):
        self.model = model
        self._handles = []
        for i, layer in enumerate(encoder_layers(model)):
            p = block_parts(layer)
            self._handles.append(p.attn_out.register_forward_pre_hook(self._hook("heads", i, p)))
            self._handles.append(p.ffn_out.register_forward_pre_hook(self._hook("ffn", i, p)))
        self.reset()

    def reset(self) -> None:
        layout = get_layout(self.model)
        device = next(self.model.parameters()).device
        self.heads = [torch.zeros(h, dtype=torch.float64, device=device) for h in layout["heads"]]
        self.ffn = [torch.zeros(w, dtype=torch.float64, device=device) for w in layout["ffn"]]
        self.examples = 0

    def _hook(self, kind: str, layer_idx: int, parts):
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
                    gate = gate.view(gate.shape[0], -1, head_size(parts)).sum(-1)
                target = self.heads if kind == "heads" else self.ffn
                target[layer_idx] += gate.pow(2).sum(0).to(torch.float64)

            x.register_hook(grad_hook)
            return None

        return pre_hook

    def all_reduce(self, accelerator) -> None:
        """Sum the scores (and example counts) over every process, so that all of them rank the same units; a no-op
        on one process."""
        if accelerator.num_processes == 1:
            return
        tensors = self.heads + self.ffn
        flat = torch.cat(tensors + [torch.tensor([self.examples], dtype=torch.float64, device=tensors[0].device)])
        flat = accelerator.reduce(flat, reduction="sum")
        parts = list(flat[:-1].split([len(t) for t in tensors]))
        self.heads, self.ffn = parts[:len(self.heads)], parts[len(self.heads):]
        self.examples = int(flat[-1].item())

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def estimate_importance(model, batches, loss_fn) -> TaylorImportance:
    """Taylor importance over `batches` (forward + backward, no weight update; eval mode, grads cleared)."""
    was_training = model.training
    model.eval()
    imp = TaylorImportance(model)
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
    finally:
        imp.close()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return imp


def magnitude_importance(model) -> dict:
    """The one-shot baseline's importance, {"heads": [per layer], "ffn": [per layer]} in the current numbering (no
    data, no gradients): a head scores the squared L2 norm of its rows of the query, key and value weights and its
    columns of the attention-output weight, an FFN neuron that of its row of the first FFN weight and its column of
    the second (biases not counted). Squared, so that a block of neurons (the selection sums its neurons) scores the
    squared norm of all its weights, as a head does. Ranked per FLOP like Taylor importance."""
    heads, ffn = [], []
    with torch.no_grad():
        for layer in encoder_layers(model):
            p = block_parts(layer)
            rows = sum(lin.weight.detach().double().pow(2).sum(1) for lin in (p.query, p.key, p.value))
            out = p.attn_out.weight.detach().double().pow(2).sum(0)
            heads.append((rows + out).view(num_heads(p), head_size(p)).sum(1).cpu())
            ffn.append((p.ffn_in.weight.detach().double().pow(2).sum(1)
                        + p.ffn_out.weight.detach().double().pow(2).sum(0)).cpu())
    return {"heads": heads, "ffn": ffn}
