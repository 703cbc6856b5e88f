"""Recipes: load (YAML, extends, --set), validate (schema and semantics), resolve into runs."""

from lowrank_runner.recipe.load import Recipe, RunSpec, load_recipe

__all__ = ["Recipe", "RunSpec", "load_recipe"]
