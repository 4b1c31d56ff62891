"""dreamfuse plugin nodes: the ONNX contract of the exporter, the onnxruntime custom ops and the TensorRT plugins.

``dreamfuse export onnx --plugins`` writes DreamMatcher's AMA attention as one custom-domain node per layer instead of
its standard-op decomposition; :func:`op_graph` builds a one-node model for each of the four plugins. The TensorRT
IPluginV3 plugins (``native/trt_plugins/``) and the onnxruntime custom ops below implement exactly this spec.

Common to every node
--------------------
* ONNX node: ``domain = "dreamfuse"`` (opset import ``("dreamfuse", 1)``), ``op_type`` = the plugin name below.
* Attributes present on every node (read by TensorRT's ONNX parser to find the plugin creator, not plugin fields):
  ``plugin_namespace`` (string) = ``"dreamfuse"``, ``plugin_version`` (string) = ``"1"``.
* Plugin fields: the other attributes listed per node, each an ONNX ``float`` (TensorRT ``PluginFieldType::kFLOAT32``)
  or ``int`` (``kINT32``). Every listed attribute is always written (no defaults to guess).
* dtypes: ``T`` is ``float32`` or ``float16``; within one node every tensor called ``T`` has the same dtype.
  Integer index tensors are ``int32`` (the exporter inserts a ``Cast`` from the graph's int64; indices stay below
  2**31: at most 9216 positions). Similarities are always ``float32``.
* Layouts are dense row-major (contiguous, "linear" format in TensorRT). Every dimension may be dynamic.
* Accumulation in fp32 whatever ``T`` is (the Triton kernels' and the references' rule).

AmaAttention  (``dreamfuse::ama_attention``, kernels/attention.py)
    inputs:  0 ``q``      (B, H, Lq, D) T
             1 ``k``      (B, H, Lk, D) T
             2 ``v_tgt``  (B, H, Lk, D) T
             3 ``v_ref``  (B, H, Lk, D) T
             4 ``flow``   (B, Lk)       int32   indices into v_ref's key axis; outside [0, Lk) clamped into it
             5 ``mask``   (B, Lk)       T       soft weights, 1 = take the warped reference value
    outputs: 0 ``out``    (B, H, Lq, D) T
    attributes: ``scale`` float (the softmax scale, D ** -0.5 in the exported UNet)
    semantics: ``V_w[b,h,j] = mask[b,j]·v_ref[b,h,flow[b,j]] + (1 − mask[b,j])·v_tgt[b,h,j]`` (blend in fp32, rounded
    once to T), ``out = softmax(scale · q·kᵀ) · V_w`` over the key axis. 1 <= D <= 256, Lk >= 1. The op's lse output is
    not part of the node (no exported graph reads it).

MatchArgmax  (``dreamfuse::match_argmax``, kernels/matching.py)
    inputs:  0 ``f_tgt``   (B, N, D) T
             1 ``f_ref``   (B, M, D) T       (need not be normalized)
    outputs: 0 ``t2r``     (B, N) int32      argmax_m cos(f_tgt[b,n], f_ref[b,m])
             1 ``r2t``     (B, M) int32      argmax_n cos(f_tgt[b,n], f_ref[b,m])
             2 ``t2r_sim`` (B, N) float32    the maxima of 0
             3 ``r2t_sim`` (B, M) float32    the maxima of 1
    attributes: none besides the common two.
    semantics: cosine similarity with ``1/‖f‖`` per row (a zero row has 1/‖f‖ = 0: similarity 0 to everything); ties
    go to the lowest index (``torch.argmax``'s rule). N, M, D >= 1.

CycleMask  (``dreamfuse::cycle_mask``, kernels/matching.py)
    inputs:  0 ``t2r``  (B, Hg, Wg) int32    target -> reference flow, row-major positions p = y·Wg + x in [0, Hg·Wg)
             1 ``r2t``  (B, Hg, Wg) int32    reference -> target flow on the same grid
             2 ``fg``   (B, Hg, Wg) T        foreground mask (soft)
    outputs: 0 ``mask`` (B, Hg, Wg) T
    attributes: ``lambda_c`` float (> 0; 0.4 in DreamMatcher)
    semantics: the grid (height Hg, width Wg) is read from the input shape (the Python op's ``height``/``width``
    arguments: the flattened ``(B, N)`` tensors reshaped to ``(B, Hg, Wg)``). For position p with
    ``q = r2t[t2r[p]]``: ``err = sqrt((q//Wg − p//Wg)² + (q%Wg − p%Wg)²)`` (fp32, correctly rounded sqrt of the exact
    integer), ``thr[b] = lambda_c · Hg · Σ_p fg[b,p] / (Hg·Wg)`` (fp32), ``mask = fg`` where ``err < thr`` else 0.
    A t2r value outside [0, Hg·Wg) counts as inconsistent (mask 0, nothing read through it).

CompositeBlend  (``dreamfuse::composite_blend``, kernels/composite.py)
    inputs:  0 ``eps_uncond`` (B, S, C, h, w) T
             1 ``eps_cond``   (B, S, C, h, w) T
             2 ``masks``      (B, S, h, w)    T     segment weights >= 0
             3 ``guidance``   (B, S)          T     CFG scale per (row, segment); a scalar scale is that value repeated
    outputs: 0 ``eps``        (B, C, h, w)    T
    attributes: none besides the common two.
    semantics: ``eps = Σ_s m_s·(u_s + g_s·(c_s − u_s)) / max(Σ_s m_s, 1e-6)`` (fp32 accumulation); pixels no segment
    covers come out 0. S >= 1.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

DOMAIN = "dreamfuse"
NAMESPACE = "dreamfuse"
VERSION = "1"
DOMAIN_VERSION = 1


@dataclass(frozen=True)
class PluginSpec:
    """One plugin node, as in the module docstring: ``(name, dtype, dims)`` per input and output (dtype ``"T"``,
    ``"int32"`` or ``"float32"``; dims are the symbolic names :func:`op_graph` gives them), the plugin-field
    attributes by ONNX type (``"float"``/``"int"``), and the ``torch.ops.dreamfuse`` op it stands for."""

    op: str
    inputs: tuple[tuple[str, str, tuple[str, ...]], ...]
    outputs: tuple[tuple[str, str, tuple[str, ...]], ...]
    attrs: dict[str, str]


PLUGINS: dict[str, PluginSpec] = {
    "AmaAttention": PluginSpec(
        "ama_attention",
        inputs=(
            ("q", "T", ("B", "H", "Lq", "D")),
            ("k", "T", ("B", "H", "Lk", "D")),
            ("v_tgt", "T", ("B", "H", "Lk", "D")),
            ("v_ref", "T", ("B", "H", "Lk", "D")),
            ("flow", "int32", ("B", "Lk")),
            ("mask", "T", ("B", "Lk")),
        ),
        outputs=(("out", "T", ("B", "H", "Lq", "D")),),
        attrs={"scale": "float"},
    ),
    "MatchArgmax": PluginSpec(
        "match_argmax",
        inputs=(("f_tgt", "T", ("B", "N", "D")), ("f_ref", "T", ("B", "M", "D"))),
        outputs=(
            ("t2r", "int32", ("B", "N")),
            ("r2t", "int32", ("B", "M")),
            ("t2r_sim", "float32", ("B", "N")),
            ("r2t_sim", "float32", ("B", "M")),
        ),
        attrs={},
    ),
    "CycleMask": PluginSpec(
        "cycle_mask",
        inputs=(
            ("t2r", "int32", ("B", "Hg", "Wg")),
            ("r2t", "int32", ("B", "Hg", "Wg")),
            ("fg", "T", ("B", "Hg", "Wg")),
        ),
        outputs=(("mask", "T", ("B", "Hg", "Wg")),),
        attrs={"lambda_c": "float"},
    ),
    "CompositeBlend": PluginSpec(
        "composite_blend",
        inputs=(
            ("eps_uncond", "T", ("B", "S", "C", "h", "w")),
            ("eps_cond", "T", ("B", "S", "C", "h", "w")),
            ("masks", "T", ("B", "S", "h", "w")),
            ("guidance", "T", ("B", "S")),
        ),
        outputs=(("eps", "T", ("B", "C", "h", "w")),),
        attrs={},
    ),
}
DTYPES = ("float32", "float16")


def _spec(name: str) -> PluginSpec:
    if name not in PLUGINS:
        raise ValueError(f"plugin: unknown plugin {name!r} (one of {', '.join(PLUGINS)})")
    return PLUGINS[name]


def node_attributes(name: str, **fields) -> dict:
    """The attributes of a ``name`` node: ``plugin_namespace``, ``plugin_version`` and every plugin field of the spec
    (all required, each converted to its ONNX type; ``ValueError`` naming a missing, unknown or invalid one)."""
    spec = _spec(name)
    unknown = set(fields) - set(spec.attrs)
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: not an attribute of {name} (it has {sorted(spec.attrs) or 'none'})")
    attrs = {}
    for key, kind in spec.attrs.items():
        if fields.get(key) is None:
            raise ValueError(f"{key}: {name} needs it ({kind})")
        value = float(fields[key]) if kind == "float" else int(fields[key])
        if key == "lambda_c" and not value > 0:
            raise ValueError(f"lambda_c: must be > 0, got {value}")
        attrs[key] = value
    return {**attrs, "plugin_namespace": NAMESPACE, "plugin_version": VERSION}


# --------------------------------------------------------------------------------------------- ONNX
def _onnx_type(kind: str, dtype: str) -> int:
    from onnx import TensorProto

    name = dtype if kind == "T" else kind
    return {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int32": TensorProto.INT32}[name]


def op_graph(name: str, *, dtype: str = "float32", opset: int = 18, **fields):
    """A one-node ``onnx.ModelProto`` of plugin ``name`` with the spec's inputs and outputs as graph inputs and
    outputs, every dimension symbolic (the names in :data:`PLUGINS`), ``T = dtype`` (``"float32"``/``"float16"``),
    and the plugin fields as keyword arguments (``op_graph("AmaAttention", scale=0.125)``). For testing one plugin
    alone (onnxruntime with :func:`add_onnxruntime_ops`, or TensorRT's parser with the plugin library loaded)."""
    from onnx import helper

    spec = _spec(name)
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not a plugin dtype ({', '.join(DTYPES)})")
    attrs = node_attributes(name, **fields)
    node = helper.make_node(
        name, [i[0] for i in spec.inputs], [o[0] for o in spec.outputs], name=name, domain=DOMAIN, **attrs
    )
    value = lambda n, kind, dims: helper.make_tensor_value_info(n, _onnx_type(kind, dtype), list(dims))
    graph = helper.make_graph(
        [node], f"dreamfuse_{name}", [value(*i) for i in spec.inputs], [value(*o) for o in spec.outputs]
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", int(opset)), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
        producer_name="dreamfuse",
    )
    model.ir_version = min(model.ir_version, 10)  # what onnxruntime >= 1.20 and TensorRT 10's parser read
    return model


def plugin_nodes(model) -> list[str]:
    """The plugin op types (sorted, unique) among the nodes of an ``onnx.ModelProto`` (functions included)."""
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    return sorted({n.op_type for n in nodes if n.domain == DOMAIN})


# --------------------------------------------------------------------------------------------- torch.export lowering
def _ama_attention(q, k, v_tgt, v_ref, flow, mask, scale):
    attrs = node_attributes("AmaAttention", scale=scale)
    out = torch.onnx.ops.symbolic(
        f"{DOMAIN}::AmaAttention",
        (q, k, v_tgt, v_ref, flow.to(torch.int32), mask.to(q.dtype)),
        attrs,
        dtype=q.dtype,
        shape=q.shape,
        version=DOMAIN_VERSION,
    )
    # The node has no lse output; a graph that reads the op's lse gets it from standard ops (pruned where unused,
    # as in every exported UNet).
    lse = torch.logsumexp((q.float() * scale) @ k.float().transpose(-1, -2), dim=-1)
    return out, lse


def _match_argmax(f_tgt, f_ref):
    B, N, _ = f_tgt.shape
    M = f_ref.shape[1]
    t2r, r2t, t2r_sim, r2t_sim = torch.onnx.ops.symbolic_multi_out(
        f"{DOMAIN}::MatchArgmax",
        (f_tgt, f_ref),
        node_attributes("MatchArgmax"),
        dtypes=(torch.int32, torch.int32, torch.float32, torch.float32),
        shapes=((B, N), (B, M), (B, N), (B, M)),
        version=DOMAIN_VERSION,
    )
    return t2r.long(), r2t.long(), t2r_sim, r2t_sim


def _cycle_mask(t2r, r2t, fg, height, width, lambda_c):
    B = fg.shape[0]
    grid = lambda t: t.reshape(B, height, width)
    out = torch.onnx.ops.symbolic(
        f"{DOMAIN}::CycleMask",
        (grid(t2r.to(torch.int32)), grid(r2t.to(torch.int32)), grid(fg)),
        node_attributes("CycleMask", lambda_c=lambda_c),
        dtype=fg.dtype,
        shape=(B, height, width),
        version=DOMAIN_VERSION,
    )
    return out.reshape(fg.shape)


def _composite_blend(eps_uncond, eps_cond, masks, guidance, guidance_scale):
    B, S, C, h, w = eps_uncond.shape
    dt = eps_uncond.dtype
    g = eps_uncond.new_full((B, S), float(guidance_scale)) if guidance is None else guidance.to(dt).expand(B, S)
    return torch.onnx.ops.symbolic(
        f"{DOMAIN}::CompositeBlend",
        (eps_uncond, eps_cond, masks.to(dt), g),
        node_attributes("CompositeBlend"),
        dtype=dt,
        shape=(B, C, h, w),
        version=DOMAIN_VERSION,
    )


def decompositions() -> dict:
    """``ExportedProgram.run_decompositions`` table: each ``torch.ops.dreamfuse`` op of the spec -> its plugin node
    (``torch.onnx.ops.symbolic``), with the casts the spec asks for (int64 flows to int32 and back). Ops not in the
    program are ignored; ``dreamfuse::attention`` is not here (plain attention stays standard ONNX)."""
    import dreamfuse.kernels  # noqa: F401 (registers the ops)

    ops = torch.ops.dreamfuse
    return {
        ops.ama_attention.default: _ama_attention,
        ops.match_argmax.default: _match_argmax,
        ops.cycle_mask.default: _cycle_mask,
        ops.composite_blend.default: _composite_blend,
    }


# --------------------------------------------------------------------------------------------- onnxruntime
_ORT_LOCK = threading.Lock()
_ORT_REGISTERED: list = []


def _ort_ama_attention(q, k, v_tgt, v_ref, flow, mask, scale):
    from dreamfuse.kernels.attention import ama_attention_reference

    t = [torch.from_numpy(x) for x in (q, k, v_tgt, v_ref, flow, mask)]
    t[4] = t[4].long().clamp(0, t[3].shape[2] - 1)  # the spec: out-of-range flow clamped
    return ama_attention_reference(*t, scale=scale).numpy()


def _ort_match_argmax(f_tgt, f_ref):
    from dreamfuse.kernels.matching import match_argmax_reference

    t2r, r2t, t2r_sim, r2t_sim = match_argmax_reference(torch.from_numpy(f_tgt), torch.from_numpy(f_ref))
    return t2r.int().numpy(), r2t.int().numpy(), t2r_sim.float().numpy(), r2t_sim.float().numpy()


def _ort_cycle_mask(t2r, r2t, fg, lambda_c):
    from dreamfuse.kernels.matching import cycle_mask_reference

    B, Hg, Wg = fg.shape
    t2r, r2t, fg = (torch.from_numpy(x).reshape(B, Hg * Wg) for x in (t2r, r2t, fg))
    ok = (t2r >= 0) & (t2r < Hg * Wg)  # the spec: an out-of-range flow is inconsistent, never read through
    out = cycle_mask_reference(torch.where(ok, t2r, 0), r2t, fg, height=Hg, width=Wg, lambda_c=lambda_c)
    return torch.where(ok, out, torch.zeros_like(out)).reshape(B, Hg, Wg).numpy()


def _ort_composite_blend(eps_uncond, eps_cond, masks, guidance):
    from dreamfuse.kernels.composite import composite_blend_reference

    t = [torch.from_numpy(x) for x in (eps_uncond, eps_cond, masks, guidance)]
    return composite_blend_reference(*t).numpy()


_ORT_IMPL = {
    "AmaAttention": _ort_ama_attention,
    "MatchArgmax": _ort_match_argmax,
    "CycleMask": _ort_cycle_mask,
    "CompositeBlend": _ort_composite_blend,
}


def _register_onnxruntime_ops():
    """Register the four nodes as onnxruntime-extensions Python custom ops (once per process); returns the
    extensions' library path for ``SessionOptions.register_custom_ops_library``."""
    try:
        from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    except ImportError:
        raise ValueError(
            "plugins: running dreamfuse plugin nodes in onnxruntime needs onnxruntime-extensions "
            "(pip install 'dreamfuse[export]' or pip install onnxruntime-extensions)"
        ) from None
    with _ORT_LOCK:
        if not _ORT_REGISTERED:
            # Python custom ops take float32, not float16 (the extensions raise "Type float16 not supported by
            # python customops api"): T is float32 here.
            dt = {"T": PyCustomOpDef.dt_float, "float32": PyCustomOpDef.dt_float, "int32": PyCustomOpDef.dt_int32}
            at = {"float": PyCustomOpDef.dt_float, "int": PyCustomOpDef.dt_int64}
            for name, spec in PLUGINS.items():
                onnx_op(
                    op_type=f"{DOMAIN}::{name}",
                    inputs=[dt[i[1]] for i in spec.inputs],
                    outputs=[dt[o[1]] for o in spec.outputs],
                    attrs={k: at[v] for k, v in spec.attrs.items()},
                )(_ORT_IMPL[name])
            _ORT_REGISTERED.append(get_library_path())
        return _ORT_REGISTERED[0]


def add_onnxruntime_ops(options, graph: dict | None = None, dtype: str = "float32"):
    """Make an ``onnxruntime.SessionOptions`` run dreamfuse plugin nodes: registers the onnxruntime-extensions
    Python custom ops (implemented with the kernels' PyTorch references, on the CPU) when ``graph`` -- a manifest
    graph entry, or None for "always" -- lists plugin nodes. Returns ``options``. ``ValueError`` naming ``plugins``
    when onnxruntime-extensions is missing, or for a ``dtype`` other than float32 (its Python ops have no
    float16)."""
    if graph is not None and not graph.get("plugins"):
        return options
    if dtype != "float32":
        raise ValueError(
            f"plugins: the graph's plugin nodes are {dtype}; onnxruntime runs them through "
            "onnxruntime-extensions' Python custom ops, which take float32 only (export the plugin "
            "graph in fp32 for onnxruntime, or build it with TensorRT and the plugin library)"
        )
    options.register_custom_ops_library(_register_onnxruntime_ops())
    return options


def onnxruntime_session(model, providers=("CPUExecutionProvider",), options=None):
    """An ``onnxruntime.InferenceSession`` of ``model`` (a path or an ``onnx.ModelProto``) that runs plugin nodes."""
    import onnxruntime as ort

    opts = add_onnxruntime_ops(options or ort.SessionOptions())
    data = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(data, opts, providers=list(providers))


# --------------------------------------------------------------------------------------------- TensorRT
_TRT_LOADED: dict[str, object] = {}


def load_tensorrt_plugins(trt, libraries, needed=()) -> list[str]:
    """Load TensorRT plugin libraries into ``trt``'s plugin registry (once per path and process) and check that
    every plugin in ``needed`` (names of :data:`PLUGINS`) is registered under the ``dreamfuse`` namespace, version 1.
    Returns the absolute paths. ``ValueError`` naming ``plugins`` for a missing file, a library TensorRT cannot load,
    or a plugin it does not register."""
    paths = []
    registry = trt.get_plugin_registry()
    for lib in [libraries] if isinstance(libraries, (str, Path)) else list(libraries or ()):
        path = Path(lib).expanduser().resolve()
        if not path.is_file():
            raise ValueError(
                f"plugins: {str(lib)!r} is not a file (the TensorRT plugin library built from native/trt_plugins/)"
            )
        key = str(path)
        if key not in _TRT_LOADED:
            try:
                handle = registry.load_library(key)
            except Exception as e:  # builds differ: None or an exception for a library they cannot load
                raise ValueError(f"plugins: TensorRT could not load {key!r} ({e})") from None
            if handle is None and not all(_creator(registry, n) for n in PLUGINS):
                raise ValueError(f"plugins: TensorRT could not load {key!r} (see TensorRT's log above)")
            _TRT_LOADED[key] = handle
        paths.append(key)
    missing = [n for n in needed if not _creator(registry, n)]
    if missing:
        where = ", ".join(paths) or "no library given"
        raise ValueError(
            f"plugins: {where} registers no {', '.join(missing)} plugin (namespace {NAMESPACE!r}, version "
            f"{VERSION}); build native/trt_plugins/ against this TensorRT"
        )
    return paths


def _creator(registry, name: str):
    try:
        return registry.get_creator(name, VERSION, NAMESPACE)
    except Exception:  # some builds raise rather than return None for an unknown creator
        return None
