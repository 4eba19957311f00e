"""The execution-provider table, option parsing, availability and session creation."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
from handbuilt_graph import make_bundle, random_batch
from zoo_ort.providers import (
    KINDS,
    PROVIDERS,
    availability,
    current_platform,
    describe_all,
    get_spec,
    make_session,
    parse_options,
    split_options,
)
from zoo_ort.providers import session as session_module
from zoo_ort.providers.options import format_value, parse_bytes

from zoo_ort.engine import OrtEngine
from zoo_ort.errors import ZooError

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("providers") / "b").model_path


# -- the table -------------------------------------------------------------------------------------
def test_main_providers_are_in_the_table():
    for name in ("cpu", "cuda", "nnapi", "qnn", "coreml", "openvino", "dml", "tensorrt"):
        assert name in PROVIDERS
    assert get_spec("CUDAExecutionProvider") is PROVIDERS["cuda"]


def test_every_entry_is_complete_and_typed():
    flags = []
    for key, spec in PROVIDERS.items():
        assert spec.name == key and re.fullmatch(r"[a-z]+", key)
        assert re.fullmatch(r"[A-Za-z]+ExecutionProvider", spec.ort_name)
        assert spec.package and spec.platforms and "\n" not in spec.package
        assert spec.precision in ("fp32", "fp16", "quantized")
        assert all(isinstance(c, str) and c and "\n" not in c for c in spec.constraints)
        names = [o.name for o in spec.options]
        keys = [o.ort_key for o in spec.options]
        assert len(set(names)) == len(names) and len(set(keys)) == len(keys), key
        for opt in spec.options:
            assert opt.kind in KINDS, (key, opt.name)
            assert opt.help and "\n" not in opt.help and opt.ort_key
            assert bool(opt.choices) == (opt.kind == "choice"), (key, opt.name)
            for value in (opt.default, opt.zoo_default):
                if value is not None:  # defaults must pass the option's own check
                    format_value(spec, opt, value)
            if opt.cli_flag:
                assert opt.cli_flag.startswith(f"--{spec.name}-"), opt.cli_flag
                flags.append(opt.cli_flag)
    assert len(set(flags)) == len(flags)
    assert {
        "--cuda-device-id",
        "--cuda-mem-limit",
        "--qnn-backend",
        "--qnn-htp-performance-mode",
        "--qnn-fp16",
        "--nnapi-fp16",
        "--nnapi-nchw",
        "--nnapi-cpu-disabled",
    } <= set(flags)


def test_real_ort_option_names():
    cuda = {o.ort_key for o in PROVIDERS["cuda"].options}
    assert {"device_id", "gpu_mem_limit", "arena_extend_strategy", "cudnn_conv_algo_search"} <= cuda
    qnn = {o.ort_key for o in PROVIDERS["qnn"].options}
    assert {"backend_type", "backend_path", "htp_performance_mode"} <= qnn
    assert {"enable_htp_fp16_precision", "ep.context_enable"} <= qnn
    nnapi = {o.ort_key for o in PROVIDERS["nnapi"].options}
    assert nnapi == {
        "NNAPI_FLAG_USE_FP16",
        "NNAPI_FLAG_USE_NCHW",
        "NNAPI_FLAG_CPU_DISABLED",
        "NNAPI_FLAG_CPU_ONLY",
    }
    assert {"ModelFormat", "MLComputeUnits"} <= {o.ort_key for o in PROVIDERS["coreml"].options}


def test_qnn_is_a_plugin_ep_and_npus_want_static_shapes():
    qnn = PROVIDERS["qnn"]
    assert qnn.plugin is not None and qnn.plugin.module == "onnxruntime_qnn"
    assert qnn.plugin.registration_name == qnn.ort_name
    assert qnn.plugin.package == "onnxruntime-qnn"
    for name in ("qnn", "nnapi", "coreml"):
        assert PROVIDERS[name].static_shapes
    assert not PROVIDERS["cpu"].static_shapes and not PROVIDERS["cuda"].static_shapes
    assert PROVIDERS["cuda"].io_binding_device == "cuda"
    assert PROVIDERS["cpu"].io_binding_device is None


# -- availability ------------------------------------------------------------------------------
def test_platform_string():
    os_name, _, arch = current_platform().partition("-")
    assert os_name in ("linux", "windows", "macos", "android", "ios") and arch


def test_cpu_is_available():
    ok, why = availability("cpu")
    assert ok and "onnxruntime" in why


@pytest.mark.skipif(HAS_CUDA, reason="this machine has the CUDA EP")
def test_cuda_is_unavailable_here_and_says_which_package():
    ok, why = availability("cuda")
    assert not ok
    assert "onnxruntime-gpu" in why and "CUDAExecutionProvider" in why


@pytest.mark.skipif(not current_platform().startswith("linux"), reason="linux-only reasons")
def test_platform_bound_providers_say_so():
    for name, platform_word in (("coreml", "macos"), ("nnapi", "android"), ("dml", "windows")):
        ok, why = availability(name)
        assert not ok and platform_word in why and "this machine is linux" in why


def test_unknown_provider():
    with pytest.raises(ZooError, match="unknown execution provider 'tpu'.*known: cpu, cuda"):
        availability("tpu")


def test_describe_all():
    rows = describe_all()
    assert [r["name"] for r in rows] == list(PROVIDERS)
    for row in rows:
        assert {"name", "ort_name", "available", "why", "options", "constraints", "package"} <= set(
            row
        )
        assert isinstance(row["available"], bool) and row["why"]
        for opt in row["options"]:
            assert {"name", "kind", "default", "help", "ort_key", "cli_flag"} <= set(opt)
    assert rows[0]["name"] == "cpu" and rows[0]["available"]


# -- options -------------------------------------------------------------------------------------
def test_parse_typed_and_generic_options():
    opts = parse_options(
        "cuda",
        {"cuda_device_id": 1, "cuda_mem_limit": "4GiB", "arena_extend_strategy": None},
        ["cudnn_conv_algo_search=heuristic", "some_new_key=7"],
    )
    assert opts == {
        "device_id": "1",
        "gpu_mem_limit": str(4 * 2**30),
        "cudnn_conv_algo_search": "HEURISTIC",
        "some_new_key": "7",  # unknown generic keys pass through for ORT to judge
        "use_tf32": "0",  # zoo-ort's default: TF32 would swamp the ±eps loss differences
    }
    assert parse_options("cuda", {}, ["use_tf32=1"])["use_tf32"] == "1"
    assert parse_options("cuda", {"device_id": "2"})["device_id"] == "2"


def test_bool_spellings_follow_the_ep():
    assert parse_options("qnn", {"qnn_fp16": False})["enable_htp_fp16_precision"] == "0"
    assert parse_options("nnapi", {"nnapi_fp16": True})["NNAPI_FLAG_USE_FP16"] == "1"
    assert parse_options("tensorrt", {"fp16": True})["trt_fp16_enable"] == "True"
    assert parse_options("qnn", {}, ["enable_htp_fp16_precision=false"]) == {
        "enable_htp_fp16_precision": "0"
    }


def test_sizes():
    assert parse_bytes(1024) == 1024
    assert parse_bytes("2GB") == 2 * 10**9
    assert parse_bytes("512MiB") == 512 * 2**20
    with pytest.raises(ValueError):
        parse_bytes("lots")


@pytest.mark.parametrize(
    ("typed", "generic", "message"),
    [
        ({"cuda_device_id": "abc"}, [], "device_id: bad value 'abc'"),
        ({"cuda_device_id": -1}, [], "at least 0"),
        ({"cuda_device_id": True}, [], "expected an integer"),
        ({"cuda_mem_limit": "lots"}, [], "gpu_mem_limit: bad value"),
        ({"arena_extend_strategy": "fast"}, [], "expected one of kNextPowerOfTwo"),
        ({"warp_speed": 9}, [], "cuda has no option 'warp_speed'; its options: device_id"),
        ({"qnn_fp16": True}, [], "--qnn-fp16 is a qnn option; the provider is cuda"),
        ({}, ["novalue"], "expected key=value"),
        ({}, ["=3"], "expected key=value"),
        ({"cuda_device_id": 1}, ["device_id=2"], "given twice"),
        ({}, ["use_tf32=maybe"], "expected true/false"),
    ],
)
def test_bad_options(typed, generic, message):
    with pytest.raises(ZooError, match=re.escape(message)):
        parse_options("cuda", typed, generic)


def test_session_config_keys_are_split_off():
    opts = parse_options("qnn", {"context_cache": True, "qnn_backend": "HTP"})
    provider, session = split_options(opts)
    assert provider == {"backend_type": "htp"}
    assert session == {"ep.context_enable": "1"}


# -- sessions ------------------------------------------------------------------------------------
def test_cpu_session(model_path):
    session = make_session(model_path, "cpu", {}, intra_op_threads=1)
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert session.get_session_options().intra_op_num_threads == 1


def test_session_options_extra(model_path):
    session = make_session(
        model_path,
        "cpu",
        {"session.intra_op.allow_spinning": "0"},
        session_options_extra={"session.use_env_allocators": "1"},
    )
    so = session.get_session_options()
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.get_session_config_entry("session.use_env_allocators") == "1"

    seen = []
    make_session(model_path, "cpu", session_options_extra=lambda so: seen.append(so))
    assert isinstance(seen[0], ort.SessionOptions)


@pytest.mark.skipif(HAS_CUDA, reason="this machine has the CUDA EP")
def test_cuda_session_fails_clearly_without_fallback(model_path):
    with pytest.raises(ZooError) as info:
        make_session(model_path, "cuda", parse_options("cuda", {}))
    message = str(info.value)
    assert "\n" not in message
    assert "onnxruntime-gpu" in message and "--fallback cpu" in message


@pytest.mark.skipif(HAS_CUDA, reason="this machine has the CUDA EP")
def test_cuda_session_falls_back_to_cpu_when_allowed(model_path):
    session = make_session(model_path, "cuda", parse_options("cuda", {}), fallback="cpu")
    assert session.get_providers() == ["CPUExecutionProvider"]


def test_silent_ort_fallback_is_caught(model_path, monkeypatch):
    # Pretend this ORT build lists CUDA: ORT then creates the session on the CPU without an
    # error (as it does when CUDA libraries are missing). zoo-ort must notice.
    real = ort.get_available_providers
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real()])
    assert availability("cuda")[0]
    with pytest.raises(ZooError, match="could not start CUDAExecutionProvider.*--fallback cpu"):
        make_session(model_path, "cuda", {"device_id": "0"})
    session = make_session(model_path, "cuda", {"device_id": "0"}, fallback="cpu")
    assert session.get_providers() == ["CPUExecutionProvider"]


def test_session_errors(model_path, tmp_path):
    with pytest.raises(ZooError, match="fallback must be 'cpu'"):
        make_session(model_path, "cpu", {}, fallback="gpu")
    with pytest.raises(ZooError, match="model file not found"):
        make_session(tmp_path / "missing.onnx", "cpu", {})
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ZooError, match="cannot load this model"):
        make_session(bad, "cpu", {})
    with pytest.raises(ZooError, match="unknown execution provider"):
        make_session(model_path, "warp", {})
    with pytest.raises(ZooError, match="threads must be at least 1"):
        make_session(model_path, "cpu", {}, intra_op_threads=0)


def _fake_device(kind: str) -> SimpleNamespace:
    return SimpleNamespace(device=SimpleNamespace(type=f"OrtHardwareDeviceType.{kind}"))


def test_plugin_device_selection(monkeypatch):
    devices = [_fake_device("NPU"), _fake_device("GPU"), _fake_device("GPU")]
    monkeypatch.setattr(session_module, "plugin_devices", lambda spec: list(devices))
    qnn = PROVIDERS["qnn"]
    assert session_module._select_devices(qnn, {"backend_type": "gpu"}) == devices[1:]
    assert session_module._select_devices(qnn, {"backend_type": "htp"}) == devices[:1]
    assert session_module._select_devices(qnn, {}) == devices
    cuda = PROVIDERS["cuda"]
    options = {"device_id": "2", "use_tf32": "0"}
    assert session_module._select_devices(cuda, options) == [devices[2]]
    assert options == {"use_tf32": "0"}  # the index picked the device; it is not an EP option
    with pytest.raises(ZooError, match="device 5 asked for"):
        session_module._select_devices(cuda, {"device_id": "5"})


def test_a_cpu_session_trains(tmp_path):
    """Two-point zeroth-order steps through OrtEngine lower the loss of a fixed batch."""
    bundle = make_bundle(tmp_path / "b", "fa")
    engine = OrtEngine(bundle, "cpu", parse_options("cpu", {}), threads=1)
    batch = random_batch(np.random.default_rng(3), 4, 6, 3, 2)
    lora = bundle.initial_lora()
    name = next(t.input for t in bundle.manifest.trainable())
    theta = lora[name]
    queries, eps, lr = 8, 1e-2, 0.05
    rows = batch.tile(2 * queries)  # copy r < q: +eps z_r, copy r >= q: -eps z_(r-q)

    def losses(b_rows: np.ndarray) -> np.ndarray:
        feeds = {k: v for k, v in lora.items() if k != name}
        feeds[name] = np.repeat(b_rows, batch.rows, axis=0)
        return engine.forward(rows, feeds).loss.reshape(2 * queries, batch.rows).mean(1)

    def loss_at(t: np.ndarray) -> float:
        return float(engine.forward(batch, {**lora, name: np.repeat(t[None], 4, 0)}).loss.mean())

    start = loss_at(theta)
    for step in range(30):
        z = np.random.default_rng(step).standard_normal((queries, *theta.shape)).astype(np.float32)
        per_copy = losses(np.concatenate([theta + eps * z, theta - eps * z]))
        g = (per_copy[:queries] - per_copy[queries:]) / (2 * eps)
        theta = theta - lr * np.tensordot(g, z, axes=1) / queries
    assert loss_at(theta) < start - 0.5


def test_docs_cover_the_table():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "providers.md").read_text()
    for spec in PROVIDERS.values():
        assert f"### {spec.name}: `{spec.ort_name}`" in text, spec.name
        for opt in spec.options:
            assert f"`{opt.ort_key}`" in text, (spec.name, opt.ort_key)
            if opt.cli_flag:
                assert f"`{opt.cli_flag}`" in text, opt.cli_flag
