"""Export a Hugging Face causal LM to a zoo-ort bundle (needs the `export` extra)."""

from .architectures import SUPPORTED_ARCHITECTURES
from .export import export_bundle
from .recipes import list_recipes, load_recipe

__all__ = ["SUPPORTED_ARCHITECTURES", "export_bundle", "list_recipes", "load_recipe"]
