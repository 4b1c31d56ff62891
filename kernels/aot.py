"""Ahead-of-time compilation of dreamfuse's Triton kernels to cubins, for the native library (``native/kernels``).

    python -m dreamfuse.kernels.aot --arch 80,90 --out build/kernels

compiles every kernel variant the engine launches -- fused attention at head dims 40/64/80/160 x fp16/bf16 x
plain/AMA (AMA also in fp32, the TensorRT plugin's float32 T; int32 and int64 flows), the matching kernel and the
cycle-consistency mask (fp16/bf16/fp32), the composite blend, the multi-LoRA shrink and expand (fp16/bf16 x
BLOCK_R 16/32/64/128, expand with and without base), and the small glue kernels below -- with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", SM, 32))``. No GPU is needed: Triton lowers to PTX and
runs its bundled ptxas. The output directory then holds

* ``cubin/<variant>.sm<SM>.cubin``, one per variant and architecture;
* ``dreamfuse_kernel_variants.h``, the generated header the C library is built from: for each cubin its op,
  selection key, architecture, entry name, parameter list (``name:type`` in launch order, Triton's two trailing
  scratch pointers included), grid formula, num_warps, num_stages, dynamic shared memory and constexpr values;
* ``dreamfuse_kernel_cubins.S``, which embeds the cubins with ``.incbin`` (no multi-megabyte hex arrays to compile);
* ``manifest.json``, the same table for tools and tests.

One kernel source: the Triton code in ``kernels/*.py`` (read here, never copied). Next to it this module defines
three tiny Triton *glue* kernels, the parts that the Python launchers do with torch ops and a C launcher cannot:
the inverse row norms and the final max over the partial buffers of ``match_argmax``, and the per-item threshold of
``cycle_mask``. They run under the interpreter in ``tests/test_native.py`` against the torch expressions they
replace.

Configs: a GPU-less build cannot autotune, so each variant gets one config per architecture, chosen below from the
autotune spaces and pruning rules of the kernel files; a candidate whose shared memory exceeds the architecture's
per-block limit falls back to the next. Untuned on hardware: the choices are the ones the kernels' own comments
argue for.

Integer arguments are compiled as i32 and pointers with 16-byte divisibility hints; the C launchers check both
(values that do not fit int32 and misaligned pointers are refused, not silently mis-launched). A variant may also
compile named integer arguments (``Variant.divisible``) with a divisible-by-16 hint, as Triton's JIT does for such
values, so that masked rows load as 16-byte vectors; its C launcher refuses other values.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner, Heuristics

__all__ = ["Variant", "variants", "kernel_function", "signature", "compile_variant", "build", "main"]

# per-block shared memory (opt-in bytes) by compute capability: the limit a config must fit
ARCH_SMEM_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
HEAD_DIMS = (40, 64, 80, 160)
DTYPES = ("fp16", "bf16")
OPS = ("attention", "ama_attention", "match_argmax", "cycle_mask", "composite_blend", "lora_delta")
_PTX_TYPES = {"p": "u64", "i32": "u32", "fp32": "f32"}


# --------------------------------------------------------------------------------------------- glue kernels
@triton.jit
def _inv_norm_kernel(F, OUT, L, D, stride_b, stride_l, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    # 1/||f_l|| per row of (B, L, D) features (unit stride on D), fp32; zero rows give 0 (similarity 0, not NaN),
    # as matching._inv_norm. One program per (tile of rows, batch item).
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_L + tl.arange(0, BLOCK_L)
    r_ok = rows < L
    acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(
            F + b * stride_b + rows[:, None] * stride_l + cols[None, :],
            mask=r_ok[:, None] & (cols < D)[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += x * x
    n = tl.sqrt_rn(tl.sum(acc, 1))
    inv = tl.where(n > 0, tl.math.div_rn(tl.full([BLOCK_L], 1.0, tl.float32), tl.where(n > 0, n, 1.0)), 0.0)
    tl.store(OUT + b * L + rows, inv, mask=r_ok)


@triton.jit
def _argmax_finish_kernel(SIM, ARG, OUT_SIM, OUT_IDX, R, L, BLOCK: tl.constexpr):
    # Max over dim 1 of the (B, R, L) partial buffers of _match_argmax_fwd_kernel, keeping the first maximal entry
    # (strict '>' from r = 0 up: torch.max's lowest-index rule, as the Python launcher's max + gather).
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < L
    base = b * R * L + offs
    best = tl.load(SIM + base, mask=ok, other=float("-inf"))
    idx = tl.load(ARG + base, mask=ok, other=0)
    for r in range(1, R):
        s = tl.load(SIM + base + r * L, mask=ok, other=float("-inf"))
        a = tl.load(ARG + base + r * L, mask=ok, other=0)
        upd = s > best
        best = tl.where(upd, s, best)
        idx = tl.where(upd, a, idx)
    tl.store(OUT_SIM + b * L + offs, best, mask=ok)
    tl.store(OUT_IDX + b * L + offs, idx.to(OUT_IDX.dtype.element_ty), mask=ok)


@triton.jit
def _cycle_threshold_kernel(FG, THR, N, stride_b, scale, BLOCK: tl.constexpr):
    # thr[b] = lambda_c * height * sum(fg[b]) / N in fp32, the expression of matching._launch_cycle; `scale` is
    # lambda_c * height rounded once to fp32 (as torch does with the Python scalar). One program per batch item.
    b = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for n0 in range(0, N, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        acc += tl.load(FG + b * stride_b + offs, mask=offs < N, other=0.0).to(tl.float32)
    total = tl.sum(acc, 0)
    tl.store(THR + b, tl.math.div_rn(scale * total, N.to(tl.float32)))


# --------------------------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """One kernel specialization: what ``triton.compile`` needs and what the C launcher selects it by."""

    op: str  # the C launcher that uses it: attention, ama_attention, match_argmax, ... (glue kernels too)
    module: str  # attribute path of the @triton.jit function: "attention._attention_fwd_kernel"
    key: dict  # selection key (sorted into "k=v;k=v" for the C side)
    pointers: dict  # pointer argument -> Triton element type ("fp16", "i64", ...)
    constexprs: dict
    grid: tuple[str, str, str]  # the launch grid, in the kernel's argument/constexpr names
    candidates: tuple  # ((num_warps, num_stages, {constexpr overrides}), ...) tried in order
    floats: tuple = ()  # fp32 scalar arguments; every other non-pointer, non-constexpr argument is i32
    name: str = field(default="")
    divisible: tuple = ()  # i32 arguments compiled as multiples of 16 (the C launcher refuses other values)

    @property
    def key_string(self) -> str:
        return ";".join(f"{k}={self.key[k]}" for k in sorted(self.key))


def _name(op: str, key: dict) -> str:
    return op + "".join(f"_{k}{v}" for k, v in sorted(key.items()))


def _v(op, module, key, pointers, constexprs, grid, candidates, floats=(), divisible=()) -> Variant:
    return Variant(op, module, key, pointers, constexprs, grid, tuple(candidates), tuple(floats), _name(op, key),
                   tuple(divisible))


def _attention_candidates(block_d: int, dtype: str):
    # (num_warps, num_stages, {BLOCK_M, BLOCK_N}) in order of preference, inside the autotune space of
    # attention.py and its _keep/_prune rules: BLOCK_M=128 only with 8 warps, BLOCK_N <= BLOCK_M,
    # BLOCK_D * BLOCK_N <= 256 * 64 (D=160 spills past it), and (checked after compiling) the shared-memory limit.
    if dtype == "fp32":
        # 4-byte tiles: half the rows of the 16-bit choices keep q + 2 stages of K/V under ~100 KiB
        if block_d <= 64:
            return [(8, 2, dict(BLOCK_M=128, BLOCK_N=64)), (4, 2, dict(BLOCK_M=64, BLOCK_N=32))]
        if block_d <= 128:
            return [(4, 2, dict(BLOCK_M=64, BLOCK_N=32)), (4, 1, dict(BLOCK_M=64, BLOCK_N=32))]
        # 64 x 256 fp32 accumulator: 8 warps so that it is 64 registers a thread, not 128
        return [(8, 1, dict(BLOCK_M=64, BLOCK_N=32)), (4, 1, dict(BLOCK_M=32, BLOCK_N=32))]
    if block_d <= 64:
        return [(8, 3, dict(BLOCK_M=128, BLOCK_N=64)), (4, 2, dict(BLOCK_M=64, BLOCK_N=64))]
    if block_d <= 128:
        return [(8, 2, dict(BLOCK_M=128, BLOCK_N=64)), (4, 2, dict(BLOCK_M=64, BLOCK_N=64))]
    # D=160 -> 256 lanes: a 128-row fp32 accumulator alone is 128 registers a thread, so 64 query rows.
    return [
        (4, 2, dict(BLOCK_M=64, BLOCK_N=64)),
        (4, 2, dict(BLOCK_M=64, BLOCK_N=32)),
        (4, 1, dict(BLOCK_M=64, BLOCK_N=32)),
    ]


def _lora_variants(dtypes) -> list[Variant]:
    """``dfk_lora_delta``'s two kernels (lora._lora_shrink_kernel then lora._lora_expand_kernel) per dtype and
    BLOCK_R (the pool's r_max rounded up to a power of two >= 16). Sizes and row strides are compiled as multiples
    of 16 (``divisible``): every SD / SDXL width is one, and a pool's r_max is padded to one at no cost."""
    out = []
    idx = dict(RANKS="i32", SEG_STARTS="i32", SEG_ADAPTER="i32", SEG_SCALE="fp32")
    for dt in dtypes:
        for br in (16, 32, 64, 128):
            # shrink: 64 tokens, x and A tiles pipelined over d_in; 8 warps from BLOCK_R = 64 on (lora._shrink_prune:
            # at most 32 accumulator registers a thread), 2 stages at 128 (48 KiB of smem on sm_90)
            cx = dict(BLOCK_R=br, DOT_PRECISION=None, INTERP_BF16=False)
            w = 4 if br <= 32 else 8
            out.append(
                _v(
                    "lora_shrink",
                    "lora._lora_shrink_kernel",
                    dict(block_r=br, dtype=dt),
                    dict(X=dt, A=dt, V=dt, **idx),
                    cx,
                    ("cdiv(T, BLOCK_M)", "K", "1"),
                    [(w, 3 if br <= 64 else 2, dict(BLOCK_M=64, BLOCK_K=64)), (w, 2, dict(BLOCK_M=64, BLOCK_K=32))],
                    divisible=("stride_xt", "stride_an", "stride_ar", "stride_vk", "D_IN"),
                )
            )
            for base in (False, True):
                # expand: 64 x 64 outputs a program; 8 warps from BLOCK_R = 64 on (lora._expand_prune: at most 64
                # operand elements a thread)
                out.append(
                    _v(
                        "lora_expand",
                        "lora._lora_expand_kernel",
                        dict(base=int(base), block_r=br, dtype=dt),
                        dict(V=dt, B=dt, BASE=dt, OUT=dt, **idx),
                        dict(cx, HAS_BASE=base),
                        ("cdiv(T, BLOCK_M)", "cdiv(D_OUT, BLOCK_N)", "1"),
                        [(w, 1, dict(BLOCK_M=64, BLOCK_N=64))],
                        divisible=("stride_vk", "stride_bn", "stride_bo", "stride_baset", "stride_ot", "D_OUT",
                                   "R_MAX"),
                    )
                )
    return out


def variants(ops=OPS, head_dims=HEAD_DIMS, dtypes=DTYPES) -> list[Variant]:
    """Every variant of ``ops`` (glue kernels included with the op that launches them)."""
    out: list[Variant] = []
    for op in ops:
        if op in ("attention", "ama_attention"):
            ama = op == "ama_attention"
            for d in head_dims:
                block_d = max(16, triton.next_power_of_2(d))  # as attention._attention_fwd
                # AMA also in fp32: the TensorRT plugin's T may be float32 (export/plugins.py), with int32 flows
                for dt in (*dtypes, "fp32") if ama else dtypes:
                    flows = (("i32", "i64") if dt != "fp32" else ("i32",)) if ama else (None,)
                    # fp32: 3xTF32 as attention._dot_precision with torch's default allow_tf32=False
                    prec = "tf32x3" if dt == "fp32" else None
                    for fl in flows:
                        key = dict(dtype=dt, head_dim=d) | (dict(flow=fl) if ama else {})
                        ptrs = dict(
                            Q=dt,
                            K=dt,
                            V=dt,
                            VREF=dt,
                            O=dt,
                            LSE="fp32",
                            FLOW=fl if ama else "fp32",
                            MASK=dt if ama else "fp32",
                        )
                        cx = dict(HEAD_DIM=d, BLOCK_D=block_d, AMA=ama, DOT_PRECISION=prec, INTERP_BF16=False, SA=8)
                        out.append(
                            _v(
                                op,
                                "attention._attention_fwd_kernel",
                                key,
                                ptrs,
                                cx,
                                ("cdiv(Lq, BLOCK_M)", "B * H", "1"),
                                _attention_candidates(block_d, dt),
                                floats=("qk_scale",),
                            )
                        )
        elif op == "match_argmax":
            for dt in (*dtypes, "fp32"):
                # fp32 features: 3xTF32 as matching._dot_precision on sm_80+ (argmax needs ~1e-6 similarities)
                prec = "tf32x3" if dt == "fp32" else "tf32"
                ptrs = dict(
                    FT=dt,
                    FR=dt,
                    INV_T="fp32",
                    INV_R="fp32",
                    ROW_SIM="fp32",
                    ROW_ARG="i32",
                    COL_SIM="fp32",
                    COL_ARG="i32",
                )
                cx = dict(UPCAST=False, DOT_PRECISION=prec)
                # 128x128 score tiles on 8 warps (matching._keep), 3 stages: 48 KiB at fp16, 96 KiB at fp32.
                out.append(
                    _v(
                        op,
                        "matching._match_argmax_fwd_kernel",
                        dict(dtype=dt),
                        ptrs,
                        cx,
                        ("cdiv(N, BLOCK_M)", "S", "B"),
                        [
                            (8, 3, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32)),
                            (4, 3, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)),
                        ],
                    )
                )
                out.append(
                    _v(
                        "match_inv_norm",
                        "aot._inv_norm_kernel",
                        dict(dtype=dt),
                        dict(F=dt, OUT="fp32"),
                        {},
                        ("cdiv(L, BLOCK_L)", "B", "1"),
                        [(4, 1, dict(BLOCK_L=32, BLOCK_D=64))],
                    )
                )
            for idx in ("i32", "i64"):
                ptrs = dict(SIM="fp32", ARG="i32", OUT_SIM="fp32", OUT_IDX=idx)
                out.append(
                    _v(
                        "match_finish",
                        "aot._argmax_finish_kernel",
                        dict(index=idx),
                        ptrs,
                        {},
                        ("cdiv(L, BLOCK)", "B", "1"),
                        [(4, 1, dict(BLOCK=512))],
                    )
                )
        elif op == "cycle_mask":
            for fl in ("i32", "i64"):
                for dt in (*dtypes, "fp32"):
                    ptrs = dict(T2R=fl, R2T=fl, FG=dt, THR="fp32", OUT=dt)
                    # one wide tile a program (matching._launch_cycle's GPU block)
                    out.append(
                        _v(
                            op,
                            "matching._cycle_mask_fwd_kernel",
                            dict(dtype=dt, flow=fl),
                            ptrs,
                            {},
                            ("cdiv(N, BLOCK)", "B", "1"),
                            [(4, 1, dict(BLOCK=1024))],
                        )
                    )
            for dt in (*dtypes, "fp32"):
                out.append(
                    _v(
                        "cycle_threshold",
                        "aot._cycle_threshold_kernel",
                        dict(dtype=dt),
                        dict(FG=dt, THR="fp32"),
                        {},
                        ("B", "1", "1"),
                        [(4, 1, dict(BLOCK=1024))],
                        floats=("scale",),
                    )
                )
        elif op == "composite_blend":
            for dt in (*dtypes, "fp32"):
                for per_seg in (False, True):
                    for bc in (4, 16):
                        key = dict(block_c=bc, dtype=dt, per_segment_guidance=int(per_seg))
                        # masks and per-segment guidance in the predictions' dtype (the plugin's T)
                        ptrs = dict(U=dt, CND=dt, M=dt, G=dt, OUT=dt)
                        cx = dict(PER_SEG_G=per_seg, FLAT=True, BLOCK_C=bc)
                        # bandwidth-bound: 512 pixels on 4 warps = 4 pixels a thread (composite._configs' keep())
                        out.append(
                            _v(
                                op,
                                "composite._composite_blend_fwd_kernel",
                                key,
                                ptrs,
                                cx,
                                ("cdiv(HW, BLOCK_P)", "cdiv(C, BLOCK_C)", "B"),
                                [(4, 1, dict(BLOCK_P=512))],
                                floats=("g_scale",),
                            )
                        )
        elif op == "lora_delta":
            out += _lora_variants(dtypes)
        else:
            raise ValueError(f"ops: unknown op {op!r} (known: {', '.join(OPS)})")
    return out


# --------------------------------------------------------------------------------------------- compiling
def kernel_function(v: Variant):
    """The ``@triton.jit`` function of ``v`` (an ``InterpretedFunction`` under ``TRITON_INTERPRET=1``)."""
    from . import attention, composite, lora, matching

    mod_name, attr = v.module.split(".")
    # "aot" is this module (also when run as __main__, where sys.modules has no dreamfuse.kernels.aot)
    mods = dict(attention=attention, composite=composite, lora=lora, matching=matching)
    fn = globals()[attr] if mod_name == "aot" else getattr(mods[mod_name], attr)
    while isinstance(fn, (Autotuner, Heuristics)):
        fn = fn.fn  # the autotuner (or heuristics) wrapping the kernel
    return fn


def _jit_function(v: Variant):
    fn = kernel_function(v)
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError(f"{v.module} is not a compiled @triton.jit kernel (TRITON_INTERPRET is set?)")
    return fn


def signature(v: Variant, fn, constexprs: dict) -> tuple[dict, list[tuple[str, str]]]:
    """Triton's signature dict and the launch parameter list ``[(name, type)]`` (``p`` = pointer)."""
    sig, params = {}, []
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in v.pointers:
            sig[name] = "*" + v.pointers[name]
            params.append((name, "p"))
        elif name in v.floats:
            sig[name] = "fp32"
            params.append((name, "fp32"))
        else:  # ints; a pointer missing from v.pointers lands here and fails the PTX check in compile_variant
            sig[name] = "i32"
            params.append((name, "i32"))
    missing = set(v.pointers) | set(v.floats) | set(constexprs)
    missing -= set(fn.arg_names)
    if missing:
        raise RuntimeError(f"{v.module}: kernels/aot.py names arguments the kernel no longer has: {sorted(missing)}")
    # Triton appends the global and profile scratch pointers to every kernel's parameters.
    return sig, params + [("global_scratch", "p"), ("profile_scratch", "p")]


def _ptx_params(ptx: str, entry: str) -> list[str]:
    m = re.search(r"\.entry\s+" + re.escape(entry) + r"\s*\(([^)]*)\)", ptx)
    if m is None:
        raise RuntimeError(f"no .entry {entry} in the PTX")
    return re.findall(r"\.param\s+\.(\w+)", m.group(1))


def _static_shared(cubin: bytes, entry: str) -> int:
    """Bytes of static shared memory of ``entry`` in a cubin (ELF64): the size of its ``.nv.shared.<entry>``
    section. Triton's kernels use dynamic shared memory, but sm_90 cubins reserve 1 KiB statically on top, and
    the per-block limit counts both."""
    shoff = int.from_bytes(cubin[0x28:0x30], "little")
    shentsize, shnum, shstrndx = (int.from_bytes(cubin[o : o + 2], "little") for o in (0x3A, 0x3C, 0x3E))
    sec = lambda i: cubin[shoff + i * shentsize : shoff + (i + 1) * shentsize]
    strtab = int.from_bytes(sec(shstrndx)[0x18:0x20], "little")
    for i in range(shnum):
        h = sec(i)
        start = strtab + int.from_bytes(h[0:4], "little")
        if cubin[start : cubin.index(b"\0", start)].decode() == f".nv.shared.{entry}":
            return int.from_bytes(h[0x20:0x28], "little")
    return 0


def compile_variant(v: Variant, arch: int) -> dict:
    """Compile ``v`` for ``sm_<arch>``; returns the manifest entry with the cubin bytes under ``"cubin"``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(v)
    limit = ARCH_SMEM_LIMIT.get(arch, ARCH_SMEM_LIMIT[80])
    tried = []
    for num_warps, num_stages, tile in v.candidates:
        constexprs = {**v.constexprs, **tile}
        sig, params = signature(v, fn, constexprs)
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in (*v.pointers, *v.divisible)}
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
        opts = dict(num_warps=num_warps, num_stages=num_stages, num_ctas=1, enable_fp_fusion=True)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
        md = k.metadata
        static = _static_shared(k.asm["cubin"], md.name)
        tried.append(f"{tile} w{num_warps} s{num_stages}: {md.shared} + {static} B")
        if md.shared + static > limit:
            continue
        # What the C launcher passes must be exactly what the kernel declares: count and PTX types.
        ptx = _ptx_params(k.asm["ptx"], md.name)
        want = [_PTX_TYPES[t] for _, t in params]
        if ptx != want:
            raise RuntimeError(f"{v.name} sm_{arch}: PTX parameters {ptx} != launcher parameters {want}")
        for flag in ("global_scratch_size", "profile_scratch_size", "tmem_size"):
            if getattr(md, flag, 0):
                raise RuntimeError(f"{v.name} sm_{arch}: {flag}={getattr(md, flag)}; the C launcher passes no scratch")
        if md.launch_pdl or md.launch_cooperative_grid or md.num_ctas != 1:
            raise RuntimeError(f"{v.name} sm_{arch}: needs cuLaunchKernelEx attributes the C launcher does not set")
        return dict(
            name=v.name,
            op=v.op,
            key=v.key_string,
            arch=arch,
            entry=md.name,
            params=params,
            grid=list(v.grid),
            num_warps=num_warps,
            num_stages=num_stages,
            shared=md.shared,
            static_shared=static,
            constexprs={k2: _const_value(x) for k2, x in constexprs.items()},
            divisible=list(v.divisible),
            triton=triton.__version__,
            cubin=k.asm["cubin"],
        )
    raise RuntimeError(f"{v.name} sm_{arch}: no config fits {limit} B of shared memory ({'; '.join(tried)})")


def _const_value(x):
    # constexprs go to the C side as integers (bools 0/1); strings and None stay in the manifest only
    return int(x) if isinstance(x, (bool, int)) else x


def _compile_job(job):
    v, arch = job
    return compile_variant(v, arch)


# --------------------------------------------------------------------------------------------- outputs
def _write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``path`` through a temporary file in its folder and ``os.replace``: a build never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _c_string(s: str) -> str:
    return json.dumps(s)  # a JSON string of ASCII is a valid C string literal


def _header(entries: list[dict], archs: list[int]) -> str:
    lines = [
        "/* Generated by `python -m dreamfuse.kernels.aot` from the Triton kernels in kernels/: do not edit, rebuild.",
        f" * triton {triton.__version__}; {len(entries)} cubins for sm_{', sm_'.join(map(str, archs))}.",
        " * Included by exactly one source file (native/kernels/src/registry.cpp), after dfk_variant.h. */",
        "#pragma once",
        f"#define DFK_AOT_TRITON_VERSION {_c_string(triton.__version__)}",
        f"#define DFK_AOT_ARCHS {_c_string(','.join(map(str, archs)))}",
        f"#define DFK_AOT_NUM_VARIANTS {len(entries)}",
        "",
    ]
    for i, e in enumerate(entries):
        lines.append(
            f"extern const unsigned char dfk_cubin_{i}[], dfk_cubin_{i}_end[];  /* {e['name']}.sm{e['arch']} */"
        )
    lines.append("")
    for i, e in enumerate(entries):
        ints = [(k, x) for k, x in sorted(e["constexprs"].items()) if isinstance(x, int)]
        body = ", ".join(f"{{{_c_string(k)}, {x}}}" for k, x in ints)
        lines.append(f"static const dfk_const dfk_consts_{i}[] = {{{body}}};")
    lines += ["", "static const dfk_variant dfk_variants[DFK_AOT_NUM_VARIANTS] = {"]
    for i, e in enumerate(entries):
        params = ",".join(f"{n}:{t}" for n, t in e["params"])
        n_int = sum(isinstance(x, int) for x in e["constexprs"].values())
        lines += [
            f"    /* {e['name']} sm_{e['arch']}: grid ({', '.join(e['grid'])}) */",
            f"    {{{_c_string(e['op'])}, {_c_string(e['key'])}, {_c_string(e['name'])}, {e['arch']}, "
            f"{_c_string(e['entry'])},",
            f"     {_c_string(params)},",
            f"     {_c_string(', '.join(e['grid']))}, {e['num_warps']}, {e['num_stages']}, {e['shared']}, "
            f"{e['static_shared']}, "
            f"dfk_consts_{i}, {n_int}, dfk_cubin_{i}, dfk_cubin_{i}_end}},",
        ]
    lines += ["};", ""]
    return "\n".join(lines)


def _assembly(entries: list[dict], cubin_paths: list[Path]) -> str:
    lines = [
        "/* Generated by `python -m dreamfuse.kernels.aot`: the cubins, embedded read-only. */",
        '.section .note.GNU-stack,"",@progbits',
        ".section .rodata",
    ]
    for i, path in enumerate(cubin_paths):
        lines += [
            ".balign 64",
            f".globl dfk_cubin_{i}",
            f".hidden dfk_cubin_{i}",
            f"dfk_cubin_{i}:",
            f".incbin {_c_string(str(path.resolve()))}",
            f".globl dfk_cubin_{i}_end",
            f".hidden dfk_cubin_{i}_end",
            f"dfk_cubin_{i}_end:",
            ".byte 0",
        ]
    return "\n".join(lines) + "\n"


def build(
    out: Path, archs: list[int], ops=OPS, head_dims=HEAD_DIMS, dtypes=DTYPES, jobs: int = 1, log=print
) -> list[dict]:
    """Compile every variant for every arch into ``out``; returns the manifest entries (without cubin bytes)."""
    t0 = time.perf_counter()
    vs = variants(ops, head_dims, dtypes)
    jobs_list = [(v, a) for a in archs for v in vs]
    if jobs > 1 and len(jobs_list) > 1:
        # fork: the children inherit the imported kernels; nothing here has touched a GPU
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            entries = list(pool.map(_compile_job, jobs_list))
    else:
        entries = [_compile_job(j) for j in jobs_list]
    paths = []
    for e in entries:
        path = out / "cubin" / f"{e['name']}.sm{e['arch']}.cubin"
        _write_atomic(path, e.pop("cubin"))
        e["cubin_file"] = str(path.relative_to(out))
        e["cubin_bytes"] = path.stat().st_size
        paths.append(path)
    _write_atomic(out / "dreamfuse_kernel_cubins.S", _assembly(entries, paths))
    _write_atomic(
        out / "manifest.json", json.dumps(dict(triton=triton.__version__, archs=archs, kernels=entries), indent=1)
    )
    _write_atomic(out / "dreamfuse_kernel_variants.h", _header(entries, archs))  # last: CMake's output
    dt = time.perf_counter() - t0
    size = sum(e["cubin_bytes"] for e in entries)
    log(
        f"dreamfuse.kernels.aot: {len(entries)} cubins ({len(vs)} variants x sm_{', sm_'.join(map(str, archs))}, "
        f"{size / 2**20:.1f} MiB) in {dt:.1f} s with {jobs} job(s) -> {out}"
    )
    return entries


# --------------------------------------------------------------------------------------------- CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (the project's CLI convention)
        self.exit(2, f"dreamfuse.kernels.aot: error: {message}\n")


def _int_list(allowed=None):
    # argparse prefixes these messages with "argument --name: "
    def parse(text: str) -> list[int]:
        items = [s.strip() for s in text.split(",")]
        if not text.strip() or not all(re.fullmatch(r"\d+", s) for s in items):
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
        vals = [int(s) for s in items]
        bad = [x for x in vals if allowed is not None and x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad[0]} is not one of {', '.join(map(str, allowed))}")
        return list(dict.fromkeys(vals))

    return parse


def _name_list(allowed):
    def parse(text: str) -> list[str]:
        vals = [s.strip() for s in text.split(",") if s.strip()]
        bad = [x for x in vals if x not in allowed] or ([] if vals else [repr(text)])
        if bad:
            raise argparse.ArgumentTypeError(f"{bad[0]} is not one of {', '.join(allowed)}")
        return list(dict.fromkeys(vals))

    return parse


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m dreamfuse.kernels.aot",
        description="Compile dreamfuse's Triton kernels to cubins and the C header of the native library "
        "(no GPU needed).",
    )
    p.add_argument(
        "--arch",
        required=True,
        type=_int_list(sorted(ARCH_SMEM_LIMIT)),
        help="CUDA compute capabilities, e.g. 80,90 (sm_80 cubins also run on sm_86/sm_89)",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder, e.g. build/kernels")
    p.add_argument("--ops", type=_name_list(OPS), default=list(OPS), help=f"subset of {','.join(OPS)}")
    p.add_argument(
        "--head-dims", type=_int_list(), default=list(HEAD_DIMS), help="attention head dims (default 40,64,80,160)"
    )
    p.add_argument(
        "--dtypes",
        type=_name_list(DTYPES),
        default=list(DTYPES),
        help="attention/matching dtypes (default fp16,bf16; matching and blend add fp32)",
    )
    p.add_argument("--jobs", "-j", type=int, default=min(os.cpu_count() or 1, 8), help="parallel compiles")
    p.add_argument("--list", action="store_true", help="print the variants and exit without compiling")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    bad_dims = [d for d in args.head_dims if not 0 < d <= 256]
    if bad_dims:
        print(f"dreamfuse.kernels.aot: error: --head-dims: {bad_dims[0]} is outside 1..256", file=sys.stderr)
        return 2
    if args.list:
        for v in variants(args.ops, args.head_dims, args.dtypes):
            print(f"{v.op:16s} {v.key_string:48s} {v.module}")
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # The kernels were defined as interpreter functions at import: compile from a fresh interpreter instead.
        if os.environ.get("_DREAMFUSE_AOT_REEXEC"):
            print("dreamfuse.kernels.aot: error: TRITON_INTERPRET is set; unset it to compile", file=sys.stderr)
            return 2
        env = dict(os.environ, TRITON_INTERPRET="0", _DREAMFUSE_AOT_REEXEC="1")
        os.execve(sys.executable, [sys.executable, "-m", "dreamfuse.kernels.aot", *(argv or sys.argv[1:])], env)
    try:
        build(args.out, args.arch, args.ops, args.head_dims, args.dtypes, jobs=max(1, args.jobs))
    except (RuntimeError, OSError) as e:
        print(f"dreamfuse.kernels.aot: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
