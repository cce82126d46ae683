"""int8 W8A8 quantization of the embedded model: the checkpoint, failure atomicity, serving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from agentkit.errors import ModelPrepareError, ModelServerError
from agentkit.services import model_quantize
from agentkit.services.model_prepare import (
    DEFAULT_MODEL,
    STAMP,
    int8_dir,
    model_dir,
    prepare_model,
)
from agentkit.services.model_quantize import int8_support, quantize_tensor
from agentkit.services.model_server import ModelServer, ServeOptions

VNNI_CPU = {"avx2", "fma", "avx512f", "avx512_vnni"}
AVX2_CPU = {"avx2", "fma", "f16c"}


@pytest.fixture
def float32_model(tmp_path: Path) -> Path:
    """A prepared float32 folder of a two-layer toy model with the embedded model's stamp."""
    folder = model_dir(tmp_path)
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(32, 8, generator=generator)}
    for layer in range(2):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            block = (
                "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            )
            prefix = f"model.layers.{layer}.{block}.{name}"
            tensors[f"{prefix}.weight"] = torch.randn(8, 8, generator=generator)
        tensors[f"model.layers.{layer}.self_attn.q_proj.bias"] = torch.randn(8)
        tensors[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(8)
    tensors["lm_head.weight"] = torch.randn(32, 8, generator=generator)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "dtype": "float32"}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / STAMP).write_text(json.dumps({"sha256": DEFAULT_MODEL.sha256}))
    return tmp_path


def test_weights_are_int8_per_output_channel_and_close_to_float32() -> None:
    weight = (
        torch.randn(16, 64) * torch.linspace(0.01, 2.0, 16)[:, None]
    )  # rows of very different size
    quantized, scale = quantize_tensor(weight)
    assert quantized.dtype == torch.int8 and scale.shape == (16, 1)
    assert quantized.abs().amax(dim=1).eq(127).all()  # every row uses its whole range
    assert torch.allclose(quantized.float() * scale, weight, atol=float(scale.max()) / 2 + 1e-6)


def test_prepare_int8_writes_a_compressed_tensors_w8a8_folder_beside_float32(
    float32_model: Path,
) -> None:
    folder = prepare_model(float32_model, quantize="int8")
    assert folder == int8_dir(float32_model) and folder.name == f"{DEFAULT_MODEL.name}-w8a8"
    tensors = load_file(str(folder / "model.safetensors"))
    assert tensors["model.layers.1.mlp.down_proj.weight"].dtype == torch.int8
    assert tensors["model.layers.1.mlp.down_proj.weight_scale"].shape == (8, 1)
    assert tensors["lm_head.weight"].dtype == torch.int8
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32  # a lookup, not a matmul
    assert tensors["model.layers.0.self_attn.q_proj.bias"].dtype == torch.float32
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "int-quantized"
    group = config["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and group["weights"]["num_bits"] == 8
    assert group["input_activations"]["strategy"] == "token"
    assert group["input_activations"]["dynamic"] is True
    assert json.loads((folder / STAMP).read_text())["precision"] == "int8"
    assert (folder / "tokenizer.json").exists()
    assert not list(folder.parent.glob(".*"))  # no scratch folder left
    stamp_time = (folder / STAMP).stat().st_mtime_ns
    assert prepare_model(float32_model, quantize="int8") == folder  # cached
    assert (folder / STAMP).stat().st_mtime_ns == stamp_time


def test_a_quantization_that_fails_half_way_leaves_both_models_untouched(
    float32_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    earlier = int8_dir(float32_model)
    earlier.mkdir(parents=True)
    (earlier / "model.safetensors").write_bytes(b"an earlier int8 model")
    float32_files = {p.name: p.read_bytes() for p in model_dir(float32_model).iterdir()}
    calls = []

    def fail_on_the_fifth(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("out of memory")
        return quantize_tensor(weight)

    monkeypatch.setattr(model_quantize, "quantize_tensor", fail_on_the_fifth)
    with pytest.raises(ModelPrepareError, match="out of memory.*float32 model and any earlier"):
        prepare_model(float32_model, quantize="int8")
    assert (earlier / "model.safetensors").read_bytes() == b"an earlier int8 model"
    assert {p.name: p.read_bytes() for p in model_dir(float32_model).iterdir()} == float32_files
    assert not list(earlier.parent.glob(".*"))


def test_an_unknown_quantization_is_refused(float32_model: Path) -> None:
    with pytest.raises(ModelPrepareError, match="use int8"):
        prepare_model(float32_model, quantize="int4")


def test_the_cpu_flags_decide_whether_int8_is_served() -> None:
    assert int8_support(VNNI_CPU).fast
    slow = int8_support(AVX2_CPU)
    assert slow.kernels and not slow.fast and "VNNI" in slow.reason
    assert not int8_support({"sse4_2"}).kernels


@pytest.mark.parametrize(
    ("flags", "force", "message"),
    [
        ({"sse4_2"}, True, "no AVX2.*--precision float32"),
        (AVX2_CPU, False, "no VNNI.*--precision float32.*--force-int8"),
    ],
)
def test_int8_on_a_cpu_without_fast_kernels_names_the_float32_fallback(
    float32_model: Path, monkeypatch: pytest.MonkeyPatch, flags: set[str], force: bool, message: str
) -> None:
    monkeypatch.setattr(model_quantize, "cpu_flags", lambda: flags)
    server = ModelServer(
        ServeOptions(device="cpu", precision="int8", force_int8=force), float32_model
    )
    with pytest.raises(ModelServerError, match=message):
        server.model_and_name()
    assert not int8_dir(float32_model).exists()  # refused before quantizing anything


def test_int8_is_served_under_a_w8a8_name(
    float32_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_quantize, "cpu_flags", lambda: VNNI_CPU)
    server = ModelServer(ServeOptions(device="cpu", precision="int8"), float32_model)
    folder, name = server.model_and_name()
    assert (folder, name) == (str(int8_dir(float32_model)), f"{DEFAULT_MODEL.name}-w8a8")
    monkeypatch.setattr(model_quantize, "cpu_flags", lambda: AVX2_CPU)
    forced = ModelServer(
        ServeOptions(device="cpu", precision="int8", force_int8=True), float32_model
    )
    assert forced.model_and_name()[1].endswith("-w8a8")
    plain = ModelServer(ServeOptions(device="cpu"), float32_model)
    assert plain.model_and_name() == (str(model_dir(float32_model)), DEFAULT_MODEL.name)


def test_precision_is_for_the_embedded_model_only(tmp_path: Path) -> None:
    server = ModelServer(ServeOptions(model="org/other", precision="int8"), tmp_path)
    with pytest.raises(ModelServerError, match="applies to the embedded model"):
        server.model_and_name()


def test_the_cli_takes_the_precision_from_the_setting(
    float32_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agentkit.cli import app

    monkeypatch.setenv("AGENTKIT_CACHE_DIR", str(float32_model))
    monkeypatch.setenv("AGENTKIT_MODEL_PRECISION", "int8")
    result = CliRunner().invoke(app, ["model", "prepare"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith(f"{DEFAULT_MODEL.name}-w8a8")
    bad = CliRunner().invoke(app, ["model", "prepare", "--quantize", "int4"])
    assert bad.exit_code == 2 and "int8" in bad.output
