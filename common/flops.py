"""GFLOPs measured with fvcore on the model itself.

Convention: fvcore's, one multiply-add = 1 FLOP. fvcore skips `aten::scaled_dot_product_attention` (the
sdpa attention transformers uses by default), so a handle counts its two matmuls (Q K^T and P V) exactly
as fvcore counts them in eager attention. Element-wise ops (add, gelu, softmax) are not counted, as in
fvcore. A 4-bit bitsandbytes model cannot be traced: count its fp32 twin, which runs the same matmuls.
"""

import warnings
from math import prod

import torch

from common.modeling_dpq import encoder_module_name

FLOPS_CONVENTION = "fvcore, 1 multiply-add = 1 FLOP, batch 1, sequence length 128"
SEQ_LEN = 128


def _sdpa_flop_handle(inputs, outputs):
    from fvcore.nn.jit_handles import get_shape  # in the body: slow to import, only needed here

    q, k, v = (get_shape(x) for x in inputs[:3])
    *batch, length, head_dim = q
    return prod(batch) * length * k[-2] * (head_dim + v[-1])


def _analysis(model, seq_len: int, batch_size: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis  # in the body: slow to import, only needed here

    device = next(model.parameters()).device
    input_ids = torch.full((batch_size, seq_len), 1000 % model.config.vocab_size, dtype=torch.long, device=device)
    attention_mask = torch.ones_like(input_ids)
    analysis = FlopCountAnalysis(model.eval(), (input_ids, attention_mask))
    analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flop_handle)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    return analysis


def count_flops(model, seq_len: int = SEQ_LEN, batch_size: int = 1, module: str = "") -> int:
    """FLOPs (fvcore convention) of one forward pass; `module` restricts to a submodule's name."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = _analysis(model, seq_len, batch_size)
        with torch.no_grad():
            return int(analysis.by_module()[module]) if module else int(analysis.total())


def measure_gflops(model, seq_len: int = SEQ_LEN, batch_size: int = 1) -> float:
    """GFLOPs of the whole classifier at batch 1, sequence length 128 unless told otherwise."""
    return count_flops(model, seq_len, batch_size) / 1e9


def measure_encoder_gflops(model, seq_len: int = SEQ_LEN, batch_size: int = 1) -> float:
    """GFLOPs of the transformer blocks alone (what pruning removes from)."""
    return count_flops(model, seq_len, batch_size, module=encoder_module_name(model)) / 1e9
