"""Classifier-free guidance and the DDIM update in one pass, over rows that each carry their own coefficients.

The step scheduler's tick ends with every running request's CFG combine and sampler update. Done request by
request, that is a dozen small ops per request (diffusers' ``DDIMScheduler.step`` alone is ~0.2 ms of Python and
launches on a CPU, as many kernel launches on a GPU): 64 requests spend longer around the UNet than in it. Here the
rows of all requests go in one call, each row with its guidance scale and its DDIM coefficients::

    e      = u + g · (c − u)                 (CFG; without it e = c)
    x0, ε  = from e and x by the prediction type:
             epsilon:       x0 = (x − k0·e) / k1,     ε = e
             sample:        x0 = e,                    ε = (x − k1·x0) / k0
             v_prediction:  x0 = k1·x − k0·e,          ε = k1·e + k0·x
    x_prev = k2·x0 + k3·ε

with ``k = (sqrt(1 − ᾱ_t), sqrt(ᾱ_t), sqrt(ᾱ_prev), sqrt(1 − ᾱ_prev))`` per row: DDIM with η = 0, no clipping or
thresholding (what :func:`dreamfuse.engine.pipelines.stepping.ddim_update` checks before it uses this).

Exactness. The reference is diffusers' own sequence of operations, rounded to the rows' dtype after each one as
eager PyTorch rounds it on the CPU (fp32 arithmetic in between): bit for bit what ``cfg_combine`` followed by
``DDIMScheduler.step`` gives there, in fp32, fp16 and bf16, whatever rows share the call. The Triton kernel keeps
every intermediate in fp32 registers and rounds once: equal in fp32 up to the compiler's contraction of ``a·b + c``;
in fp16/bf16 it is the more accurate of the two (op-by-op rounding loses digits where ``x − k0·e`` cancels, at the
first, noisiest steps), within a few roundings of the dtype.

Reading order: the Triton kernel, the launcher, the ``torch.library`` op with its fake, the public function, then
the reference (the CPU path and the tests' oracle).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check, interpreting, pin_configs, use_triton

__all__ = ["PREDICTIONS", "cfg_ddim_step", "cfg_ddim_step_reference"]

PREDICTIONS = ("epsilon", "sample", "v_prediction")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _configs() -> list[triton.Config]:
    if pin_configs():
        if interpreting():
            return [triton.Config({"BLOCK": 64}, num_warps=1)]
        return [triton.Config({"BLOCK": 1024}, num_warps=4)]
    # Elementwise and bandwidth-bound: 4-16 elements per thread keeps a few vector loads in flight. An SD 1.5
    # latent row is 4·64·64 = 16384 elements: 16 programs of 1024 per row. Not yet tuned on a GPU.
    cfgs = [triton.Config({"BLOCK": b}, num_warps=w) for b in (512, 1024, 2048, 4096) for w in (2, 4, 8)]
    keep = lambda c: 4 <= c.kwargs["BLOCK"] // (32 * c.num_warps) <= 16
    return [c for c in cfgs if keep(c)]


@triton.autotune(configs=_configs(), key=["numel"])
@triton.jit
def _cfg_ddim_fwd_kernel(U, C, X, G, K, OUT, numel, HAS_CFG: tl.constexpr, PRED: tl.constexpr,
                         BLOCK: tl.constexpr):
    row = tl.program_id(1).to(tl.int64)  # row * numel indexes the whole batch: int64
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    base = row * numel
    x = tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(C + base + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_CFG:
        u = tl.load(U + base + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + row)
        e = u + g * (e - u)
    k0 = tl.load(K + row * 4)
    k1 = tl.load(K + row * 4 + 1)
    k2 = tl.load(K + row * 4 + 2)
    k3 = tl.load(K + row * 4 + 3)
    if PRED == 0:  # epsilon
        x0 = (x - k0 * e) / k1
        eps = e
    elif PRED == 1:  # sample
        x0 = e
        eps = (x - k1 * x0) / k0
    else:  # v_prediction
        x0 = k1 * x - k0 * e
        eps = k1 * e + k0 * x
    out = k2 * x0 + k3 * eps
    tl.store(OUT + base + offs, out.to(OUT.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------- launcher
def _check(uncond, cond, x, guidance, coeffs, prediction) -> None:
    check(isinstance(x, torch.Tensor) and x.dtype in _DTYPES and x.dim() >= 1,
          f"x: expected a float16/bfloat16/float32 tensor (N, ...), got {getattr(x, 'dtype', type(x))}")
    for name, t in (("cond", cond), ("uncond", uncond)):
        if t is None:
            check(name == "uncond", "cond: required")
            continue
        check(isinstance(t, torch.Tensor) and t.shape == x.shape and t.dtype == x.dtype and t.device == x.device,
              f"{name}: expected {tuple(x.shape)} {x.dtype} on {x.device}, got "
              f"{tuple(getattr(t, 'shape', ()))} {getattr(t, 'dtype', None)}")
    n = x.shape[0]
    check(isinstance(coeffs, torch.Tensor) and coeffs.shape == (n, 4) and coeffs.dtype == torch.float32
          and coeffs.device == x.device, f"coeffs: expected ({n}, 4) float32 on {x.device}")
    if uncond is not None:
        check(isinstance(guidance, torch.Tensor) and guidance.shape == (n,) and guidance.dtype == torch.float32
              and guidance.device == x.device, f"guidance: expected ({n},) float32 on {x.device} with uncond")
    check(prediction in range(len(PREDICTIONS)), f"prediction: an index of {PREDICTIONS}, got {prediction!r}")


def _fwd(uncond, cond, x, guidance, coeffs, prediction: int) -> torch.Tensor:
    n = x.shape[0]
    numel = x[0].numel() if n else 0
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    x, cond = x.contiguous(), cond.contiguous()
    has_cfg = uncond is not None
    u = uncond.contiguous() if has_cfg else cond
    g = guidance if has_cfg else coeffs
    grid = lambda meta: (triton.cdiv(numel, meta["BLOCK"]), n)
    torch.library.wrap_triton(_cfg_ddim_fwd_kernel)[grid](u, cond, x, g, coeffs.contiguous(), out, numel,
                                                          HAS_CFG=has_cfg, PRED=prediction)
    return out


@torch.library.triton_op("dreamfuse::cfg_ddim_step", mutates_args=())
def _cfg_ddim_op(uncond: torch.Tensor | None, cond: torch.Tensor, x: torch.Tensor, guidance: torch.Tensor | None,
                 coeffs: torch.Tensor, prediction: int) -> torch.Tensor:
    return _impl(uncond, cond, x, guidance, coeffs, prediction, x.is_cuda)


@_cfg_ddim_op.register_kernel("cpu")
def _(uncond, cond, x, guidance, coeffs, prediction):
    return _impl(uncond, cond, x, guidance, coeffs, prediction, True)


def _impl(uncond, cond, x, guidance, coeffs, prediction, kernel: bool):
    _check(uncond, cond, x, guidance, coeffs, prediction)
    if kernel and use_triton(x):
        return _fwd(uncond, cond, x, guidance, coeffs, prediction)
    return cfg_ddim_step_reference(uncond, cond, x, guidance, coeffs, prediction)


@_cfg_ddim_op.register_fake
def _(uncond, cond, x, guidance, coeffs, prediction):
    _check(uncond, cond, x, guidance, coeffs, prediction)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------------------------- public API
def cfg_ddim_step(uncond: torch.Tensor | None, cond: torch.Tensor, x: torch.Tensor, guidance: torch.Tensor | None,
                  coeffs: torch.Tensor, prediction: str | int = "epsilon") -> torch.Tensor:
    """CFG and the DDIM (η = 0) update of ``N`` rows, each with its own guidance and coefficients (module docs).

    Args:
        uncond, cond: ``(N, ...)`` the UNet's unconditional and conditional outputs of each row (``uncond`` None:
            no CFG, ``cond`` is the output), ``x``'s dtype (float16, bfloat16, float32) and device.
        x: ``(N, ...)`` the rows' current latents ``x_t``.
        guidance: ``(N,)`` float32 CFG scales (with ``uncond``), else None.
        coeffs: ``(N, 4)`` float32 ``(sqrt(1 − ᾱ_t), sqrt(ᾱ_t), sqrt(ᾱ_prev), sqrt(1 − ᾱ_prev))``.
        prediction: ``"epsilon"``, ``"sample"`` or ``"v_prediction"`` (or its index in :data:`PREDICTIONS`).

    Returns ``x_prev`` ``(N, ...)``, contiguous, in ``x``'s dtype. Triton on CUDA (and on CPU under
    ``TRITON_INTERPRET=1``), :func:`cfg_ddim_step_reference` otherwise. ``ValueError`` names a bad argument.
    """
    pred = PREDICTIONS.index(prediction) if isinstance(prediction, str) and prediction in PREDICTIONS else prediction
    if isinstance(pred, str):
        raise ValueError(f"prediction: one of {PREDICTIONS}, got {prediction!r}")
    return _cfg_ddim_op(uncond, cond, x, guidance, coeffs, pred)


# --------------------------------------------------------------------------------------------- reference
def cfg_ddim_step_reference(uncond, cond, x, guidance, coeffs, prediction) -> torch.Tensor:
    """diffusers' operations (``cfg_combine``, then ``DDIMScheduler.step`` with η = 0) as eager PyTorch runs them on
    the CPU, one rounding to the rows' dtype per op (all of it the identity in fp32): the guidance scale is a Python
    float (kept in fp32), ``ᾱ`` terms are 0-d fp32 tensors, rounded to the rows' dtype when they multiply and kept
    in fp32 when they divide (eager CPU kernels' behaviour, checked bit for bit by the tests)."""
    pred = PREDICTIONS[prediction] if isinstance(prediction, int) else prediction
    dt = x.dtype
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)

    def r(t):  # round to the working dtype: what an eager op on `dt` tensors stores
        return t.to(dt).float()

    k = [coeffs[:, i].float().reshape(shape) for i in range(4)]  # divisors
    km = [r(v) for v in k]  # factors
    xf, e = x.float(), cond.float()
    if uncond is not None:
        uf = uncond.float()
        g = guidance.float().reshape(shape)
        e = r(uf + r(g * r(e - uf)))  # uncond + g * (cond - uncond)
    if pred == "epsilon":
        x0 = r(r(xf - r(km[0] * e)) / k[1])
        eps = e
    elif pred == "sample":
        x0 = e
        eps = r(r(xf - r(km[1] * x0)) / k[0])
    else:
        x0 = r(r(km[1] * xf) - r(km[0] * e))
        eps = r(r(km[1] * e) + r(km[0] * xf))
    direction = r(km[3] * eps)
    return r(r(km[2] * x0) + direction).to(dt).contiguous()
