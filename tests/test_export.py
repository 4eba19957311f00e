"""The exported graph against independent PyTorch + PEFT references, for every architecture."""

from __future__ import annotations

import numpy as np
import pytest
from export_reference import OrtRunner, PeftReference, pad, random_examples, random_lora

from zoo_ort.bundle import load_bundle

VOCAB = 384  # the tiny tokenizer's vocabulary (see zoo_ort.exporters.tiny)


def test_tiny_bundle_matches_peft(tiny_bundle, tiny_model_dir):
    runner = OrtRunner(tiny_bundle)
    rng = np.random.default_rng(0)
    examples = random_examples(rng, VOCAB, [5, 9, 7], slots=3, cands=2)
    lora = random_lora(runner.bundle, 3, rng)
    loss, cand = runner(pad(examples, "left"), lora)
    ref_loss, ref_cand = PeftReference(tiny_model_dir("llama"), runner.bundle).batch(
        examples, runner.bundle, lora
    )
    np.testing.assert_allclose(loss, ref_loss, atol=1e-4)
    np.testing.assert_allclose(cand, ref_cand, atol=1e-4)
    assert load_bundle(tiny_bundle).manifest.lora.mode == "fa"
