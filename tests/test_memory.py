"""Memory preflight: vLLM's own arithmetic reproduced from files, and refusals before a spawn."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sovereignd.backends import memory as m
from tests.harness import Daemon
from tests.helpers import REPO, run_cli

MakeDaemon = Callable[..., Daemon]
MESSAGES = REPO / "tests" / "data" / "server_messages"

# The tiny model of ops/demo/make_tiny_model.py, as its config.json reads (embedded so the fast
# tier does not need the model to have been generated).
TINY = {"architectures": ["LlamaForCausalLM"], "dtype": "bfloat16", "head_dim": 64,
        "hidden_size": 128, "intermediate_size": 256, "max_position_embeddings": 512,
        "model_type": "llama", "num_attention_heads": 2, "num_hidden_layers": 2,
        "num_key_value_heads": 1, "vocab_size": 512}


def tiny_model(path: Path, **changes: Any) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**TINY, **changes}))
    (path / "model.safetensors").write_bytes(safetensors_bytes(4096))
    return path


def safetensors_bytes(total: int) -> bytes:
    """A valid safetensors file of exactly `total` bytes (one U8 tensor), so the header
    check before start passes and only the size matters."""
    n = total
    while True:
        header = json.dumps({"w": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}})
        header += " " * (-len(header) % 8)
        if 8 + len(header) + n == total:
            return len(header).to_bytes(8, "little") + header.encode() + b"\0" * n
        n = total - 8 - len(header)


def vllm_line(name: str, pattern: str) -> re.Match[str]:
    """The first line of a captured real vLLM output that matches `pattern`."""
    text = (MESSAGES / name).read_text()
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in {name}"
    return found


# --- the CPU build's arithmetic, against what real vLLM printed --------------------------------


def test_largest_max_model_len_is_vllms_own_estimate(tmp_path: Path) -> None:
    """1 GiB of KV cache and the tiny model: vLLM estimated 2097024 tokens and 2.0 GiB needed."""
    said = vllm_line("vllm-cpu-kv-cache-too-small-for-max-model-len.txt",
                     r"max seq len \((\d+)\), \(([\d.]+) GiB KV cache is needed.*?memory "
                     r"\(([\d.]+) GiB\).*?estimated maximum model length is (\d+)")
    max_len, needed, available, estimate = (int(said[1]), said[2], said[3], int(said[4]))
    shape = m.read_shape(tiny_model(tmp_path / "long", max_position_embeddings=max_len))
    sa = m.parse_server_args(["--max-model-len", str(max_len)], {"VLLM_CPU_KVCACHE_SPACE": "1"})
    host = m.HostMemory(total=16 * m.GiB, available=14 * m.GiB, source="test node")
    verdict = m.check_cpu(shape, 4096, sa, host)
    assert not verdict.ok
    assert verdict.numbers["largest_max_model_len"] == estimate == 2097024
    assert f"{verdict.numbers['kv_needed_bytes'] / m.GiB:.1f}" == needed == "2.0"
    assert f"{verdict.numbers['kv_available_bytes'] / m.GiB:.1f}" == available == "1.0"
    assert f"at most {estimate}" in verdict.sentence()
    # One block less than that length still fits; vLLM's estimate is the exact boundary.
    assert m.kv_needed(shape, estimate, 128) <= m.GiB - 2 * shape.page_bytes(128)
    assert m.kv_needed(shape, estimate + 1, 128) > m.GiB - 2 * shape.page_bytes(128)


def test_kvcache_space_beyond_the_node_is_refused_with_what_fits() -> None:
    """VLLM_CPU_KVCACHE_SPACE=64 on a node with 14.8 of 16.21 GiB available, as vLLM saw it."""
    said = vllm_line("vllm-cpu-kvcache-space-too-large.txt",
                     r"Available memory on node 0 \(([\d.]+)/([\d.]+) GiB\) on kv cache "
                     r"allocation is less than requested memory for kv \(([\d.]+) GiB\)")
    host = m.HostMemory(total=int(float(said[2]) * m.GiB), available=int(14.85 * m.GiB),
                        source="NUMA node 0")
    sa = m.parse_server_args([], {"VLLM_CPU_KVCACHE_SPACE": "64"})
    verdict = m.check_cpu(None, 855_440, sa, host)
    assert not verdict.ok
    assert f"{verdict.numbers['kv_cache_bytes'] / m.GiB:.1f}" == said[3] == "64.0"
    assert "14.85/16.21 GiB available on NUMA node 0" in verdict.summary
    assert "VLLM_CPU_KVCACHE_SPACE to at most 12 (GiB)" in verdict.sentence()


def test_memory_utilization_beyond_what_is_free_is_refused() -> None:
    """--gpu-memory-utilization 0.99 of 16.21 GiB is 16.05 GiB, as vLLM computed it."""
    said = vllm_line("vllm-cpu-cpu-memory-utilization-too-high.txt",
                     r"desired CPU memory utilization \(([\d.]+), ([\d.]+) GiB\)")
    host = m.HostMemory(total=17_000_224 * 1024, available=int(14.85 * m.GiB), source="node 0")
    sa = m.parse_server_args(["--gpu-memory-utilization", said[1]], {})
    verdict = m.check_cpu(None, 855_440, sa, host)
    assert not verdict.ok
    assert f"reserves {said[2]} GiB" in verdict.summary
    assert "lower --gpu-memory-utilization to at most 0.91" in verdict.sentence()


def test_explicit_kv_space_skips_the_utilization_check() -> None:
    """Measured fact: with VLLM_CPU_KVCACHE_SPACE set, vLLM ignores --gpu-memory-utilization."""
    host = m.HostMemory(total=16 * m.GiB, available=10 * m.GiB, source="node 0")
    shape = m.ModelShape(full_layers=2, kv_heads=1, head_dim=64, dtype_bytes=2,
                         max_position=512)
    sa = m.parse_server_args(["--gpu-memory-utilization", "0.99", "--max-model-len", "512"],
                             {"VLLM_CPU_KVCACHE_SPACE": "1"})
    assert m.check_cpu(shape, 855_440, sa, host).ok
    without = m.parse_server_args(["--gpu-memory-utilization", "0.99"], {})
    assert not m.check_cpu(shape, 855_440, without, host).ok


def test_server_args_parse_like_vllm() -> None:
    sa = m.parse_server_args(["--max-model-len=32k", "--kv-cache-memory-bytes", "2G",
                              "--dtype", "float32", "--block-size", "64"], {})
    assert sa.max_model_len == 32_000 and sa.kv_cache_bytes == 2 * m.GiB
    assert sa.dtype_bytes == 4 and sa.block_size == 64
    assert sa.kv_cache_source == "--kv-cache-memory-bytes"
    env = {"VLLM_CPU_KVCACHE_SPACE": "3", "VLLM_METAL_MEMORY_FRACTION": "0.6"}
    sa = m.parse_server_args(["--kv-cache-memory-bytes", "2G", "--max-model-len", "auto"], env)
    assert sa.kv_cache_bytes == 3 * m.GiB and sa.auto_max_model_len  # the variable wins
    assert m.metal_fraction(sa) == 0.6
    assert m.metal_fraction(m.parse_server_args([], {})) == 0.92  # auto -> vLLM's default
    assert m.human_int("1.5M") == 1_572_864 and m.human_int("2k") == 2000


def test_model_shapes_from_config_json(tmp_path: Path) -> None:
    """GQA, head_dim from hidden size, nested text_config, per-layer types, weight files."""
    shape = m.read_shape(tiny_model(tmp_path / "a"))
    assert (shape.layers, shape.kv_heads, shape.head_dim, shape.dtype_bytes) == (2, 1, 64, 2)
    d = tmp_path / "b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"text_config": {
        "num_hidden_layers": 4, "num_attention_heads": 8, "hidden_size": 512,
        "torch_dtype": "float32", "sliding_window": 256,
        "layer_types": ["sliding_attention", "full_attention"] * 2}}))
    (d / "model-1.safetensors").write_bytes(b"\0" * 100)
    (d / "pytorch_model.bin").write_bytes(b"\0" * 1000)  # ignored: safetensors win
    shape = m.read_shape(d)
    assert (shape.full_layers, shape.sliding_layers, shape.kv_heads, shape.head_dim,
            shape.dtype_bytes) == (2, 2, 8, 64, 4)
    assert m.weights_bytes(d) == 100
    # Sliding layers hold at most their window: a long sequence costs only the full layers more.
    assert (m.kv_needed(shape, 4096, 128) - m.kv_needed(shape, 2048, 128)
            == 2 * 16 * shape.page_bytes(128))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text('{"architectures": ["X"]}')
    with pytest.raises(m.Unestimable, match="num_hidden_layers"):
        m.read_shape(tmp_path / "c")


# --- vllm-metal's arithmetic, against the breakdowns it printed --------------------------------


def test_metal_breakdown_reproduces_vllm_metal_exactly() -> None:
    """`metal_limit=51.54GB, fraction=0.75, ...kv_budget=-0.54GB`: a 64 GB Mac (recommended
    working set 48 GiB) and a hybrid model whose GDN state vllm-metal 0.2 reserved per
    --max-num-seqs (64.36 MB x 256)."""
    state = m.hybrid_reservation(64_360_000, 256, lazy=False)
    plan = m.MetalPlan(metal_limit=48 * m.GiB, fraction=0.75, model_memory=21_640_000_000,
                       overhead=1_080_000_000, hybrid_state=state)
    assert plan.breakdown() == ("metal_limit=51.54GB, fraction=0.75, usable_metal=38.65GB, "
                                "model_memory=21.64GB, overhead=1.08GB, kv_budget=-0.54GB")
    # vllm-metal's own regression test (#401): 3.50GB before the hybrid state of 64.4MB x 256.
    before = m.MetalPlan(metal_limit=10 * 10**9, fraction=0.5, model_memory=1_000_000_000,
                         overhead=500_000_000)
    assert f"{before.kv_budget / 1e9:.2f}" == "3.50"
    after = m.MetalPlan(10 * 10**9, 0.5, 1_000_000_000, 500_000_000,
                        m.hybrid_reservation(64_400_000, 256, lazy=False))
    assert f"{after.kv_budget / 1e9:.2f}" == "-12.99"
    # Since lazy GDN allocation (#409) the reservation is a cushion of 3 slots.
    assert m.hybrid_reservation(64_400_000, 256) == 3 * 64_400_000


def test_metal_refusal_and_largest_length_match_a_real_run() -> None:
    """A reported run: `metal_limit=40.20GB, fraction=0.5, ..., kv_budget=2.21GB,
    per_block_bytes=1572864, num_blocks=1404`, then vLLM: 6.0 GiB needed for 65536 tokens,
    2.06 GiB available, estimated maximum model length 22448 (48 layers, 4 KV heads x 128)."""
    shape = m.ModelShape(full_layers=48, kv_heads=4, head_dim=128, dtype_bytes=2,
                         max_position=262144)
    sa = m.parse_server_args(["--max-model-len", "65536", "--max-num-seqs", "1"],
                             {"VLLM_METAL_MEMORY_FRACTION": "0.5"})
    verdict = m.check_metal(shape, 17_180_000_000, sa, 40_200_000_000, overhead=711_000_000)
    assert verdict.numbers["breakdown"] == (
        "metal_limit=40.20GB, fraction=0.5, usable_metal=20.10GB, model_memory=17.18GB, "
        "overhead=0.71GB, kv_budget=2.21GB")
    assert shape.layers * shape.page_bytes(m.METAL_BLOCK_SIZE) == 1572864
    assert not verdict.ok
    assert verdict.numbers["largest_max_model_len"] == 22448
    assert f"{verdict.numbers['kv_needed_bytes'] / m.GiB:.1f}" == "6.0"
    assert f"{verdict.numbers['kv_available_bytes'] / m.GiB:.2f}" == "2.06"
    assert "VLLM_METAL_MEMORY_FRACTION" in verdict.sentence()


def test_metal_budget_below_zero_is_refused_with_the_breakdown() -> None:
    shape = m.ModelShape(full_layers=64, kv_heads=8, head_dim=128, dtype_bytes=2)
    sa = m.parse_server_args([], {"VLLM_METAL_MEMORY_FRACTION": "0.3"})
    verdict = m.check_metal(shape, 20 * 10**9, sa, 51_539_607_552)
    assert not verdict.ok and "kv_budget=-" in verdict.summary
    assert "smaller or more quantized model" in verdict.sentence()


# --- real: the daemon on this Linux machine ----------------------------------------------------


def memory_daemon(make_daemon: MakeDaemon, args: list[str], env: dict[str, str],
                  **model_changes: Any) -> Daemon:
    d = make_daemon({"server": {"args": args}})
    tiny_model(d.model, **model_changes)
    d.cfg["server"]["env"].update(env)
    d.write_config()
    return d


def test_kv_space_beyond_this_machine_goes_fatal_without_spawning(
        make_daemon: MakeDaemon) -> None:
    """Real vLLM refuses VLLM_CPU_KVCACHE_SPACE=64 after ~36 s of loading; the daemon at once."""
    d = memory_daemon(make_daemon, ["--max-model-len", "512"], {"VLLM_CPU_KVCACHE_SPACE": "64"})
    d.start()
    st = d.wait_state("FATAL")
    assert d.starts() == [] and not d.events("spawn")
    assert "VLLM_CPU_KVCACHE_SPACE=64 asks for 64.00 GiB" in st["reason"]
    assert "GiB available on NUMA node" in st["reason"] or "psutil" in st["reason"]
    [fatal] = [e for e in d.events("state") if e["to"] == "FATAL"]
    assert fatal["kind"] == "memory" and fatal["kv_cache_bytes"] == 64 * m.GiB
    assert "VLLM_CPU_KVCACHE_SPACE to at most" in fatal["mitigation"]


def test_max_model_len_beyond_the_kv_cache_is_refused_with_the_length_that_fits(
        make_daemon: MakeDaemon) -> None:
    d = memory_daemon(make_daemon, ["--max-model-len", "4194304"],
                      {"VLLM_CPU_KVCACHE_SPACE": "1"}, max_position_embeddings=4194304)
    d.start()
    st = d.wait_state("FATAL")
    assert d.starts() == []
    assert "lower --max-model-len to at most 2097024" in st["reason"]
    res = run_cli("check", "--config", str(d.config_path))
    assert res.returncode == 1
    assert re.search(r"\[FAIL\] memory\s+one sequence of --max-model-len 4194304 needs 2.00 GiB",
                     res.stdout), res.stdout


def test_a_fitting_estimate_is_recorded_and_the_server_starts(make_daemon: MakeDaemon) -> None:
    d = memory_daemon(make_daemon, ["--max-model-len", "512"], {"VLLM_CPU_KVCACHE_SPACE": "1"})
    d.start()
    d.wait_state("READY")
    [event] = d.events("memory_preflight")
    assert event["ok"] is True and event["max_model_len"] == 512
    assert "one 512-token sequence needs 0.25 MiB of KV cache of 1.00 GiB" in event["summary"]
