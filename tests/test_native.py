"""The native kernel library's Python side: ``python -m dreamfuse.kernels.aot`` and the data of its GPU test.

* The AOT CLI compiles a small variant set (no GPU) into cubins of the right architecture, a header and an
  ``.incbin`` assembly file whose parameter lists are the Triton kernels' own; bad options are one-line errors.
* The glue kernels of ``kernels/aot.py`` (what the Python launchers do with torch ops and the C launchers cannot)
  equal those torch expressions under the interpreter, and the C launcher's sequence for ``match_argmax``
  (inverse norms -> the matching kernel -> the finishing max), replayed here in the interpreter, equals
  ``match_argmax_reference``.
* :func:`write_gpu_data` writes inputs, fp64-oracle outputs and tolerances for ``native/kernels``'s C++ GPU test
  (``dfk_gpu_test``; ctest runs ``python tests/test_native.py --write-gpu-data DIR`` first). The ``gpu`` test runs
  that binary from the build folder (``DREAMFUSE_NATIVE_BUILD``, default ``build/``) on CUDA.

Tolerances follow the kernel tests: ``2 * err(torch at the inputs' precision) + atol`` against the fp64 oracle.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- GPU test data
def _np(t: torch.Tensor) -> np.ndarray:
    """A tensor as numpy for the C++ reader: bf16 as its uint16 bit pattern (numpy has no bf16)."""
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


_DT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64"}
_ATOL = {torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float32: 1e-5}


class _Writer:
    def __init__(self, out: Path):
        self.out, self.lines = out, []

    def case(self, name: str, op: str, inputs: dict, expect: dict, **params):
        """``inputs``: name -> tensor, or (storage tensor, perm) for a strided view (logical dim i = storage dim
        perm[i]); ``expect``: name -> (fp64 oracle, tolerance)."""
        d = self.out / name
        d.mkdir(parents=True, exist_ok=True)
        self.lines += [f"case {name}", f"op {op}"] + [f"param {k} {v}" for k, v in params.items()]
        for k, t in inputs.items():
            t, perm = t if isinstance(t, tuple) else (t, "")
            np.save(d / f"{k}.npy", _np(t))
            self.lines.append(f"input {k} {_DT[t.dtype]} {name}/{k}.npy {perm}".rstrip())
        for k, (t, tol) in expect.items():
            np.save(d / f"{k}.npy", t.detach().double().contiguous().numpy())
            assert math.isfinite(tol) and tol >= 0, (name, k, tol)
            self.lines.append(f"expect {k} {name}/{k}.npy {tol:.6g}")
        self.lines.append("end")

    def close(self):
        (self.out / "cases.txt").write_text("\n".join(self.lines) + "\n")  # last: the reader's index


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _attention_cases(w: _Writer, g: torch.Generator):
    from dreamfuse.kernels.attention import ama_attention_reference, attention_reference

    same = lambda q, k, v, s: torch.softmax((q @ k.transpose(-1, -2)) * s, dim=-1) @ v  # torch at q's precision
    B, H, Lq, Lk = 2, 3, 77, 100
    for D in (40, 64, 80, 160):
        for dt in (torch.float16, torch.bfloat16):
            # (B, L, H, D) storage seen as (B, H, L, D): the processors' layout
            q, k, v = (torch.randn(B, L, H, D, generator=g).to(dt) for L in (Lq, Lk, Lk))
            qv, kv, vv = (t.transpose(1, 2) for t in (q, k, v))
            scale = D**-0.5
            out, lse = attention_reference(qv.double(), kv.double(), vv.double(), scale=scale, return_lse=True)
            tol = 2 * _err(same(qv, kv, vv, scale), out) + _ATOL[dt]
            w.case(
                f"attention_d{D}_{_DT[dt]}",
                "attention",
                dict(q=(q, "0213"), k=(k, "0213"), v=(v, "0213")),
                dict(out=(out, tol), lse=(lse, 2e-5 + 1e-5 * lse.abs().max().item())),
                scale=f"{scale:.17g}",
            )
    for D, dt, fdt in (
        (40, torch.float16, torch.int64),
        (80, torch.bfloat16, torch.int32),
        (160, torch.float16, torch.int32),
        (64, torch.bfloat16, torch.int64),
        (40, torch.float32, torch.int32),
        (160, torch.float32, torch.int32),
    ):
        q, k, vt, vr = (torch.randn(B, H, L, D, generator=g).to(dt) for L in (Lq, Lk, Lk, Lk))
        flow = torch.randint(0, Lk, (B, Lk), generator=g)
        flow[0, :2] = torch.tensor([-5, Lk + 7])  # out of range: clamped into [0, Lk) by the kernel
        mask = torch.rand(B, Lk, generator=g)
        mask[:, ::7] = 0.0  # exact 0 and 1 read one side only
        mask[:, 1::7] = 1.0
        mask = mask.to(dt)
        fl = flow.clamp(0, Lk - 1)
        scale = D**-0.5
        out, lse = ama_attention_reference(
            q.double(), k.double(), vt.double(), vr.double(), fl, mask.double(), scale=scale, return_lse=True
        )
        m = mask[:, None, :, None]
        vw = (m * torch.gather(vr, 2, fl[:, None, :, None].expand(B, H, Lk, D)) + (1 - m) * vt).to(dt)
        tol = 2 * _err(same(q, k, vw, scale), out) + _ATOL[dt]
        w.case(
            f"ama_d{D}_{_DT[dt]}_{_DT[fdt]}",
            "ama_attention",
            dict(q=q, k=k, v_tgt=vt, v_ref=vr, flow=flow.to(fdt), mask=mask),
            dict(out=(out, tol), lse=(lse, 2e-5 + 1e-5 * lse.abs().max().item())),
            scale=f"{scale:.17g}",
        )


def _matching_cases(w: _Writer, g: torch.Generator):
    for (B, N, M, D), dt, ix in (
        ((2, 100, 67, 256), torch.float16, torch.int32),
        ((1, 64, 700, 512), torch.bfloat16, torch.int64),  # several column splits
        ((2, 37, 50, 64), torch.float32, torch.int32),
    ):
        ft = torch.randn(B, N, D, generator=g).to(dt)
        fr = torch.randn(B, M, D, generator=g).to(dt)
        fr[0, 3] = 0  # a zero row: similarity 0, not NaN
        norm = lambda f: f.double() / f.double().norm(dim=-1, keepdim=True).clamp_min(1e-300)
        sim = norm(ft) @ norm(fr).transpose(1, 2)
        tol = 1e-4 if dt != torch.float32 else 1e-5  # fp32 accumulation of exact products; 3xTF32 for fp32
        w.case(
            f"match_{B}x{N}x{M}x{D}_{_DT[dt]}",
            "match_argmax",
            dict(f_tgt=ft, f_ref=fr),
            dict(t2r_sim=(sim.amax(2), tol), r2t_sim=(sim.amax(1), tol), sim=(sim, 0.0)),
            index=_DT[ix],
            gap=f"{2 * tol:g}",
        )


def _cycle_cases(w: _Writer, g: torch.Generator):
    from dreamfuse.kernels.matching import cycle_mask_reference

    h, wd, B = 8, 12, 2
    n = h * wd
    for dt, fdt in ((torch.float16, torch.int32), (torch.float32, torch.int64), (torch.bfloat16, torch.int32)):
        # near-identity flows (most positions consistent) with random jumps, and two out-of-range values
        t2r = (torch.arange(n).repeat(B, 1) + torch.randint(-2, 3, (B, n), generator=g)).clamp(0, n - 1)
        jump = torch.rand(B, n, generator=g) < 0.3
        t2r = torch.where(jump, torch.randint(0, n, (B, n), generator=g), t2r)
        r2t = torch.randint(0, n, (B, n), generator=g)
        r2t = torch.where(torch.rand(B, n, generator=g) < 0.6, t2r.argsort(1), r2t)
        t2r[1, :2] = torch.tensor([-1, n + 3])
        fg = torch.rand(B, n, generator=g).to(dt)
        ok = (t2r >= 0) & (t2r < n)
        y = torch.gather(r2t, 1, torch.where(ok, t2r, 0))
        x = torch.arange(n)
        err = torch.sqrt(((y // wd - x // wd) ** 2 + (y % wd - x % wd) ** 2).double())
        lam = 0.4
        # keep every error clear of the threshold: fp32 sums in another order must decide the same way
        for _ in range(100):
            thr = (lam * h * fg.double().sum(1) / n)[:, None]
            if ((err - thr).abs() / thr).min() > 1e-3:
                break
            lam *= 1.0137
        out = cycle_mask_reference(torch.where(ok, t2r, 0), r2t, fg, height=h, width=wd, lambda_c=lam)
        out = torch.where(ok, out, torch.zeros_like(out))
        w.case(
            f"cycle_{_DT[dt]}_{_DT[fdt]}",
            "cycle_mask",
            dict(t2r=t2r.to(fdt), r2t=r2t.to(fdt), fg=fg),
            dict(out=(out, 0.0)),
            height=h,
            width=wd,
            lambda_c=f"{lam:.17g}",
        )


def _blend_cases(w: _Writer, g: torch.Generator):
    from dreamfuse.kernels.composite import composite_blend_reference

    for (B, S, C, h, wd), dt, guide in (
        ((2, 3, 4, 7, 9), torch.float16, 7.5),
        ((2, 3, 4, 16, 16), torch.bfloat16, "bs"),
        ((1, 2, 8, 5, 13), torch.float32, "s"),
    ):
        u = torch.randn(B, S, C, h, wd, generator=g).to(dt)
        c = (u.float() + 0.5 * torch.randn(B, S, C, h, wd, generator=g)).to(dt)
        m = torch.rand(B, S, h, wd, generator=g)
        m = torch.where(m < 0.25, torch.zeros_like(m), m)
        m[:, :, 0, :3] = 0  # uncovered pixels come out 0
        m = m.to(dt)
        gt = None if isinstance(guide, float) else (torch.rand(B, S, generator=g) * 8).to(dt)
        if guide == "s":
            gt = gt[0]  # (S,): broadcast over the batch
        gg = guide if gt is None else gt
        oracle = composite_blend_reference(u.double(), c.double(), m.double(), gg if gt is None else gt.double())
        gs = gg if gt is None else gt.to(dt).expand(B, S)[:, :, None, None, None]
        naive = (m[:, :, None] * (u + gs * (c - u))).sum(1) / m.sum(1).clamp_min(1e-6)[:, None]
        tol = 2 * _err(naive, oracle) + 10 * _ATOL[dt]
        inputs = dict(eps_uncond=u, eps_cond=c, masks=m) | ({} if gt is None else dict(guidance=gt))
        w.case(
            f"blend_{_DT[dt]}_{'scalar' if gt is None else 'g' + str(gt.ndim)}",
            "composite_blend",
            inputs,
            dict(out=(oracle, tol)),
            **({"guidance_scale": guide} if gt is None else {}),
        )


def _lora_cases(w: _Writer, g: torch.Generator):
    from dreamfuse.kernels.lora import lora_delta_reference, lora_segments

    # (rows, tokens a row, d_in, d_out, r_max, ranks, dtype, with base): rows with one adapter, none, and two; lanes
    # past each rank and the unused pool slot hold NaN (the kernels must never use them)
    for rows, L, d_in, d_out, r_max, ranks, dt, with_base in (
        (6, 77, 320, 640, 16, [16, 4, 1, 9], torch.float16, True),
        (5, 64, 640, 320, 64, [64, 8, 33, 16], torch.bfloat16, False),
        (3, 100, 768, 1280, 128, [128, 2, 16, 128], torch.float16, False),
    ):
        N = len(ranks)
        A = torch.randn(N, r_max, d_in, generator=g) / math.sqrt(d_in)
        B = torch.randn(N, d_out, r_max, generator=g) / math.sqrt(r_max)
        for n, r in enumerate(ranks):
            A[n, r:], B[n, :, r:] = float("nan"), float("nan")
        A[N - 1], B[N - 1] = float("nan"), float("nan")  # never referenced below
        A, B = A.to(dt), B.to(dt)
        pairs = [[(i % (N - 1), 0.5 + 0.25 * i)] if i % 3 != 1 else [] for i in range(rows)]
        pairs[-1] = [(0, 1.0), (1, -0.75)]
        st, ad, sc = lora_segments(pairs, L)
        rk = torch.tensor(ranks, dtype=torch.int32)
        T = rows * L
        x = torch.randn(T, d_in, generator=g).to(dt)
        base = torch.randn(T, d_out, generator=g).to(dt) if with_base else None
        oracle = lora_delta_reference(x.double(), A.double(), B.double(), rk, st, ad, sc,
                                      None if base is None else base.double())
        same = torch.zeros(T, d_out, dtype=dt) if base is None else base.clone()  # torch at the inputs' precision
        for s, (lo, hi) in enumerate(zip(st.tolist(), st.tolist()[1:])):
            for a, scale in zip(ad[s].tolist(), sc[s].tolist()):
                if a >= 0:
                    r = ranks[a]
                    same[lo:hi] += scale * ((x[lo:hi] @ A[a, :r].T) @ B[a, :, :r].T)
        tol = 2 * _err(same, oracle) + _ATOL[dt]
        inputs = dict(x=x, lora_a=A, lora_b=B, ranks=rk, seg_starts=st, seg_adapter=ad, seg_scale=sc)
        w.case(
            f"lora_{rows}x{L}_{d_in}to{d_out}_r{r_max}_{_DT[dt]}{'_base' if with_base else ''}",
            "lora_delta",
            inputs | ({} if base is None else dict(base=base)),
            dict(out=(oracle, tol)),
        )


def write_gpu_data(out: Path) -> Path:
    """Write the GPU test's cases into ``out`` (seeded, CPU only); returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    w = _Writer(out)
    g = torch.Generator().manual_seed(20240611)
    _attention_cases(w, g)
    _matching_cases(w, g)
    _cycle_cases(w, g)
    _blend_cases(w, g)
    _lora_cases(w, g)
    w.close()
    return out


def _read_cases(path: Path) -> list[dict]:
    cases, cur = [], None
    for line in (path / "cases.txt").read_text().splitlines():
        word, *rest = line.split()
        if word == "case":
            cur = dict(name=rest[0], params={}, inputs={}, expect={})
        elif word == "op":
            cur["op"] = rest[0]
        elif word == "param":
            cur["params"][rest[0]] = rest[1]
        elif word == "input":
            cur["inputs"][rest[0]] = (rest[1], np.load(path / rest[2]), rest[3] if len(rest) > 3 else "")
        elif word == "expect":
            cur["expect"][rest[0]] = (np.load(path / rest[1]), float(rest[2]))
        elif word == "end":
            cases.append(cur)
    return cases


if __name__ == "__main__":  # ctest: python tests/test_native.py --write-gpu-data DIR
    if len(sys.argv) != 3 or sys.argv[1] != "--write-gpu-data":
        sys.exit("usage: python tests/test_native.py --write-gpu-data DIR")
    print(f"wrote {len(_read_cases(write_gpu_data(Path(sys.argv[2]))))} cases to {sys.argv[2]}")
    sys.exit(0)


# --------------------------------------------------------------------------------------------- tests
import pytest  # noqa: E402 (the data writer above runs without pytest)
from dreamfuse.kernels import aot  # noqa: E402


def _elf_arch(blob: bytes) -> int:
    """The SM a cubin targets (as dfk_cubin_arch): e_flags bits 0-7 (ELF ABI v7) or 8-15 (v8)."""
    assert blob[:4] == b"\x7fELF" and int.from_bytes(blob[18:20], "little") == 190  # EM_CUDA
    flags = int.from_bytes(blob[48:52], "little")
    return (flags >> 8) & 0xFF if blob[8] >= 8 else flags & 0xFF


def test_aot_cli_compiles_a_small_set(tmp_path):
    # TRITON_INTERPRET=1 here (conftest): the CLI re-executes itself with the kernels compiled, not interpreted
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [
        sys.executable,
        "-m",
        "dreamfuse.kernels.aot",
        "--arch",
        "80",
        "--ops",
        "cycle_mask",
        "--out",
        str(tmp_path),
        "-j",
        "2",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    kernels = manifest["kernels"]
    assert {(k["op"], k["key"]) for k in kernels} == {
        *(("cycle_mask", f"dtype={d};flow={f}") for d in ("fp16", "bf16", "fp32") for f in ("i32", "i64")),
        *(("cycle_threshold", f"dtype={d}") for d in ("fp16", "bf16", "fp32")),
    }
    assert f"{len(kernels)} cubins" in r.stdout
    from dreamfuse.kernels.matching import _cycle_mask_fwd_kernel

    header = (tmp_path / "dreamfuse_kernel_variants.h").read_text()
    asm = (tmp_path / "dreamfuse_kernel_cubins.S").read_text()
    assert f"#define DFK_AOT_NUM_VARIANTS {len(kernels)}" in header
    for i, k in enumerate(kernels):
        blob = (tmp_path / k["cubin_file"]).read_bytes()
        assert _elf_arch(blob) == 80 and k["entry"].encode() in blob
        assert f'.incbin "{(tmp_path / k["cubin_file"]).resolve()}"' in asm and f"dfk_cubin_{i}:" in asm
        assert k["static_shared"] == 0 and k["shared"] >= 0 and k["num_warps"] == 4
        params = ",".join(f"{n}:{t}" for n, t in k["params"])
        assert f'"{params}"' in header
        if k["op"] == "cycle_mask":  # the launch parameters are the kernel's arguments without its constexprs
            names = [a for a in _cycle_mask_fwd_kernel.arg_names if a != "BLOCK"]
            assert [n for n, _ in k["params"]] == names + ["global_scratch", "profile_scratch"]
            assert k["constexprs"] == {"BLOCK": 1024} and k["grid"] == ["cdiv(N, BLOCK)", "B", "1"]


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--arch", "80x"], "--arch: expected comma-separated integers"),
        (["--arch", "70"], "--arch: 70 is not one of"),
        (["--arch", ""], "--arch"),
        (["--arch", "80", "--ops", "attention,frobnicate"], "--ops: frobnicate is not one of"),
        (["--arch", "80", "--dtypes", "fp8"], "--dtypes: fp8"),
        (["--arch", "80", "--head-dims", "300"], "--head-dims: 300 is outside 1..256"),
        (["--out", "x"], "the following arguments are required: --arch"),
    ],
)
def test_aot_cli_errors_are_one_line(argv, field, tmp_path, capsys):
    argv = argv if "--out" in argv else [*argv, "--out", str(tmp_path)]
    try:
        rc = aot.main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("dreamfuse.kernels.aot: error: ") and field in err, err
    assert not any(tmp_path.iterdir())  # nothing compiled or written


def test_variants_cover_what_the_engine_launches():
    vs = aot.variants()
    by_op = {}
    for v in vs:
        by_op.setdefault(v.op, set()).add(v.key_string)
    dims, half = (40, 64, 80, 160), ("fp16", "bf16")
    assert by_op["attention"] == {f"dtype={d};head_dim={h}" for d in half for h in dims}
    assert by_op["ama_attention"] == (
        {f"dtype={d};flow={f};head_dim={h}" for d in half for f in ("i32", "i64") for h in dims}
        | {f"dtype=fp32;flow=i32;head_dim={h}" for h in dims}
    )
    assert by_op["match_argmax"] == {f"dtype={d}" for d in (*half, "fp32")}
    blocks = (16, 32, 64, 128)
    assert by_op["lora_shrink"] == {f"block_r={r};dtype={d}" for d in half for r in blocks}
    assert by_op["lora_expand"] == {f"base={b};block_r={r};dtype={d}" for d in half for r in blocks for b in (0, 1)}
    assert len({v.name for v in vs}) == len(vs)
    for v in vs:  # every kernel argument is typed, and every name aot.py types is one of the kernel's
        fn = aot.kernel_function(v)
        _, params = aot.signature(v, fn, {**v.constexprs, **v.candidates[0][2]})
        assert [n for n, _ in params[:-2]] == [
            a for a in fn.arg_names if a not in {**v.constexprs, **v.candidates[0][2]}
        ]
        assert all(t == "p" for n, t in params if n in v.pointers)


# --------------------------------------------------------------------------------------------- glue kernels
def test_inv_norm_kernel_matches_torch():
    from dreamfuse.kernels.matching import _inv_norm

    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 37, 70, generator=g)
    f[1, 5] = 0  # zero rows: 0, not inf
    for dt in (torch.float32, torch.float16):
        x = f.to(dt)
        out = torch.empty(2, 37)
        aot._inv_norm_kernel[(triton_cdiv(37, 16), 2)](x, out, 37, 70, x.stride(0), x.stride(1), BLOCK_L=16, BLOCK_D=32)
        torch.testing.assert_close(out, _inv_norm(x), rtol=2e-6, atol=0)
        assert out[1, 5] == 0


def test_argmax_finish_kernel_takes_the_first_maximum():
    g = torch.Generator().manual_seed(1)
    sim = torch.randn(2, 5, 300, generator=g)
    sim[0, 3, 7] = sim[0, 1, 7] = sim[0, :, 7].max() + 1  # a tie across splits: the lower split wins
    arg = torch.randint(0, 1000, (2, 5, 300), generator=g, dtype=torch.int32)
    for dt in (torch.int32, torch.int64):
        out_sim, out_idx = torch.empty(2, 300), torch.empty(2, 300, dtype=dt)
        aot._argmax_finish_kernel[(triton_cdiv(300, 128), 2)](sim, arg, out_sim, out_idx, 5, 300, BLOCK=128)
        best, r = sim.max(1)
        torch.testing.assert_close(out_sim, best, rtol=0, atol=0)
        assert torch.equal(out_idx, arg.gather(1, r[:, None]).squeeze(1).to(dt))
        assert out_idx[0, 7] == arg[0, 1, 7]


def test_cycle_threshold_kernel_matches_the_launchers_expression():
    g = torch.Generator().manual_seed(2)
    for dt in (torch.float32, torch.bfloat16):
        fg = torch.rand(3, 1500, generator=g).to(dt)
        thr = torch.empty(3)
        lam, height = 0.4, 30
        aot._cycle_threshold_kernel[(3,)](fg, thr, 1500, fg.stride(0), lam * height, BLOCK=256)
        want = lam * height * fg.float().sum(1) / 1500  # matching._launch_cycle
        torch.testing.assert_close(thr, want, rtol=2e-6, atol=0)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def test_the_c_launchers_match_sequence_equals_the_reference():
    """native/kernels/src/ops_matching.cpp's steps, in the interpreter: inverse norms (glue), the matching kernel
    on its (B, S, N) / (B, P, M) partial buffers, then the finishing max (glue) both ways."""
    from dreamfuse.kernels.matching import _match_argmax_fwd_kernel, match_argmax_reference

    g = torch.Generator().manual_seed(3)
    B, N, M, D = 2, 37, 50, 24
    ft, fr = torch.randn(B, N, D, generator=g), torch.randn(B, M, D, generator=g)
    fr[0, 4] = 0
    bm, bn, chunk = 16, 16, 32  # chunk: a multiple of BLOCK_N, as the C launcher rounds it
    S, P = triton_cdiv(M, chunk), triton_cdiv(N, bm)
    inv_t, inv_r = torch.empty(B, N), torch.empty(B, M)
    for f, inv, L in ((ft, inv_t, N), (fr, inv_r, M)):
        aot._inv_norm_kernel[(triton_cdiv(L, 16), B)](f, inv, L, D, f.stride(0), f.stride(1), BLOCK_L=16, BLOCK_D=16)
    row_sim, row_arg = torch.empty(B, S, N), torch.empty(B, S, N, dtype=torch.int32)
    col_sim, col_arg = torch.empty(B, P, M), torch.empty(B, P, M, dtype=torch.int32)
    kernel = aot.kernel_function(next(v for v in aot.variants(("match_argmax",)) if v.op == "match_argmax"))
    assert kernel is _match_argmax_fwd_kernel.fn
    kernel[(P, S, B)](
        ft,
        fr,
        inv_t,
        inv_r,
        row_sim,
        row_arg,
        col_sim,
        col_arg,
        ft.stride(0),
        ft.stride(1),
        fr.stride(0),
        fr.stride(1),
        N,
        M,
        D,
        chunk,
        S,
        P,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=16,
        UPCAST=False,
        DOT_PRECISION="ieee",
    )
    outs = []
    for sim, arg, L, R in ((row_sim, row_arg, N, S), (col_sim, col_arg, M, P)):
        best, idx = torch.empty(B, L), torch.empty(B, L, dtype=torch.int64)
        aot._argmax_finish_kernel[(triton_cdiv(L, 64), B)](sim, arg, best, idx, R, L, BLOCK=64)
        outs += [idx, best]
    t2r, r2t, t2r_sim, r2t_sim = match_argmax_reference(ft, fr)
    assert torch.equal(outs[0], t2r) and torch.equal(outs[2], r2t)
    torch.testing.assert_close(outs[1], t2r_sim, atol=1e-6, rtol=0)
    torch.testing.assert_close(outs[3], r2t_sim, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------- C launchers
# The built library (ctypes), in dry-run mode: its launchers must pass the kernels what the Python launchers pass.
import ctypes  # noqa: E402


class _DfkTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("dtype", ctypes.c_int),
        ("ndim", ctypes.c_int32),
        ("shape", ctypes.c_int64 * 5),
        ("strides", ctypes.c_int64 * 5),
    ]


class _DfkLaunch(ctypes.Structure):
    _fields_ = [
        ("kernel", ctypes.c_int32),
        ("grid", ctypes.c_uint32 * 3),
        ("block", ctypes.c_uint32),
        ("shared_bytes", ctypes.c_uint32),
        ("num_params", ctypes.c_int32),
    ]


_DFK_DTYPE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.int32: 3, torch.int64: 4}


@pytest.fixture(scope="module")
def dfk():
    build = Path(os.environ.get("DREAMFUSE_NATIVE_BUILD", ROOT / "build"))
    lib_path = build / "native" / "kernels" / "libdreamfuse_kernels.so"
    if not lib_path.is_file():
        pytest.skip(f"{lib_path} not built (make native, or cmake -S . -B build && cmake --build build)")
    lib = ctypes.CDLL(str(lib_path))
    lib.dfk_last_error.restype = ctypes.c_char_p
    lib.dfk_kernel_constexpr.restype = ctypes.c_int64
    lib.dfk_set_dry_run(80, 108)
    return lib


def _dt(t: torch.Tensor) -> _DfkTensor:
    x = _DfkTensor(t.data_ptr(), _DFK_DTYPE[t.dtype], t.ndim)
    for i, (n, st) in enumerate(zip(t.shape, t.stride())):
        x.shape[i], x.strides[i] = n, st
    return x


def _c_launch(lib, fn: str, *args) -> tuple[dict, tuple, int]:
    """Call launcher ``fn`` (dry run) and return the first launch's parameters, grid and kernel index."""
    ref = lambda a: ctypes.byref(a) if isinstance(a, _DfkTensor) else a
    st = getattr(lib, fn)(*[ref(a) for a in args])
    assert st == 0, lib.dfk_last_error().decode()
    recs = (_DfkLaunch * 8)()
    n = lib.dfk_last_launches(recs, 8)
    i = n - 1  # the op's main kernel is its last launch
    size = lib.dfk_last_launch_params(i, None, 0)
    buf = ctypes.create_string_buffer(size + 1)
    lib.dfk_last_launch_params(i, buf, size + 1)
    params = dict(item.split("=") for item in buf.value.decode().split(","))
    return params, tuple(recs[i].grid), recs[i].kernel


class _Recorder:
    """Stands in for a kernel object: records ``kernel[grid](*args, **kwargs)`` instead of running it."""

    def __init__(self, kernel):
        fn = kernel
        while not hasattr(fn, "arg_names") or type(fn).__name__ == "Autotuner":
            fn = fn.fn
        self.arg_names, self.calls = fn.arg_names, []
        self.best_config = triton_config(BLOCK_M=16)  # what _launch_match reads after the launch

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, dict(zip(self.arg_names, args)), kwargs))


def triton_config(**kwargs):
    import triton

    return triton.Config(kwargs)


def _py_launch(monkeypatch, module, kernel_name: str, call):
    rec = _Recorder(getattr(module, kernel_name))
    monkeypatch.setattr(module, kernel_name, rec)
    monkeypatch.setattr(torch.library, "wrap_triton", lambda k: k)
    call()
    assert len(rec.calls) == 1
    return rec.calls[0]


def _same(c_params: dict, py_args: dict, pointers=(), skip=()):
    """Every i32/fp32 parameter equal (fp32 as the kernel receives it), and the listed pointers equal."""
    import numpy as np

    for name, value in c_params.items():
        if name in ("global_scratch", "profile_scratch") or name in skip or name not in py_args:
            continue
        py = py_args[name]
        if isinstance(py, torch.Tensor):
            if name in pointers:
                assert int(value, 16) == py.data_ptr(), name
        elif isinstance(py, float):
            assert np.float32(value) == np.float32(py), (name, value, py)
        else:
            assert int(value) == int(py), (name, value, py)


@pytest.mark.parametrize("ama", [False, True], ids=["plain", "ama"])
@pytest.mark.parametrize("layout", ["contiguous", "blhd"])
def test_c_attention_launcher_passes_what_python_passes(dfk, monkeypatch, ama, layout):
    from dreamfuse.kernels import attention as attn

    B, H, Lq, Lk, D = 2, 3, 77, 100, 80
    g = torch.Generator().manual_seed(0)
    if layout == "blhd":  # (B, L, H, D) storage seen as (B, H, L, D)
        q, k, v, vr = (torch.randn(B, L, H, D, generator=g).half().transpose(1, 2) for L in (Lq, Lk, Lk, Lk))
    else:
        q, k, v, vr = (torch.randn(B, H, L, D, generator=g).half() for L in (Lq, Lk, Lk, Lk))
    flow = torch.randint(0, Lk, (B, Lk), generator=g)
    mask = torch.rand(B, Lk, generator=g).half()
    scale = D**-0.5
    extra = (vr, flow, mask) if ama else ()
    grid, py, kw = _py_launch(
        monkeypatch, attn, "_attention_fwd_kernel", lambda: attn._attention_fwd(q, k, v, scale, *extra)
    )
    out, lse = torch.empty_like(q), torch.empty(B, H, Lq)
    if ama:
        c, c_grid, idx = _c_launch(
            dfk,
            "dfk_ama_attention",
            _dt(q),
            _dt(k),
            _dt(v),
            _dt(vr),
            _dt(flow),
            _dt(mask),
            ctypes.c_double(scale),
            _dt(out),
            _dt(lse),
            None,
        )
    else:
        c, c_grid, idx = _c_launch(
            dfk, "dfk_attention", _dt(q), _dt(k), _dt(v), ctypes.c_double(scale), _dt(out), _dt(lse), None
        )
    assert kw["SA"] == 8 and dfk.dfk_kernel_constexpr(idx, b"SA") == 8  # the strides arrive divided by 8 in both
    assert kw["HEAD_DIM"] == dfk.dfk_kernel_constexpr(idx, b"HEAD_DIM") and kw["AMA"] == ama
    _same(c, py, pointers=("Q", "K", "V") + (("VREF", "FLOW", "MASK") if ama else ()))
    meta = {"BLOCK_M": dfk.dfk_kernel_constexpr(idx, b"BLOCK_M")}
    assert c_grid == (*grid(meta), 1)


@pytest.mark.parametrize("guidance", ["scalar", "per-segment", "broadcast"])
def test_c_blend_launcher_passes_what_python_passes(dfk, monkeypatch, guidance):
    from dreamfuse.kernels import composite

    B, S, C, h, w = 2, 3, 4, 7, 9
    g = torch.Generator().manual_seed(1)
    eps = torch.randn(2 * B * S, C, h, w, generator=g)
    u, c = eps[: B * S].view(B, S, C, h, w), eps[B * S :].view(B, S, C, h, w)  # slices of a UNet output
    m = torch.rand(B, S, h, w, generator=g)
    gt = {"scalar": None, "per-segment": torch.rand(B, S, generator=g), "broadcast": torch.rand(S, generator=g)}[
        guidance
    ]
    grid, py, kw = _py_launch(
        monkeypatch,
        composite,
        "_composite_blend_fwd_kernel",
        lambda: composite._blend_fwd(u, c, m, None if gt is None else gt.expand(B, S), 7.5),
    )
    out = torch.empty(B, C, h, w)
    cp, c_grid, idx = _c_launch(
        dfk,
        "dfk_composite_blend",
        _dt(u),
        _dt(c),
        _dt(m),
        None if gt is None else _dt(gt),
        ctypes.c_double(7.5),
        _dt(out),
        None,
    )
    assert (
        kw["PER_SEG_G"] == (gt is not None)
        and kw["FLAT"]
        and kw["BLOCK_C"] == dfk.dfk_kernel_constexpr(idx, b"BLOCK_C")
    )
    _same(cp, py, pointers=("U", "CND", "M") + (("G",) if gt is not None else ()))
    assert c_grid == grid({"BLOCK_P": dfk.dfk_kernel_constexpr(idx, b"BLOCK_P")})


def test_c_matching_launchers_pass_what_python_passes(dfk, monkeypatch):
    from dreamfuse.kernels import matching

    g = torch.Generator().manual_seed(2)
    ft, fr = torch.randn(2, 100, 64, generator=g).half(), torch.randn(2, 67, 64, generator=g).half()
    _, py, _ = _py_launch(monkeypatch, matching, "_match_argmax_fwd_kernel", lambda: matching._launch_match(ft, fr))
    t2r, r2t = torch.empty(2, 100, dtype=torch.int64), torch.empty(2, 67, dtype=torch.int64)
    ws = torch.empty(
        dfk.dfk_match_argmax_workspace_size(ctypes.c_int64(2), ctypes.c_int64(100), ctypes.c_int64(67)),
        dtype=torch.uint8,
    )
    cp, _, _ = _c_launch(
        dfk,
        "dfk_match_argmax",
        _dt(ft),
        _dt(fr),
        _dt(t2r),
        _dt(r2t),
        None,
        None,
        ctypes.c_void_p(ws.data_ptr()),
        ctypes.c_size_t(ws.numel()),
        None,
    )
    # the column split (CHUNK, S) and row tiles (P) follow each side's tile sizes; strides and sizes are the same
    _same(cp, py, pointers=("FT", "FR"), skip=("CHUNK", "S", "P"))
    t2r32, r2t32 = (torch.randint(0, 96, (2, 96), generator=g, dtype=torch.int32) for _ in range(2))
    fg = torch.rand(2, 96, generator=g)
    _, py, kw = _py_launch(
        monkeypatch, matching, "_cycle_mask_fwd_kernel", lambda: matching._launch_cycle(t2r32, r2t32, fg, 8, 12, 0.4)
    )
    flows = [py["T2R"], py["R2T"]]  # the tensors the Python launcher passed
    ws = torch.empty(256, dtype=torch.uint8)
    cp, _, _ = _c_launch(
        dfk,
        "dfk_cycle_mask",
        _dt(flows[0]),
        _dt(flows[1]),
        _dt(fg),
        ctypes.c_int64(8),
        ctypes.c_int64(12),
        ctypes.c_double(0.4),
        _dt(torch.empty_like(fg)),
        ctypes.c_void_p(ws.data_ptr()),
        ctypes.c_size_t(256),
        None,
    )
    _same(cp, py, pointers=("T2R", "R2T", "FG"))
    assert set(cp) - set(py) == {"global_scratch", "profile_scratch"}  # nothing the kernel lacks


def _c_launch_all(lib, fn: str, *args) -> list[dict]:
    """Call launcher ``fn`` (dry run) and return every launch's parameters, oldest first."""
    ref = lambda a: ctypes.byref(a) if isinstance(a, _DfkTensor) else a  # noqa: E731
    st = getattr(lib, fn)(*[ref(a) for a in args])
    assert st == 0, lib.dfk_last_error().decode()
    recs = (_DfkLaunch * 8)()
    out = []
    for i in range(lib.dfk_last_launches(recs, 8)):
        size = lib.dfk_last_launch_params(i, None, 0)
        buf = ctypes.create_string_buffer(size + 1)
        lib.dfk_last_launch_params(i, buf, size + 1)
        params = dict(item.split("=") for item in buf.value.decode().split(","))
        out.append((params, tuple(recs[i].grid), recs[i].kernel))
    return out


@pytest.mark.parametrize("with_base", [False, True], ids=["delta", "base"])
def test_c_lora_launcher_passes_what_python_passes(dfk, monkeypatch, with_base):
    from dreamfuse.kernels import lora

    g = torch.Generator().manual_seed(4)
    T, d_in, d_out, r_max = 3 * 77, 320, 640, 48  # BLOCK_R 64
    x = torch.randn(T, d_in + 16, generator=g).half()[:, 16:]  # a row stride of 336
    A, B = torch.randn(5, r_max, d_in).half(), torch.randn(5, d_out, r_max).half()
    ranks = torch.tensor([48, 4, 16, 1, 33], dtype=torch.int32)
    st, ad, sc = lora.lora_segments([[(0, 1.0)], [], [(1, 0.5), (4, 2.0)]], 77)
    base = torch.randn(T, d_out, generator=g).half() if with_base else None
    recs = {name: _Recorder(getattr(lora, name)) for name in ("_lora_shrink_kernel", "_lora_expand_kernel")}
    for name, rec in recs.items():
        monkeypatch.setattr(lora, name, rec)
    monkeypatch.setattr(torch.library, "wrap_triton", lambda k: k)
    lora._lora_delta_fwd(x, A, B, ranks, st, ad, sc, base)
    (s_grid, s_py, s_kw), (e_grid, e_py, e_kw) = (rec.calls[0] for rec in recs.values())
    out = torch.empty(T, d_out).half()
    ws = torch.empty(dfk.dfk_lora_delta_workspace_size(ctypes.c_int64(T), ctypes.c_int64(2), ctypes.c_int64(r_max),
                                                       ctypes.c_int(0)), dtype=torch.uint8)
    assert ws.numel() == 2 * T * 64 * 2  # K * T * BLOCK_R fp16
    (sc_p, sc_grid, si), (ec_p, ec_grid, ei) = _c_launch_all(
        dfk, "dfk_lora_delta", _dt(x), _dt(A), _dt(B), _dt(ranks), _dt(st), _dt(ad), _dt(sc),
        None if base is None else _dt(base), _dt(out), ctypes.c_void_p(ws.data_ptr()), ctypes.c_size_t(ws.numel()),
        None,
    )
    idx = ("RANKS", "SEG_STARTS", "SEG_ADAPTER", "SEG_SCALE")
    _same(sc_p, s_py, pointers=("X", "A", *idx))
    _same(ec_p, e_py, pointers=("B", *idx) + (("BASE",) if base is not None else ()))
    assert set(sc_p) - set(s_py) == set(ec_p) - set(e_py) == {"global_scratch", "profile_scratch"}
    assert int(sc_p["V"], 16) == int(ec_p["V"], 16) == ws.data_ptr()
    for kw, i in ((s_kw, si), (e_kw, ei)):
        assert kw["BLOCK_R"] == dfk.dfk_kernel_constexpr(i, b"BLOCK_R") == 64
    assert e_kw["HAS_BASE"] == (base is not None) == bool(dfk.dfk_kernel_constexpr(ei, b"HAS_BASE"))
    meta = lambda i, *names: {n: dfk.dfk_kernel_constexpr(i, n.encode()) for n in names}  # noqa: E731
    assert sc_grid == (*s_grid(meta(si, "BLOCK_M")), 1)
    assert ec_grid == (*e_grid(meta(ei, "BLOCK_M", "BLOCK_N")), 1)


# --------------------------------------------------------------------------------------------- GPU data
def test_gpu_data_is_complete_and_well_formed(tmp_path):
    cases = _read_cases(write_gpu_data(tmp_path))
    ops = {c["op"] for c in cases}
    assert ops == {"attention", "ama_attention", "match_argmax", "cycle_mask", "composite_blend", "lora_delta"}
    attn = {c["name"] for c in cases if c["op"] == "attention"}
    assert attn == {f"attention_d{d}_{t}" for d in (40, 64, 80, 160) for t in ("fp16", "bf16")}
    for c in cases:
        for name, (dt, arr, perm) in c["inputs"].items():
            assert (
                arr.dtype
                == {"fp16": np.float16, "bf16": np.uint16, "fp32": np.float32, "i32": np.int32, "i64": np.int64}[dt]
            ), (c["name"], name)
            assert not perm or sorted(perm) == list("0123")
        for name, (arr, tol) in c["expect"].items():
            assert arr.dtype == np.float64 and np.isfinite(arr).all() and 0 <= tol < 0.5, (c["name"], name, tol)
        if c["op"] == "cycle_mask":  # exact comparison: the data keeps every error clear of the threshold
            out = c["expect"]["out"][0]
            assert 0 < (out > 0).mean() < 1  # both outcomes occur


@pytest.mark.gpu
def test_native_launchers_match_the_references_on_gpu(tmp_path):
    build = Path(os.environ.get("DREAMFUSE_NATIVE_BUILD", ROOT / "build"))
    exe = build / "native" / "kernels" / "dfk_gpu_test"
    if not exe.is_file():
        pytest.skip(f"{exe} not built (cmake -S . -B build && cmake --build build)")
    r = subprocess.run([str(exe), str(write_gpu_data(tmp_path))], capture_output=True, text=True, timeout=600)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
