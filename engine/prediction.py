"""What a diffusion model's output means, and the conversions a pipeline needs when it forms ε or x̂0 itself.

A UNet predicts, at a sample ``x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε``, one of three equivalent quantities, named
by its scheduler config's ``prediction_type``:

- ``"epsilon"``: the noise ``ε``;
- ``"v_prediction"``: the velocity ``v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x0`` (SD 2.x 768, many fine-tunes);
- ``"sample"``: the clean sample ``x0``.

The scheduler's ``step`` reads the type itself. A pipeline that computes ε or x̂0 on its own (DDIM inversion,
guidance on the predicted x0) goes through :func:`to_eps_x0`; one that corrects a prediction (guidance defined on
ε) writes the result back in the model's own parameterization with :func:`update_output` before ``step``, so the
scheduler sees a consistent output. Every conversion is affine in (output, sample) at a fixed ᾱ: a v- (or x0-)
model and its ε-equivalent then give the same latents, and CFG or mask blending (weights summing to 1) commute
with the conversion.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _check(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type: {prediction_type!r} is not supported (one of "
                         f"{', '.join(PREDICTION_TYPES)})")
    return prediction_type


def prediction_type_of(scheduler) -> str:
    """The ``prediction_type`` of a diffusers scheduler or its config (``"epsilon"`` when the config has none);
    ``ValueError`` for a type this module does not know."""
    config = getattr(scheduler, "config", scheduler)
    kind = config.get("prediction_type") if isinstance(config, dict) else getattr(config, "prediction_type", None)
    return _check(kind or "epsilon")


def _coefs(alpha_t, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sqrt(ᾱ), sqrt(1 − ᾱ))`` as tensors on ``like``'s device (a 0-d fp32 ᾱ keeps an fp16 tensor fp16)."""
    a = torch.as_tensor(alpha_t, device=like.device)
    if not a.is_floating_point():
        a = a.float()
    return a.sqrt(), (1 - a).sqrt()


def to_eps_x0(model_output: torch.Tensor, sample: torch.Tensor, alpha_t,
              prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ε, x̂0)`` of a model output at ``sample`` (``x_t``); ``alpha_t`` is ``ᾱ_t`` of the timestep the model was
    given (a scalar, a 0-d tensor, or a tensor broadcastable to the sample such as ``(B, 1, 1, 1)``).

    - ``epsilon``: ``ε = out``, ``x̂0 = (x_t − sqrt(1 − ᾱ)·ε) / sqrt(ᾱ)``;
    - ``v_prediction``: ``ε = sqrt(ᾱ)·v + sqrt(1 − ᾱ)·x_t``, ``x̂0 = sqrt(ᾱ)·x_t − sqrt(1 − ᾱ)·v``;
    - ``sample``: ``ε = (x_t − sqrt(ᾱ)·x̂0) / sqrt(1 − ᾱ)``, ``x̂0 = out``.

    Differentiable in both inputs. For ``epsilon`` the returned ε is ``model_output`` itself (no arithmetic, so an
    ε-model's path stays bit-identical to code that never converts)."""
    sa, sb = _coefs(alpha_t, sample)
    if _check(prediction_type) == "epsilon":
        return model_output, (sample - sb * model_output) / sa
    if prediction_type == "v_prediction":
        return sa * model_output + sb * sample, sa * sample - sb * model_output
    return (sample - sa * model_output) / sb, model_output


def from_eps(eps: torch.Tensor, sample: torch.Tensor, alpha_t, prediction_type: str) -> torch.Tensor:
    """The model output, in ``prediction_type``, of the noise prediction ``eps`` at ``sample`` (the inverse of
    :func:`to_eps_x0`): ``ε``; ``v = (ε − sqrt(1 − ᾱ)·x_t) / sqrt(ᾱ)``; ``x̂0 = (x_t − sqrt(1 − ᾱ)·ε) / sqrt(ᾱ)``."""
    sa, sb = _coefs(alpha_t, sample)
    if _check(prediction_type) == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return (eps - sb * sample) / sa
    return (sample - sb * eps) / sa


def update_output(model_output: torch.Tensor, alpha_t, prediction_type: str, *, d_eps: torch.Tensor | None = None,
                  d_sample: torch.Tensor | None = None) -> torch.Tensor:
    """The model output, in ``prediction_type``, of the prediction whose ε changed by ``d_eps`` at a sample moved
    by ``d_sample`` (ε otherwise held): ``from_eps(ε + d_eps, x_t + d_sample)``, written as the increment
    ``model_output + A·d_eps + B·d_sample`` (``from_eps`` is linear in both):

    - ``epsilon``: ``A = 1``, ``B = 0``;
    - ``v_prediction``: ``A = 1 / sqrt(ᾱ)``, ``B = −sqrt(1 − ᾱ) / sqrt(ᾱ)``;
    - ``sample``: ``A = −sqrt(1 − ᾱ) / sqrt(ᾱ)``, ``B = 1 / sqrt(ᾱ)``.

    As an increment, a zero change gives back the output's values exactly, and elements whose change is zero
    keep their bits (a round trip through ε would not)."""
    sa, sb = _coefs(alpha_t, model_output)
    kind = _check(prediction_type)
    out = model_output
    if d_eps is not None:
        a = None if kind == "epsilon" else (1 / sa if kind == "v_prediction" else -sb / sa)
        out = out + (d_eps if a is None else a * d_eps).to(out.dtype)
    if d_sample is not None and kind != "epsilon":
        b = -sb / sa if kind == "v_prediction" else 1 / sa
        out = out + (b * d_sample).to(out.dtype)
    return out
