"""Model-level check: the tiny UNet with dreamfuse processors matches diffusers' stock processors."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from dreamfuse.engine.processors import CallContext, install_processors, token_grid
from dreamfuse.engine.tiny import build_components


@pytest.fixture(scope="module")
def unet_and_inputs():
    unet = build_components()["unet"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    emb = torch.randn(2, 77, 64, generator=g)
    t = torch.tensor(500)
    unet.set_attn_processor(AttnProcessor2_0())
    with torch.no_grad():
        stock = unet(x, t, encoder_hidden_states=emb).sample
    return unet, (x, t, emb), stock


@pytest.mark.parametrize("backend", ["torch", "triton"])  # triton: the kernel under TRITON_INTERPRET on CPU
def test_dreamfuse_processors_match_stock(unet_and_inputs, backend):
    unet, (x, t, emb), stock = unet_and_inputs
    procs = install_processors(unet, backend)
    # 3 down + 1 mid + 3x2 up transformer blocks, each with attn1 and attn2
    assert len(procs) == 20 and sum(n.endswith("attn2") for n in procs) == 10
    with torch.no_grad():
        ours = unet(x, t, encoder_hidden_states=emb).sample
        with_ctx = unet(x, t, encoder_hidden_states=emb,
                        cross_attention_kwargs={"dreamfuse_ctx": CallContext(latent_hw=(8, 8))}).sample
    torch.testing.assert_close(with_ctx, ours, atol=0, rtol=0)  # an empty context changes nothing
    torch.testing.assert_close(ours, stock, atol=1e-4, rtol=1e-4)


def test_handler_takes_over_one_layer_with_its_grid(unet_and_inputs):
    unet, (x, t, emb), stock = unet_and_inputs
    install_processors(unet, "torch")
    ctx = CallContext(latent_hw=(8, 8))
    seen = []
    name = "up_blocks.3.attentions.0.transformer_blocks.0.attn1"

    def zero_values(layer, q, k, v):
        seen.append((layer.name, layer.is_cross, layer.hidden_hw, tuple(q.shape)))
        assert torch.equal(layer.attend(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v))
        return torch.zeros_like(q)

    ctx.handlers[name] = zero_values
    with torch.no_grad():
        out = unet(x, t, encoder_hidden_states=emb, cross_attention_kwargs={"dreamfuse_ctx": ctx}).sample
        plain = unet(x, t, encoder_hidden_states=emb).sample  # the handler belongs to that call only
    torch.testing.assert_close(plain, stock, atol=1e-4, rtol=1e-4)
    assert seen == [(name, False, (8, 8), (2, 2, 64, 20))]
    assert not torch.allclose(out, stock, atol=1e-4)


def test_token_grid_follows_unet_levels():
    assert token_grid((64, 64), 4096) == (64, 64)
    assert token_grid((64, 64), 256) == (16, 16)
    assert token_grid((12, 9), 9) == (3, 3)  # odd sizes round up, as diffusers' strided convs do
    assert token_grid((12, 9), 12) is None
    assert token_grid((12, 9), 30) == (6, 5)
    assert token_grid(None, 64) is None
