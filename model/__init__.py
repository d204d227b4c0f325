"""The decoder-only transformer (`model.transformer`), its configuration and presets
(`model.config`), its parameter and FLOP accounting (`model.flops`) and the precision table
(`model.precision`). Import the submodules: `model.config`, `model.flops` and
`model.precision` do not import torch, so the estimator can use them without it."""
