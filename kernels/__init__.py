"""dreamfuse's Triton kernels, each a ``torch.ops.dreamfuse.*`` op with a fake and a PyTorch reference.

On CUDA tensors the ops run Triton; on CPU tensors they run their ``*_reference`` (or the Triton code through
the interpreter when ``TRITON_INTERPRET=1`` is set before import). ``DREAMFUSE_DISABLE_KERNELS=1`` forces the
references everywhere.

``dreamfuse.kernels.attention``, ``.composite``, ``.matching`` and ``.lora`` are the kernel modules; the ops are
exported here by name (``match_argmax``, ``composite_blend``, ``lora_delta``, ...), except that the fused attention op
is ``fused_attention`` here (``attention.attention`` in its module): the name ``attention`` belongs to the module.
"""

if __name__ != "dreamfuse.kernels":
    # Imported under another name than dreamfuse.kernels: the repository root is on sys.path (`python -m pytest`,
    # `python -m bench.x`, `python` typed in a checkout) and something imported the top-level `kernels`, which is
    # Hugging Face's kernel-hub package on PyPI (transformers >= 5.25 requires it and imports it). This folder is
    # not that package and registers nothing from here -- the ops belong to dreamfuse.kernels, and registering them
    # from a second copy of these modules would bind the `dreamfuse::` ops to the wrong module objects. See
    # _shadowed_import below: the installed package takes this module's place in sys.modules, and the import
    # returns it; without one installed, this stays an empty module with no __version__ (a probe reports the
    # package unavailable, as it would outside the checkout).
    def _shadowed_import(name: str) -> bool:
        """Load the installed package ``name`` that this folder shadows into ``sys.modules[name]``; False when none
        is installed. Every finder on ``sys.meta_path`` is asked, with every ``sys.path`` entry but the folder
        holding this one, and a spec inside this folder is never taken."""
        import importlib.util
        import os
        import sys

        here = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
        root = os.path.dirname(here)

        def elsewhere(entry) -> bool:
            try:
                return os.path.realpath(entry or os.getcwd()) != root
            except (TypeError, ValueError, OSError):
                return True

        paths = [p for p in sys.path if isinstance(p, str) and elsewhere(p)]
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            try:
                spec = find(name, paths)
            except (ImportError, ValueError, OSError):
                continue
            if spec is None or spec.loader is None:
                continue
            places = [os.path.realpath(x) for x in [spec.origin, *(spec.submodule_search_locations or ())]
                      if isinstance(x, str)]
            if any(x == here or x.startswith(here + os.sep) for x in places):
                continue  # this folder again (a finder that ignores the path it is given)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # the import system returns sys.modules[name] once this module has run
            spec.loader.exec_module(module)
            return True
        return False

    __all__: list[str] = []
    if __name__ == "kernels":
        _shadowed_import(__name__)
    del _shadowed_import
else:
    # The submodules stay modules: `import dreamfuse.kernels.attention as m` must give the module, so no function
    # is re-exported under a submodule's name. The fused attention op is `attention.attention` (also exported here
    # as `fused_attention`); every other op keeps its own name, which no submodule has.
    from . import attention, composite, lora, matching, sampler
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
    from .lora import lora_delta, lora_delta_reference, lora_segments
    from .matching import cycle_mask, cycle_mask_reference, match_argmax, match_argmax_reference
    from .sampler import cfg_ddim_step, cfg_ddim_step_reference

    __all__ = [
        "attention", "composite", "lora", "matching",
        "fused_attention", "attention_reference", "ama_attention", "ama_attention_reference",
        "match_argmax", "match_argmax_reference", "cycle_mask", "cycle_mask_reference",
        "composite_blend", "composite_blend_reference", "composite_latents", "composite_latents_reference",
        "segment_fill", "segment_fill_reference",
        "lora_delta", "lora_delta_reference", "lora_segments",
        "sampler", "cfg_ddim_step", "cfg_ddim_step_reference",
    ]
