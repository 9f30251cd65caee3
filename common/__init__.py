"""Shared code for the Distill-Prune-Quantize stage scripts.

Modules are named by what they do: paths (stage -> folder map), config (constants, KEY=VALUE overrides, defaults by
situation and the rule every constant is checked against), stage (atomic stage folders, metadata.json, logging,
seeding, which process writes), data (SST-2), modeling_dpq + modeling_dpq_4bit (model families, block anatomy and
slicing, the one loader and its bitsandbytes modules; self-contained, shipped into model folders), quantization,
modeling (presets and the project's entry points to the loader), flops, training (the one Accelerate loop, its hooks,
evaluation), distillation, pruning/ (importance, selection, schedule, run, frontier), export, stats, report/.
Module-level imports form no cycle (tests/test_architecture.py); names are imported from where they are defined.
"""
