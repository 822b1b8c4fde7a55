"""Names every stage shares: precisions, the ops kept in fp32, dtype names (no torch, no onnx).

One home for these so that the exporter, the runtimes, the TensorRT layer and the benchmarks
cannot drift apart.
"""

from __future__ import annotations

from vitdeploy.outputs import LOGITS

# Graph precisions an ONNX artifact or engine can have. int8 and fp8 are quantized (Q/DQ) graphs.
GRAPH_PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8", "fp8")
# Quantized graph precisions: calibrated QuantizeLinear/DequantizeLinear graphs (int8, fp8 = E4M3).
QUANTIZED_PRECISIONS: tuple[str, ...] = ("int8", "fp8")
# Roles a node can have in a quantized graph, each of which can be kept in float by name: Conv,
# MatMul and Gemm with a constant weight; the MatMuls of two activations: AttentionScores (Q·Kᵀ),
# AttentionValues (P·V) and AttentionMatMul (both); LayerNormalization, Softmax and Gelu (their
# inputs). exporters/quantize.py documents the scheme.
QUANTIZABLE_ROLES: tuple[str, ...] = ("Conv", "MatMul", "Gemm", "AttentionMatMul", "AttentionScores", "AttentionValues",
                                      "LayerNormalization", "Softmax", "Gelu")
# Kept in float by default, as NVIDIA's ModelOpt ViT recipe and the ViT quantization literature do.
DEFAULT_KEEP_FLOAT: tuple[str, ...] = ("LayerNormalization", "Softmax", "Gelu", "AttentionMatMul")
# How activation ranges are read from calibration: the largest magnitude, or a percentile of them.
CALIBRATORS: tuple[str, ...] = ("max", "percentile")
# A LayerNorm's output channels are smoothed (SmoothQuant) only when the largest channel maximum is
# at least this many times the median channel's.
DEFAULT_SMOOTH_THRESHOLD = 8.0
# Precisions the eager PyTorch model runs in (the reference and the torch runtime).
TORCH_PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")
# Reduced float precisions in which the model follows the fp32-ops precision policy.
LOW_FLOAT_PRECISIONS: tuple[str, ...] = ("fp16", "bf16")

# Ops computed in fp32 inside fp16/bf16 graphs and models by default: their reductions
# (mean/variance, exp-sum) overflow or lose too much in 16 bits.
DEFAULT_FP32_OPS: tuple[str, ...] = ("LayerNormalization", "Softmax")
# Every op the precision policy knows how to keep in fp32.
POLICY_OPS: frozenset[str] = frozenset(DEFAULT_FP32_OPS)

# precision name -> torch dtype attribute (``getattr(torch, name)``), so this module needs no torch.
TORCH_DTYPES: dict[str, str] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# onnxruntime type strings -> numpy dtype names.
ORT_DTYPES: dict[str, str] = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}

# Normalisation statistics of the sources' preprocessing: ImageNet's (timm/torchvision, DeiT, DINOv2)
# and OpenAI CLIP's.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

INPUT_NAME = "pixel_values"
LOGITS_NAME = LOGITS  # the output names themselves live in vitdeploy.outputs


def check_precision(precision: str, allowed: tuple[str, ...], what: str = "precision") -> str:
    """``precision`` if it is one of ``allowed``; else ``ValueError`` naming both."""
    if precision not in allowed:
        raise ValueError(f"{what} {precision!r} is not one of {list(allowed)}")
    return precision


def with_article(name: str) -> str:
    """``name`` after the article it is read with: ``an fp16``, ``an int8``, ``a bf16`` (letters are spelled out)."""
    return f"{'an' if name[:1].lower() in 'aefhilmnorsx' else 'a'} {name}"


def torch_dtype(precision: str):  # noqa: ANN201 - returns a torch.dtype; torch is imported here only
    """The ``torch.dtype`` of ``precision`` (imports torch)."""
    import torch

    return getattr(torch, TORCH_DTYPES[check_precision(precision, TORCH_PRECISIONS)])
