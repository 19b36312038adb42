"""Multi-stage recipes: a YAML list of stages, each an alignflow command whose outputs feed the next ones
(``alignflow recipe --config configs/recipes/<name>.yaml``; docs/recipes.md). This package sits above the trainers;
importing it loads only the config (no torch), so the command line can list it."""

from alignflow.recipes.spec import RecipeConfig

__all__ = ["RecipeConfig"]
