"""Registers, spills and shared memory of every kernel of the op, compiled for an H100 (sm_90)
on a machine without a GPU.

    python3 benchmarks/sm90_resources.py [--shape 8,4096,16,128,128] [--dtype bfloat16]

Runs one forward+backward at a small T in Triton's interpreter (CPU tensors), records each
kernel launch (its arguments and launch options), then compiles that exact specialisation
for sm_90 with the ptxas that ships with Triton and reads the resource usage from the cubin.
Pointer arguments are marked 16-byte aligned, as the launcher does for PyTorch's allocations
(without that Triton cannot vectorise a load and every element costs its own address).

It answers, at no device time, the questions that decide a kernel's speed before it runs:
does it spill (STACK > 0), how much shared memory do its pipeline stages take, how many
wgmma / cp.async it issues; and one that decides whether it is right: does an asynchronous
wgmma read a pipelined buffer that the next copy may overwrite (``pipeliner_hazards``).
The local Triton may be newer than the GPU machine's (3.6):
treat the figures as close, not exact (benchmarks/NOTES.md §8).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

_RECORDING = os.environ.get("GDN_SM90_RECORD") == "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
if _RECORDING:
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeliner_hazards import pipeliner_hazards  # noqa: E402

_TORCH_TO_TRITON = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                    torch.int64: "i64", torch.int32: "i32"}
_TL_DTYPES = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}
_CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
_SM90_SHARED_PER_BLOCK = 227 * 1024   # the H100's opt-in maximum of one block


def _encode(value):
    """A kernel argument as JSON: tensors by dtype, Triton dtypes by name."""
    if isinstance(value, torch.Tensor):
        return {"ptr": _TORCH_TO_TRITON[value.dtype]}
    if isinstance(value, tl.dtype):
        return {"tl": value.name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"cannot record a kernel argument of type {type(value).__name__}")


def record_launches(shape: tuple, dtype: torch.dtype, keep: bool = False,
                    variant: str = "gated") -> list[dict]:
    """Run one forward+backward in the interpreter and record every kernel launch: module,
    name, arguments and launch options (this process has TRITON_INTERPRET=1); with ``keep``
    the op runs with recompute=False; ``variant`` "deltanet" runs it without the gate, "gla"
    without the delta term (chunk_gated_linear_attention)."""
    from triton.runtime.interpreter import InterpretedFunction

    from gdn.ops import chunk_gated_delta_rule, chunk_gated_linear_attention
    from gdn.testing import random_inputs

    B, T, H, HV, K, V = shape
    launches = []
    original = InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        names = list(triton.JITFunction(self.fn).arg_names)
        bound = dict(zip(names, args, strict=False))
        bound |= {k: v for k, v in kwargs.items() if k in names}
        launches.append(dict(module=self.fn.__module__, name=self.fn.__name__,
                             args={k: _encode(v) for k, v in bound.items()},
                             options={k: v for k, v in kwargs.items() if k not in names}))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    x = random_inputs(B=B, T=T, H=H, HV=HV, K=K, V=V, seed=0).to(dtype, requires_grad=True)
    InterpretedFunction.run = recording
    try:
        # With the in-op L2 norm, as the Gated DeltaNet layer calls it: its kernels too.
        kw = dict(backend="triton", use_qk_l2norm_in_kernel=True, recompute=not keep)
        if variant == "gla":
            o, _ = chunk_gated_linear_attention(x.q, x.k, x.v, x.g, **kw)
        else:
            g = None if variant == "deltanet" else x.g
            o, _ = chunk_gated_delta_rule(x.q, x.k, x.v, g, x.beta, **kw)
        o.float().square().sum().backward()
    finally:
        InterpretedFunction.run = original
    return launches


def _signature(jit, args: dict, as_bf16: bool) -> tuple[dict, dict, dict]:
    """Triton signature, constexprs and alignment attributes of one recorded launch."""
    sig, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(jit.params):
        arg = args.get(param.name, {"value": param.default})
        if "ptr" in arg:
            name = arg["ptr"]
            sig[param.name] = "*" + ("bf16" if as_bf16 and name == "fp16" else name)
            # PyTorch's allocations are 16-byte aligned and the launcher says so; without
            # it Triton cannot vectorise a load, and every element costs its own address.
            attrs[(i,)] = [["tt.divisibility", 16]]
            continue
        if "tl" in arg:
            value = _TL_DTYPES["bf16" if as_bf16 and arg["tl"] == "fp16" else arg["tl"]]
        else:
            value = arg["value"]
        if param.is_constexpr or value is None:
            sig[param.name] = "constexpr"
            constexprs[(i,)] = value
        elif isinstance(value, bool):
            sig[param.name] = "i1"
        elif isinstance(value, int):
            sig[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
            # The launcher marks integers divisible by 16 the same way (strides, lengths),
            # which lets loads through them vectorise.
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[param.name] = "fp32"
    return sig, constexprs, attrs


def compile_sm90(launch: dict, as_bf16: bool, extra: dict | None = None,
                 dump: Path | None = None) -> dict:
    """Compile one recorded launch for sm_90 and read its resource usage; with ``dump``, also
    write its TTGIR, PTX and SASS there (which loads the pipeliner made asynchronous, which
    products became wgmma)."""
    import importlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit = getattr(importlib.import_module(launch["module"]), launch["name"])
    sig, constexprs, attrs = _signature(jit, launch["args"], as_bf16)
    options = launch["options"]
    opts = dict(num_warps=options.get("num_warps", 4), num_stages=options.get("num_stages", 3))
    opts |= {key: options[key] for key in ("maxnreg",) if key in options}
    opts |= extra or {}
    kernel = triton.compile(ASTSource(jit, sig, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options=opts)
    cubin = Path("/tmp") / f"gdn-sm90-{os.getpid()}.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    usage = subprocess.run([str(_CUOBJDUMP), "--dump-resource-usage", str(cubin)],
                           capture_output=True, text=True, check=True).stdout
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        stem = dump / f"{launch['name']}-w{opts['num_warps']}-s{opts['num_stages']}"
        # Launches of one kernel under different flags (the forward pass with and without
        # OUTPUT) get their own files.
        n = 1
        while stem.with_suffix(".ttgir").exists():
            n += 1
            stem = dump / f"{launch['name']}-w{opts['num_warps']}-s{opts['num_stages']}-{n}"
        stem.with_suffix(".ttgir").write_text(kernel.asm["ttgir"])
        stem.with_suffix(".ptx").write_text(kernel.asm["ptx"])
        stem.with_suffix(".sass").write_text(subprocess.run(
            [str(_CUOBJDUMP), "--dump-sass", str(cubin)], capture_output=True, text=True,
            check=True).stdout)
    cubin.unlink()
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    ptx = collections.Counter(re.findall(r"(wgmma\.mma_async|cp\.async\.cg|ld\.global\.b16|"
                                         r"ld\.global\.b32)", kernel.asm["ptx"]))
    return dict(regs=int(regs), stack=int(stack), shared=kernel.metadata.shared,
                wgmma=ptx["wgmma.mma_async"], cp_async=ptx["cp.async.cg"],
                scalar_loads=ptx["ld.global.b16"] + ptx["ld.global.b32"],
                hazards=pipeliner_hazards(kernel.asm["ttgir"], opts["num_stages"]), **opts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="1,128,2,128,128", help="B,T,H,K,V[,HV]: the "
                        "launch flags depend on H, HV, K, V only; keep T small (interpreter)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16",
                                                                "float32"))
    parser.add_argument("--only", default="", help="kernels whose name contains this")
    parser.add_argument("--keep", action="store_true", help="the op with recompute=False")
    parser.add_argument("--variant", default="gated", choices=("gated", "deltanet", "gla"))
    parser.add_argument("--dump", type=Path, help="write each kernel's TTGIR, PTX and SASS "
                        "to this folder")
    parser.add_argument("--options", default="", help="compile options to try, e.g. "
                        "num_warps=8,num_stages=2,maxnreg=128")
    args = parser.parse_args()
    extra = {key: int(value) for key, _, value in
             (item.partition("=") for item in args.options.split(",") if item)}
    B, T, H, K, V, *rest = (int(x) for x in args.shape.split(","))
    shape = (B, T, H, rest[0] if rest else H, K, V)
    # The interpreter mishandles bf16 (README): a float16 run stands for it, and its float16
    # pointers and DT are compiled as bfloat16.
    run_dtype = "float16" if args.dtype == "bfloat16" else args.dtype
    if _RECORDING:
        print(json.dumps(record_launches(shape, getattr(torch, run_dtype), args.keep,
                                          args.variant)))
        return
    # The launches are recorded with the Triton of the environment (the interpreter of an
    # older one may fail on this numpy); PYTHONPATH may put another Triton (e.g. the GPU
    # machine's 3.6) first for the compile.
    env = os.environ | {"GDN_SM90_RECORD": "1", "PYTHONPATH": ""}
    recorded = subprocess.run([sys.executable, __file__, "--shape", args.shape, "--dtype",
                               run_dtype, "--variant", args.variant,
                               *(["--keep"] if args.keep else [])], env=env,
                              capture_output=True, text=True, check=True)
    launches = json.loads(recorded.stdout.strip().splitlines()[-1])
    print(f"sm_90 resources, (B, T, H, HV, K, V) = {shape}, {args.dtype}, {args.variant}, "
          f"Triton {triton.__version__}")
    print(f"{'kernel':26} {'warps':>5} {'stages':>6} {'regs':>5} {'spill B':>8} "
          f"{'smem KiB':>9} {'wgmma':>6} {'cp.async':>8} {'scalar ld':>9}  race hazards")
    seen, hazardous = set(), []
    for launch in launches:
        key = json.dumps([launch["name"], {k: v for k, v in launch["args"].items()
                                           if "ptr" not in v}, launch["options"]])
        if key in seen or args.only not in launch["name"]:
            continue
        seen.add(key)
        r = compile_sm90(launch, as_bf16=args.dtype == "bfloat16", extra=extra,
                         dump=args.dump)
        # A block may have at most 227 KiB of shared memory on an H100: more cannot launch
        # (a K = 256 sweep lost a run to it without a word, NOTES.md §14 item 4).
        too_big = "  cannot launch: > 227 KiB" if r["shared"] > _SM90_SHARED_PER_BLOCK else ""
        print(f"{launch['name']:26} {r['num_warps']:5} {r['num_stages']:6} {r['regs']:5} "
              f"{r['stack']:8} {r['shared'] / 1024:9.1f} {r['wgmma']:6} {r['cp_async']:8} "
              f"{r['scalar_loads']:9}  {','.join(r['hazards']) or '-'}{too_big}")
        if r["hazards"]:
            hazardous.append(f"{launch['name']} ({', '.join(r['hazards'])})")
    # The last column is easy to cut off with a grep: a hazard also fails the run (a knob of
    # NOTES.md §32.2 reached the GPU with one flagged here and gave wrong dβ there).
    if hazardous:
        sys.exit("pipeliner race hazards, do not run on the GPU: " + "; ".join(hazardous))


if __name__ == "__main__":
    main()
