"""Fidelity of the pipelines' own diffusion math: semantic matching guidance lowers its distance, every
``prediction_type`` is read (ε, v, x0), and DDIM inversion is DDIM inversion — each checked against a plain
reference (closed-form denoisers, float64 recurrences, the ε-equivalent of a v-model)."""

import contextlib
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from dreamfuse.engine import Engine, EngineConfig
from dreamfuse.engine.pipelines import personalize as pz
from dreamfuse.engine.pipelines.composite import ComposeRequest, compose_batch, subject_aware_grad
from dreamfuse.engine.prediction import PREDICTION_TYPES, from_eps, prediction_type_of, to_eps_x0, update_output
from dreamfuse.engine.tiny import build_components

SIZE = 64  # latent 8x8: AMA at 4x4 and 8x8, foreground at 2x2
CFG = EngineConfig(device="cpu", backend="torch", progress=False)


def scheduler(kind: str) -> DDIMScheduler:
    from dreamfuse.engine.tiny import _ddim_scheduler

    return DDIMScheduler.from_config(_ddim_scheduler().config, prediction_type=kind)


ALPHAS = scheduler("epsilon").alphas_cumprod


# --------------------------------------------------------------------------------------------- prediction.py
@pytest.mark.parametrize("kind", PREDICTION_TYPES)
def test_conversions_invert_each_other_and_match_diffusers(kind):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 4, 8, 8, generator=g,
                                                                                      dtype=torch.float64)
    a = ALPHAS[[201, 801]].double().view(2, 1, 1, 1)
    x = a.sqrt() * x0 + (1 - a).sqrt() * eps
    out = from_eps(eps, x, a, kind)
    want = {"epsilon": eps, "v_prediction": scheduler(kind).get_velocity(x0, eps, torch.tensor([201, 801])),
            "sample": x0}[kind]
    torch.testing.assert_close(out, want.double())
    got_eps, got_x0 = to_eps_x0(out, x, a, kind)
    torch.testing.assert_close(got_eps, eps)
    torch.testing.assert_close(got_x0, x0)
    d_eps, d_x = torch.randn_like(eps), torch.randn_like(x)
    torch.testing.assert_close(update_output(out, a, kind, d_eps=d_eps, d_sample=d_x), from_eps(eps + d_eps, x + d_x,
                                                                                                a, kind))
    assert torch.equal(update_output(out, a, kind, d_eps=0 * d_eps), out)
    assert prediction_type_of(scheduler(kind)) == kind
    with pytest.raises(ValueError, match="prediction_type"):
        to_eps_x0(out, x, a, "flow")


# --------------------------------------------------------------------------------------------- guidance
def _blur(x: torch.Tensor) -> torch.Tensor:
    """Binomial 3x3 blur per channel (its symbol cos^4 lies in [0, 1], so I - blur is positive semi-definite)."""
    k = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype)
    k = (k[:, None] * k[None, :] / 16).expand(x.shape[1], 1, 3, 3)
    return F.conv2d(x, k, padding=1, groups=x.shape[1])


def _problem(seed=0, rows=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, 8, 8, generator=g)
    z0_ref = torch.randn(1, 4, 8, 8, generator=g)
    t_idx = [1, 3]  # [ref_u, tgt_u, ref_c, tgt_c]
    flow = torch.randint(0, 64, (len(t_idx), 64), generator=g)
    mask = torch.rand(len(t_idx), 64, generator=g)
    return x, z0_ref, t_idx, flow, mask


def _distance_after(out, x, t_idx, z0_ref, a, flow, mask, kind):
    return pz.guidance_distance(to_eps_x0(out[t_idx], x[t_idx], a, kind)[1], z0_ref, flow, mask)


def _check_one_guided_update(eps_model, x, z0_ref, t_idx, flow, mask, t, lam, kind):
    """``eps_model(x) -> ε``; the model under test outputs it in ``kind``. One guided update must lower the
    masked distance; the gradient must be the plain one through ε only; the old one (through all of x̂0) raises it."""
    a = ALPHAS[t]
    model = (lambda z: eps_model(z)) if kind == "epsilon" else (lambda z: from_eps(eps_model(z), z, a, kind))
    out, grad = pz._matching_guidance_grad(model, x, z0_ref, a, t_idx, lambda: (flow, mask), kind)
    guided = pz._apply_guidance(out, grad, a, lam, t_idx, kind)
    before = _distance_after(out, x, t_idx, z0_ref, a, flow, mask, kind)
    after = _distance_after(guided, x, t_idx, z0_ref, a, flow, mask, kind)
    # reference: plain autograd of the distance of x̂0 = (x.detach() - sqrt(1-ᾱ)·ε(x))/sqrt(ᾱ)
    xr = x.clone().requires_grad_(True)
    eps_t = eps_model(xr)[t_idx]
    x0 = (x[t_idx] - (1 - a).sqrt() * eps_t) / a.sqrt()
    (ref,) = torch.autograd.grad(pz.guidance_distance(x0, z0_ref, flow, mask), xr)
    torch.testing.assert_close(grad, ref[t_idx], atol=1e-5, rtol=1e-4)
    # the defect: differentiating the whole x̂0 (x with gradient) and applying the same update
    xo = x.clone().requires_grad_(True)
    x0_old = (xo[t_idx] - (1 - a).sqrt() * eps_model(xo)[t_idx]) / a.sqrt()
    (old,) = torch.autograd.grad(pz.guidance_distance(x0_old, z0_ref, flow, mask), xo)
    old_after = _distance_after(pz._apply_guidance(out, old[t_idx], a, lam, t_idx, kind), x, t_idx, z0_ref, a, flow,
                                mask, kind)
    assert after < before < old_after, (before.item(), after.item(), old_after.item())
    # λg = 0: the guided path returns the model output bit for bit
    assert torch.equal(pz._apply_guidance(out, grad, a, 0.0, t_idx, kind), out)
    return before - after


@pytest.mark.parametrize("kind", PREDICTION_TYPES)
@pytest.mark.parametrize("t", [201, 801])
def test_guidance_lowers_the_distance_on_a_smooth_denoiser(t, kind):
    """ε(x) = x - blur(x): a smooth surrogate with a positive semi-definite Jacobian, as an ε-, v- or x0-model."""
    x, z0_ref, t_idx, flow, mask = _problem()
    drop = _check_one_guided_update(lambda z: z - _blur(z), x, z0_ref, t_idx, flow, mask, t, 1.0, kind)
    assert drop > 1e-3


@pytest.fixture(scope="module")
def tiny():
    comps = build_components()
    v = Engine({**comps, "scheduler": scheduler("v_prediction")}, CFG)
    eps = EpsEquivalent({**comps, "scheduler": scheduler("epsilon")}, CFG)
    return v, eps  # one UNet: read as a v-model, and as the ε-model it is equivalent to


class EpsEquivalent(Engine):
    """The tiny UNet read as a v-model, converted to the ε-model it is: ``ε = sqrt(ᾱ)·v + sqrt(1 − ᾱ)·x`` (with an
    ε scheduler). Every pipeline must give the v-engine's latents."""

    def unet_call(self, latents, t, *args, **kwargs):
        v = super().unet_call(latents, t, *args, **kwargs)
        a = self.scheduler.alphas_cumprod.to(latents.device)[torch.as_tensor(t).long()]
        return to_eps_x0(v, latents, a.view(-1, 1, 1, 1) if a.ndim else a, "v_prediction")[0]


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("t", [201, 801])
def test_guidance_lowers_the_distance_on_the_tiny_unet(tiny, t, kind):
    """The tiny UNet as the model, in the personalize batch layout [ref_u, tgt_u, ref_c, tgt_c], its output read
    as ε, or as v (then its ε is sqrt(ᾱ)·v + sqrt(1 − ᾱ)·x)."""
    engine = tiny[0]
    emb, _ = engine.encode_text(["", "", "a photo of a sks dog", "a photo of a sks dog"])
    a = ALPHAS[t]

    def eps_model(z):
        return to_eps_x0(engine.unet_call(z, t, emb), z, a, kind)[0]

    x, z0_ref, t_idx, flow, mask = _problem(seed=1)
    _check_one_guided_update(eps_model, x, z0_ref, t_idx, flow, mask, t, 1.0, kind)


def test_zero_guidance_through_the_guided_path_is_the_unguided_result(tiny, monkeypatch):
    """The guided branch (UNet under autograd, backward, correction) with its step forced to λg = 0 gives the
    unguided run bit for bit."""
    engine = tiny[0]
    ref = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    kw = dict(subject_token="sks", steps=3, seed=0, height=SIZE, width=SIZE, output_type="latent", ama_start=1)
    plain = engine.personalize("a photo of a sks dog", ref, **kw)
    apply = pz._apply_guidance
    monkeypatch.setattr(pz, "_apply_guidance", lambda out, grad, a, lam, *args: apply(out, grad, a, 0.0, *args))
    forced = engine.personalize("a photo of a sks dog", ref, lambda_g=5.0, **kw)
    assert torch.equal(forced, plain)


# --------------------------------------------------------------------------------------------- inversion
MU, SIGMA = 0.3, 0.7  # data ~ N(MU, SIGMA² I): the exact ε(x_t) = sqrt(1-ᾱ)(x_t - sqrt(ᾱ)MU) / (ᾱ SIGMA² + 1 - ᾱ)


def _gauss_eps(z, a):
    return (1 - a).sqrt() * (z - a.sqrt() * MU) / (a * SIGMA**2 + 1 - a)


def _gauss_engine(kind: str):
    """A stand-in engine whose UNet is the exact denoiser of the Gaussian data, in parameterization ``kind``."""
    sched = scheduler(kind)
    ac = sched.alphas_cumprod

    def unet_call(z, t, embeddings, *conditioning, **kwargs):  # Engine.unet_call's signature; conditioning unused
        a = ac[int(t)].to(z.dtype)
        return from_eps(_gauss_eps(z, a), z, a, kind)

    def new_scheduler(steps):
        s = DDIMScheduler.from_config(sched.config)
        s.set_timesteps(steps)
        return s

    @contextlib.contextmanager
    def progress(*args, **kwargs):
        yield types.SimpleNamespace(update=lambda n: None)

    return types.SimpleNamespace(scheduler=sched, device=torch.device("cpu"), unet_call=unet_call,
                                 new_scheduler=new_scheduler, progress=progress)


def _reference_round_trip(z0: np.ndarray, steps: int) -> np.ndarray:
    """DDIM inversion (the official recurrence: ε at the cleaner latent with the noisier timestep) then DDIM
    sampling, in float64 NumPy with the closed-form ε."""
    s = scheduler("epsilon")
    s.set_timesteps(steps)
    ts = s.timesteps.tolist()
    ac = s.alphas_cumprod.double().numpy()
    final = float(s.final_alpha_cumprod)
    at = lambda j: ac[ts[j]] if j < steps else final  # ᾱ of denoising index j (steps: the clean end)
    eps = lambda z, a: np.sqrt(1 - a) * (z - np.sqrt(a) * MU) / (a * SIGMA**2 + 1 - a)
    z = z0.copy()
    for j in reversed(range(steps)):
        a_s, a_t = at(j + 1), at(j)
        e = eps(z, a_t)
        z = np.sqrt(a_t) * (z - np.sqrt(1 - a_s) * e) / np.sqrt(a_s) + np.sqrt(1 - a_t) * e
    for j in range(steps):
        a_t, a_s = at(j), at(j + 1)
        e = eps(z, a_t)
        z = np.sqrt(a_s) * (z - np.sqrt(1 - a_t) * e) / np.sqrt(a_t) + np.sqrt(1 - a_s) * e
    return z


@pytest.mark.parametrize("kind", PREDICTION_TYPES)
def test_ddim_inversion_then_reconstruction_returns_the_start(kind):
    """With the exact denoiser of Gaussian data, in any parameterization: inverting (ddim_invert) then denoising
    (the scheduler's DDIM step) equals DDIM inversion's own float64 round trip within fp32 rounding, so it
    returns the start up to that method's first-order error (4.2e-2 at 50 steps here, 2.1e-2 at 100: the
    official code's one-evaluation-per-step inversion has it too). Reading the output as ε gave 2.4 (v), 1.8 (x0)."""
    steps = 50
    z0 = MU + SIGMA * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    engine = _gauss_engine(kind)
    traj = pz.ddim_invert(engine, z0, steps, None, progress=False)
    sched = engine.new_scheduler(steps)
    z = traj[0]
    for t in sched.timesteps:
        z = sched.step(engine.unet_call(z, t, None), t, z, return_dict=False)[0]
    ref = _reference_round_trip(z0.double().numpy(), steps)
    ref_err = np.abs(ref - z0.double().numpy()).max()
    assert np.abs(z.double().numpy() - ref).max() < 2e-5  # fp32 rounding: 100 steps x |z| < 4 x 6e-8 (measured 2e-6)
    assert (z - z0).abs().max().item() < ref_err + 2e-5
    # the method's error is first order in the step (not a defect): at 100 steps it halves
    ref_err_100 = np.abs(_reference_round_trip(z0.double().numpy(), 100) - z0.double().numpy()).max()
    assert 0.4 < ref_err_100 / ref_err < 0.6 and ref_err < 0.05


# --------------------------------------------------------------------------------------------- v-prediction pipelines
def test_personalize_on_a_v_model_equals_its_eps_equivalent(tiny):
    """Inversion, AMA and guidance on the v-model give the ε-equivalent model's latents; the reference rows are
    untouched by AMA; two targets in one call equal each alone."""
    v_engine, eps_engine = tiny
    ref = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    prompts = ["a photo of a sks dog", "a sks dog on the beach"]
    kw = dict(subject_token="sks", steps=3, seed=0, height=SIZE, width=SIZE, output_type="latent", ama_start=1,
              lambda_g=2.0)
    logs = {True: [], False: []}
    got = v_engine.personalize(prompts, ref, callback=logs[True].append, **kw)
    want = eps_engine.personalize(prompts, ref, **kw)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    alone = v_engine.personalize(prompts[1], ref, **{**kw, "seed": 1})
    torch.testing.assert_close(got[1:], alone, atol=1e-4, rtol=1e-4)
    v_engine.personalize(prompts, ref, callback=logs[False].append, **{**kw, "ama": False, "lambda_g": 0.0})
    rows = logs[True][0]["rows"]
    for on, off in zip(logs[True], logs[False]):
        assert torch.equal(on["eps"][[0, rows.n + 1]], off["eps"][[0, rows.n + 1]])


class _Seg(torch.nn.Module):
    def forward(self, x):
        w = torch.tensor([[4.0, -2, 1], [-3, 5, 0.5], [1, 1, -4]])
        return torch.einsum("kc,bchw->bkhw", w, x).softmax(1)


def test_compose_on_a_v_model_equals_its_eps_equivalent(tiny):
    """Scaffolding, blending and subject-aware guidance on the v-model give the ε-equivalent's latents (the
    guidance holds ε, so the v output handed to the step is re-expressed at the moved latent)."""
    v_engine, eps_engine = tiny
    layout = np.zeros((SIZE, SIZE, 3), np.uint8)
    layout[:, : SIZE // 2] = (255, 0, 0)
    layout[:, SIZE // 2:] = (0, 0, 255)
    req = ComposeRequest(layout, {"#ff0000": {"prompt": "a red car", "subject": True}, "#0000ff": "a dog"}, "a street")
    kw = dict(steps=4, seed=3, global_steps=1, scaffold_fraction=0.5, sal_model=_Seg(), sal_scale=20.0,
              output_type="latent")
    got = compose_batch(v_engine, [req], **kw)
    want = compose_batch(eps_engine, [req], **kw)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - compose_batch(v_engine, [req], **{**kw, "sal_scale": 0.0})).abs().max() > 1e-4


def test_subject_aware_grad_reads_the_prediction_type(tiny):
    """A v output and its ε give the same gradient (ε at x_t held constant)."""
    engine = tiny[0]
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    a, masks = ALPHAS[501], torch.ones(2, 8, 8)
    v = from_eps(eps, x, a, "v_prediction")
    want = subject_aware_grad(engine, x, eps, a, masks, _Seg())
    torch.testing.assert_close(subject_aware_grad(engine, x, v, a, masks, _Seg(), "v_prediction"), want,
                               atol=1e-6, rtol=1e-4)


def test_guidance_loss_is_the_official_masked_mse_per_target():
    """``F.mse_loss(m'·W, m'·x̂0, reduction="sum") / (C · Σ m')`` over each target's uncond and cond rows (the
    official ``diffuser_utils.py`` form), summed over targets: a target's loss is independent of the others."""
    g = torch.Generator().manual_seed(3)
    n, c = 3, 4
    x0 = torch.randn(2 * n, c, 8, 8, generator=g)
    z0 = torch.randn(1, c, 8, 8, generator=g)
    flow = torch.randint(0, 64, (2 * n, 64), generator=g)
    mask = torch.rand(2 * n, 64, generator=g)
    warped = torch.stack([z0[0].flatten(1)[:, flow[r]] for r in range(2 * n)])  # (2n, C, 64)
    want = 0.0
    for k in range(n):
        rows = [k, k + n]
        m = mask[rows][:, None]
        want += F.mse_loss(m * warped[rows], m * x0[rows].flatten(2), reduction="sum") / (c * mask[rows].sum())
    torch.testing.assert_close(pz.guidance_distance(x0, z0, flow, mask, targets=n), want)
    alone = pz.guidance_distance(x0[[0, n]], z0, flow[[0, n]], mask[[0, n]], targets=1)
    torch.testing.assert_close(alone, F.mse_loss(mask[[0, n]][:, None] * warped[[0, n]],
                                                 mask[[0, n]][:, None] * x0[[0, n]].flatten(2),
                                                 reduction="sum") / (c * mask[[0, n]].sum()))
