"""Recipes: the typed schema (`schema`) and the loader with line-numbered errors (`load`)."""
from .load import LoadedRecipe, load_recipe
from .schema import Recipe

__all__ = ["LoadedRecipe", "Recipe", "load_recipe"]
