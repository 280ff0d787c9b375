"""Distill a pruned student from its teacher with PyTorch: the recipe (distill.json), the trainer, and the checkpoint it writes.

The pruner writes the student folder (HF config with the new sizes + safetensors + tokenizer)
and calls `write_recipe` to leave `distill.json` beside it: the teacher, the student→teacher
layer map and the losses. `distill` reads that recipe, trains the student on text against the
teacher's logits (KL at temperature T, scaled by T²) plus an optional hidden-state MSE on
mapped layers, measures held-out perplexity and KL-to-teacher before and after (on
fdec/data/held.txt, never trained on), and writes an HF checkpoint that `fdec compile` takes.

Modules: recipe (distill.json), train (the training loop and held-out figures), run (`distill`:
checks, training, the checkpoint).
"""

from __future__ import annotations

from fdec.distill.recipe import (
    RECIPE_FILE,
    REPORT_FILE,
    Recipe,
    parse_recipe,
    read_recipe,
    write_recipe,
)
from fdec.distill.run import DistillResult, distill

__all__ = [
    "RECIPE_FILE",
    "REPORT_FILE",
    "DistillResult",
    "Recipe",
    "distill",
    "parse_recipe",
    "read_recipe",
    "write_recipe",
]
