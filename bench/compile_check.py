"""Compile every autotune config of dreamfuse's Triton kernels for one GPU architecture, without a GPU.

    python -m bench.compile_check --arch 90                  # every config of every variant, sm_90
    python -m bench.compile_check --arch 90 --ops attention --dtypes fp16 --jobs 2

The GPU suite's kernels are JIT-compiled on the GPU machine by *its* Triton (3.6 on the lent H100/H200, while
this project is tested with a newer one), and autotuning compiles every config of a kernel's space, not the one
config per variant that ``python -m dreamfuse.kernels.aot`` builds. This runs the same
``triton.compile(ASTSource(...), target=GPUTarget("cuda", ARCH, 32))`` over the variants of ``kernels/aot.py``
(head dims, dtypes, AMA/plain, flows, BLOCK_R ...) times every config of the kernel's autotune space (its
``_keep`` rules applied; its shape-dependent prune is not, so a few configs the GPU run would never try are
compiled too). Run it in a throwaway venv holding the GPU machine's Triton (``pip install triton==3.6.*`` and a CPU
torch, with this checkout on ``PYTHONPATH`` as ``dreamfuse``) to learn, before the GPU session, whether the
kernels compile there. It prints, per op, the configs compiled, failures, configs over the architecture's
shared-memory limit (those fail at launch and the autotuner skips them) and the mean compile time per config, the
figure the suite's budget for autotuning is estimated from. Exit status 1 when any config fails to compile.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "0")

import triton  # noqa: E402
from dreamfuse.kernels import aot  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402


def autotune_configs(v: aot.Variant) -> list[tuple[int, int, dict]]:
    """``(num_warps, num_stages, kwargs)`` of every config of ``v``'s autotune space; the variant's own candidates
    for kernels that are not autotuned (the glue kernels, the cycle mask)."""
    mod_name, attr = v.module.split(".")
    if mod_name == "aot":
        return list(v.candidates)
    import importlib

    fn = getattr(importlib.import_module(f"dreamfuse.kernels.{mod_name}"), attr)
    if not isinstance(fn, Autotuner):
        return list(v.candidates)
    return [(c.num_warps, c.num_stages, dict(c.kwargs)) for c in fn.configs]


def _compile(job) -> dict:
    v, arch, (num_warps, num_stages, tile) = job
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = aot._jit_function(v)
    constexprs = {**v.constexprs, **tile}
    sig, _ = aot.signature(v, fn, constexprs)
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in (*v.pointers, *v.divisible)}
    t0 = time.perf_counter()
    row = dict(op=v.op, variant=v.name, config=f"{tile} w{num_warps} s{num_stages}")
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                           target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=num_warps, num_stages=num_stages, num_ctas=1, enable_fp_fusion=True))
    except Exception as e:  # noqa: BLE001 - reported, counted, exit 1
        return {**row, "ok": False, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}",
                "seconds": time.perf_counter() - t0}
    smem = k.metadata.shared + aot._static_shared(k.asm["cubin"], k.metadata.name)
    return {**row, "ok": True, "seconds": time.perf_counter() - t0, "smem": smem,
            "fits": smem <= aot.ARCH_SMEM_LIMIT.get(arch, aot.ARCH_SMEM_LIMIT[80])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability (default 90: H100/H200)")
    ap.add_argument("--ops", nargs="+", default=list(aot.OPS), choices=aot.OPS)
    ap.add_argument("--head-dims", type=int, nargs="+", default=list(aot.HEAD_DIMS))
    ap.add_argument("--dtypes", nargs="+", default=list(aot.DTYPES), choices=aot.DTYPES)
    ap.add_argument("--jobs", type=int, default=1, help="parallel compiles (processes; default 1)")
    ap.add_argument("--limit", type=int, default=None, help="at most this many configs per variant (a smoke test)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        ap.error("TRITON_INTERPRET is set: the kernels were defined as interpreter functions; unset it")

    jobs = []
    for v in aot.variants(args.ops, args.head_dims, args.dtypes):
        cfgs = autotune_configs(v)
        jobs += [(v, args.arch, c) for c in cfgs[: args.limit]]
    t0 = time.perf_counter()
    if args.jobs > 1:
        ctx = multiprocessing.get_context("fork")  # children inherit the imported kernels; no GPU is touched
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            rows = list(pool.map(_compile, jobs))
    else:
        rows = [_compile(j) for j in jobs]
    wall = time.perf_counter() - t0

    print(f"# Triton {triton.__version__}: every autotune config for sm_{args.arch} "
          f"({len(rows)} compiles in {wall:.0f} s, {args.jobs} job(s))\n")
    print("| op | variants | configs compiled | failed | over the smem limit | mean s / compile | max s |")
    print("|---|---|---|---|---|---|---|")
    for op in dict.fromkeys(r["op"] for r in rows):
        rs = [r for r in rows if r["op"] == op]
        secs = [r["seconds"] for r in rs]
        print(f"| {op} | {len({r['variant'] for r in rs})} | {len(rs)} | {sum(not r['ok'] for r in rs)} | "
              f"{sum(r['ok'] and not r['fits'] for r in rs)} | {statistics.mean(secs):.2f} | {max(secs):.2f} |")
    failed = [r for r in rows if not r["ok"]]
    for r in failed[:20]:
        print(f"FAILED {r['variant']} {r['config']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
