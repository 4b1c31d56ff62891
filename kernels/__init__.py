"""dreamfuse's Triton kernels, each a ``torch.ops.dreamfuse.*`` op with a fake and a PyTorch reference.

On CUDA tensors the ops run Triton; on CPU tensors they run their ``*_reference`` (or the Triton code through
the interpreter when ``TRITON_INTERPRET=1`` is set before import). ``DREAMFUSE_DISABLE_KERNELS=1`` forces the
references everywhere.
"""

if __name__ != "dreamfuse.kernels":
    # Imported as a top-level `kernels`: the repository root is on sys.path (`python -m pytest`, `python -m bench.x`
    # from a checkout) and transformers/diffusers probe the PyPI package `kernels` by importing it. Register nothing
    # here -- the ops belong to dreamfuse.kernels, and registering them from a second copy of these modules would
    # bind the `dreamfuse::` ops to the wrong module objects -- and look like no installed package (no __version__,
    # so the probe reports it unavailable).
    __all__: list[str] = []
else:
    from .attention import ama_attention, ama_attention_reference, attention, attention_reference
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
        "attention", "attention_reference", "ama_attention", "ama_attention_reference",
        "match_argmax", "match_argmax_reference", "cycle_mask", "cycle_mask_reference",
        "composite_blend", "composite_blend_reference", "composite_latents", "composite_latents_reference",
        "segment_fill", "segment_fill_reference",
    ]
