"""Evaluation metrics against an independent per-example computation with a numpy engine."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from zoo_ort.engine.protocol import EngineOutput, TokenBatch
from zoo_ort.loop.evaluate import broadcast_lora, evaluate
from zoo_ort.tasks import TextEncoder, build_task, load_task_data

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
META = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


@pytest.fixture(scope="module")
def enc(tmp_path_factory) -> TextEncoder:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["Review: positive negative the a film movie good bad"] * 3, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return TextEncoder.from_file(path, META | {"add_bos": True})


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class BigramEngine:
    """A numpy 'model': the next-token logits at position t are ``scale * (W[token_t] + b_row)``,
    with ``b`` a trained per-row LoRA-like input and ``scale`` a frozen shared one."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        self.W = np.random.default_rng(seed).normal(size=(vocab, vocab)) * 3
        self.calls: list[int] = []

    def forward(self, batch: TokenBatch, lora: Mapping[str, np.ndarray]) -> EngineOutput:
        rows = batch.rows
        assert lora["b"].shape == (rows, self.W.shape[0])  # per-row: leading row dim
        assert lora["scale"].shape == (1,)  # shared: as is
        self.calls.append(rows)
        logits = lora["scale"][0] * (self.W[batch.input_ids] + lora["b"][:, None, :])
        lp = log_softmax(logits)  # [N, T, V]
        n = np.arange(rows)[:, None]
        at = lp[n, batch.target_pos]  # [N, K, V]
        nll = -np.take_along_axis(at, batch.target_ids[:, :, None], axis=2)[:, :, 0]
        m = batch.target_mask
        loss = (nll * m).sum(axis=1) / m.sum(axis=1)
        cand = np.take_along_axis(at, batch.candidate_ids[:, None, :].repeat(at.shape[1], 1), 2)
        return EngineOutput(
            loss=loss.astype(np.float32), candidate_logprobs=cand.astype(np.float32)
        )


def reference_logprobs(engine, params, frozen, context: list[int]) -> np.ndarray:
    """log p(. | context) for one example, straight from the definition above."""
    logits = frozen["scale"][0] * (engine.W[context[-1]] + params["b"])
    return log_softmax(logits[None])[0]


def test_broadcast_lora():
    params = {"B": np.arange(6, dtype=np.float32).reshape(2, 3)}
    frozen = {"A": np.ones((4, 2), dtype=np.float32)}
    lora = broadcast_lora(params, frozen, 5)
    assert lora["B"].shape == (5, 2, 3) and lora["B"].flags.c_contiguous
    assert all(np.array_equal(lora["B"][i], params["B"]) for i in range(5))
    assert lora["A"] is frozen["A"]
    with pytest.raises(ValueError, match="both trained and frozen"):
        broadcast_lora(params, {"B": params["B"]}, 2)


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not present")
def test_classification_metrics_match_a_per_example_reference(enc):
    data = load_task_data(DATA / "sst2", "dev", build_task("sst2"), enc, max_length=48, limit=61)
    vocab = enc.tokenizer.get_vocab_size()
    engine = BigramEngine(vocab)
    rng = np.random.default_rng(1)
    params = {"b": rng.normal(size=vocab)}
    frozen = {"scale": np.array([0.7])}
    got = evaluate(engine, params, frozen, data, batch_size=8, limit=50)
    assert engine.calls == [8] * 6 + [2]  # 50 examples, the last pass short
    correct, cand_ce, nll = 0, [], []
    for i in range(50):
        ids = data.example(i).tolist()
        lp = reference_logprobs(engine, params, frozen, ids)
        label = int(data.labels[i])
        cand = lp[data.candidates]
        correct += int(np.argmax(cand) == label)
        cand_ce.append(-(cand[label] - np.log(np.exp(cand).sum())))
        nll.append(-lp[data.candidates[label]])
    assert got["examples"] == 50
    assert got["accuracy"] == pytest.approx(correct / 50, abs=1e-12)
    assert 0.1 < got["accuracy"] < 0.9  # the reference is not trivially all-or-nothing here
    assert got["candidate_loss"] == pytest.approx(np.mean(cand_ce), rel=1e-5)
    assert got["loss"] == pytest.approx(np.mean(nll), rel=1e-5)
    # The adapter matters: another b gives other scores.
    other = evaluate(engine, {"b": -params["b"]}, frozen, data, batch_size=16, limit=50)
    assert other["candidate_loss"] != pytest.approx(got["candidate_loss"], rel=1e-3)


def test_lm_loss_and_perplexity_match_a_per_token_reference(tmp_path, enc):
    rows = [
        {"prompt": "Review: the film", "completion": " was good"},
        {"prompt": "a", "completion": " bad movie, a bad film and bad"},
        {"prompt": "positive", "completion": " negative"},
    ]
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_task_data(tmp_path, "dev", build_task("lm"), enc)
    vocab = enc.tokenizer.get_vocab_size()
    engine = BigramEngine(vocab, seed=3)
    params = {"b": np.zeros(vocab)}
    frozen = {"scale": np.array([1.0])}
    got = evaluate(engine, params, frozen, data, batch_size=2)
    per_example, total, count = [], 0.0, 0
    for row in rows:
        prompt = [1] + enc.encode(row["prompt"])  # add_bos: BOS first
        completion = enc.encode(row["completion"]) + [2]  # EOS closes the completion
        ids = prompt + completion
        nlls = [
            -reference_logprobs(engine, params, frozen, ids[:t])[ids[t]]
            for t in range(len(prompt), len(ids))
        ]
        per_example.append(np.mean(nlls))
        total += sum(nlls)
        count += len(nlls)
    assert got["tokens"] == count and got["examples"] == 3
    assert got["loss"] == pytest.approx(np.mean(per_example), rel=1e-5)
    assert got["nll"] == pytest.approx(total / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(np.exp(total / count), rel=1e-5)
    assert got["nll"] != pytest.approx(got["loss"], rel=1e-3)  # token- vs example-weighted


def test_pad_to_does_not_change_scores(tmp_path, enc):
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\ngood film\t1\na bad, bad movie\t0\n")
    data = load_task_data(tmp_path, "dev", build_task("sst2"), enc)
    vocab = enc.tokenizer.get_vocab_size()
    engine = BigramEngine(vocab)
    args = ({"b": np.zeros(vocab)}, {"scale": np.array([1.0])}, data)
    a = evaluate(engine, *args, batch_size=2)
    b = evaluate(engine, *args, batch_size=1, pad_to=64)
    assert a == pytest.approx(b)
