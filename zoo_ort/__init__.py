"""zoo-ort: zeroth-order fine-tuning of language models over a stock inference engine."""

__version__ = "0.1.0"
