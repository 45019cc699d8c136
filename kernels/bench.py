"""`specray bench kernels`: each Triton kernel against its PyTorch twin at realistic sizes, in one run.

Per model shape and batch size it times the twin and the kernel on the same inputs (median of repeated
calls, the L2 cache flushed between calls on a GPU), checks that both agree, and reports the ratio;
for the attention kernel also the achieved fraction of the GPU's memory bandwidth (K/V bytes read).
Without a GPU it times the twins alone, and only when `--device cpu` asks for it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from specray.kernels.acceptance import accept_drafts
from specray.kernels.attention import build_attention_metadata, paged_attention
from specray.kernels.markov_sampling import sample_markov_block


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    markov_rank: int


SHAPES = {
    "smollm2": Shape(vocab=49_152, hidden=576, num_heads=9, num_kv_heads=3, head_dim=64, markov_rank=64),
    "qwen3-8b": Shape(
        vocab=151_936, hidden=4096, num_heads=32, num_kv_heads=8, head_dim=128, markov_rank=256
    ),
    # Small enough for a CPU smoke run of the twins.
    "tiny": Shape(vocab=1000, hidden=64, num_heads=4, num_kv_heads=2, head_dim=16, markov_rank=8),
}
# Peak HBM bandwidth (GB/s) by device name, where the driver does not report clock and bus width.
PEAK_GBPS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100": 2039.0, "L40S": 864.0}


def add_bench_kernels_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `kernels` under a `bench` sub-command parser; the handler is `args.func`."""
    parser = subparsers.add_parser("kernels", help="Triton kernels vs their PyTorch twins (GPU)")
    parser.add_argument("--shapes", default="smollm2,qwen3-8b", help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--batch-sizes", default="1,8,32,128,256")
    parser.add_argument("--num_slots", type=int, default=7)
    parser.add_argument("--context", type=int, default=1024, help="KV length per sequence for attention")
    parser.add_argument("--block-size", type=int, default=16, help="KV cache page size")
    parser.add_argument("--device", default=None, help="cuda (default when present) or cpu (twins only)")
    parser.add_argument("--peak-gbps", type=float, default=None, help="memory bandwidth for the fraction")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    parser.set_defaults(func=run_bench_kernels)
    return parser


def run_bench_kernels(args: argparse.Namespace) -> dict:
    """Run the benchmark described by `args` (see `add_bench_kernels_parser`), print a table, return rows."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("specray bench kernels: --device cuda but no CUDA device is visible")
    if device.type != "cuda" and args.device is None:
        raise SystemExit(
            "specray bench kernels compares Triton kernels on a GPU and found none; "
            "pass --device cpu to time the PyTorch twins alone"
        )
    with_kernels = device.type == "cuda"
    peak = args.peak_gbps or (_peak_gbps(device) if with_kernels else None)
    rows = []
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name.strip()]
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            for kernel, bench in (
                ("acceptance", _bench_acceptance),
                ("markov", _bench_markov),
                ("attention", _bench_attention),
            ):
                row = {"shape": shape_name.strip(), "kernel": kernel, "batch": batch}
                row.update(bench(shape, batch, args, device, with_kernels))
                if peak and "bytes" in row and row.get("triton_ms"):
                    row["bandwidth_fraction"] = row["bytes"] / (row["triton_ms"] * 1e-3) / (peak * 1e9)
                rows.append(row)
                print(_format_row(row), flush=True)
    result = {
        "device": torch.cuda.get_device_name(device) if with_kernels else "cpu",
        "peak_gbps": peak,
        "num_slots": args.num_slots,
        "context": args.context,
        "rows": rows,
    }
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _format_row(row: dict) -> str:
    parts = [f"{row['shape']:>9} {row['kernel']:>10} B={row['batch']:<4} twin {row['twin_ms']:9.3f} ms"]
    if row.get("triton_ms") is not None:
        parts.append(f"triton {row['triton_ms']:9.3f} ms  x{row['speedup']:6.2f}  agree {row['agree']:.4f}")
    if "bandwidth_fraction" in row:
        parts.append(f"{row['bandwidth_fraction']:.0%} of peak bandwidth")
    return "  ".join(parts)


def _peak_gbps(device: torch.device) -> float | None:
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        # Double data rate: two transfers per memory clock.
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9
    return next((gbps for name, gbps in PEAK_GBPS.items() if name in props.name), None)


def _time_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _compare(
    twin: Callable[[], object],
    kernel: Callable[[], object] | None,
    device: torch.device,
    agreement: Callable[[object, object], float],
) -> dict:
    """Times of both, their ratio, and the fraction of outputs on which they agree."""
    out = {"twin_ms": _time_ms(twin, device), "triton_ms": None}
    if kernel is not None:
        out["agree"] = float(agreement(twin(), kernel()))
        out["triton_ms"] = _time_ms(kernel, device)
        out["speedup"] = out["twin_ms"] / out["triton_ms"]
    return out


def _rows_equal(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> float:
    same = (a[0] == b[0]) & (a[1] == b[1]).all(dim=1)
    return float(same.float().mean())


def _bench_acceptance(
    shape: Shape, batch: int, args: argparse.Namespace, device: torch.device, with_kernels: bool
) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    num_slots, vocab = args.num_slots, shape.vocab
    target = torch.softmax(torch.randn(batch, num_slots + 1, vocab, device=device, generator=g), -1)
    # Drafts close to the target so that rows accept a few tokens, as a trained drafter does.
    draft = torch.softmax(
        target.log()[:, :num_slots] + 0.5 * torch.randn(batch, num_slots, vocab, device=device, generator=g),
        -1,
    )
    tokens = torch.multinomial(draft.view(-1, vocab), 1, generator=g).view(batch, num_slots)
    greedy = torch.arange(batch, device=device) % 2 == 0
    inputs = (
        tokens,
        torch.full((batch,), num_slots, device=device),
        target,
        draft,
        greedy,
        torch.rand(batch, num_slots + 1, device=device, generator=g),
    )
    kernel = None
    if with_kernels:
        from specray.kernels.triton_acceptance import accept_drafts_triton

        kernel = lambda: accept_drafts_triton(*inputs)  # noqa: E731
    return _compare(lambda: accept_drafts(*inputs), kernel, device, _rows_equal)


def _bench_markov(
    shape: Shape, batch: int, args: argparse.Namespace, device: torch.device, with_kernels: bool
) -> dict:
    g = torch.Generator(device=device).manual_seed(1)
    num_slots, vocab, rank, dtype = args.num_slots, shape.vocab, shape.markov_rank, torch.bfloat16
    kwargs = {
        "logits": (4 * torch.randn(batch, num_slots, vocab, device=device, generator=g)).to(dtype),
        "anchor": torch.randint(0, vocab, (batch,), device=device, generator=g),
        "temperature": torch.ones(batch, device=device),
        "uniforms": torch.rand(batch, num_slots, device=device, generator=g),
        "w1": (0.05 * torch.randn(vocab, rank, device=device, generator=g)).to(dtype),
        "w2": (0.05 * torch.randn(vocab, rank, device=device, generator=g)).to(dtype),
        "hidden": torch.randn(batch, num_slots, shape.hidden, device=device, generator=g).to(dtype),
        "conf_weight": (0.02 * torch.randn(shape.hidden + rank, device=device, generator=g)).to(dtype),
        "return_probs": True,
    }
    kernel = None
    if with_kernels:
        from specray.kernels.triton_markov import sample_markov_block_triton

        kernel = lambda: sample_markov_block_triton(**kwargs)  # noqa: E731
    # Rounding differs between a tensor-core dot and a matmul: a rare token right at a CDF boundary flips.
    return _compare(
        lambda: sample_markov_block(**kwargs),
        kernel,
        device,
        lambda a, b: (a.tokens == b.tokens).float().mean(),
    )


def _bench_attention(
    shape: Shape, batch: int, args: argparse.Namespace, device: torch.device, with_kernels: bool
) -> dict:
    g = torch.Generator(device=device).manual_seed(2)
    dtype, block_size, context = torch.bfloat16, args.block_size, args.context
    query_len = args.num_slots + 1
    pages = -(-context // block_size)
    table = torch.randperm(batch * pages, device=device, generator=g).view(batch, pages).to(torch.int32)
    meta = build_attention_metadata(table, [query_len] * batch, [context] * batch, block_size)
    cache_shape = (batch * pages, block_size, shape.num_kv_heads, shape.head_dim)
    k_cache = torch.randn(cache_shape, device=device, generator=g).to(dtype)
    v_cache = torch.randn(cache_shape, device=device, generator=g).to(dtype)
    q = torch.randn(batch * query_len, shape.num_heads, shape.head_dim, device=device, generator=g).to(dtype)
    scale = shape.head_dim**-0.5
    kernel = None
    if with_kernels:
        from specray.kernels.triton_attention import paged_attention_triton

        kernel = lambda: paged_attention_triton(q, k_cache, v_cache, meta, scale)  # noqa: E731
    row = _compare(
        lambda: paged_attention(q, k_cache, v_cache, meta, scale),
        kernel,
        device,
        lambda a, b: torch.isclose(a.float(), b.float(), atol=3e-2, rtol=3e-2).float().mean(),
    )
    # What the kernel must move at the least: every sequence's K and V once, plus queries and outputs.
    kv_bytes = 2 * batch * context * shape.num_kv_heads * shape.head_dim * k_cache.element_size()
    row["bytes"] = kv_bytes + 2 * q.numel() * q.element_size()
    return row
