"""Compile every Triton kernel that a wrapper launches for an H100 (sm_90), without a GPU.

Run as a script in a process without TRITON_INTERPRET: `JITFunction.run` is replaced by an
ahead-of-time compile of the very arguments the wrapper passes, so a kernel that only the interpreter
accepts (it is plain Python there) fails here. Prints one line per distinct compiled kernel.
"""

from __future__ import annotations

import inspect
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

TARGET = GPUTarget("cuda", 90, 32)
_DTYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int8: "i8",
    torch.bool: "i1",
}
_seen: set[tuple] = set()


def _arg_type(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {value!r}")


def _compile_run(self: JITFunction, *args, grid, warmup, **kwargs):
    options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages") if key in kwargs}
    bound = inspect.signature(self.fn).bind(*args, **kwargs)
    bound.apply_defaults()
    signature, constexprs = {}, {}
    for param in self.params:
        value = bound.arguments[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        else:
            signature[param.name] = _arg_type(value)
    key = (
        self.fn.__name__,
        tuple(signature.items()),
        tuple(map(str, constexprs.items())),
        tuple(options.items()),
    )
    if key not in _seen:
        _seen.add(key)
        compiled = triton.compile(ASTSource(self, signature, constexprs), target=TARGET, options=options)
        print(f"compiled {self.fn.__name__} sm_90 cubin={len(compiled.asm['cubin'])} bytes", flush=True)


def main() -> int:
    JITFunction.run = _compile_run
    from kernel_cases import launch_every_kernel

    launch_every_kernel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
