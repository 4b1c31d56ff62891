"""dreamfuse attention processors for diffusers UNets, and the per-UNet-call context they read.

Installed with ``unet.set_attn_processor``: one processor per attention layer, each knowing its own
module name (``up_blocks.2.attentions.0.transformer_blocks.0.attn1``) so that a pipeline can change
what one layer does for one call (AMA value warping, reading cross-attention maps through the
log-sum-exp) through the :class:`CallContext`, never through globals.

IP-Adapter (decoupled cross-attention): an ``attn2`` processor whose ``ip_layer`` is set (a module with
``to_k_ip``/``to_v_ip``, owned by the engine's loaded :class:`~dreamfuse.engine.ip_adapter.IPAdapter`) adds
``ip_scale * Attn(q, to_k_ip(tokens), to_v_ip(tokens))`` to its text attention when the call's context holds
``data["ip_tokens"]`` (``(B, T, cross_dim)``, one row per UNet batch row) and ``data["ip_scale"]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from dreamfuse.kernels.attention import attention as fused_attention

# A layer handler takes over the attention product of one layer for one call:
# handler(layer: LayerInfo, q, k, v) -> out, with q (B, H, Lq, D), k/v (B, H, Lk, D), out like q.
Handler = Callable[["LayerInfo", torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LayerInfo:
    name: str
    """Module path of the attention layer in the UNet, e.g. ``up_blocks.3.attentions.2.transformer_blocks.0.attn1``."""
    is_cross: bool
    """True for cross-attention (``attn2``: keys from the text/image prompt), False for self-attention."""
    hidden_hw: tuple[int, int] | None
    """Spatial size of the layer's tokens when known (set by the processor from the call's latent size)."""
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    """The layer's plain attention (what it runs without a handler): a handler uses it for the rows it leaves
    alone, so that they come out bit-identical to a call without the handler."""


@dataclass
class CallContext:
    """What the processors need for one UNet call. Pipelines fill it before the call and clear it after.

    ``handlers`` maps a layer name to the handler that computes that layer's attention for this call;
    layers without one run the plain fused attention. ``latent_hw`` is the latent grid of the call, from
    which each layer derives its token grid. ``data`` carries pipeline state (branch layout of the batch,
    flows and masks per resolution, token indices) that handlers close over or read.
    """

    handlers: dict[str, Handler] = field(default_factory=dict)
    latent_hw: tuple[int, int] | None = None
    data: dict = field(default_factory=dict)

    def clear(self) -> None:
        self.handlers.clear()
        self.latent_hw = None
        self.data.clear()


def token_grid(latent_hw: tuple[int, int] | None, tokens: int) -> tuple[int, int] | None:
    """The (h, w) grid of a layer with ``tokens`` positions, from the call's latent size (UNet levels halve
    the latent, rounding up as diffusers' downsamplers do)."""
    if latent_hw is None:
        return None
    h, w = latent_hw
    while h * w > tokens and h > 1:
        h, w = (h + 1) // 2, (w + 1) // 2
    return (h, w) if h * w == tokens else None


class DreamfuseAttnProcessor:
    """Attention processor running ``dreamfuse.kernels.attention`` (backend ``triton``) or PyTorch SDPA
    (backend ``torch``), with per-call handlers from the :class:`CallContext`.

    Falls back to SDPA when the kernel's constraints fail (an attention mask, head dim > 256).
    """

    def __init__(self, name: str, ctx: CallContext, backend: str):
        self.name = name
        self.ctx = ctx
        self.backend = backend
        self.is_cross = name.endswith("attn2")
        self.ip_layer: torch.nn.Module | None = None
        """IP-Adapter ``to_k_ip``/``to_v_ip`` of this layer (attn2 only), or None: the layer is plain."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask=None) -> torch.Tensor:
        if attention_mask is not None or q.shape[-1] > 256 or self.backend == "torch":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        return fused_attention(q, k, v)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq_len, _ = hidden_states.shape
        if attention_mask is not None:
            kv_len = seq_len if encoder_hidden_states is None else encoder_hidden_states.shape[1]
            attention_mask = attn.prepare_attention_mask(attention_mask, kv_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        heads = attn.heads
        head_dim = key.shape[-1] // heads
        # (B, L, H*D) -> (B, H, L, D) as strided views: the kernel reads strides, no copies.
        q = query.view(batch, -1, heads, head_dim).transpose(1, 2)
        k = key.view(batch, -1, heads, head_dim).transpose(1, 2)
        v = value.view(batch, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)

        handler = self.ctx.handlers.get(self.name)
        if handler is not None and attention_mask is None:
            info = LayerInfo(self.name, self.is_cross, token_grid(self.ctx.latent_hw, q.shape[2]), self.attend)
            out = handler(info, q, k, v)
        else:
            out = self.attend(q, k, v, attention_mask)
        ip_tokens = self.ctx.data.get("ip_tokens") if self.ip_layer is not None else None
        if ip_tokens is not None:
            out = out + self.ctx.data.get("ip_scale", 1.0) * self.ip_attention(q, ip_tokens)

        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def ip_attention(self, q: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The image branch of decoupled cross-attention: ``Attn(q, to_k_ip(tokens), to_v_ip(tokens))``,
        ``q`` ``(B, H, Lq, D)``, ``tokens`` ``(B, T, cross_dim)`` -> ``(B, H, Lq, D)``; no mask (the official
        IP-Adapter attends to every image token)."""
        batch, heads, _, head_dim = q.shape
        tokens = tokens.to(q.dtype)
        k = self.ip_layer.to_k_ip(tokens).view(batch, -1, heads, head_dim).transpose(1, 2)
        v = self.ip_layer.to_v_ip(tokens).view(batch, -1, heads, head_dim).transpose(1, 2)
        return self.attend(q, k, v)


def install_processors(unet, ctx: CallContext, backend: str) -> dict[str, DreamfuseAttnProcessor]:
    """Give every attention layer of ``unet`` a :class:`DreamfuseAttnProcessor`; returns them by layer name."""
    procs = {}
    for key in unet.attn_processors:  # keys look like "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
        name = key.removesuffix(".processor")
        procs[name] = DreamfuseAttnProcessor(name, ctx, backend)
    unet.set_attn_processor({f"{n}.processor": p for n, p in procs.items()})
    return procs
