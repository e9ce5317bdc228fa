"""Where and in what precision seap computes: device, dtype, memory, and the loading strategy.

`Runtime` is the one place these choices are made and checked, so every command resolves
`--device auto` and `--dtype auto` the same way: a GPU when there is one, the checkpoint's own
dtype there, float32 on a CPU (bf16 matmuls are slow on most CPUs). A choice the machine cannot
run is refused here with one line, before any weight is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError

DTYPES: dict[str, torch.dtype | None] = {
    "auto": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
    "fp16": torch.float16, "half": torch.float16, "float32": torch.float32, "fp32": torch.float32,
}
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
LOAD_MODES = ("auto", "whole", "layerwise")
GiB = 2**30


@dataclass(frozen=True)
class Runtime:
    """Device, dtype and loading strategy of one run (all 'auto' by default).

    load: `whole` loads the model into memory; `layerwise` streams one decoder layer at a time from
    the checkpoint's safetensors shards (models that do not fit); `auto` picks from the memory free.
    device_map: for evaluation, generation and benchmarks, accelerate's placement (`auto` spreads a
    big model over the GPUs and the CPU); None puts the whole model on `device`.
    """

    device: str = "auto"
    dtype: str = "auto"
    load: str = "auto"
    device_map: str | None = None

    def __post_init__(self) -> None:
        if str(self.dtype).replace("torch.", "") not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}: choose one of {', '.join(DTYPE_CHOICES)}")
        if self.load not in LOAD_MODES:
            raise ConfigError(f"unknown loading mode {self.load!r}: choose one of {', '.join(LOAD_MODES)}")
        if self.device_map not in (None, "auto", "balanced", "sequential"):
            raise ConfigError(f"unknown device map {self.device_map!r}: choose auto, balanced or sequential")

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def torch_dtype(self, checkpoint_dtype: torch.dtype | None = None) -> torch.dtype:
        return resolve_dtype(self.dtype, self.torch_device, checkpoint_dtype)


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """'auto' -> the first GPU when one is visible, else the CPU; 'cuda:1', 'mps', 'cpu' are checked."""
    spec = str(spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"unknown device {spec!r}: give auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch is a CPU build" if torch.version.cuda is None else "no driver or GPU found"
            raise ConfigError(f"--device {spec}: no CUDA GPU is visible ({build}): use --device cpu or --device auto")
        index = dev.index or 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device {spec}: only {torch.cuda.device_count()} CUDA GPU(s) are visible "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
        return torch.device("cuda", index)
    if dev.type == "mps" and not _mps_available():
        raise ConfigError(f"--device {spec}: Apple's MPS backend is not available here: use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device type {dev.type!r} is not supported: give auto, cpu, cuda, cuda:N or mps")
    return dev


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device,
                  checkpoint_dtype: torch.dtype | None = None) -> torch.dtype:
    """'auto' -> the checkpoint's dtype on a GPU (bfloat16 when it is unknown), float32 on a CPU."""
    if isinstance(spec, torch.dtype):
        dtype = spec
    else:
        key = str(spec or "auto").replace("torch.", "")
        if key not in DTYPES:
            raise ConfigError(f"unknown dtype {spec!r}: choose one of {', '.join(DTYPE_CHOICES)}")
        dtype = DTYPES[key]
    if dtype is None:
        if device.type == "cpu":
            return torch.float32
        dtype = checkpoint_dtype if checkpoint_dtype in (torch.bfloat16, torch.float16, torch.float32) else None
        dtype = dtype or torch.bfloat16
        if dtype == torch.bfloat16 and not dtype_supported(device, dtype):
            dtype = torch.float16  # GPUs before Ampere: the closest half precision they run
    check_dtype(device, dtype)
    return dtype


def dtype_supported(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type == "cuda" and dtype == torch.bfloat16:
        return bool(torch.cuda.is_bf16_supported())
    try:
        a = torch.ones(4, 4, dtype=dtype, device=device)
        (a @ a).sum().item()
    except (RuntimeError, TypeError):
        return False
    return True


def check_dtype(device: torch.device, dtype: torch.dtype) -> None:
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ConfigError(f"dtype {dtype} is not a compute dtype: choose one of {', '.join(DTYPE_CHOICES[1:])}")
    if not dtype_supported(device, dtype):
        name = str(dtype).replace("torch.", "")
        raise ConfigError(f"--dtype {name} cannot run on {device} (this device has no {name} matrix multiply): "
                          "use --dtype float16 or float32, or --dtype auto")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# -- memory ----------------------------------------------------------------------------------------
def available_memory(device: torch.device) -> int:
    """Bytes that a new allocation on `device` can use now (free GPU memory, or available RAM)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return host_available_memory()


def host_available_memory() -> int:
    """Available RAM, capped by the cgroup limit of a container when there is one."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 8 * GiB  # an unknown platform: assume a modest machine
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return int(avail)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


# -- command-line options ---------------------------------------------------------------------------
def add_runtime_args(p, *, load: bool = False, device_map: bool = False) -> None:
    """--device and --dtype on every command; --load where a model can stay on disk (collect, prune,
    apply); --device-map where a whole model runs (eval, generate, bench, route, analyze, export)."""
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one, else cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="compute dtype; auto: the checkpoint's own on a GPU, float32 on a CPU")
    if load:
        p.add_argument("--load", default="auto", choices=LOAD_MODES,
                       help="whole: the model in memory; layerwise: one decoder layer at a time from the safetensors "
                            "shards (models bigger than memory); auto: whole when it fits")
    if device_map:
        p.add_argument("--device-map", default=None, choices=("auto", "balanced", "sequential"),
                       help="spread a big model over the GPUs and the CPU with accelerate (default: all on --device)")


def runtime_from_args(args) -> Runtime:
    return Runtime(device=getattr(args, "device", "auto"), dtype=getattr(args, "dtype", "auto"),
                   load=getattr(args, "load", "auto"), device_map=getattr(args, "device_map", None))
