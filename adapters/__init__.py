"""Quantization backends behind one contract (see base.py). Registered by import path only:
nothing here imports a backend library until a backend is chosen."""

from __future__ import annotations

from harness.registry import Registry

BACKENDS: Registry = Registry(
    "backend",
    {
        "fp": "harness.adapters.fp:FloatAdapter",
        "rtn": "harness.adapters.rtn:RTNAdapter",
        "torch-int8": "harness.adapters.torch_int8:TorchDynamicInt8Adapter",
        "torchao": "harness.adapters.torchao_backend:TorchAOAdapter",
        "bnb": "harness.adapters.bnb:BitsAndBytesAdapter",
        "quanto": "harness.adapters.quanto:QuantoAdapter",
        "hqq": "harness.adapters.hqq_backend:HQQAdapter",
        "llamacpp": "harness.adapters.llamacpp:LlamaCppAdapter",
        "gptqmodel": "harness.adapters.gptqmodel_backend:GPTQModelAdapter",
        "llmcompressor": "harness.adapters.llmcompressor_backend:LLMCompressorAdapter",
        "optimum-gptq": "harness.adapters.optimum_gptq:OptimumGPTQAdapter",
        "auto-gptq": "harness.adapters.autogptq:AutoGPTQAdapter",
        "autoawq": "harness.adapters.autoawq:AutoAWQAdapter",
        "qat": "harness.adapters.qat:QATAdapter",
        "mixed": "harness.adapters.mixed:MixedPrecisionAdapter",
        "kv-cache": "harness.adapters.kvcache:KVCacheAdapter",
        "tensorrt": "harness.adapters.tensorrt:TensorRTAdapter",
        "modelopt": "harness.adapters.modelopt_backend:ModelOptAdapter",
        "onnxruntime": "harness.adapters.onnxruntime_backend:OnnxRuntimeAdapter",
        "torch-static": "harness.adapters.torch_static:TorchStaticAdapter",
        "torch-qat": "harness.adapters.torch_qat:TorchQATAdapter",
        "pt2e": "harness.adapters.pt2e:PT2EAdapter",
        "pt2e-llm": "harness.adapters.pt2e_llm:PT2ELLMAdapter",
        "onnxruntime-vision": "harness.adapters.onnxruntime_vision:OrtVisionAdapter",
        "executorch": "harness.adapters.executorch_backend:ExecuTorchAdapter",
        "litert": "harness.adapters.litert_backend:LiteRTAdapter",
    },
)


def get_adapter(name: str):
    """An adapter instance by registered name or "package.module:Class" path."""
    return BACKENDS.get(name)()
