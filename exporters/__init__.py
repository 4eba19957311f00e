"""Export a Hugging Face causal LM to a zoo-ort bundle (needs the `export` extra)."""
