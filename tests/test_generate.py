"""Generation with a trained adapter: onnxruntime-genai (adapter inputs and merged) and plain ONNX,
each against PyTorch + peft with the same nonzero adapter, on tiny random models.

The genai tests skip when onnxruntime-genai (the `genai` extra) or the exporter is not installed.
The tiny Llama here has hidden size 64 (head size 16): onnxruntime-genai's CPU attention refuses
the head size 8 of the shared 32-wide fixtures.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from zoo_ort.errors import ZooError
from zoo_ort.generate import (
    GENAI_MISSING,
    GenerationConfig,
    Sampling,
    convert_adapter,
    load_generator,
    pick_token,
)

PROMPTS = ["The quick brown fox", "Review: a great movie with", "It was"]
NEW = 32
EOS = 2  # the tiny tokenizer's </s>
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"
)


# -- fixtures ------------------------------------------------------------------------------------


def _random_adapter(bundle, seed: int) -> tuple[dict, dict]:
    """A nonzero adapter: the bundle's frozen A, random trained B."""
    init = bundle.initial_lora()
    rng = np.random.default_rng(seed)
    params = {
        t.input: rng.normal(0.0, 0.5, size=t.shape).astype(np.float32)
        for t in bundle.manifest.trainable()
    }
    return params, {k: v for k, v in init.items() if k not in params}


@dataclasses.dataclass
class Tiny:
    root: Path
    src: Path
    bundle: Path
    adapters: dict[str, Path]  # "one" / "two": PEFT folders; "one.onnx": bundle .onnx_adapter
    genai: Path | None = None
    merged: Path | None = None


def _make_tiny(root: Path, family: str, hidden: int, genai: bool) -> Tiny:
    from zoo_ort.exporters import export_bundle
    from zoo_ort.exporters.genai import build_genai_model, merge_adapter
    from zoo_ort.exporters.tiny import make_tiny_model

    from zoo_ort.adapters import save_onnx_adapter, save_peft_adapter
    from zoo_ort.bundle import load_bundle

    src = make_tiny_model(family, root / "src", hidden=hidden)
    bundle_dir = export_bundle(str(src), root / "bundle", rank=4, mode="fa", seed=0)
    bundle = load_bundle(bundle_dir)
    adapters = {}
    for name, seed in (("one", 1), ("two", 2)):
        params, frozen = _random_adapter(bundle, seed)
        adapters[name] = save_peft_adapter(root / name, bundle.manifest, params, frozen)
    params, frozen = _random_adapter(bundle, 1)
    adapters["one.onnx"] = save_onnx_adapter(
        root / "one.onnx_adapter", bundle.manifest, params, frozen
    )
    tiny = Tiny(root, src, bundle_dir, adapters)
    if genai:
        tiny.genai = build_genai_model(bundle_dir, root / "genai")
    tiny.merged = merge_adapter(bundle_dir, adapters["one"], root / "merged", genai=genai)
    return tiny


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    return _make_tiny(tmp_path_factory.mktemp("gen-llama"), "llama", 64, genai=True)


class Reference:
    """PyTorch + peft greedy generation: the tokens every route must reproduce."""

    def __init__(self, src: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(src)
        self.base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        self._peft = {}

    def model(self, adapter: Path | None):
        if adapter is None:
            return self.base
        if adapter not in self._peft:
            import copy

            from peft import PeftModel

            self._peft[adapter] = PeftModel.from_pretrained(copy.deepcopy(self.base), adapter)
        return self._peft[adapter].eval()

    def greedy(self, ids: list[int], adapter: Path | None, new: int = NEW) -> list[int]:
        with self.torch.no_grad():
            out = self.model(adapter).generate(
                self.torch.tensor([ids]), max_new_tokens=new, do_sample=False, pad_token_id=0
            )
        tokens = out[0, len(ids) :].tolist()
        return tokens[: tokens.index(EOS)] if EOS in tokens else tokens

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt).input_ids


@pytest.fixture(scope="module")
def reference(llama: Tiny) -> Reference:
    return Reference(llama.src)


def _greedy(generator, prompt, new: int = NEW) -> list[int]:
    return list(generator.generate_ids(prompt, GenerationConfig(max_new_tokens=new)))


# -- without onnxruntime-genai -------------------------------------------------------------------


def test_runtime_package_needs_neither_torch_nor_genai_to_import() -> None:
    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('torch', 'transformers', 'peft', 'onnxruntime_genai'):
                    raise ImportError('blocked ' + name)
        sys.meta_path.insert(0, Block())
        import zoo_ort.generate as g
        from zoo_ort.errors import ZooError
        try:
            g.import_genai()
        except ZooError as e:
            print(e)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == GENAI_MISSING


def test_sampling_cuts_and_seed() -> None:
    logits = np.array([0.0, 3.0, 2.9, -1.0, 1.0], dtype=np.float32)
    rng = np.random.default_rng(0)
    assert pick_token(logits, Sampling(), rng) == 1
    assert {pick_token(logits, Sampling(1.0, top_k=2), rng) for _ in range(200)} == {1, 2}
    # top_p 0.4 keeps only the first token whose cumulative probability reaches it
    assert {pick_token(logits, Sampling(1.0, top_p=0.4), rng) for _ in range(50)} == {1}
    draws = [
        [pick_token(logits, Sampling(2.0), np.random.default_rng(seed)) for _ in range(20)]
        for seed in (7, 7)
    ]
    assert draws[0] == draws[1]


@pytest.mark.parametrize(
    "option", [{"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -1}]
)
def test_bad_generation_options_are_zoo_errors(option: dict) -> None:
    with pytest.raises(ZooError):
        GenerationConfig(**option).check()


def test_genai_route_families_and_head_size() -> None:
    transformers = pytest.importorskip("transformers")
    from zoo_ort.exporters.genai import genai_route

    llama = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4)
    assert genai_route(llama) is None
    assert "multiple of 16" in genai_route(transformers.LlamaConfig(hidden_size=32))
    assert "no route for gpt2" in genai_route(transformers.GPT2Config())
    assert "no route for opt" in genai_route(transformers.OPTConfig())


# -- onnxruntime-genai against PyTorch + peft ----------------------------------------------------


def test_adapter_inputs_and_merged_models_match_peft(llama: Tiny, reference: Reference) -> None:
    routes = {
        "genai + PEFT folder": load_generator(llama.genai, llama.adapters["one"]),
        "genai + bundle .onnx_adapter": load_generator(llama.genai, llama.adapters["one.onnx"]),
        "merged genai": load_generator(llama.merged / "genai"),
        "merged plain ONNX": load_generator(llama.merged / "onnx"),
    }
    for prompt in PROMPTS:
        want = reference.greedy(reference.prompt_ids(prompt), llama.adapters["one"])
        assert len(want) > 8
        for name, generator in routes.items():
            assert _greedy(generator, prompt) == want, (name, prompt)


def test_adapters_switch_without_reloading(llama: Tiny, reference: Reference) -> None:
    generator = load_generator(llama.genai)
    generator.load_adapter(llama.adapters["one"], "one")
    generator.load_adapter(llama.adapters["two"], "two")
    prompt = PROMPTS[0]
    ids = reference.prompt_ids(prompt)
    seen = {}
    for name in ("two", None, "one", "two"):
        generator.use_adapter(name)
        want = reference.greedy(ids, llama.adapters[name] if name else None)
        seen[name] = _greedy(generator, prompt)
        assert seen[name] == want, name
    assert len({tuple(v) for v in seen.values()}) == 3
    generator.unload_adapter("two")
    assert generator.adapters == ("one",)
    with pytest.raises(ZooError):
        generator.use_adapter("two")


def test_converted_adapter_runs_in_plain_onnxruntime_genai(
    llama: Tiny, reference: Reference, tmp_path: Path
) -> None:
    og = pytest.importorskip("onnxruntime_genai")
    file = convert_adapter(llama.adapters["two"], llama.genai, tmp_path / "two.onnx_adapter")
    model = og.Model(str(llama.genai))
    adapters = og.Adapters(model)
    adapters.load(str(file), "two")
    ids = reference.prompt_ids(PROMPTS[1])
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + NEW, do_sample=False)
    generator = og.Generator(model, params)
    generator.set_active_adapter(adapters, "two")
    generator.append_tokens(ids)
    got = []
    while not generator.is_done() and (not got or got[-1] != EOS):
        generator.generate_next_token()
        got.append(int(generator.get_next_tokens()[0]))
    want = reference.greedy(ids, llama.adapters["two"])
    assert got[: len(want)] == want


def test_sampling_is_seeded_and_top_k_1_is_greedy(llama: Tiny) -> None:
    for folder in (llama.genai, llama.merged / "onnx"):
        adapter = llama.adapters["one"] if folder == llama.genai else None
        generator = load_generator(folder, adapter)
        greedy = _greedy(generator, PROMPTS[1], 16)

        def sample(seed: int, generator=generator, **kw) -> list[int]:
            config = GenerationConfig(max_new_tokens=16, temperature=1.0, seed=seed, **kw)
            return list(generator.generate_ids(PROMPTS[1], config))

        assert sample(3) == sample(3)
        assert len({tuple(sample(seed, top_p=0.9)) for seed in range(4)}) > 1
        assert sample(5, top_k=1) == greedy


def test_max_new_tokens_and_stop_at_eos(llama: Tiny) -> None:
    generator = load_generator(llama.genai, llama.adapters["one"])
    full = _greedy(generator, PROMPTS[0])
    assert _greedy(generator, PROMPTS[0], 5) == full[:5]
    stop = full[4]  # pretend this token is EOS: generation ends before its first occurrence
    generator.info = dataclasses.replace(generator.info, eos_token_ids=[stop])
    assert _greedy(generator, PROMPTS[0]) == full[: full.index(stop)]


def test_streams_text_pieces(llama: Tiny, reference: Reference) -> None:
    generator = load_generator(llama.genai, llama.adapters["one"])
    pieces = list(generator.generate(PROMPTS[2], GenerationConfig(max_new_tokens=NEW)))
    want = reference.greedy(reference.prompt_ids(PROMPTS[2]), llama.adapters["one"])
    assert len(pieces) > 1
    assert "".join(pieces) == reference.tokenizer.decode(want, skip_special_tokens=True)


def test_chat_template_is_applied(llama: Tiny, reference: Reference, tmp_path: Path) -> None:
    folder = shutil.copytree(llama.genai, tmp_path / "chat")
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    generator = load_generator(folder, llama.adapters["one"])
    messages = [{"role": "user", "content": "Is it good?"}]
    want_ids = reference.tokenizer.apply_chat_template(
        messages, chat_template=CHAT_TEMPLATE, add_generation_prompt=True, tokenize=True
    )
    want_ids = list(getattr(want_ids, "input_ids", want_ids))
    assert generator.prompt_ids("Is it good?") == want_ids
    assert generator.prompt_ids("Is it good?", chat=False) == reference.prompt_ids("Is it good?")
    want = reference.greedy(want_ids, llama.adapters["one"])
    assert _greedy(generator, "Is it good?") == want


# -- bad input -----------------------------------------------------------------------------------


def _one_line_zoo_error(call) -> str:
    with pytest.raises(ZooError) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_prompt_longer_than_the_context(llama: Tiny) -> None:
    generator = load_generator(llama.genai)
    message = _one_line_zoo_error(lambda: _greedy(generator, "It was great. " * 200))
    assert "context" in message


def test_adapter_for_another_model(llama: Tiny, tiny_bundle: Path, tmp_path: Path) -> None:
    from zoo_ort.adapters import save_onnx_adapter, save_peft_adapter
    from zoo_ort.bundle import load_bundle

    other = load_bundle(tiny_bundle)  # the 32-wide tiny Llama
    params, frozen = _random_adapter(other, 0)
    peft = save_peft_adapter(tmp_path / "other", other.manifest, params, frozen)
    onnx_file = save_onnx_adapter(tmp_path / "other.onnx_adapter", other.manifest, params, frozen)
    generator = load_generator(llama.genai)
    assert "another model" in _one_line_zoo_error(lambda: generator.load_adapter(peft))
    assert "another model" in _one_line_zoo_error(lambda: generator.load_adapter(onnx_file))
    merged = load_generator(llama.merged / "onnx")
    _one_line_zoo_error(lambda: merged.load_adapter(llama.adapters["one"]))


def test_genai_folder_refused_for_small_heads(tiny_bundle: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime_genai")
    from zoo_ort.exporters.genai import build_genai_model

    message = _one_line_zoo_error(lambda: build_genai_model(tiny_bundle, tmp_path / "g"))
    assert "multiple of 16" in message
    assert not (tmp_path / "g").exists()


def test_gpt2_has_no_genai_route_but_its_merged_model_generates(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("peft")
    from zoo_ort.exporters.genai import build_genai_model

    tiny = _make_tiny(tmp_path_factory.mktemp("gen-gpt2"), "gpt2", 32, genai=False)
    message = _one_line_zoo_error(lambda: build_genai_model(tiny.bundle, tiny.root / "g"))
    assert "no route for gpt2" in message
    assert sorted(p.name for p in tiny.merged.iterdir()) == ["onnx"]
    reference = Reference(tiny.src)
    generator = load_generator(tiny.merged)
    for prompt in PROMPTS[:2]:
        want = reference.greedy(reference.prompt_ids(prompt), tiny.adapters["one"])
        assert _greedy(generator, prompt) == want


def test_cli_generate_and_merge(llama: Tiny, tmp_path: Path) -> None:
    """`zoo-ort merge` then `zoo-ort generate` print what the library generates."""
    import subprocess
    import sys

    from zoo_ort.generate import GenerationConfig, load_generator

    def zoo(*args: object) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "zoo_ort", *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600)

    merged = tmp_path / "merged"
    res = zoo(
        "merge", llama.bundle, "--adapter", llama.adapters["one"], "--out", merged, "--no-genai"
    )
    assert res.returncode == 0, res.stderr
    prompt = "the story is"
    res = zoo("generate", merged, "--prompt", prompt, "--max-new-tokens", "8")
    assert res.returncode == 0, res.stderr
    want = "".join(load_generator(merged).generate(prompt, GenerationConfig(max_new_tokens=8)))
    assert res.stdout.rstrip("\n") == want
    res = zoo("generate", llama.genai, "--adapter", llama.adapters["one"], "--max-new-tokens", "8")
    assert res.returncode == 2 and "no prompt" in res.stderr and "Traceback" not in res.stderr


def test_choose_ranks_answers_like_peft(llama: Tiny, reference: Reference) -> None:
    """`choose` = softmax over the choices' first-token logits, as PyTorch + peft give them."""
    import torch

    from zoo_ort.generate import load_generator

    prompt, choices = "the story is", [" good", " bad", " funny"]
    ids = reference.prompt_ids(prompt)
    firsts = [reference.tokenizer(c, add_special_tokens=False).input_ids[0] for c in choices]
    for adapter in (None, llama.adapters["one"]):
        with torch.no_grad():
            logits = reference.model(adapter)(torch.tensor([ids])).logits[0, -1].double()
        want = torch.softmax(logits[firsts], dim=0).numpy()
        got = dict(load_generator(llama.genai, adapter).choose(prompt, choices, chat=False))
        np.testing.assert_allclose([got[c] for c in choices], want, atol=1e-4)
