"""dreamfuse::cfg_ddim_step: CFG and the DDIM update of many rows in one call. The reference equals diffusers'
cfg_combine + DDIMScheduler.step bit for bit in every dtype and prediction type; the Triton kernel (through the
interpreter here) equals the reference within one rounding; rows never see each other."""

import pytest
import torch
from diffusers import DDIMScheduler
from dreamfuse.engine.pipelines.common import cfg_combine
from dreamfuse.engine.pipelines.stepping import StepUpdate, apply_updates, ddim_update
from dreamfuse.engine.samplers import Sampler
from dreamfuse.kernels.sampler import cfg_ddim_step, cfg_ddim_step_reference

DTYPES = [(torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)]
PREDICTIONS = ["epsilon", "v_prediction", "sample"]


def _sampler(prediction: str, steps: int = 25) -> Sampler:
    base = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction).config
    return Sampler("ddim", base, steps, "cpu")


def _rows(n, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((n, *shape), generator=g).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("dtype,_", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("cfg", [7.5, None])
def test_reference_is_diffusers_bit_for_bit(prediction, dtype, _, cfg):
    sampler = _sampler(prediction)
    for t in (sampler.timesteps[0], sampler.timesteps[12], sampler.timesteps[-1]):  # the last: alpha_prev = final
        u, c, x = _rows(3, (4, 5, 7), dtype, seed=int(t))
        out = torch.cat([u, c]) if cfg is not None else c
        eps = cfg_combine(out, 3, cfg) if cfg is not None else out
        want = sampler.scheduler.step(eps, t, x, return_dict=False)[0]
        upd = ddim_update(sampler, t, x, cfg)
        got = apply_updates([upd], [out])[0]  # on the CPU: the reference
        assert got.dtype == want.dtype and torch.equal(got, want), (prediction, dtype, int(t))


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("dtype,atol", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(4, 8, 8), (3, 5, 7), (1, 1, 1), (4, 33, 29)])
def test_triton_kernel_equals_the_reference(prediction, dtype, atol, shape):
    n = 5
    u, c, x = _rows(n, shape, dtype, seed=1)
    g = torch.tensor([1.0, 7.5, 0.0, 3.0, 12.0])
    k = torch.rand(n, 4, generator=torch.Generator().manual_seed(2)) * 0.9 + 0.05
    ref32 = cfg_ddim_step_reference(u.float(), c.float(), x.float(), g, k, prediction)
    ref = cfg_ddim_step_reference(u, c, x, g, k, prediction)
    got = cfg_ddim_step(u, c, x, g, k, prediction)  # Triton through the interpreter (conftest)
    err_ref = (ref.float() - ref32).abs().max()
    assert (got.float() - ref32).abs().max() <= 2 * err_ref + atol
    nocfg = cfg_ddim_step(None, c, x, None, k, prediction)
    assert (nocfg.float() - cfg_ddim_step_reference(None, c.float(), x.float(), None, k, prediction)).abs().max() \
        <= 2 * err_ref + atol


def test_rows_are_independent_and_batched_updates_equal_separate_ones():
    """Three requests with different guidance, timesteps and sizes of batch in one apply_updates call give what
    each gives alone, bit for bit."""
    sampler = _sampler("epsilon")
    updates, outs = [], []
    for i, (n, g) in enumerate([(1, 7.5), (3, 2.0), (2, 11.0)]):
        u, c, x = _rows(n, (4, 8, 8), torch.float32, seed=10 + i)
        t = sampler.timesteps[4 * i]
        updates.append(ddim_update(sampler, t, x, g))
        outs.append(torch.cat([u, c]))
    together = apply_updates(updates, outs)
    for upd, out, got in zip(updates, outs, together):
        assert torch.equal(got, upd.apply(out))


def test_what_is_not_batchable_says_so():
    clip = DDIMScheduler(clip_sample=True).config
    assert ddim_update(Sampler("ddim", clip, 10, "cpu"), torch.tensor(901), torch.zeros(1, 4, 2, 2), 7.5) is None
    euler = Sampler("euler", DDIMScheduler().config, 10, "cpu")
    assert ddim_update(euler, euler.timesteps[0], torch.zeros(1, 4, 2, 2), 7.5) is None
    upd = StepUpdate(torch.zeros(2, 4, 2, 2), 7.5, torch.ones(4), "epsilon")
    with pytest.raises(ValueError, match="update"):
        upd.apply(torch.zeros(2, 4, 2, 2))  # CFG needs 4 rows for 2 images


def test_bad_arguments_are_value_errors():
    x = torch.zeros(2, 4, 3, 3)
    k = torch.ones(2, 4)
    with pytest.raises(ValueError, match="coeffs"):
        cfg_ddim_step(None, x, x, None, torch.ones(3, 4), "epsilon")
    with pytest.raises(ValueError, match="guidance"):
        cfg_ddim_step(x, x, x, None, k, "epsilon")
    with pytest.raises(ValueError, match="cond"):
        cfg_ddim_step(None, x.half(), x, None, k, "epsilon")
    with pytest.raises(ValueError, match="prediction"):
        cfg_ddim_step(None, x, x, None, k, "flow")


def test_opcheck():
    x = torch.randn(2, 4, 3, 3)
    torch.library.opcheck(torch.ops.dreamfuse.cfg_ddim_step, (x, x + 1, x - 1, torch.tensor([7.5, 1.0]),
                                                             torch.rand(2, 4) + 0.1, 0))
    torch.library.opcheck(torch.ops.dreamfuse.cfg_ddim_step, (None, x + 1, x - 1, None, torch.rand(2, 4) + 0.1, 2))
