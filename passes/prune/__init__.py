"""Structured pruning: whole query heads (GQA-aware), MLP channels and whole layers.

Only whole units give real speed, so this pass removes them from the weights (smaller
matmuls, fewer layers, a smaller KV cache when layers go) instead of zeroing them.

1. **Coupling** (`coupled_groups`): a networkx graph of the ONNX dataflow names, for each
   "closing" projection (o, down: the ones writing back to the residual stream), the
   projections opened inside the same block: the weighted MatMuls among the ancestors of
   the closer's input that are not ancestors of those projections' own inputs. For a llama
   layer that is {q, k, v} → o and {gate, up} → down; anything else is refused, so a family
   the slicing rules below do not describe is never cut.
2. **Importance** (`measure_importance`), from calibration batches run through ONNX Runtime:
   a query head's score is the mean norm of what it writes to the residual stream
   (‖A_h · W_o[h]‖ per token), an MLP channel's is mean |a_c| · ‖W_down[c]‖, a layer's is
   the mean of 1 − cos(x_in, x_out) of the residual stream across it (how much it changes
   the hidden state; ShortGPT's block influence).
3. **Slicing**: per layer, the lowest-scoring query heads of *each KV group* go (the same
   number per group and per layer, so KV heads, the cache and the Hugging Face config stay
   expressible), q's columns and o's rows with them, and the repeat-KV Expand/Reshape
   constants are rewritten for the new group size; the lowest-scoring MLP channels go from
   gate/up columns and down rows (the kept count rounded to a multiple of 64, or 8 for small
   models, which block quantizers need); the lowest-scoring layers are bypassed (their
   output's users read their input), their cache inputs/outputs dropped, and the remaining
   layers renumbered so the build looks like a smaller model of the same family.

The ModelSpec is updated (heads, intermediate size, layers, weight roles, cache I/O), so
`fdec.lower.hf_checkpoint.write_hf_checkpoint` writes the pruned model as a Hugging Face
checkpoint transformers loads (the student for `fdec distill`).

Modules: coupling (1), importance (2), slicing (3), pruner (the pass and --prune's parser).
"""

from __future__ import annotations

from fdec.passes.prune.coupling import Coupling, coupled_groups
from fdec.passes.prune.importance import Importance, measure_importance
from fdec.passes.prune.pruner import PrunePass, parse_prune

__all__ = [
    "Coupling",
    "Importance",
    "PrunePass",
    "coupled_groups",
    "measure_importance",
    "parse_prune",
]
