"""Combined compression: recipes (low rank > pruning > quantization, torch or GGUF) measured end to end.

- `sizes`: three sizes of one compressed model side by side (the paper's nominal accounting, the
  real artifact, a sparse encoding a runtime could load), because the three disagree exactly where
  the paper's headline numbers come from;
- `export`: the GGUF of a recipe's torch result (low rank multiplied back, shapes checked);
- `grid`: one stored point per (recipe, evaluation protocol), scored against the dense model;
- `plan`: eq. 6's planner on a model's own measured curves, turned back into a recipe.

Submodules are imported on use (`from mpt_utils.combined.grid import grid_point`): this package
pulls in no family at import time, so it can never close an import cycle.
"""
