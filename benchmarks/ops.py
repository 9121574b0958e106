"""Op benchmark: time, rates, memory and error of each backend of the recurrences.

    python benchmarks/ops.py                                  # CPU default: cpu-gdn, float32
    python benchmarks/ops.py --shapes 2,1000,2,60,100,4 --variants deltanet --no-save
    python benchmarks/ops.py --device cuda --dtype bfloat16   # the ANCHORS.md shapes
    GDN_COMMIT=abc1234 python3 benchmarks/ops.py              # name the commit (no git history)

For each case (B, T, H, K, V, HV, variant) and backend: forward time (no autograd),
forward+backward time, TFLOP/s from `model_flops` and GB/s from `model_bytes` (the ANCHORS.md
cost model), peak memory of forward+backward, and the relative error of the output and the
gradients against a float64 run on the same inputs. Prints a table last, writes
benchmarks/results/<device>-<date>-<commit>.json and regenerates docs/benchmarks.md.
A new implementation (Triton, fla) is a new entry of BACKENDS.

Letters: B batch, T time, H q/k heads, HV v heads, K key dim, V value dim, C chunk size.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import render
from gdn import chunk_gated_delta_rule, chunk_gated_linear_attention
from gdn.ops import DEFAULT_CHUNK_SIZE
from gdn.testing import RecurrenceInputs, random_inputs, rel_error

ROOT = Path(__file__).resolve().parent.parent
C = DEFAULT_CHUNK_SIZE  # every backend runs, and is charged for, chunks of this size


@dataclass(frozen=True)
class Variant:
    gate: bool   # g given (else None: no decay)
    delta: bool  # beta given: the delta rule (else gated linear attention)


VARIANTS = {
    "gated_delta_rule": Variant(gate=True, delta=True),
    "deltanet": Variant(gate=False, delta=True),
    "gated_linear_attention": Variant(gate=True, delta=False),
}


@dataclass(frozen=True)
class Case:
    name: str
    B: int
    T: int
    H: int
    K: int
    V: int
    HV: int = 0  # 0 means HV = H
    variant: str = "gated_delta_rule"

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.HV == 0:
            object.__setattr__(self, "HV", self.H)
        if min(self.B, self.T, self.H, self.K, self.V) < 1 or self.HV % self.H:
            raise ValueError(f"case {self.name}: sizes must be >= 1 and HV a multiple of H")

    def inputs(self, device: torch.device, seed: int) -> RecurrenceInputs:
        """float64 inputs at the ranges of `random_inputs`; cast per dtype before use."""
        v = VARIANTS[self.variant]
        return random_inputs(B=self.B, T=self.T, H=self.H, K=self.K, V=self.V, HV=self.HV,
                             gate=v.gate, delta=v.delta, device=device, seed=seed)


CASES = {c.name: c for c in [
    # CPU: small enough for the token loop with autograd (tens of seconds, a few GiB).
    Case("cpu-gdn", 1, 8192, 4, 64, 64),
    Case("cpu-deltanet", 1, 8192, 4, 64, 64, variant="deltanet"),
    Case("cpu-gla", 1, 8192, 4, 64, 64, variant="gated_linear_attention"),
    Case("cpu-gva-awkward", 2, 1000, 2, 60, 100, HV=4),  # T % C != 0, odd head dims, GVA
    # GPU: the shapes of the ANCHORS.md fla table, so the figures there compare directly.
    Case("8x4096-h16", 8, 4096, 16, 128, 128),
    Case("8x4096-h16-deltanet", 8, 4096, 16, 128, 128, variant="deltanet"),
    Case("8x4096-h16-gla", 8, 4096, 16, 128, 128, variant="gated_linear_attention"),
    Case("2x16384-h16", 2, 16384, 16, 128, 128),
    Case("1x65536-h16", 1, 65536, 16, 128, 128),
    Case("8x4096-h6-k256v512", 8, 4096, 6, 256, 512),
    Case("8x4096-h32", 8, 4096, 32, 128, 128),
    Case("8x4096-h16-gva32", 8, 4096, 16, 128, 128, HV=32),
]}
DEFAULT_CASES = {"cpu": ["cpu-gdn"], "cuda": [n for n in CASES if not n.startswith("cpu")]}


def model_flops(case: Case) -> tuple[float, float]:
    """(forward, backward) FLOPs of the chunked algorithm: the ANCHORS.md cost model.

    Per token and v head, 2mnk per matmul (the O(C) elementwise gate work is left out):
      delta rule, gated or not:  fwd  6KV + 6CK + 4CV + C²/3
                                 bwd 16KV + 16CK + 10CV + 4C²
        fwd = KKᵀ 2CK + inverse of I+L C²/3 + A[βK, βV] 2CK+2CV + wS 2KV + kᵀΔ 2KV
              + qS 2KV + QKᵀ 2CK + (QKᵀ⊙D)Δ 2CV;
        bwd = two matmuls per forward matmul, plus recomputing wS, kᵀΔ (4KV), KKᵀ, QKᵀ (4CK),
              u (2CV), and 4C² for the triangular parts.
      gated linear attention (no WY stage; counted here the same way, not in ANCHORS.md):
                                 fwd  4KV + 2CK + 2CV
                                 bwd 10KV + 6CK + 4CV   (2 × fwd, plus recomputing kᵀV, QKᵀ)
    Every backend is charged this count (the token loop really does ~6KV per token forward),
    so TFLOP/s compares backends as inverse time.
    """
    K, V = case.K, case.V
    if VARIANTS[case.variant].delta:
        fwd = 6 * K * V + 6 * C * K + 4 * C * V + C * C / 3
        bwd = 16 * K * V + 16 * C * K + 10 * C * V + 4 * C * C
    else:
        fwd = 4 * K * V + 2 * C * K + 2 * C * V
        bwd = 10 * K * V + 6 * C * K + 4 * C * V
    token_heads = case.B * case.T * case.HV
    return token_heads * fwd, token_heads * bwd


def model_bytes(case: Case, itemsize: int) -> tuple[float, float]:
    """(forward, backward) fewest bytes to and from memory: the ANCHORS.md cost model.

    Each tensor read or written once, the state kept on chip; e = itemsize of q, k, v, o, and
    the gates g, β counted at 4 B each as in ANCHORS.md. Per token:
      forward  reads q, k [H, K], v [HV, V], g, β [HV]; writes o [HV, V]
               H = HV: e(2K + 2V) + 8          (bf16, K = V = 128: 1,032 B)
      backward reads q, k, v, dO, g, β; writes dq, dk, dv, dg, dβ
               H = HV: e(4K + 3V) + 16         (1,808 B)
    """
    v = VARIANTS[case.variant]
    gates = int(v.gate) + int(v.delta)
    qk = case.H * case.K * itemsize
    fwd = 2 * qk + case.HV * (2 * case.V * itemsize + 4 * gates)
    bwd = 4 * qk + case.HV * (3 * case.V * itemsize + 8 * gates)
    tokens = case.B * case.T
    return tokens * fwd, tokens * bwd


# The token loop under autograd keeps ~4 [B, HV, K, V] states per step (3.4 measured at
# T = 2048 on CPU) and runs T Python steps; past these limits it is not worth running.
REFERENCE_STATES_PER_STEP = 4
REFERENCE_MAX_BYTES = 8 * 2**30
REFERENCE_MAX_T = 16384


def reference_too_big(case: Case, dtype: torch.dtype) -> str | None:
    """Why the token loop should not run this case (None: it may)."""
    state_bytes = 8 if dtype == torch.float64 else 4
    saved = REFERENCE_STATES_PER_STEP * case.T * case.B * case.HV * case.K * case.V * state_bytes
    if saved > REFERENCE_MAX_BYTES:
        return f"token loop would keep ~{saved / 2**30:.0f} GiB for autograd"
    if case.T > REFERENCE_MAX_T:
        return f"token loop of {case.T} steps"
    return None


@dataclass(frozen=True)
class Backend:
    """One column of the comparison: an implementation of the three variants."""

    name: str
    call: Callable[[str, RecurrenceInputs], torch.Tensor]  # (variant, inputs) -> o [B,T,HV,V]
    why_not: Callable[[Case, torch.dtype], str | None] = lambda case, dtype: None
    same_function: bool = True  # False: a yardstick of another function (attention)


def _gdn_op(backend: str, **options) -> Callable[[str, RecurrenceInputs], torch.Tensor]:
    def call(variant: str, x: RecurrenceInputs) -> torch.Tensor:
        delta = VARIANTS[variant].delta
        op = chunk_gated_delta_rule if delta else chunk_gated_linear_attention
        return op(**x.kwargs(delta=delta), backend=backend, chunk_size=C, **options)[0]
    return call


def _needs_cuda(case: Case, dtype: torch.dtype) -> str | None:
    if not torch.cuda.is_available():
        return "needs CUDA"
    return "Triton kernels take float32, float16, bfloat16" if dtype == torch.float64 else None


def _fla_call(variant: str, x: RecurrenceInputs) -> torch.Tensor:
    """flash-linear-attention 0.6.0, the yardstick (installed from wheels on the GPU box).

    On Triton 3.4–3.7.0 fla refuses its own gated backward (a guarded wrong-result bug); the
    guard is lifted here for timing only, as ANCHORS.md did; its errors are reported as is.
    """
    import fla.ops.common.chunk_o as fla_chunk_o
    fla_chunk_o.TRITON_ABOVE_3_7_1 = True
    if variant == "gated_delta_rule":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_op
        return fla_op(x.q, x.k, x.v, x.g, x.beta)[0]
    if variant == "deltanet":
        from fla.ops.delta_rule import chunk_delta_rule as fla_op
        return fla_op(x.q, x.k, x.v, x.beta)[0]
    from fla.ops.simple_gla import chunk_simple_gla as fla_op
    return fla_op(x.q, x.k, x.v, g=x.g)[0]


def _fla_why_not(case: Case, dtype: torch.dtype) -> str | None:
    try:
        import fla  # noqa: F401
    except ImportError:
        return "fla not installed"
    if case.HV != case.H:
        return "fla 0.6.0 has no separate v heads in this op"
    return _needs_cuda(case, dtype)


def _sdpa_call(variant: str, x: RecurrenceInputs) -> torch.Tensor:
    """Causal softmax attention at the same (B, T, H, K, V): the quadratic yardstick. With GVA
    (more v heads than q/k heads) every v head attends with the q/k head it reads, so q and
    k are repeated to HV heads (SDPA's enable_gqa covers the opposite case only)."""
    G = x.v.shape[2] // x.q.shape[2]
    q, k = (t.repeat_interleave(G, dim=2) if G > 1 else t for t in (x.q, x.k))
    q, k, v = (t.transpose(1, 2) for t in (q, k, x.v))
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return o.transpose(1, 2)


def _sdpa_why_not(case: Case, dtype: torch.dtype) -> str | None:
    if case.K != case.V:
        return "SDPA's fast kernels need equal q/k and v head dims"
    if case.variant != "gated_delta_rule":
        return "timed once per shape"
    return _needs_cuda(case, dtype)


BACKENDS = {b.name: b for b in [
    Backend("torch", _gdn_op("torch")),
    Backend("reference", _gdn_op("reference"), why_not=reference_too_big),
    Backend("triton", _gdn_op("triton"), why_not=_needs_cuda),
    # recompute=False: the forward keeps w, Δ and the chunk states for the backward.
    Backend("triton-keep", _gdn_op("triton", recompute=False), why_not=_needs_cuda),
    # exact=True: float32 operands, IEEE products and hand-offs, whatever the input dtype.
    Backend("triton-exact", _gdn_op("triton", exact=True), why_not=_needs_cuda),
    # precise_state=True: the state recurrence at about float32 precision, 16-bit tiles kept.
    Backend("triton-precise", _gdn_op("triton", precise_state=True), why_not=_needs_cuda),
    Backend("fla", _fla_call, why_not=_fla_why_not),
    Backend("sdpa", _sdpa_call, why_not=_sdpa_why_not, same_function=False),
]}


# ---------------------------------------------------------------------------- measuring

SLOW_MS = 500.0  # a call slower than this is timed by a few wall-clock repeats, even on CUDA


def _wall_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def median_ms(fn, device, *, repeats, budget_s, grads=()) -> tuple[float, int | None, str]:
    """Median ms of fn() after one warm-up call: (ms, calls timed or None, timer used).

    CUDA: triton.testing.do_bench (CUDA events when Triton is absent). CPU and slow calls:
    `repeats` wall-clock calls, fewer once `budget_s` is spent (at least one).
    """
    def clear():
        for t in grads:
            t.grad = None

    # The warm-up call compiles (Triton, fla's autotune) and is not what decides the timer:
    # when it did, every freshly compiled backend fell to the wall-clock timer, which on
    # CUDA adds the host's launch time to the GPU's (NOTES.md §9).
    clear()
    _wall_ms(fn, device)
    clear()
    first = _wall_ms(fn, device)
    if device.type == "cuda" and first < SLOW_MS:
        try:
            from triton.testing import do_bench
        except ImportError:
            return _cuda_events_ms(fn, clear, n=25), 25, "cuda events"
        return do_bench(fn, grad_to_none=list(grads), return_mode="median"), None, "do_bench"
    times, start = [first], time.perf_counter()
    while len(times) < repeats and time.perf_counter() - start < budget_s:
        clear()
        times.append(_wall_ms(fn, device))
    return statistics.median(times), len(times), "perf_counter"


def _cuda_events_ms(fn, clear, *, n: int) -> float:
    times = []
    for _ in range(n):
        clear()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _grad_output(case: Case, dtype: torch.dtype, device, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1)
    dO = torch.randn(case.B, case.T, case.HV, case.V, generator=gen, dtype=torch.float64)
    return dO.to(device=device, dtype=dtype)


def _peak_rss_child(case: Case, backend: str, dtype: str, seed: int, threads: int) -> dict:
    """In a fresh process: growth of ru_maxrss (KiB on Linux) over one forward+backward."""
    torch.set_num_threads(threads)
    # a tiny call first, so one-time library set-up (~50 MiB) is not charged to the op
    tiny = replace(case, B=1, T=min(case.T, 2 * C))
    x = tiny.inputs(torch.device("cpu"), seed).to(getattr(torch, dtype), requires_grad=True)
    BACKENDS[backend].call(case.variant, x).sum().backward()
    x = case.inputs(torch.device("cpu"), seed).to(getattr(torch, dtype), requires_grad=True)
    dO = _grad_output(case, getattr(torch, dtype), "cpu", seed)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_now = os.sysconf("SC_PAGE_SIZE") * int(Path("/proc/self/statm").read_text().split()[1])
    BACKENDS[backend].call(case.variant, x).backward(dO)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # slack: high-water mark already above the live set before the run (input creation);
    # the reported growth undercounts by at most this much.
    return {"peak_mib": (after - before) / 1024, "slack_mib": before / 1024 - rss_now / 2**20}


def peak_memory(case, backend, dtype, device, seed) -> dict:
    """High-water memory of one forward+backward above what the inputs hold, in MiB; on
    CUDA also what stays allocated from the end of the forward until the backward (the
    output and what autograd saved for the backward: per layer in a model, what a
    ``recompute=False`` trades for time)."""
    if device.type == "cuda":
        x = case.inputs(device, seed).to(dtype, requires_grad=True)
        dO = _grad_output(case, dtype, device, seed)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        o = BACKENDS[backend].call(case.variant, x)
        torch.cuda.synchronize(device)
        saved = torch.cuda.memory_allocated(device) - base
        o.backward(dO)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mib": (peak - base) / 2**20, "peak_total_mib": peak / 2**20,
                "saved_mib": saved / 2**20, "peak_method": "torch.cuda.max_memory_allocated"}
    # Not "spawn": a fork+exec child starts with its parent's ru_maxrss (Linux keeps the
    # high-water mark across exec), so growth under the parent's peak would be invisible.
    # The forkserver's children descend from a small process and start near their live set.
    args = (case, backend, str(dtype).removeprefix("torch."), seed, torch.get_num_threads())
    with multiprocessing.get_context("forkserver").Pool(1) as pool:
        child = pool.apply(_peak_rss_child, args)
    return {**child, "peak_method": "ru_maxrss growth in a fresh forkserver process"}


def float64_truth(case, x, dO) -> tuple[torch.Tensor, dict, str]:
    """Output and gradients in float64 on x's (rounded) values: token loop if it fits."""
    name = "reference" if reference_too_big(case, torch.float64) is None else "torch"
    x64 = x.to(torch.float64, requires_grad=True)
    o = BACKENDS[name].call(case.variant, x64)
    o.backward(dO.double())
    grads = {n: t.grad for n, t in x64.tensors().items()}
    return o.detach(), grads, f"{name}-float64"


def measure(case, backend, dtype, device, args, truths) -> dict:
    """One row: timings, rates, peak memory and errors of `backend` on `case`."""
    row = {"case": case.name, **{k: v for k, v in asdict(case).items() if k != "name"},
           "backend": backend.name, "dtype": str(dtype).removeprefix("torch."),
           "chunk_size": C}
    reason = backend.why_not(case, dtype)
    if reason is not None:
        print(f"  skip {backend.name}: {reason}", file=sys.stderr)
        return {**row, "skipped": reason}
    base = case.inputs(device, args.seed)
    x, x_plain = base.to(dtype, requires_grad=True), base.to(dtype)
    dO = _grad_output(case, dtype, device, args.seed)
    last = {}

    def forward():
        with torch.no_grad():
            backend.call(case.variant, x_plain)

    def forward_backward():
        last["o"] = backend.call(case.variant, x)
        last["o"].backward(dO)

    timing = dict(device=device, repeats=args.repeats, budget_s=args.budget_s)
    fwd_ms, fwd_n, timer = median_ms(forward, **timing)
    fb_ms, fb_n, _ = median_ms(forward_backward, grads=list(x.tensors().values()), **timing)

    errors, err_vs = None, None
    if backend.same_function:
        key = (case, dtype)
        if key not in truths:
            truths[key] = float64_truth(case, x, dO)
        o64, grads64, err_vs = truths[key]
        errors = {"o": rel_error(last["o"], o64)}
        errors |= {f"d{n}": rel_error(t.grad, grads64[n]) for n, t in x.tensors().items()
                   if t.grad is not None}

    flops_fwd, flops_bwd = model_flops(case)
    bytes_fwd, bytes_bwd = model_bytes(case, dtype.itemsize)
    row |= {
        "fwd_ms": fwd_ms, "fwd_bwd_ms": fb_ms, "fwd_calls": fwd_n, "fwd_bwd_calls": fb_n,
        "timer": timer,
        "fwd_tflops": flops_fwd / fwd_ms / 1e9,
        "fwd_bwd_tflops": (flops_fwd + flops_bwd) / fb_ms / 1e9,
        "fwd_gbps": bytes_fwd / fwd_ms / 1e6,
        "fwd_bwd_gbps": (bytes_fwd + bytes_bwd) / fb_ms / 1e6,
        "flops_fwd": flops_fwd, "flops_bwd": flops_bwd,
        "bytes_fwd": bytes_fwd, "bytes_bwd": bytes_bwd,
        **peak_memory(case, backend.name, dtype, device, args.seed),
        "rel_err": errors, "err_vs": err_vs,
    }
    return row


# ---------------------------------------------------------------------------- the run


def _git(*argv: str) -> str:
    done = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else ""


def header(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text() if cpuinfo.exists()
                          else "", re.MULTILINE)
        name = found.group(1).strip() if found else platform.processor() or "unknown CPU"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    # The lent GPU's copy of the tree has a .git without history: there the caller names the
    # commit, e.g. GDN_COMMIT=ebfc400+dirty python3 benchmarks/ops.py --device cuda
    commit, dirty = os.environ.get("GDN_COMMIT", ""), []
    if not commit:
        commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    if commit != "unknown" and "GDN_COMMIT" not in os.environ:
        # dirty: the code that ran differs from the commit (results and docs do not count)
        dirty = _git("status", "--porcelain", "--", "src", "benchmarks",
                     ":!benchmarks/results", "pyproject.toml").splitlines()
        commit += "+dirty" if dirty else ""
    return {
        "device": name, "device_type": device.type, "torch": torch.__version__,
        "triton": triton_version, "python": platform.python_version(), "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_avg": list(os.getloadavg()) if device.type == "cpu" else None,
        "dirty_paths": [line.strip() for line in dirty], "argv": sys.argv[1:],
        # The knobs the kernels read (tiles.py, passes.py, launch.py): two runs of one commit
        # with different knobs are otherwise told apart only by their file names.
        "gdn_env": {key: value for key, value in sorted(os.environ.items())
                    if key.startswith("GDN_TRITON")},
    }


def results_stem(head: dict) -> str:
    """<device>-<date>-<commit>: the name of a results file, from its header."""
    slug = re.sub(r"[^a-z0-9]+", "-", re.sub(r"\((r|tm)\)", "", head["device"].lower()))
    return f"{slug.strip('-')}-{head['date'][:10]}-{head['commit'].replace('+', '-')}"


def parse_cases(shapes: list[str], variants: list[str]) -> list[Case]:
    """Names from CASES, or ad-hoc `B,T,H,K,V[,HV]` shapes, one case per variant."""
    cases = []
    for spec in shapes:
        if spec in CASES:
            cases.append(CASES[spec])
            continue
        sizes = [int(s) for s in spec.split(",")] if re.fullmatch(r"\d+(,\d+){4,5}", spec) else []
        if not sizes:
            raise ValueError(f"--shapes: {spec!r} is neither a case ({', '.join(CASES)}) nor "
                             "B,T,H,K,V[,HV]")
        cases += [Case("x".join(map(str, sizes)), *sizes[:5], HV=sizes[5] if len(sizes) > 5
                       else 0, variant=v) for v in variants]
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
        epilog=__doc__.split("\n\n")[1])
    parser.add_argument("--shapes", nargs="+", help="case names or B,T,H,K,V[,HV] "
                        "(default: cpu-gdn on CPU, the ANCHORS shapes on CUDA)")
    parser.add_argument("--variants", default="gated_delta_rule",
                        help=f"for B,T,H,K,V shapes, comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", help="comma list (default float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--backends", default="torch,reference", help=f"of {', '.join(BACKENDS)}")
    parser.add_argument("--repeats", type=int, default=3, help="wall-clock repeats (CPU)")
    parser.add_argument("--budget-s", type=float, default=30.0,
                        help="stop repeating a measurement after this many seconds (CPU)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--tag", default="", help="suffix of the results file name, e.g. 1thread")
    parser.add_argument("--no-save", action="store_true", help="print only; write no files")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible to torch")
    try:
        variants = args.variants.split(",")
        if bad := [v for v in variants if v not in VARIANTS]:
            raise ValueError(f"--variants: unknown {bad}; choose from {', '.join(VARIANTS)}")
        cases = parse_cases(args.shapes or DEFAULT_CASES[device.type], variants)
    except ValueError as err:
        parser.error(str(err))
    dtypes_arg = args.dtype or ("float32" if device.type == "cpu" else "bfloat16")
    dtypes = [getattr(torch, d, None) for d in dtypes_arg.split(",")]
    if not all(isinstance(d, torch.dtype) and d.is_floating_point for d in dtypes):
        parser.error(f"--dtype: {dtypes_arg!r} is not a list of torch float dtypes")
    backends = [BACKENDS.get(b) for b in args.backends.split(",")]
    if None in backends:
        parser.error(f"--backends: {args.backends!r}; choose from {', '.join(BACKENDS)}")
    if not re.fullmatch(r"[A-Za-z0-9._-]*", args.tag):
        parser.error(f"--tag: {args.tag!r} must be letters, digits, '.', '_' or '-'")
    if args.threads:
        torch.set_num_threads(args.threads)

    head = header(device)
    rows, truths = [], {}
    for case in cases:
        for dtype in dtypes:
            for backend in backends:
                print(f"{case.name} {dtype} {backend.name} ...", file=sys.stderr, flush=True)
                rows.append(measure(case, backend, dtype, device, args, truths))
        truths.clear()
    if device.type == "cpu":  # other work on the machine shows up in CPU timings
        head["load_avg_end"] = list(os.getloadavg())
    result = {"header": head, "rows": rows}

    print(f"\n{head['device']} · torch {head['torch']} · Triton {head['triton']} · "
          f"commit {head['commit']} · {head['threads']} threads")
    print("\n".join(render.table(rows)))
    if args.no_save:
        return
    stem = results_stem(head)
    path = unused_path(args.out, f"{stem}-{args.tag}" if args.tag else stem)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    print(f"wrote {render.render(args.out)}")



def unused_path(folder: Path, name: str) -> Path:
    """folder/name.json, or name-2.json, -3 … if taken: runs of one commit with the same tag
    (one case per process, say) must not overwrite each other's results."""
    path, n = folder / f"{name}.json", 1
    while path.exists():
        n += 1
        path = folder / f"{name}-{n}.json"
    return path


if __name__ == "__main__":
    main()
