"""Independent references for the exporter tests: PyTorch + PEFT on unpadded rows, and ORT runs.

The reference never touches the exporter's wrapper: it loads the source model with Hugging Face,
applies a real ``peft`` LoRA carrying the bundle's tensors, runs each row *without* padding and
computes the loss from the full logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from zoo_ort.bundle import Bundle, load_bundle
from zoo_ort.engine.protocol import TokenBatch


@dataclass(frozen=True)
class Example:
    """One row before padding: tokens, (position, expected id, mask) slots and candidates."""

    tokens: list[int]
    target_pos: list[int]
    target_ids: list[int]
    target_mask: list[float]
    candidates: list[int]


def random_examples(
    rng: np.random.Generator, vocab: int, lengths: list[int], slots: int, cands: int
) -> list[Example]:
    examples = []
    for length in lengths:
        tokens = rng.integers(3, vocab, size=length).tolist()
        pos = sorted(rng.choice(length, size=slots, replace=slots > length).tolist())
        examples.append(
            Example(
                tokens=tokens,
                target_pos=pos,
                target_ids=rng.integers(0, vocab, size=slots).tolist(),
                target_mask=[1.0] * slots,
                candidates=rng.integers(0, vocab, size=cands).tolist(),
            )
        )
    return examples


def pad(
    examples: list[Example], side: str, length: int | None = None, pad_id: int = 0
) -> TokenBatch:
    """Pad rows to a common length on ``side``; target positions shift with left padding."""
    t = length or max(len(e.tokens) for e in examples)
    n = len(examples)
    ids = np.full((n, t), pad_id, dtype=np.int64)
    mask = np.zeros((n, t), dtype=np.int64)
    pos = np.zeros((n, len(examples[0].target_pos)), dtype=np.int64)
    for i, e in enumerate(examples):
        offset = t - len(e.tokens) if side == "left" else 0
        ids[i, offset : offset + len(e.tokens)] = e.tokens
        mask[i, offset : offset + len(e.tokens)] = 1
        pos[i] = np.asarray(e.target_pos) + offset
    return TokenBatch(
        input_ids=ids,
        attention_mask=mask,
        target_pos=pos,
        target_ids=np.array([e.target_ids for e in examples], dtype=np.int64),
        target_mask=np.array([e.target_mask for e in examples], dtype=np.float32),
        candidate_ids=np.array([e.candidates for e in examples], dtype=np.int64),
    )


class OrtRunner:
    def __init__(self, bundle: Bundle | Path) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(self.bundle.model_path), options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, batch: TokenBatch, lora: dict[str, np.ndarray]):
        feeds = batch.arrays() | {k: np.ascontiguousarray(v, np.float32) for k, v in lora.items()}
        loss, cand = self.session.run(["loss", "candidate_logprobs"], feeds)
        return loss, cand


def random_lora(bundle: Bundle, rows: int, rng: np.random.Generator, scale: float = 0.3):
    """Initial A (tiled where per row, plus noise so rows differ) and random nonzero B per row."""
    init = bundle.initial_lora()
    lora = {}
    for t in bundle.manifest.lora_tensors():
        base = init[t.input]
        if not t.per_row:
            lora[t.input] = base
        elif t.input.endswith("lora_B"):
            lora[t.input] = scale * rng.standard_normal((rows, *base.shape)).astype(np.float32)
        else:
            noise = 0.3 * rng.standard_normal((rows, *base.shape)).astype(np.float32)
            lora[t.input] = base[None] + noise / np.sqrt(base.shape[0])
    return lora


def row_lora(bundle: Bundle, lora: dict[str, np.ndarray], row: int) -> dict[str, np.ndarray]:
    per_row = {t.input for t in bundle.manifest.trainable()}
    return {k: (v[row] if k in per_row else v) for k, v in lora.items()}


class PeftReference:
    """The source model under a real PEFT LoRA, scored row by row without padding."""

    def __init__(self, source: Path | str, bundle: Bundle, gguf_file: str | None = None) -> None:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        spec = bundle.manifest.lora
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **extra)
        config = LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            target_modules=spec.target_modules,
            fan_in_fan_out=spec.fan_in_fan_out,
            lora_dropout=0.0,
            bias="none",
        )
        self.model = get_peft_model(base, config).eval()
        self.sites = spec.sites
        self.torch = torch

    def load(self, lora_row: dict[str, np.ndarray]) -> None:
        """Set the adapter from one row's tensors (zoo-ort A [in, r] -> PEFT lora_A [r, in])."""
        from peft import set_peft_model_state_dict

        state = {}
        for site in self.sites:
            state[f"{site.peft_prefix}.lora_A.weight"] = self.torch.from_numpy(
                np.ascontiguousarray(lora_row[site.A.input].T)
            )
            state[f"{site.peft_prefix}.lora_B.weight"] = self.torch.from_numpy(
                np.ascontiguousarray(lora_row[site.B.input].T)
            )
        result = set_peft_model_state_dict(self.model, state)
        assert not result.unexpected_keys, result.unexpected_keys

    def score(self, example: Example) -> tuple[float, np.ndarray]:
        torch = self.torch
        with torch.no_grad():
            ids = torch.tensor([example.tokens])
            logits = self.model(input_ids=ids).logits[0].double()
        logprobs = torch.log_softmax(logits, dim=-1).numpy()
        at = logprobs[example.target_pos]  # [K, V]
        nll = -at[np.arange(len(example.target_ids)), example.target_ids]
        mask = np.asarray(example.target_mask)
        loss = float((nll * mask).sum() / mask.sum()) if mask.sum() > 0 else 0.0
        return loss, at[:, example.candidates]

    def batch(self, examples: list[Example], bundle: Bundle, lora: dict[str, np.ndarray]):
        losses, cands = [], []
        for i, e in enumerate(examples):
            self.load(row_lora(bundle, lora, i))
            loss, cand = self.score(e)
            losses.append(loss)
            cands.append(cand)
        return np.array(losses), np.stack(cands)


def peft_default_modules(source: Path | str) -> list[str]:
    """The modules ``get_peft_model`` adapts when given no ``target_modules`` (peft's defaults
    for the model's type), as paths inside the source model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=2, lora_dropout=0.0))
    prefix = "base_model.model."
    return [
        name.removeprefix(prefix)
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and name.startswith(prefix)
    ]
