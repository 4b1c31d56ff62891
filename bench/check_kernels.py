"""Every kernel against its reference at the shapes the benchmarks time, with the configs they will time (the GPU
suite's correctness stage), and the parallel compile that precedes it.

    python -m bench.check_kernels --json check.json        # CUDA: check; exit 1 when a family fails
    python -m bench.check_kernels --warm 12                # CUDA: compile every autotune config, 12 processes
    python -m bench.check_kernels --device cpu             # CPU: small shapes, the references' own path

Check. The shapes are the benchmark scripts' own (imported from them, so they cannot drift): attention at the SD1.5
512² and SDXL 1024² levels of ``bench.attention`` (self and cross), AMA at ``bench.ama_attention``'s levels,
``match_argmax`` at N = 1024 and 4096 with D = 512, ``composite_blend`` at ``bench.composite_blend``'s quick
shapes, ``lora_delta`` at ``bench.multi_lora_kernel``'s layers with 16 adapters over 16 rows; fp16, batch 2. The
rule is the kernel tests': ``err(kernel) <= 2 * err(torch at the inputs' precision) + atol`` against a float64
oracle (matching: the chosen index reaches the float64 maximum within that bound, and the reported similarities
are within it). Outside pytest the kernels autotune, and with ``TRITON_CACHE_AUTOTUNING=1`` (the suite sets it)
the choice is stored on disk and reused by every later process: this checks the very configs the benchmarks time,
and it is where the suite pays for autotuning, once. The table lists each case; ``--json`` writes
``{"families": {family: passed}, "rows": [...]}``, which gates the suite's timing stages.

Warm (``--warm N``): N processes each run the same workloads once with 1/N of every autotune space (its configs
``i::N`` after the kernel's own pruning) and no oracle. They compile in parallel what each process would otherwise
compile serially while autotuning, into Triton's on-disk cache, through the very launch path the benchmarks use
(the cache key is the same), so the check and the benchmarks find the binaries there. The timings these sharded
processes see are never kept (autotune caching is off for them, and their config lists differ anyway).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

FAMILIES = ("attention", "ama", "matching", "composite", "lora")


# --------------------------------------------------------------------------------------------- workloads
def _attention_cases(cuda: bool):
    from bench.attention import _shapes

    B = 2 if cuda else 1
    for res, Lq, Lk, D, H, kind in _shapes(cuda, False, [512, 1024] if cuda else [512]):
        yield f"{res}² {kind} B{B} H{H} {Lq}x{Lk} d{D}", (B, H, Lq, Lk, D)


def _ama_cases(cuda: bool):
    from bench.ama_attention import CPU_LEVELS, CUDA_LEVELS, HEADS

    for side, D in CUDA_LEVELS if cuda else CPU_LEVELS:
        yield f"B2 {side}x{side} h{HEADS} d{D}", (2, HEADS, side * side, D)


def _lora_cases(cuda: bool):
    from bench.multi_lora_kernel import CPU_SHAPES, GPU_SHAPES

    rows = 16 if cuda else 2
    for what, L, C in GPU_SHAPES if cuda else CPU_SHAPES:
        yield f"{what} {rows}x{L} x {C}", (rows, L, C)


def _qkv(B, H, Lq, Lk, D, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, L, H, D, generator=g).to(device, dtype).transpose(1, 2) for L in (Lq, Lk, Lk)]


def _err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _row(family, case, dtype, err, ref_err, atol, extra=""):
    bound = 2 * ref_err + atol
    ok = bool(err == err and err <= bound)  # NaN fails
    return dict(family=family, case=case, dtype=str(dtype).removeprefix("torch."), err=err, torch_err=ref_err,
                bound=bound, ok=ok, extra=extra)


def run_workloads(device, dtype, *, check: bool, only=FAMILIES) -> list[dict]:
    """Call every kernel at every case; with ``check``, compare with the oracle and return the rows. A family whose
    calls raise gets one failing row with the error (check) or a line on stderr (warm); the others still run."""
    rows = []
    for family in only:
        try:
            rows += _family(family, device, dtype, check)
        except Exception as e:  # noqa: BLE001 - a verdict, not a crash: the suite gates on it
            msg = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            print(f"{family}: raised {msg}", file=sys.stderr)
            rows.append(dict(family=family, case="(raised)", dtype=str(dtype).removeprefix("torch."), err=float("nan"),
                             torch_err=float("nan"), bound=float("nan"), ok=False, extra=msg))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return rows


def _family(family: str, device, dtype, check: bool) -> list[dict]:
    only = (family,)
    from dreamfuse.kernels import attention as attn
    from dreamfuse.kernels.composite import composite_blend, composite_blend_reference
    from dreamfuse.kernels.lora import lora_delta, lora_delta_reference, lora_segments
    from dreamfuse.kernels.matching import match_argmax

    cuda = device.type == "cuda"
    atol = {torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float32: 1e-5}[dtype]
    rows = []
    same = lambda q, k, v: torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1) @ v  # noqa: E731
    if "attention" in only:
        for case, (B, H, Lq, Lk, D) in _attention_cases(cuda):
            q, k, v = _qkv(B, H, Lq, Lk, D, device, dtype)
            out = attn.attention(q, k, v)
            if check:
                oracle = attn.attention_reference(q.double(), k.double(), v.double())
                rows.append(_row("attention", case, dtype, _err(out, oracle), _err(same(q, k, v), oracle), atol))
    if "ama" in only:
        for case, (B, H, L, D) in _ama_cases(cuda):
            q, k, vt = _qkv(B, H, L, L, D, device, dtype)
            g = torch.Generator().manual_seed(1)
            vr = torch.randn(B, L, H, D, generator=g).to(device, dtype).transpose(1, 2)
            flow = torch.randint(0, L, (B, L), generator=g).to(device)
            mask = (torch.rand(B, L, generator=g) * (torch.rand(B, L, generator=g) < 0.5)).to(device, dtype)
            out = attn.ama_attention(q, k, vt, vr, flow, mask)
            if check:
                m = mask[:, None, :, None]
                v_ref_w = torch.gather(vr, 2, flow[:, None, :, None].expand_as(vr))
                oracle = attn.ama_attention_reference(q.double(), k.double(), vt.double(), vr.double(), flow,
                                                      mask.double())
                v_w = (m * v_ref_w + (1 - m) * vt).to(dtype)
                rows.append(_row("ama", case, dtype, _err(out, oracle), _err(same(q, k, v_w), oracle), atol))
    if "matching" in only:
        for n in (1024, 4096) if cuda else (256,):
            g = torch.Generator().manual_seed(2)
            ft, fr = (torch.randn(2, n, 512, generator=g).to(device, dtype) for _ in range(2))
            t2r, r2t, t2r_sim, r2t_sim = match_argmax(ft, fr)
            if check:
                sim = torch.bmm(F.normalize(ft.double(), dim=-1), F.normalize(fr.double(), dim=-1).transpose(1, 2))
                sim_same = torch.bmm(F.normalize(ft, dim=-1), F.normalize(fr, dim=-1).transpose(1, 2))
                best_t, best_r = sim.max(2).values, sim.max(1).values
                # how far the chosen index falls short of the maximum, and the reported maxima's error
                short = max((best_t - sim.gather(2, t2r[..., None]).squeeze(2)).max().item(),
                            (best_r - sim.gather(1, r2t[:, None]).squeeze(1)).max().item())
                err = max(short, _err(t2r_sim, best_t), _err(r2t_sim, best_r))
                agree = (t2r == sim.argmax(2)).float().mean().item()
                rows.append(_row("matching", f"B2 N=M={n} D=512", dtype, err, _err(sim_same, sim), 1e-5,
                                 f"t2r = float64 argmax at {100 * agree:.2f}%"))
    if "composite" in only:
        from bench.composite_blend import C, _masks, _naive_blend

        for S, hw in ((2, 64), (8, 96)) if cuda else ((2, 16),):
            g = torch.Generator().manual_seed(3)
            u, c = (torch.randn(1, S, C, hw, hw, generator=g).to(device, dtype) for _ in range(2))
            m = _masks(1, S, hw, "bands", device, dtype)
            gs = (torch.rand(1, S, generator=g) * 8 + 1).to(device, dtype)
            out = composite_blend(u, c, m, gs)
            if check:
                oracle = composite_blend_reference(u.double(), c.double(), m.double(), gs.double())
                rows.append(_row("composite", f"B1 S{S} {hw}x{hw}", dtype, _err(out, oracle),
                                 _err(_naive_blend(u, c, m, gs), oracle), 1e-3))
    if "lora" in only:
        from bench.multi_lora_kernel import _SCALE, _groups, _setup, _torch_loop

        for case, (rows_, L, C_) in _lora_cases(cuda):
            x, W, A, B_, ranks = _setup(rows_, L, C_, 16, 16, device, dtype)
            mixed_rows = [i % 16 for i in range(rows_)]
            segs = lora_segments([[(a, _SCALE)] for a in mixed_rows], L, device=device)
            out = lora_delta(x, A, B_, ranks, *segs, base=F.linear(x, W))
            if check:
                oracle = F.linear(x.double(), W.double()) + lora_delta_reference(
                    x.double(), A.double(), B_.double(), ranks, *segs)
                naive = _torch_loop(x, W, A, B_, _groups(mixed_rows, L), _SCALE)
                rows.append(_row("lora", case, dtype, _err(out, oracle), _err(naive, oracle), atol))
    return rows


# --------------------------------------------------------------------------------------------- warm
def shard_autotuning(index: int, count: int) -> None:
    """Keep configs ``index::count`` of every autotune space, after the kernel's own pruning (at least one)."""
    from triton.runtime.autotuner import Autotuner

    prune = Autotuner.prune_configs

    def sharded(self, kwargs):
        configs = prune(self, kwargs)
        return configs[index::count] or configs[:1]

    Autotuner.prune_configs = sharded


def warm(jobs: int, device: str, dtype: str, timeout: float) -> int:
    env = {**os.environ, "TRITON_CACHE_AUTOTUNING": "0", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "bench.check_kernels", "--device", device, "--dtype", dtype]
    t0 = time.perf_counter()
    procs = [subprocess.Popen([*cmd, "--warm-shard", f"{i}/{jobs}"], env=env) for i in range(jobs)]
    rcs = []
    for p in procs:
        try:
            rcs.append(p.wait(timeout=max(1.0, timeout - (time.perf_counter() - t0))))
        except subprocess.TimeoutExpired:
            p.kill()
            rcs.append(124)
    print(f"warm: {jobs} processes in {time.perf_counter() - t0:.1f} s, return codes {rcs}")
    return 0 if all(rc == 0 for rc in rcs) else 1


# --------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"), help="default fp16 (what the suite times)")
    ap.add_argument("--only", nargs="+", default=list(FAMILIES), choices=FAMILIES, help="kernel families")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the families' verdicts and the rows")
    ap.add_argument("--warm", type=int, default=None, metavar="N",
                    help="compile every autotune config in N processes instead of checking")
    ap.add_argument("--warm-shard", default=None, metavar="I/N", help=argparse.SUPPRESS)
    ap.add_argument("--warm-timeout", type=float, default=120.0, help="seconds for --warm (default 120)")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if device.type == "cpu":
        dtype = torch.float32  # the references' path; half matmuls on CPU are slow and beside the point
    if args.warm is not None:
        if args.warm < 1:
            ap.error("--warm: at least one process")
        return warm(args.warm, device.type, args.dtype, args.warm_timeout)
    if args.warm_shard is not None:
        i, n = (int(x) for x in args.warm_shard.split("/"))
        shard_autotuning(i, n)
        run_workloads(device, dtype, check=False, only=args.only)
        return 0

    from bench._util import hardware, print_table

    t0 = time.perf_counter()
    rows = run_workloads(device, dtype, check=True, only=args.only)
    families = {f: all(r["ok"] for r in rows if r["family"] == f) for f in args.only if any(
        r["family"] == f for r in rows)}
    print(f"# kernels vs float64 oracles at the benchmarks' shapes — {hardware(device)}")
    print(f"rule: err <= 2 x err(torch at the inputs' precision) + atol; {time.perf_counter() - t0:.1f} s "
          f"(autotuning included)")
    print_table("correctness at the timed shapes",
                ["family", "case", "dtype", "max abs err", "torch same-precision err", "bound", "ok", "note"],
                [[r["family"], r["case"], r["dtype"], f"{r['err']:.3g}", f"{r['torch_err']:.3g}", f"{r['bound']:.3g}",
                  "yes" if r["ok"] else "**NO**", r["extra"]] for r in rows])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"families": families, "rows": rows}, f, indent=1)
    return 0 if all(families.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
