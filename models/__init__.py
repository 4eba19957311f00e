"""Model recipes (*.toml): sources, LoRA targets and training defaults, by name."""
