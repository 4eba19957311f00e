"""Every model family zoo-ort claims, exported from a tiny random model and held against peft.

For each family in ``SUPPORTED_ARCHITECTURES`` a tiny random model (``zoo_ort.exporters.tiny``:
hidden 32, short sliding windows where the family has them) is exported as a LoRA-FA bundle with
the family's default targets, which are peft's. The reference (tests/export_reference.py) is the
source model under ``peft.get_peft_model`` carrying the same adapter, run one unpadded row at a
time; nothing of the exporter's wrapper is involved. The adapter has a nonzero B that differs per
row, so every row is scored under its own LoRA.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from export_reference import (
    Example,
    OrtRunner,
    PeftReference,
    pad,
    peft_default_modules,
    random_examples,
    random_lora,
)
from zoo_ort.exporters import export_bundle
from zoo_ort.exporters.architectures import (
    PEFT_LORA_TARGETS,
    SUPPORTED_ARCHITECTURES,
    architecture,
    families_markdown,
)
from zoo_ort.exporters.tiny import layers_needed, make_tiny_model

from zoo_ort.bundle import load_bundle
from zoo_ort.errors import ZooError

VOCAB = 384  # the tiny tokenizer's vocabulary
TOLERANCE = 1e-4
DOCS = Path(__file__).resolve().parents[1] / "docs" / "families.md"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """``family("gpt2")``: (tiny model folder, LoRA-FA rank-4 bundle with default targets).

    The tiny models have as few layers as show every kind of layer the family has (1, or 2
    where full and windowed attention alternate): exports dominate this file's runtime.
    """
    built: dict[str, tuple[Path, Path]] = {}

    def get(model_type: str) -> tuple[Path, Path]:
        if model_type not in built:
            folder = tmp_path_factory.mktemp(f"family-{model_type}")
            source = make_tiny_model(model_type, folder / "src", layers=layers_needed(model_type))
            built[model_type] = (source, export_bundle(str(source), folder / "bundle", rank=4))
        return built[model_type]

    return get


def _examples(seed: int) -> list[Example]:
    # Rows of 5, 9, 1 and 7 tokens: longer than the tiny sliding windows (4), so a wrong window
    # shows. A masked slot and a row without targets check that masks are honoured.
    examples = random_examples(np.random.default_rng(seed), VOCAB, [5, 9, 1, 7], 3, 4)
    examples[0] = replace(examples[0], target_mask=[1.0, 0.0, 1.0])
    examples[2] = replace(examples[2], target_mask=[0.0, 0.0, 0.0])
    return examples


def _per_row_b(lora: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in lora.items() if k.endswith("lora_B")}


@pytest.mark.parametrize("model_type", SUPPORTED_ARCHITECTURES)
def test_family_matches_peft_and_rows_are_independent(model_type, family, record_property):
    source, bundle = family(model_type)
    runner = OrtRunner(bundle)
    manifest = runner.bundle.manifest
    assert manifest.architecture["model_type"] == model_type
    shape = (manifest.architecture["hidden_size"], manifest.architecture["num_layers"])
    assert shape == (32, layers_needed(model_type))
    assert manifest.lora.mode == "fa"
    examples = _examples(seed=1)
    lora = random_lora(runner.bundle, len(examples), np.random.default_rng(2))
    for name, b in _per_row_b(lora).items():  # a nonzero B, different in every row
        assert b.ndim == 3 and np.all(np.abs(b).max(axis=(1, 2)) > 0), name
        assert all(np.abs(b[i] - b[j]).max() > 0.1 for i in range(len(b)) for j in range(i)), name

    reference = PeftReference(source, runner.bundle)
    ref_loss, ref_cand = reference.batch(examples, runner.bundle, lora)
    assert ref_loss[2] == 0.0 and np.all(ref_loss[[0, 1, 3]] > 0.5)
    worst = 0.0
    for side in ("left", "right"):
        loss, cand = runner(pad(examples, side), lora)
        np.testing.assert_allclose(loss, ref_loss, atol=TOLERANCE, err_msg=f"{side} padding")
        np.testing.assert_allclose(cand, ref_cand, atol=TOLERANCE, err_msg=f"{side} padding")
        worst = max(
            worst, float(np.abs(loss - ref_loss).max()), float(np.abs(cand - ref_cand).max())
        )
    record_property("max_abs_diff", worst)

    # The adapter matters: without it (B = 0) the losses move, so the match above saw LoRA.
    batch = pad(examples, "left")
    no_lora = lora | {k: np.zeros_like(v) for k, v in _per_row_b(lora).items()}
    base_loss, _ = runner(batch, no_lora)
    assert np.abs(base_loss - ref_loss)[[0, 1, 3]].min() > 1e-3

    # Changing row 1's adapter moves row 1's scores and leaves every other row's bit for bit.
    loss, cand = runner(batch, lora)
    rng = np.random.default_rng(3)
    changed = lora | {k: v.copy() for k, v in _per_row_b(lora).items()}
    for name in _per_row_b(changed):
        changed[name][1] += 0.5 * rng.standard_normal(changed[name].shape[1:])
    new_loss, new_cand = runner(batch, changed)
    assert abs(new_loss[1] - loss[1]) > 1e-3
    others = [0, 2, 3]
    np.testing.assert_array_equal(new_loss[others], loss[others])
    np.testing.assert_array_equal(new_cand[others], cand[others])


@pytest.mark.parametrize("model_type", SUPPORTED_ARCHITECTURES)
def test_default_targets_are_what_peft_adapts(model_type, family):
    """The bundle's LoRA sites are the modules ``get_peft_model`` picks with no target_modules."""
    source, bundle = family(model_type)
    manifest = load_bundle(bundle).manifest
    assert manifest.lora.target_modules == list(PEFT_LORA_TARGETS[model_type])
    sites = [site.module for site in manifest.lora.sites]
    assert sites and sites == peft_default_modules(source)


# Families peft has default targets for that zoo-ort refuses, and what the refusal must say.
REFUSED = {
    "t5": "encoder-decoder",
    "bart": "encoder-decoder",
    "bert": "encoder (bidirectional)",
    "deberta": "encoder (bidirectional)",
    "blip-2": "no causal-LM class",
    "chatglm": "remote code",
    "RefinedWeb": "remote code",
    "llama4": "multimodal",
    "gemma4": "multimodal",
    "mixtral": "mixture-of-experts",
    "nemotron_h": "Mamba",
    "rwkv": "recurrent",
    "phi3": "peft has no default LoRA targets",  # decoder-only, but not in peft's table
    "whisper": "encoder-decoder",  # not in peft's table either; refused for what it is
}


@pytest.mark.parametrize(("model_type", "reason"), sorted(REFUSED.items()))
def test_refused_families_say_why(model_type, reason):
    assert model_type not in SUPPORTED_ARCHITECTURES
    with pytest.raises(ZooError) as info:
        architecture(model_type)
    message = str(info.value)
    assert message.startswith(f"unsupported architecture {model_type!r}: ")
    assert reason in message and "\n" not in message
    assert all(supported in message for supported in SUPPORTED_ARCHITECTURES)


def test_discovered_names_match_the_former_table():
    """Discovery finds what the hand-written table used to say for the first four families."""
    former = {
        "llama": ("model", "lm_head", False),
        "qwen2": ("model", "lm_head", False),
        "gpt2": ("transformer", "lm_head", True),
        "opt": ("model", "lm_head", False),
    }
    for model_type, expected in former.items():
        arch = architecture(model_type)
        assert (arch.backbone, arch.lm_head, arch.fan_in_fan_out) == expected, model_type


def test_docs_list_exactly_the_verified_families():
    expected = families_markdown()
    assert DOCS.read_text() == expected, (
        "docs/families.md is stale; regenerate it with families_markdown() (see its docstring)"
    )
    for model_type in SUPPORTED_ARCHITECTURES:
        assert f"| `{model_type}` |" in expected
