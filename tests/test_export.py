"""The exported graph against independent PyTorch + PEFT references, for every architecture.

The references (tests/export_reference.py) run the *source* model under a real ``peft`` LoRA,
one unpadded row at a time, and compute losses from the full logits; nothing of the exporter's
wrapper is involved. Tiny random models keep every export to a few seconds of work.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from export_reference import (
    Example,
    OrtRunner,
    PeftReference,
    pad,
    random_examples,
    random_lora,
    row_lora,
)
from tokenizers import Tokenizer

from zoo_ort.bundle import OUTPUTS, TOKEN_INPUTS, load_bundle
from zoo_ort.engine.protocol import TokenBatch

VOCAB = 384  # the tiny tokenizer's vocabulary (zoo_ort.exporters.tiny)
ARCHITECTURES = ["llama", "qwen2", "gpt2", "opt"]


@pytest.fixture(scope="session")
def arch_bundle(tmp_path_factory, tiny_model_dir, tiny_bundle):
    """``arch_bundle("gpt2")``: a LoRA-FA rank-4 bundle of that tiny architecture."""
    from zoo_ort.exporters import export_bundle

    built = {"llama": tiny_bundle}

    def get(model_type: str) -> Path:
        if model_type not in built:
            out = tmp_path_factory.mktemp(f"bundle-{model_type}") / "bundle"
            built[model_type] = export_bundle(str(tiny_model_dir(model_type)), out, rank=4)
        return built[model_type]

    return get


def _examples(seed: int, lengths=(5, 9, 1, 7), slots: int = 3, cands: int = 4) -> list[Example]:
    examples = random_examples(np.random.default_rng(seed), VOCAB, list(lengths), slots, cands)
    # One masked slot and one row without any target: masks must be honoured, and a row with
    # nothing to score gets loss 0 rather than 0/0.
    examples[0] = replace(examples[0], target_mask=[1.0, 0.0, 1.0])
    examples[2] = replace(examples[2], target_mask=[0.0] * slots)
    return examples


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_loss_and_candidates_match_peft(model_type, arch_bundle, tiny_model_dir):
    runner = OrtRunner(arch_bundle(model_type))
    examples = _examples(seed=1)
    lora = random_lora(runner.bundle, len(examples), np.random.default_rng(2))
    reference = PeftReference(tiny_model_dir(model_type), runner.bundle)
    ref_loss, ref_cand = reference.batch(examples, runner.bundle, lora)
    assert ref_loss[2] == 0.0 and np.all(ref_loss[[0, 1, 3]] > 0.5)

    for side in ("left", "right"):
        loss, cand = runner(pad(examples, side), lora)
        np.testing.assert_allclose(loss, ref_loss, atol=1e-4, err_msg=f"{side} padding")
        np.testing.assert_allclose(cand, ref_cand, atol=1e-4, err_msg=f"{side} padding")

    # The LoRA matters: without it (B = 0) the losses move.
    no_lora = {k: (0 * v if k.endswith("lora_B") else v) for k, v in lora.items()}
    base_loss, _ = runner(pad(examples, "left"), no_lora)
    assert np.abs(base_loss - ref_loss)[[0, 1, 3]].min() > 1e-3


def test_extra_padding_and_masked_slots_change_nothing(tiny_bundle):
    runner = OrtRunner(tiny_bundle)
    examples = _examples(seed=3)
    lora = random_lora(runner.bundle, len(examples), np.random.default_rng(4))
    loss, cand = runner(pad(examples, "left"), lora)
    longer, longer_cand = runner(pad(examples, "right", length=23, pad_id=7), lora)
    np.testing.assert_allclose(longer, loss, atol=1e-5)
    np.testing.assert_allclose(longer_cand, cand, atol=1e-5)

    # A masked slot's position and expected id are ignored.
    batch = pad(examples, "left")
    ids, pos = batch.target_ids.copy(), batch.target_pos.copy()
    ids[0, 1], pos[0, 1] = (ids[0, 1] + 1) % VOCAB, 0
    moved, _ = runner(replace(batch, target_ids=ids, target_pos=pos), lora)
    np.testing.assert_allclose(moved, loss, atol=1e-6)
    assert loss[2] == 0.0


def test_rows_are_independent(tiny_bundle):
    runner = OrtRunner(tiny_bundle)
    examples = _examples(seed=5)
    batch = pad(examples, "left")
    rng = np.random.default_rng(6)
    lora = random_lora(runner.bundle, batch.rows, rng)
    loss, _ = runner(batch, lora)

    # Each row scored alone, under its own adapter only, gives the same loss.
    for row in range(batch.rows):
        alone = {k: (v[row : row + 1] if v.ndim == 3 else v) for k, v in lora.items()}
        single, _ = runner(batch.take(slice(row, row + 1)), alone)
        np.testing.assert_allclose(single[0], loss[row], atol=1e-5)

    # Changing row 1's adapter changes row 1's loss and nothing else.
    changed = {k: v.copy() for k, v in lora.items()}
    for name in changed:
        if name.endswith("lora_B"):
            changed[name][1] += 0.5 * rng.standard_normal(changed[name].shape[1:])
    new_loss, _ = runner(batch, changed)
    assert abs(new_loss[1] - loss[1]) > 1e-3
    np.testing.assert_array_equal(np.delete(new_loss, 1), np.delete(loss, 1))


def test_full_mode_matches_peft(tiny_bundle_full, tiny_model_dir):
    runner = OrtRunner(tiny_bundle_full)
    manifest = runner.bundle.manifest
    assert manifest.lora.mode == "full"
    assert all(s.A.per_row and s.B.per_row for s in manifest.lora.sites)
    examples = _examples(seed=7)
    lora = random_lora(runner.bundle, len(examples), np.random.default_rng(8))
    assert all(v.ndim == 3 for v in lora.values())  # A differs per row too
    loss, cand = runner(pad(examples, "left"), lora)
    reference = PeftReference(tiny_model_dir("llama"), runner.bundle)
    ref_loss, ref_cand = reference.batch(examples, runner.bundle, lora)
    np.testing.assert_allclose(loss, ref_loss, atol=1e-4)
    np.testing.assert_allclose(cand, ref_cand, atol=1e-4)

    # Only A changing in one row still moves only that row.
    changed = {k: v.copy() for k, v in lora.items()}
    for name in changed:
        if name.endswith("lora_A"):
            changed[name][3] *= 1.5
    new_loss, _ = runner(pad(examples, "left"), changed)
    assert abs(new_loss[3] - loss[3]) > 1e-4
    np.testing.assert_array_equal(new_loss[:3], loss[:3])


def test_manifest_tokenizer_and_initial_adapter(tiny_bundle):
    from zoo_ort.exporters.lora import Site, initial_tensors

    bundle = load_bundle(tiny_bundle)
    m = bundle.manifest
    names = [s.name for s in TOKEN_INPUTS] + [t.input for t in m.lora_tensors()]
    assert [s.name for s in m.inputs] == names
    assert [s.name for s in m.outputs] == [s.name for s in OUTPUTS]
    graph = onnx.load(str(bundle.model_path), load_external_data=False).graph
    assert [i.name for i in graph.input] == names
    assert [o.name for o in graph.output] == ["loss", "candidate_logprobs"]
    assert not {i.name for i in graph.initializer} & set(names)  # LoRA inputs have no defaults
    assert m.architecture["model_type"] == "llama" and m.architecture["num_layers"] == 2
    assert m.graph["base_precision"] == "fp32" and m.graph["external_data"] == "model.onnx.data"
    assert m.static is None and m.lora.rank == 4 and m.lora.scale == 2.0
    assert [s.module for s in m.lora.sites] == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    assert m.lora.sites[0].peft_prefix == "base_model.model.model.layers.0.self_attn.q_proj"
    assert m.defaults == {}  # no recipe: zoo_ort.settings owns every default

    tok = Tokenizer.from_file(str(bundle.tokenizer_path))
    ids = tok.encode("Review: a great movie").ids
    assert m.tokenizer["add_bos"] is True and ids[0] == m.tokenizer["bos_token_id"] == 1
    assert m.tokenizer["eos_token_id"] == 2 and m.tokenizer["pad_token_id"] == 0

    # PEFT's init: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0; reproducible from the seed.
    init = bundle.initial_lora()
    for site in m.lora.sites:
        a, b = init[site.A.input], init[site.B.input]
        bound = 1 / np.sqrt(site.in_features)
        assert a.shape == (site.in_features, 4) and np.abs(a).max() <= bound
        assert np.abs(a).max() > 0.8 * bound and not b.any()
    sites = [Site(s.module, s.in_features, s.out_features) for s in m.lora.sites]
    again, other = initial_tensors(sites, 4, seed=0), initial_tensors(sites, 4, seed=1)
    first = m.lora.sites[0].A.input
    np.testing.assert_array_equal(again[first], init[first])
    assert not np.allclose(other[first], init[first])


def test_int8_base_keeps_lora_live(tmp_path, tiny_model_dir, tiny_bundle):
    from zoo_ort.exporters import export_bundle

    out = export_bundle(str(tiny_model_dir("llama")), tmp_path / "int8", rank=4, quantize="int8")
    int8, fp32 = OrtRunner(out), OrtRunner(tiny_bundle)
    manifest = int8.bundle.manifest
    assert manifest.graph["base_precision"] == "int8"
    graph = onnx.load(str(int8.bundle.model_path)).graph
    ops = {n.op_type for n in graph.node}
    assert "MatMulNBits" in ops, ops
    # The LoRA tensors stay fp32 graph inputs feeding plain MatMuls.
    lora_names = {t.input for t in manifest.lora_tensors()}
    assert lora_names <= {i.name for i in graph.input}
    consumers = {n.op_type for n in graph.node for x in n.input if x in lora_names}
    assert consumers == {"MatMul"}, consumers

    examples = random_examples(np.random.default_rng(9), VOCAB, [6, 9, 4, 7] * 4, 3, 2)
    batch = pad(examples, "left")
    lora = random_lora(int8.bundle, batch.rows, np.random.default_rng(10))
    zero = {k: (0 * v if k.endswith("lora_B") else v) for k, v in lora.items()}
    q_loss, q_base = int8(batch, lora)[0], int8(batch, zero)[0]
    f_loss, f_base = fp32(batch, lora)[0], fp32(batch, zero)[0]
    assert np.abs(q_loss - f_loss).max() < 0.02  # losses are ~6 nats
    # The adapters move every int8 loss, and the way they move the fp32 ones.
    q_delta, f_delta = q_loss - q_base, f_loss - f_base
    assert np.abs(q_delta).min() > 1e-3
    assert np.corrcoef(q_delta, f_delta)[0, 1] > 0.9


def test_static_shapes_match_dynamic(tmp_path, tiny_model_dir, tiny_bundle):
    from zoo_ort.exporters import export_bundle

    out = tmp_path / "static"
    out.mkdir()
    (out / "old.txt").write_text("replaced by overwrite")
    export_bundle(str(tiny_model_dir("llama")), out, rank=4, rows=4, seq_len=12, overwrite=True)
    assert not (out / "old.txt").exists()
    static, dynamic = OrtRunner(out), OrtRunner(tiny_bundle)
    m = static.bundle.manifest
    assert m.static == {"N": 4, "T": 12, "K": 12, "C": 2}
    graph = onnx.load(str(static.bundle.model_path), load_external_data=False).graph
    dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["input_ids"] == [4, 12] and dims["target_pos"] == [4, 12]
    assert dims["candidate_ids"] == [4, 2]
    assert m.input("target_mask").shape == [4, 12]
    b_name = m.lora.sites[0].B.input
    assert dims[b_name] == [4, 4, 32] and m.input(b_name).shape == [4, 4, 32]

    examples = _examples(seed=11, cands=2)
    batch = pad(examples, "left", length=12)
    k = batch.target_pos.shape[1]
    slots = {  # K padded to T with masked slots
        name: np.pad(getattr(batch, name), ((0, 0), (0, 12 - k)))
        for name in ("target_pos", "target_ids", "target_mask")
    }
    padded = TokenBatch(**(batch.arrays() | slots))
    lora = random_lora(static.bundle, 4, np.random.default_rng(12))
    s_loss, s_cand = static(padded, lora)
    d_loss, d_cand = dynamic(padded, lora)
    np.testing.assert_allclose(s_loss, d_loss, atol=1e-5)
    np.testing.assert_allclose(s_cand, d_cand, atol=1e-5)
    # ... and the same as the dynamic graph on the unpadded slots.
    d_small, _ = dynamic(batch, lora)
    np.testing.assert_allclose(s_loss, d_small, atol=1e-5)


def test_rows_of_one_example_agree_with_peft_row(tiny_bundle, tiny_model_dir):
    """``row_lora`` slices what a separate single-adapter PEFT forward sees."""
    runner = OrtRunner(tiny_bundle)
    examples = _examples(seed=13)
    lora = random_lora(runner.bundle, len(examples), np.random.default_rng(14))
    reference = PeftReference(tiny_model_dir("llama"), runner.bundle)
    reference.load(row_lora(runner.bundle, lora, 3))
    ref_loss, _ = reference.score(examples[3])
    loss, _ = runner(pad(examples, "right"), lora)
    assert abs(loss[3] - ref_loss) < 1e-4
