"""Chapter 1-2, MLPs and optimisation: `mlp`, `perceptron`, `uat` (importing registers them)."""

from litlab.chapters.mlp import module  # noqa: F401
