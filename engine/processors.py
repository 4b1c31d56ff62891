"""dreamfuse attention processors for diffusers UNets, and the per-UNet-call context they read.

Installed with ``unet.set_attn_processor``: one processor per attention layer, each knowing its own
module name (``up_blocks.2.attentions.0.transformer_blocks.0.attn1``) so that a pipeline can change
what one layer does for one call (AMA value warping, reading cross-attention maps through the
log-sum-exp) through a :class:`CallContext`, never through globals.

One context per UNet call, carried by the call itself: ``Engine.unet_call(..., ctx=ctx)`` passes it down through
diffusers' ``cross_attention_kwargs`` (``dreamfuse_ctx``), which the UNet hands to every attention processor
and every cross-attention block. Processors are stateless between calls, so any number of threads can run
pipelines on one engine at once and each call sees only its own handlers, features and image tokens. A call
without a context (plain text-to-image) passes no kwargs at all: the compiled UNet sees the stock signature.

IP-Adapter (decoupled cross-attention): an ``attn2`` processor whose ``ip_layer`` is set (a module with
``to_k_ip``/``to_v_ip``, owned by the engine's loaded :class:`~dreamfuse.engine.ip_adapter.IPAdapter`) adds
``ip_scale * Attn(q, to_k_ip(tokens), to_v_ip(tokens))`` to its text attention when the call passes
``ip_tokens`` (``(B, T, cross_dim)``, one row per UNet batch row) and ``ip_scale`` (also through
``cross_attention_kwargs``: tensors, so a compiled UNet takes them as graph inputs).

Decoder features: :func:`install_feature_hooks` puts one permanent forward hook on every cross-attention up
block; it stores the block's output in ``ctx.features[name]`` when the call's context lists ``name`` in
``ctx.capture`` (hooks are never added or removed per call: that would race with other threads' forwards).

Stock diffusers on the same modules: :func:`stock_attention` (``Engine.stock_attention()``) swaps diffusers'
default processors in for a block and puts dreamfuse's back afterwards, for like-for-like comparisons without
loading the model twice.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
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
    """What the processors and feature hooks need for one UNet call; a pipeline makes one per call (or per
    step) and passes it to ``Engine.unet_call(..., ctx=...)``. Never shared between concurrent calls.

    ``handlers`` maps a layer name to the handler that computes that layer's attention for this call;
    layers without one run the plain fused attention. ``latent_hw`` is the latent grid of the call (set by
    ``unet_call``), from which each layer derives its token grid. ``capture`` names the up blocks
    (``"up_blocks.1"``) whose outputs the call keeps in ``features``. ``data`` carries pipeline state that
    handlers close over or read.
    """

    handlers: dict[str, Handler] = field(default_factory=dict)
    latent_hw: tuple[int, int] | None = None
    capture: frozenset[str] = frozenset()
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    data: dict = field(default_factory=dict)


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

    def __init__(self, name: str, backend: str):
        self.name = name
        self.backend = backend
        self.is_cross = name.endswith("attn2")
        self.ip_layer: torch.nn.Module | None = None
        """IP-Adapter ``to_k_ip``/``to_v_ip`` of this layer (attn2 only), or None: the layer is plain."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask=None) -> torch.Tensor:
        if attention_mask is not None or q.shape[-1] > 256 or self.backend == "torch":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        return fused_attention(q, k, v)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *,
                 dreamfuse_ctx: CallContext | None = None, ip_tokens: torch.Tensor | None = None,
                 ip_scale: float | torch.Tensor = 1.0, **kwargs):
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

        ctx = dreamfuse_ctx
        handler = ctx.handlers.get(self.name) if ctx is not None else None
        if handler is not None and attention_mask is None:
            info = LayerInfo(self.name, self.is_cross, token_grid(ctx.latent_hw, q.shape[2]), self.attend)
            out = handler(info, q, k, v)
        else:
            out = self.attend(q, k, v, attention_mask)
        if ip_tokens is not None and self.ip_layer is not None:
            out = out + ip_scale * self.ip_attention(q, ip_tokens)

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


def install_processors(unet, backend: str) -> dict[str, DreamfuseAttnProcessor]:
    """Give every attention layer of ``unet`` a :class:`DreamfuseAttnProcessor`; returns them by layer name."""
    procs = {}
    for key in unet.attn_processors:  # keys look like "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
        name = key.removesuffix(".processor")
        procs[name] = DreamfuseAttnProcessor(name, backend)
    # set_attn_processor(dict) pops the entries it uses: give it a copy, keep ours
    unet.set_attn_processor({f"{n}.processor": p for n, p in procs.items()})
    return procs


def stock_processors(unet) -> dict[str, object]:
    """diffusers' default processor for every attention layer of ``unet``, keyed ``"<layer>.processor"``: what
    a freshly loaded UNet holds (``Attention.__init__``: ``AttnProcessor2_0`` where SDPA exists and the layer
    scales q·k, else ``AttnProcessor``). ``unet.set_default_attn_processor()`` cannot be used instead: it refuses
    processors it does not know (ours), and picks ``AttnProcessor`` (no SDPA), not what a loaded model runs."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    sdpa = hasattr(F, "scaled_dot_product_attention")
    out = {}
    for key in unet.attn_processors:
        attn = unet.get_submodule(key.removesuffix(".processor"))
        out[key] = AttnProcessor2_0() if sdpa and getattr(attn, "scale_qk", True) else AttnProcessor()
    return out


@contextmanager
def stock_attention(unet):
    """Run ``unet`` with diffusers' stock attention processors (:func:`stock_processors`) inside the block and
    put back the processors it had (dreamfuse's) on exit, also when the block raises.

    Inside, the UNet computes what the same weights compute in a plain diffusers pipeline: dreamfuse's per-call
    layer handlers (``dreamfuse_ctx``: AMA, attention maps) and IP-Adapter tokens do not reach the attention, so
    run only stock work there (e.g. a diffusers pipeline built on the engine's modules). Refused
    (``RuntimeError``) while an IP-Adapter is loaded: the stock processors would silently drop its image
    attention, and diffusers' own IP-Adapter processors hold their weights differently; unload it first.
    The processors are model state shared by every thread: swap them while no other call runs."""
    current = unet.attn_processors  # a fresh dict: layer key -> processor object
    if any(getattr(p, "ip_layer", None) is not None for p in current.values()):
        raise RuntimeError("stock attention: an IP-Adapter is loaded; diffusers' stock processors would drop its "
                           "image attention (unload_ip_adapter() first)")
    unet.set_attn_processor(stock_processors(unet))
    try:
        yield unet
    finally:
        unet.set_attn_processor(dict(current))  # set_attn_processor empties the dict it is given


def capturable_blocks(unet) -> list[str]:
    """The up blocks whose outputs a call can capture: those with cross-attention, which receive the call's
    ``cross_attention_kwargs`` (``up_blocks.1`` ... in SD, ``up_blocks.0``/``.1`` in SDXL)."""
    return [f"up_blocks.{i}" for i, b in enumerate(unet.up_blocks) if getattr(b, "has_cross_attention", False)]


def _capture_hook(name: str):
    def hook(module, args, kwargs, output):
        cak = kwargs.get("cross_attention_kwargs") or {}
        ctx = cak.get("dreamfuse_ctx")
        if ctx is not None and name in ctx.capture:
            ctx.features[name] = (output[0] if isinstance(output, tuple) else output).detach()
    return hook


def install_feature_hooks(unet) -> list:
    """One permanent forward hook per :func:`capturable_blocks` entry (see the module docstring); returns the
    hook handles. Idempotent: engines sharing one UNet share its hooks."""
    handles = getattr(unet, "_dreamfuse_feature_hooks", None)
    if handles is None:
        handles = [unet.get_submodule(name).register_forward_hook(_capture_hook(name), with_kwargs=True)
                   for name in capturable_blocks(unet)]
        unet._dreamfuse_feature_hooks = handles
    return handles
