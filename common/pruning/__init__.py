"""Structured pruning: attention heads and FFN neurons physically removed (every family in
common.modeling_dpq.FAMILIES), ranked by first-order Taylor importance per FLOP, on a cubic schedule while the model
keeps learning from the teacher.

- `importance`: Taylor / Fisher importance of heads and FFN neurons from the ordinary backward passes, and the weight
  magnitude of the one-shot baseline;
- `selection`: what to remove (every unit ranked by importance per FLOP saved) and removing it until the MEASURED
  encoder GFLOPs reach a target; the slicing itself is the loader's (common.modeling_dpq);
- `schedule`: the cubic schedule and gradual pruning as a hook of the one training loop (common.training.train);
- `run`: one pruned folder of stage 8 (gradual pruning, recovery, save, reload, measure);
- `frontier`: stage 8's frontier sweep (one gradual run branched at every target, the magnitude baseline,
  models/frontier.json).
Import names from the module that defines them.
"""
