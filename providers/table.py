"""The execution-provider table: one entry per ONNX Runtime EP zoo-ort knows how to drive.

Option keys, defaults and value spellings follow ONNX Runtime's EP documentation (CUDA, TensorRT,
QNN, NNAPI, CoreML, OpenVINO, DirectML, XNNPACK pages) and the onnxruntime-qnn plugin's own docs.
"""

from __future__ import annotations

from zoo_ort.providers.spec import DeviceSelection, PluginLibrary, ProviderOption, ProviderSpec

_TRUE_FALSE = ("True", "False")  # TensorRT and OpenVINO parse booleans as True/False words

_HTP_MODES = (
    "default",
    "burst",
    "balanced",
    "high_performance",
    "high_power_saver",
    "low_balanced",
    "low_power_saver",
    "power_saver",
    "extreme_power_saver",
    "sustained_high_performance",
)

CPU = ProviderSpec(
    name="cpu",
    ort_name="CPUExecutionProvider",
    package="onnxruntime (every build)",
    platforms=("any",),
    constraints=("threads: --threads (intra-op); everything runs in fp32",),
)

CUDA = ProviderSpec(
    name="cuda",
    ort_name="CUDAExecutionProvider",
    package="onnxruntime-gpu (NVIDIA GPU, CUDA 12 and cuDNN 9 libraries)",
    platforms=("linux-x86_64", "linux-arm64", "windows-x86_64"),
    options=(
        ProviderOption(
            "device_id",
            "int",
            0,
            "CUDA device index",
            "device_id",
            cli_flag="--cuda-device-id",
            minimum=0,
        ),
        ProviderOption(
            "gpu_mem_limit",
            "bytes",
            None,
            "memory arena limit in bytes (accepts 4GiB, 512MiB, ...); unset: no limit",
            "gpu_mem_limit",
            cli_flag="--cuda-mem-limit",
            minimum=1,
        ),
        ProviderOption(
            "arena_extend_strategy",
            "choice",
            "kNextPowerOfTwo",
            "how the memory arena grows",
            "arena_extend_strategy",
            choices=("kNextPowerOfTwo", "kSameAsRequested"),
        ),
        ProviderOption(
            "cudnn_conv_algo_search",
            "choice",
            "EXHAUSTIVE",
            "cuDNN convolution algorithm search",
            "cudnn_conv_algo_search",
            choices=("EXHAUSTIVE", "HEURISTIC", "DEFAULT"),
        ),
        ProviderOption(
            "do_copy_in_default_stream",
            "bool",
            True,
            "copy on the compute stream (0 may race)",
            "do_copy_in_default_stream",
        ),
        ProviderOption(
            "use_tf32",
            "bool",
            True,
            "TF32 matmuls; zoo-ort turns them off: ±eps loss differences need full fp32",
            "use_tf32",
            zoo_default=False,
        ),
        ProviderOption(
            "enable_cuda_graph",
            "bool",
            False,
            "capture a CUDA graph (needs static shapes and fixed bound buffers)",
            "enable_cuda_graph",
        ),
    ),
    constraints=(
        "fp32 bundles run as exported; fp16 bundles are faster on tensor cores",
        "zoo-ort keeps inputs and LoRA tensors on the GPU (IO binding); only losses come back",
    ),
    io_binding_device="cuda",
    device_selection=DeviceSelection(index_option="device_id"),
    note="ORT >= 1.32 wheels may ship CUDA as a bundled plugin EP; both forms are handled",
)

TENSORRT = ProviderSpec(
    name="tensorrt",
    ort_name="TensorrtExecutionProvider",
    package="onnxruntime-gpu plus TensorRT 10 libraries (pip install tensorrt)",
    platforms=("linux-x86_64", "windows-x86_64"),
    options=(
        ProviderOption("device_id", "int", 0, "CUDA device index", "device_id", minimum=0),
        ProviderOption(
            "max_workspace_size",
            "bytes",
            None,
            "TensorRT builder workspace in bytes",
            "trt_max_workspace_size",
            minimum=1,
        ),
        ProviderOption(
            "fp16",
            "bool",
            False,
            "let TensorRT run fp32 layers in fp16",
            "trt_fp16_enable",
            bool_strings=_TRUE_FALSE,
        ),
        ProviderOption(
            "engine_cache",
            "bool",
            False,
            "cache built engines on disk",
            "trt_engine_cache_enable",
            bool_strings=_TRUE_FALSE,
        ),
        ProviderOption(
            "engine_cache_path",
            "path",
            None,
            "folder for cached engines",
            "trt_engine_cache_path",
        ),
        ProviderOption(
            "timing_cache",
            "bool",
            False,
            "cache layer timings on disk",
            "trt_timing_cache_enable",
            bool_strings=_TRUE_FALSE,
        ),
        ProviderOption(
            "builder_optimization_level",
            "int",
            3,
            "0 (fast build) .. 5 (best engine)",
            "trt_builder_optimization_level",
            minimum=0,
        ),
    ),
    constraints=(
        "static shapes preferred (each new shape builds a new engine): export with --static",
        "first session builds the engine (minutes): enable engine_cache",
        "nodes TensorRT cannot take run on CUDA, then CPU",
    ),
    static_shapes=True,
    precision="fp16",
    io_binding_device="cuda",
    companions=("CUDAExecutionProvider",),
)

QNN = ProviderSpec(
    name="qnn",
    ort_name="QNNExecutionProvider",
    package="onnxruntime-qnn >= 2.0 (plugin EP; Windows ARM64/x64 and Linux ARM64 wheels)",
    platforms=("windows-arm64", "windows-x86_64", "linux-arm64", "android-arm64"),
    options=(
        ProviderOption(
            "backend_type",
            "choice",
            "htp",
            "QNN backend: htp (NPU), gpu, cpu, saver or ir",
            "backend_type",
            choices=("htp", "gpu", "cpu", "saver", "ir"),
            cli_flag="--qnn-backend",
        ),
        ProviderOption(
            "backend_path",
            "path",
            None,
            "QNN backend library (QnnHtp.dll / libQnnHtp.so); excludes backend_type",
            "backend_path",
        ),
        ProviderOption(
            "htp_performance_mode",
            "choice",
            "default",
            "HTP power/performance mode",
            "htp_performance_mode",
            choices=_HTP_MODES,
            cli_flag="--qnn-htp-performance-mode",
        ),
        ProviderOption(
            "fp16",
            "bool",
            True,
            "run fp32 graphs in fp16 on the HTP",
            "enable_htp_fp16_precision",
            cli_flag="--qnn-fp16",
        ),
        ProviderOption(
            "graph_optimization_mode",
            "choice",
            "0",
            "HTP graph finalization: 1 fast prepare .. 3 best graph",
            "htp_graph_finalization_optimization_mode",
            choices=("0", "1", "2", "3"),
        ),
        ProviderOption("vtcm_mb", "int", None, "HTP VTCM size in MB", "vtcm_mb", minimum=1),
        ProviderOption("soc_model", "str", None, "SoC model number (offline prepare)", "soc_model"),
        ProviderOption("htp_arch", "str", None, "HTP architecture, e.g. 73 or 75", "htp_arch"),
        ProviderOption(
            "profiling_level",
            "choice",
            "off",
            "QNN profiling",
            "profiling_level",
            choices=("off", "basic", "detailed", "optrace"),
        ),
        ProviderOption(
            "context_cache",
            "bool",
            False,
            "write an EPContext model with the compiled QNN context (session config)",
            "ep.context_enable",
        ),
        ProviderOption(
            "context_file",
            "path",
            None,
            "where the EPContext model goes (default <model>_ctx.onnx)",
            "ep.context_file_path",
        ),
        ProviderOption(
            "context_embed",
            "bool",
            False,
            "embed the context binary in the EPContext model instead of a .bin beside it",
            "ep.context_embed_mode",
        ),
        ProviderOption(
            "cpu_fallback_disabled",
            "bool",
            False,
            "fail instead of running unsupported nodes on the CPU EP",
            "session.disable_cpu_ep_fallback",
        ),
    ),
    constraints=(
        "static shapes required: export with --static",
        "HTP runs quantized (QDQ uint8/uint16) graphs best; fp32 graphs run in fp16",
        "first session compiles the graph (slow): use context_cache and reuse the _ctx.onnx",
    ),
    static_shapes=True,
    precision="quantized",
    plugin=PluginLibrary(
        module="onnxruntime_qnn",
        package="onnxruntime-qnn",
        path_function="get_library_path",
        registration_name="QNNExecutionProvider",
        module_defaults=(("backend_path", "get_qnn_htp_path", ("backend_path", "backend_type")),),
    ),
    device_selection=DeviceSelection(
        type_option="backend_type", type_map=(("htp", "NPU"), ("gpu", "GPU"), ("cpu", "CPU"))
    ),
    note="onnxruntime-qnn < 2.0 was a whole ORT build with QNN built in; that works too",
)

NNAPI = ProviderSpec(
    name="nnapi",
    ort_name="NnapiExecutionProvider",
    package="ONNX Runtime for Android (onnxruntime-android AAR, or --android --use_nnapi builds)",
    platforms=("android",),
    options=(
        ProviderOption(
            "fp16",
            "bool",
            False,
            "allow fp16 relaxation",
            "NNAPI_FLAG_USE_FP16",
            cli_flag="--nnapi-fp16",
        ),
        ProviderOption(
            "nchw",
            "bool",
            False,
            "use NCHW layout (Android API 29+)",
            "NNAPI_FLAG_USE_NCHW",
            cli_flag="--nnapi-nchw",
        ),
        ProviderOption(
            "cpu_disabled",
            "bool",
            False,
            "never use NNAPI's own CPU implementation",
            "NNAPI_FLAG_CPU_DISABLED",
            cli_flag="--nnapi-cpu-disabled",
        ),
        ProviderOption(
            "cpu_only",
            "bool",
            False,
            "only NNAPI's CPU (for testing)",
            "NNAPI_FLAG_CPU_ONLY",
        ),
    ),
    constraints=(
        "static shapes required: nodes with dynamic shapes stay on the CPU EP",
        "mobile builds load .ort models (python -m onnxruntime.tools.convert_onnx_models_to_ort)",
        "fp16 or quantized graphs preferred",
    ),
    static_shapes=True,
    precision="fp16",
    note="flags are a bitmask in the C/C++/Java APIs; ORT's Python binding creates NNAPI with 0",
)

COREML = ProviderSpec(
    name="coreml",
    ort_name="CoreMLExecutionProvider",
    package="onnxruntime (macOS wheels include CoreML; iOS: onnxruntime-objc / -c pods)",
    platforms=("macos", "ios"),
    options=(
        ProviderOption(
            "model_format",
            "choice",
            "NeuralNetwork",
            "CoreML model type; MLProgram covers more ops and fp16",
            "ModelFormat",
            choices=("MLProgram", "NeuralNetwork"),
        ),
        ProviderOption(
            "compute_units",
            "choice",
            "ALL",
            "hardware CoreML may use",
            "MLComputeUnits",
            choices=("ALL", "CPUOnly", "CPUAndGPU", "CPUAndNeuralEngine"),
        ),
        ProviderOption(
            "require_static_shapes",
            "bool",
            False,
            "only take nodes with static input shapes",
            "RequireStaticInputShapes",
        ),
        ProviderOption(
            "enable_on_subgraphs",
            "bool",
            False,
            "also run control-flow subgraphs",
            "EnableOnSubgraphs",
        ),
        ProviderOption(
            "specialization",
            "choice",
            "Default",
            "CoreML specialization strategy",
            "SpecializationStrategy",
            choices=("Default", "FastPrediction"),
        ),
        ProviderOption(
            "low_precision_gpu",
            "bool",
            False,
            "allow fp16 accumulation on the GPU",
            "AllowLowPrecisionAccumulationOnGPU",
        ),
        ProviderOption(
            "cache_dir", "path", None, "cache compiled CoreML models here", "ModelCacheDirectory"
        ),
    ),
    constraints=(
        "static shapes recommended (the Neural Engine needs them): export with --static",
        "fp16 runs best on the Neural Engine",
    ),
    static_shapes=True,
    precision="fp16",
)

OPENVINO = ProviderSpec(
    name="openvino",
    ort_name="OpenVINOExecutionProvider",
    package="onnxruntime-openvino (Intel CPU, iGPU/dGPU, NPU)",
    platforms=("linux-x86_64", "windows-x86_64"),
    options=(
        ProviderOption(
            "device_type",
            "str",
            "CPU",
            "CPU, GPU, NPU, or AUTO:GPU,CPU / HETERO:... ",
            "device_type",
        ),
        ProviderOption(
            "precision",
            "choice",
            None,
            "inference precision (default depends on device)",
            "precision",
            choices=("FP32", "FP16", "ACCURACY"),
        ),
        ProviderOption(
            "num_of_threads", "int", None, "CPU inference threads", "num_of_threads", minimum=1
        ),
        ProviderOption(
            "num_streams", "int", 1, "parallel inference streams", "num_streams", minimum=1
        ),
        ProviderOption("cache_dir", "path", None, "cache compiled blobs here", "cache_dir"),
        ProviderOption(
            "disable_dynamic_shapes",
            "bool",
            False,
            "reshape dynamic inputs to static ones",
            "disable_dynamic_shapes",
            bool_strings=_TRUE_FALSE,
        ),
    ),
    constraints=(
        "NPU needs static shapes: export with --static",
        "GPU/NPU prefer fp16 (precision=FP16)",
    ),
)

DML = ProviderSpec(
    name="dml",
    ort_name="DmlExecutionProvider",
    package="onnxruntime-directml (Windows 10+, DirectX 12 GPU or NPU)",
    platforms=("windows-x86_64", "windows-arm64"),
    options=(
        ProviderOption("device_id", "int", 0, "DirectX adapter index", "device_id", minimum=0),
        ProviderOption(
            "performance_preference",
            "choice",
            "default",
            "adapter choice when device_id unset",
            "performance_preference",
            choices=("default", "high_performance", "minimum_power"),
        ),
        ProviderOption(
            "device_filter",
            "choice",
            "gpu",
            "which adapters to consider",
            "device_filter",
            choices=("gpu", "npu", "any"),
        ),
    ),
    constraints=(
        "sessions run sequentially with memory patterns off (set by zoo-ort)",
        "fp16 graphs preferred",
    ),
    session_settings=(("enable_mem_pattern", False), ("execution_mode", "ORT_SEQUENTIAL")),
    precision="fp16",
)

XNNPACK = ProviderSpec(
    name="xnnpack",
    ort_name="XnnpackExecutionProvider",
    package="ONNX Runtime builds with --use_xnnpack (the Android and iOS packages include it)",
    platforms=("android", "ios", "linux-arm64", "macos"),
    options=(
        ProviderOption(
            "threads", "int", None, "XNNPACK thread pool size", "intra_op_num_threads", minimum=1
        ),
    ),
    constraints=("fp32/fp16 ARM kernels; set --threads 1 so two pools do not compete",),
)

PROVIDERS: dict[str, ProviderSpec] = {
    spec.name: spec for spec in (CPU, CUDA, TENSORRT, QNN, NNAPI, COREML, OPENVINO, DML, XNNPACK)
}
