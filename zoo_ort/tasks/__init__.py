"""Task data: datasets, prompt templates, verbalizers and tokenisation."""
