"""dreamfuse's Triton kernels, each a ``torch.ops.dreamfuse.*`` op with a fake and a PyTorch reference.

On CUDA tensors the ops run Triton; on CPU tensors they run their ``*_reference`` (or the Triton code through
the interpreter when ``TRITON_INTERPRET=1`` is set before import). ``DREAMFUSE_DISABLE_KERNELS=1`` forces the
references everywhere.

``dreamfuse.kernels.attention``, ``.composite`` and ``.matching`` are the kernel modules; the ops are exported here
by name (``match_argmax``, ``composite_blend``, ...), except that the fused attention op is ``fused_attention``
here (``attention.attention`` in its module): the name ``attention`` belongs to the module.
"""

if __name__ != "dreamfuse.kernels":
    # Imported as a top-level `kernels`: the repository root is on sys.path (`python -m pytest`, `python -m bench.x`
    # from a checkout) and transformers/diffusers probe the PyPI package `kernels` by importing it. Register nothing
    # here -- the ops belong to dreamfuse.kernels, and registering them from a second copy of these modules would
    # bind the `dreamfuse::` ops to the wrong module objects -- and look like no installed package (no __version__,
    # so the probe reports it unavailable).
    __all__: list[str] = []
else:
    # The submodules stay modules: `import dreamfuse.kernels.attention as m` must give the module, so no function
    # is re-exported under a submodule's name. The fused attention op is `attention.attention` (also exported here
    # as `fused_attention`); every other op keeps its own name, which no submodule has.
    from . import attention, composite, matching
    from .attention import ama_attention, ama_attention_reference, attention_reference
    from .attention import attention as fused_attention
    from .composite import (
        composite_blend,
        composite_blend_reference,
        composite_latents,
        composite_latents_reference,
        segment_fill,
        segment_fill_reference,
    )
    from .matching import cycle_mask, cycle_mask_reference, match_argmax, match_argmax_reference

    __all__ = [
        "attention", "composite", "matching",
        "fused_attention", "attention_reference", "ama_attention", "ama_attention_reference",
        "match_argmax", "match_argmax_reference", "cycle_mask", "cycle_mask_reference",
        "composite_blend", "composite_blend_reference", "composite_latents", "composite_latents_reference",
        "segment_fill", "segment_fill_reference",
    ]
