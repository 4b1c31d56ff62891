"""UNet backends: exported graphs standing in for the PyTorch UNet, behind the call the pipelines already make.

``Engine.unet_call`` ends in ``engine._unet_fn(sample, timestep, encoder_hidden_states=..., added_cond_kwargs=...,
return_dict=False, cross_attention_kwargs=...)``; a backend is any object with that call and a ``bind(engine)``
(:class:`UNetBackend`). ``Engine.from_pretrained(..., unet_backend="onnxruntime", unet_path=DIR)`` or
``engine.set_unet_backend(...)`` installs one; the pipelines never know which runs.

* :class:`OnnxRuntimeUNet` ``(dir, providers=...)``: ``unet.onnx`` (and ``unet_personalize.onnx``) in onnxruntime,
  CPU / CUDA / TensorRT execution providers, I/O binding on CUDA.
* :class:`TensorRTUNet` ``(plan or dir)``: TensorRT (or TensorRT-RTX) engines built by
  :mod:`dreamfuse.export.tensorrt`: I/O bound to torch tensors, ``execute_async_v3`` on torch's current stream,
  CUDA-graph replay for static engines.
* :class:`AotiUNet` ``(dir)``: an AOTInductor package (``unet.pt2``, :mod:`dreamfuse.export.aoti`) through
  ``torch._inductor.aoti_load_package``, on the device it was compiled for.
* Another backend subclasses :class:`UNetBackend` and implements ``__call__``; one that runs a named graph on a dict
  of tensors subclasses :class:`GraphUNet` and implements ``_run`` only.

What crosses the graph boundary. Per-row timesteps ``(B,)``; SDXL's ``text_embeds``/``time_ids``; IP-Adapter image
tokens and scale (when the export baked the adapter's layers in; a call without tokens feeds zero tokens at scale
0, exactly the text-only result). Personalize's per-call :class:`~dreamfuse.engine.processors.CallContext` handlers
are Python closures and cannot cross: a call whose handlers are personalize's foreground and AMA layers (marked
``dreamfuse_role``) or that asks for decoder features runs ``unet_personalize.onnx`` instead, fed with what those
handlers would compute from the pipeline's match state: each row's reference row, the subject-token weights, the
previous step's flows and cycle errors (by the same matching kernel); the graph returns the current foreground map
and the features, written back into the context and the state as the handlers would. Any other handler, AMA on
layers other than the exported ones, a gradient through the UNet (personalize's semantic matching guidance,
``lambda_g > 0``), LoRAs or an IP-Adapter changed after binding: refused with a ``ValueError``, never silently run
with the exported weights.

Before use: the manifest (:mod:`dreamfuse.export.manifest`) is read and its whole structure checked; every file is
checked against the sha256 the manifest records right before it is loaded (before any onnxruntime session is
created, any plugin library loaded or plan deserialized, any package loaded: a package's shared library runs code
as soon as it is loaded); the engine's UNet weights must hash to the exported ones; every call is checked against
the exported profile (batch rows, latent size, text length). An export folder is a program: these checks catch a
changed, swapped or damaged file and keep the manifest inside its folder, they cannot make a hostile folder safe.
"""

from __future__ import annotations

import abc
import threading
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F

from . import plugins
from .manifest import check_model, check_package, check_request, folder_kind, graph_files, read_manifest, verify_files

BACKENDS = ("torch", "onnxruntime", "tensorrt", "aoti")
_CAK_KEYS = {"dreamfuse_ctx", "ip_tokens", "ip_scale"}


class UNetBackend(abc.ABC):
    """The UNet call of the pipelines, served by something other than the engine's PyTorch UNet.

    ``bind(engine)`` checks that the backend serves this engine's model (it raises ``ValueError`` otherwise) and is
    called by ``Engine.set_unet_backend``; ``__call__`` has the diffusers UNet signature the engine uses and returns
    ``(noise_pred,)``."""

    name = "?"

    @abc.abstractmethod
    def bind(self, engine) -> None: ...

    @abc.abstractmethod
    def __call__(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=False,
                 cross_attention_kwargs=None): ...


def load_unet_backend(kind: str, path: str | Path | None, **kwargs) -> UNetBackend:
    """``"onnxruntime"`` (a folder with ``unet.onnx``), ``"tensorrt"`` (a folder with ``unet.plan`` or a ``.plan``
    file) or ``"aoti"`` (a folder with ``unet.pt2``); ``kwargs`` go to the backend's constructor."""
    if kind == "onnxruntime":
        return OnnxRuntimeUNet(path, **kwargs)
    if kind == "tensorrt":
        return TensorRTUNet(path, **kwargs)
    if kind == "aoti":
        return AotiUNet(path, **kwargs)
    raise ValueError(f"unet_backend: unknown backend {kind!r} (use one of {', '.join(BACKENDS)})")


def backend_for_path(path: str | Path) -> str:
    """The backend that reads ``path``: ``"tensorrt"`` for a ``.plan`` file or a folder holding ``unet.plan``,
    ``"aoti"`` for a folder holding ``unet.pt2``, ``"onnxruntime"`` for a folder holding ``unet.onnx``
    (``ValueError`` otherwise)."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".plan":
        return "tensorrt"
    if p.is_dir():
        if (p / "unet.plan").is_file():
            return "tensorrt"
        if (p / "unet.pt2").is_file():
            return "aoti"
        if (p / "unet.onnx").is_file():
            return "onnxruntime"
        raise ValueError(f"unet: {str(path)!r} holds none of unet.onnx, unet.plan, unet.pt2 (make one with "
                         "`dreamfuse export onnx` / `dreamfuse export tensorrt` / `dreamfuse export aoti`)")
    if not p.exists():
        raise FileNotFoundError(f"unet: {str(path)!r} does not exist")
    raise ValueError(f"unet: {str(path)!r} is neither an export folder nor a .plan file")


# --------------------------------------------------------------------------------------------- graph backends
class GraphUNet(UNetBackend):
    """What every exported-graph backend shares: the manifest checks, the inputs of a UNet call, personalize's AMA
    inputs. Subclasses implement :meth:`_run`."""

    kind: str | None = None  # the export folder kind this backend reads (manifest.folder_kind); None: any
    _KINDS = {"onnx": ("ONNX graphs", "onnxruntime"), "tensorrt": ("TensorRT plans", "tensorrt"),
              "aoti": ("an AOTInductor package", "aoti")}

    def __init__(self, folder: str | Path, field: str = "unet_path", named: str | None = None):
        self.folder = Path(folder).expanduser()
        self.field = field
        self.manifest = read_manifest(self.folder, field)
        self.graphs = self.manifest["graphs"]
        got = folder_kind(self.manifest)
        if self.kind is not None and got != self.kind:
            what, backend = self._KINDS[got]
            raise ValueError(f"{field}: {str(self.folder)!r} holds {what}, not {self._KINDS[self.kind][0]} (use "
                             f"unet_backend={backend!r})")
        if named is not None and named not in {graph_files(self.manifest, g)[0] for g in self.graphs}:
            raise ValueError(f"{field}: {str(self.folder / named)!r} is not a file its folder's manifest lists (give "
                             "the export folder)")
        self._engine = None
        self._bound: tuple | None = None  # (lora snapshot, ip adapter) at bind time

    # ----------------------------------------------------------------------------------------- to implement
    @abc.abstractmethod
    def _run(self, graph: str, feeds: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        """Run graph ``graph`` (a key of the manifest's ``graphs``) on ``feeds`` (torch tensors; cast to the graph's
        input types here); return its outputs by name as torch tensors on ``device``."""

    # ----------------------------------------------------------------------------------------- binding
    def bind(self, engine) -> None:
        if engine.config.compile:
            raise ValueError(f"unet_backend: {self.name} runs an exported graph; compile=True compiles the torch UNet "
                             "(use one or the other)")
        check_model(self.manifest, engine.unet, engine.ip_adapter, self.field)
        self._engine = weakref.ref(engine)
        self._bound = (dict(engine.loras), engine.ip_adapter)

    def _check_engine(self) -> None:
        engine = self._engine() if self._engine is not None else None
        if engine is None:
            return  # called directly, not through an engine
        loras, adapter = self._bound
        if dict(engine.loras) != loras:
            raise ValueError(f"lora: the engine's LoRAs changed since the {self.name} UNet was bound; the exported "
                             "graph holds the weights it was exported with (export again with these LoRAs)")
        if engine.ip_adapter is not adapter:
            check_model(self.manifest, engine.unet, engine.ip_adapter, self.field)  # raises on another adapter
            self._bound = (loras, engine.ip_adapter)

    # ----------------------------------------------------------------------------------------- the call
    def __call__(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=False,
                 cross_attention_kwargs=None):
        if return_dict:
            raise ValueError("return_dict: exported UNet backends return a tuple (return_dict=False)")
        cak = dict(cross_attention_kwargs or {})
        unknown = set(cak) - _CAK_KEYS
        if unknown:
            raise ValueError(f"cross_attention_kwargs: {sorted(unknown)} cannot reach an exported graph")
        if torch.is_grad_enabled() and sample.requires_grad:
            raise ValueError(f"unet_backend: a gradient through the UNet (personalize's lambda_g, compose's subject "
                             f"guidance) needs the torch backend; {self.name} runs the exported graph forward only")
        self._check_engine()
        ctx = cak.get("dreamfuse_ctx")
        personalize = ctx is not None and bool(ctx.handlers or ctx.capture)
        # the plain UNet takes any number of rows (split and padded into the profile: _run_rows); the personalize
        # graph's rows are tied to the match state, so they must fit as they are
        check_request(self.manifest, sample, encoder_hidden_states, check_batch=personalize)
        rows = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device)
        t = (t.expand(rows) if t.ndim == 0 else t.reshape(rows)).float()
        feeds = {"sample": sample, "timestep": t, "encoder_hidden_states": encoder_hidden_states}
        is_xl = self.manifest["model"]["is_xl"]
        if is_xl:
            if not added_cond_kwargs:
                raise ValueError("added_cond_kwargs: an SDXL UNet needs text_embeds and time_ids")
            feeds["text_embeds"] = added_cond_kwargs["text_embeds"]
            feeds["time_ids"] = added_cond_kwargs["time_ids"]
        if personalize:
            if cak.get("ip_tokens") is not None:
                raise ValueError("ip_tokens: the personalize graph takes no image prompt")
            return (self._personalize_call(ctx, feeds, sample),)
        self._ip_feeds(feeds, cak, rows, sample)
        out = self._run_rows("unet", feeds, sample.device)["noise_pred"]
        return (out.to(sample.dtype),)

    _SHARED_FEEDS = frozenset({"ip_scale"})  # the UNet graph's inputs that are not one row per sample

    def _run_rows(self, graph: str, feeds: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        """:meth:`_run` on any number of rows: more than the profile's batch range runs in chunks of its maximum,
        fewer than its minimum (a static batch, say) is padded with copies of the last row, whose outputs are
        dropped. The UNet's rows are independent (no batch statistics), so the result is the one call's; this is how
        a server's merged calls and a pipeline's CFG batch fit any exported profile."""
        lo, hi = self.manifest["profile"]["batch"]
        rows = feeds["sample"].shape[0]
        if lo <= rows <= hi:
            return self._run(graph, feeds, device)
        per_row = [k for k in feeds if k not in self._SHARED_FEEDS]
        outs = []
        for start in range(0, rows, hi):
            n = min(hi, rows - start)
            chunk = dict(feeds)
            for k in per_row:
                v = feeds[k][start:start + n]
                chunk[k] = v if n >= lo else torch.cat([v, v[-1:].expand(lo - n, *v.shape[1:])])
            outs.append({k: v[:n] for k, v in self._run(graph, chunk, device).items()})
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    def _ip_feeds(self, feeds: dict, cak: dict, rows: int, sample: torch.Tensor) -> None:
        ip = self.manifest.get("ip_adapter")
        tokens = cak.get("ip_tokens")
        if ip is None:
            if tokens is not None:
                raise ValueError("ip_tokens: the exported UNet has no image-prompt layers (export with the "
                                 "IP-Adapter loaded)")
            return
        cross = self.manifest["model"]["cross_attention_dim"]
        if tokens is None:  # text only: zero tokens at scale 0 add exactly nothing
            tokens = sample.new_zeros(rows, ip["tokens"], cross)
            scale = 0.0
        else:
            scale = float(cak.get("ip_scale", 1.0))
            if tuple(tokens.shape) != (rows, ip["tokens"], cross):
                raise ValueError(f"ip_tokens: expected ({rows}, {ip['tokens']}, {cross}), got {tuple(tokens.shape)}")
        feeds["ip_tokens"] = tokens
        feeds["ip_scale"] = torch.tensor([scale], device=sample.device)

    # ----------------------------------------------------------------------------------------- personalize's AMA
    def _personalize_call(self, ctx, feeds: dict, sample: torch.Tensor) -> torch.Tensor:
        graph = self.graphs.get("unet_personalize")
        if graph is None:
            raise ValueError(f"personalize: {str(self.folder)!r} has no personalize graph (export with "
                             "`dreamfuse export onnx --personalize`); per-layer handlers cannot cross the graph "
                             "boundary")
        roles: dict[str, list[str]] = {"ama": [], "foreground": []}
        for name, handler in ctx.handlers.items():
            role = getattr(handler, "dreamfuse_role", None)
            if role not in roles:
                raise ValueError(f"handlers: layer {name} has a handler the exported graph cannot run (only "
                                 "personalize's AMA and foreground layers cross the graph boundary)")
            roles[role].append(name)
        for role, key, option in (("ama", "ama_layers", "ama_blocks"), ("foreground", "foreground_layers", None)):
            if roles[role] and set(roles[role]) != set(graph[key]):
                extra = f" ({option}: use the defaults)" if option else ""
                raise ValueError(f"{option or 'foreground'}: the call runs {role} on layers the personalize graph was "
                                 f"not exported with{extra}")
        if roles["ama"] and not roles["foreground"]:
            raise ValueError("personalize: AMA without the current step's foreground layers cannot run in the graph")
        missing = set(ctx.capture) - set(graph["feature_blocks"])
        if missing:
            raise ValueError(f"feature_blocks: the personalize graph gives features of {graph['feature_blocks']}, not "
                             f"{sorted(missing)} (use the defaults)")
        rows, _, h, w = sample.shape
        dev = sample.device
        text_len = feeds["encoder_hidden_states"].shape[1]
        state = None
        for name in roles["ama"] + roles["foreground"]:
            state = ctx.handlers[name].state
        ref_index = torch.arange(rows, device=dev)
        fg_source = torch.arange(rows, device=dev)
        fg_tokens = torch.zeros(rows, text_len, device=dev)
        if state is not None:
            lay = state.layout
            if lay.rows != rows:
                raise ValueError(f"personalize: the match state has {lay.rows} rows, the call {rows}")
            ref_index[lay.targets] = torch.tensor(lay.refs_of_targets, device=dev)
        if roles["foreground"]:
            token_idx = ctx.handlers[roles["foreground"][0]].token_idx
            for i, r in enumerate(lay.cond_targets):
                fg_tokens[r, token_idx[i].to(dev)] = 1.0 / token_idx.shape[1]
                fg_source[1 + i] = r  # the uncond target row uses its cond row's mask (as state.fg = [m, m])
        feeds.update(ama_ref_index=ref_index, fg_tokens=fg_tokens, fg_source=fg_source)
        if state is not None and state.mask_mode != "consistent":
            raise ValueError(f"ama_mask: the personalize graph applies the semantic-consistent mask only, got "
                             f"{state.mask_mode!r} (use 'consistent', or the torch backend)")
        ready = bool(roles["ama"]) and state is not None and state.psi_ref is not None
        for f in graph["ama_factors"]:
            hw = (h // f, w // f)
            flow = torch.zeros(rows, *hw, dtype=torch.long, device=dev)
            err = torch.full((rows, *hw), float("inf"), device=dev)
            if ready:
                t2r, cycle = _flow_and_cycle_error(state, hw)
                flow[lay.targets] = t2r.view(-1, *hw).to(dev)
                err[lay.targets] = cycle.view(-1, *hw).to(dev)
            feeds[f"ama_flow_{f}"], feeds[f"ama_err_{f}"] = flow, err
            # the pipeline's threshold is lambda_c * height * fg.sum / N with a Python float lambda_c * height
            feeds[f"ama_thresh_{f}"] = torch.tensor([(state.lambda_c if state is not None else 0.0) * hw[0]],
                                                    device=dev)
        outs = self._run("unet_personalize", feeds, dev)
        for block in ctx.capture:
            ctx.features[block] = outs[f"feature_{block.replace('.', '_')}"].to(sample.dtype)
        if roles["foreground"] and state is not None:
            m = outs["foreground"][lay.cond_targets].float()
            state.fg = torch.cat([m, m])  # what the first AMA layer's finish_foreground leaves
            state.fg_sum, state.fg_layers = None, 0
            state._flows.clear()
        return outs["noise_pred"].to(sample.dtype)


def _flow_and_cycle_error(state, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Target->reference flow ``(2n, h*w)`` and cycle-consistency error in pixels from the previous step's matching
    features: the first half of personalize's ``_MatchState.flow_and_mask`` (same resize, normalization and
    matching kernel) and the error of ``cycle_mask_reference``; the threshold and the foreground mask are applied
    inside the graph, where the current step's foreground map is."""
    h, w = hw
    resize = lambda x: F.interpolate(x, size=hw, mode="bilinear", align_corners=False)
    f_ref = F.normalize(resize(state.psi_ref), dim=1).flatten(2).transpose(1, 2).contiguous()
    f_tgt = F.normalize(resize(state.psi_tgt), dim=1).flatten(2).transpose(1, 2).contiguous()
    t2r, r2t, _, _ = state.ops.match_argmax(f_tgt, f_ref)
    y = torch.gather(r2t.long(), 1, t2r.long())
    x = torch.arange(h * w, device=t2r.device)
    dy, dx = y // w - x // w, y % w - x % w
    return t2r.long(), torch.sqrt((dy * dy + dx * dx).float())


# --------------------------------------------------------------------------------------------- onnxruntime
_ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                  "tensorrt": "TensorrtExecutionProvider"}
_ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16,
              "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(double)": torch.float64}


class OnnxRuntimeUNet(GraphUNet):
    """The exported UNet in onnxruntime.

    Args:
        folder: an export folder (``dreamfuse export onnx``).
        providers: execution providers, in order of preference: ``"cpu"``, ``"cuda"``, ``"tensorrt"`` or
            onnxruntime's names (``"CUDAExecutionProvider"``, or ``(name, options)`` pairs). Default: CUDA where the
            installed onnxruntime has it and CUDA is available, else CPU. Providers the installed onnxruntime lacks
            are a ``ValueError``.
        threads: intra-op threads of the CPU provider (default: onnxruntime's; on a small shared machine 1-2).

    On CUDA tensors with the CUDA or TensorRT provider the inputs and ``noise_pred`` are bound in place (I/O binding,
    no host copies); elsewhere tensors go through host memory. Sessions are created per graph on first use and are
    safe to share between threads (onnxruntime's ``run`` is thread-safe).
    """

    name = "onnxruntime"
    kind = "onnx"

    def __init__(self, folder: str | Path, providers=None, threads: int | None = None, field: str = "unet_path"):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ValueError(f"{field}: the onnxruntime backend needs onnxruntime (pip install 'dreamfuse[export]')") \
                from None
        super().__init__(folder, field)
        available = ort.get_available_providers()
        if providers is None:
            providers = ["cuda", "cpu"] if "CUDAExecutionProvider" in available and torch.cuda.is_available() \
                else ["cpu"]
        resolved = []
        for p in [providers] if isinstance(providers, str) else providers:
            name, opts = (p if isinstance(p, tuple) else (p, None))
            name = _ORT_PROVIDERS.get(str(name).lower(), name)
            if name not in available:
                raise ValueError(f"providers: {name} is not in this onnxruntime ({', '.join(available)})")
            resolved.append((name, opts) if opts else name)
        self.providers = resolved
        self.threads = threads
        self._sessions: dict[str, object] = {}
        self._lock = threading.Lock()
        self._session("unet")  # fail early on a broken graph

    def _session(self, graph: str):
        sess = self._sessions.get(graph)
        if sess is None:
            import onnxruntime as ort

            with self._lock:
                sess = self._sessions.get(graph)
                if sess is None:
                    opts = ort.SessionOptions()
                    if self.threads:
                        opts.intra_op_num_threads = int(self.threads)
                        opts.inter_op_num_threads = 1
                    opts.log_severity_level = 3
                    plugins.add_onnxruntime_ops(opts, self.graphs[graph], self.manifest["dtype"])  # plugin nodes
                    # the graph and its external data, as exported (onnxruntime reads both by path, just below)
                    verify_files(self.folder, self.manifest, graph_files(self.manifest, graph), self.field)
                    path = self.folder / self.graphs[graph]["file"]
                    try:
                        sess = ort.InferenceSession(str(path), opts, providers=self.providers)
                    except Exception as e:  # onnxruntime's own exception types (Fail, InvalidProtobuf, ...)
                        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                        raise ValueError(f"{self.field}: {str(path)!r} is what its manifest describes, but onnxruntime "
                                         f"cannot load it ({first}); export again") from None
                    self._sessions[graph] = sess
        return sess

    def _run(self, graph, feeds, device):
        sess = self._session(graph)
        types = {i.name: _ORT_TYPES.get(i.type) for i in sess.get_inputs()}
        missing = set(types) - set(feeds)
        if missing:
            raise ValueError(f"{graph}: the graph needs inputs {sorted(missing)} the call does not give")
        feeds = {k: v.to(types[k] or v.dtype).contiguous() for k, v in feeds.items() if k in types}
        names = [o.name for o in sess.get_outputs()]
        if device.type == "cuda" and any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
                                         for p in (x if isinstance(x, str) else x[0] for x in self.providers)):
            return self._run_bound(sess, feeds, names, device)
        outs = sess.run(names, {k: v.detach().cpu().numpy() for k, v in feeds.items()})
        return {n: torch.from_numpy(o).to(device) for n, o in zip(names, outs)}

    @staticmethod
    def _run_bound(sess, feeds, names, device):
        """I/O binding on CUDA: inputs by pointer; ``noise_pred`` into a torch tensor of the sample's shape; the other
        outputs allocated by onnxruntime on the device and copied once. Never ran on these machines (no GPU)."""
        import numpy as np

        io = sess.io_binding()
        np_types = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32}
        for k, v in feeds.items():
            io.bind_input(k, "cuda", device.index or 0, np_types[v.dtype], list(v.shape), v.data_ptr())
        out_type = next(o.type for o in sess.get_outputs() if o.name == "noise_pred")
        noise = torch.empty(feeds["sample"].shape, dtype=_ORT_TYPES[out_type], device=device)
        io.bind_output("noise_pred", "cuda", device.index or 0, np_types[noise.dtype], list(noise.shape),
                       noise.data_ptr())
        for n in names:
            if n != "noise_pred":
                io.bind_output(n, "cuda", device.index or 0)
        torch.cuda.current_stream(device).synchronize()  # the inputs are written on torch's stream
        sess.run_with_iobinding(io)
        result = {"noise_pred": noise}
        others = [n for n in names if n != "noise_pred"]
        for n, ov in zip(others, io.get_outputs()[1:]):
            result[n] = torch.from_numpy(ov.numpy()).to(device)
        return result


# --------------------------------------------------------------------------------------------- TensorRT
class TensorRTUNet(GraphUNet):
    """TensorRT engines (``dreamfuse export tensorrt``) as the UNet: ``unet.plan`` (and ``unet_personalize.plan``).

    Args:
        path: a plan folder (with ``dreamfuse.json``) or a ``.plan`` file inside one.
        device: the CUDA device (default ``cuda``).
        warmup: run every optimization profile once at its opt shape when loading (the first call of a profile
            otherwise pays TensorRT's lazy initialization).

    One execution context per optimization profile; a call picks the first profile whose ranges hold its shapes
    (``ValueError`` naming the field when none does), sets the input shapes, binds torch tensors by address
    (inputs contiguous in the engine's dtypes, outputs pre-allocated and reused per shape) and enqueues with
    ``execute_async_v3`` on torch's current stream. A static engine (``--static``) is captured into a CUDA graph on
    its first call and replayed afterwards (inputs copied into the captured buffers). Calls are serialized per
    engine (execution contexts are not thread-safe). Needs a GPU and the TensorRT runtime: never ran on the
    machines this was written on.
    """

    name = "tensorrt"
    kind = "tensorrt"

    def __init__(self, path: str | Path, device: str | torch.device = "cuda", warmup: bool = True,
                 field: str = "unet_path"):
        p = Path(path).expanduser()
        plan = p.suffix == ".plan" and not p.is_dir()
        folder = p.parent if plan else p
        super().__init__(folder, field, named=p.name if plan else None)
        trt_info = self.manifest["tensorrt"]
        libraries = trt_info["plugin_libraries"]
        plans = [g["plan"] for name, g in self.graphs.items() if name in ("unet", "unet_personalize")]
        # plugin libraries are native code that runs when loaded, plans are deserialized: both as built, or neither
        verify_files(folder, self.manifest, [*libraries, *plans], field)
        if not torch.cuda.is_available():
            raise ValueError(f"{field}: TensorRT engines run on a CUDA GPU; none is available here")
        from .tensorrt import import_tensorrt

        try:
            self.trt = import_tensorrt(trt_info.get("module"))
        except ImportError as e:
            raise ValueError(f"{field}: {e}") from None
        plugins.load_tensorrt_plugins(self.trt, [folder / lib for lib in libraries])  # before deserializing
        self.device = torch.device(device)
        self.static = bool(trt_info.get("static"))
        self._engines: dict[str, _TrtGraph] = {}
        self._lock = threading.Lock()
        for graph in ("unet", "unet_personalize"):
            if graph in self.graphs:
                self._engines[graph] = _TrtGraph(self.trt, folder / self.graphs[graph]["plan"],
                                                 self.graphs[graph]["profiles"], self.device, self.static)
        if warmup:
            for g in self._engines.values():
                g.warmup()

    def _run(self, graph, feeds, device):
        eng = self._engines.get(graph)
        if eng is None:
            raise ValueError(f"personalize: {str(self.folder)!r} has no {graph}.plan (build it from an export with "
                             "--personalize)")
        with self._lock:
            return eng.run(feeds)


class _TrtGraph:
    """One deserialized engine: its execution contexts (one per profile), tensor types and output buffers."""

    def __init__(self, trt, plan: Path, profiles: list[dict], device: torch.device, static: bool):
        self.trt, self.device, self.static, self.profiles = trt, device, static, profiles
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise ValueError(f"unet_path: {str(plan)!r} could not be deserialized (built by another TensorRT version "
                             "or for another GPU: build it again here)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.contexts = []
        stream = torch.cuda.current_stream(device)
        for i in range(self.engine.num_optimization_profiles):
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(i, stream.cuda_stream)
            self.contexts.append(ctx)
        self._buffers: dict[tuple, dict[str, torch.Tensor]] = {}
        self._graphs: dict[tuple, tuple] = {}

    def _profile_for(self, feeds: dict[str, torch.Tensor]) -> int:
        rows, _, h, w = feeds["sample"].shape
        for i, p in enumerate(self.profiles):
            if p["batch"][0] <= rows <= p["batch"][2] and p["latent_height"][0] <= h <= p["latent_height"][2] \
                    and p["latent_width"][0] <= w <= p["latent_width"][2]:
                return i
        ranges = "; ".join(f"batch {p['batch'][0]}-{p['batch'][2]}, latent {p['latent_height'][0]}-"
                           f"{p['latent_height'][2]} x {p['latent_width'][0]}-{p['latent_width'][2]}"
                           for p in self.profiles)
        raise ValueError(f"batch/height/width: {rows} rows at latent {h}x{w} lie in no optimization profile of the "
                         f"engine ({ranges}); build it with a profile that covers them")

    def warmup(self) -> None:
        for i in range(len(self.profiles)):
            feeds = {}
            for n in self.inputs:
                shape = tuple(self.engine.get_tensor_profile_shape(n, i)[1])  # (min, opt, max): opt
                feeds[n] = torch.zeros(shape, dtype=self.dtypes[n], device=self.device)
            for n in ("ama_err_1", "ama_err_2", "ama_err_4"):
                if n in feeds:
                    feeds[n].fill_(float("inf"))
            self.run(feeds)
        torch.cuda.synchronize(self.device)

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        idx = self._profile_for(feeds)
        ctx = self.contexts[idx]
        feeds = {n: feeds[n].to(self.device, self.dtypes[n]).contiguous() for n in self.inputs}
        key = (idx, *(tuple(v.shape) for v in feeds.values()))
        if self.static and key in self._graphs:
            graph, static_in, outs = self._graphs[key]
            for n, v in feeds.items():
                static_in[n].copy_(v)
            graph.replay()
            return {n: t.clone() for n, t in outs.items()}
        for n, v in feeds.items():
            ctx.set_input_shape(n, tuple(v.shape))
        outs = self._buffers.get(key)
        if outs is None:
            outs = {n: torch.empty(tuple(ctx.get_tensor_shape(n)), dtype=self.dtypes[n], device=self.device)
                    for n in self.outputs}
            self._buffers[key] = outs
        for n, v in feeds.items():
            ctx.set_tensor_address(n, v.data_ptr())
        for n, t in outs.items():
            ctx.set_tensor_address(n, t.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("tensorrt: execute_async_v3 failed (see TensorRT's log above)")
        if self.static:
            self._capture(key, ctx, feeds, outs)
        return {n: t.clone() for n, t in outs.items()}  # the buffers are reused by the next call

    def _capture(self, key, ctx, feeds, outs) -> None:
        """CUDA-graph capture of a static engine's enqueue, on a side stream, with buffers owned by the graph."""
        static_in = {n: v.clone() for n, v in feeds.items()}
        for n, v in static_in.items():
            ctx.set_tensor_address(n, v.data_ptr())
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
            ctx.execute_async_v3(side.cuda_stream)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._graphs[key] = (graph, static_in, outs)


def _torch_dtype(trt, dt) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool}
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    return table[dt]


# --------------------------------------------------------------------------------------------- AOTInductor
_AOTI_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int64": torch.int64, "int32": torch.int32}


class AotiUNet(GraphUNet):
    """An AOTInductor package (``dreamfuse export aoti``, :mod:`dreamfuse.export.aoti`) as the UNet: ``unet.pt2``
    loaded with ``torch._inductor.aoti_load_package`` on the device type it was compiled for.

    Args:
        path: a package folder (with ``dreamfuse.json``) or the ``unet.pt2`` inside one.
        device: where to load it (default: the type it was compiled for; ``cuda`` is the current CUDA device). A
            device of another type is a ``ValueError``.

    Binding refuses an engine on another device type or in another dtype than the package's, or with other UNet
    weights (the manifest's hash; LoRAs count); every call is checked against the exported profile (batch rows,
    latent size, text length) before it runs, and its inputs are cast to the package's dtypes and made contiguous (a
    package reads its inputs with the strides it was traced with). A gradient through the UNet and personalize's
    per-layer handlers (DreamMatcher's AMA and foreground layers, decoder features) are refused: the package is the
    plain UNet call, forward only. Safe to share between threads (AOTInductor's runner serializes its runs).
    """

    name = "aoti"
    kind = "aoti"

    def __init__(self, path: str | Path, device: str | torch.device | None = None, field: str = "unet_path"):
        p = Path(path).expanduser()
        package = p.suffix == ".pt2" and not p.is_dir()
        folder = p.parent if package else p
        super().__init__(folder, field, named=p.name if package else None)
        compiled_for = self.manifest["device"]
        self.device = torch.device(compiled_for if device is None else device)
        if self.device.type != compiled_for:
            raise ValueError(f"device: the package was compiled for {compiled_for}, not {self.device.type} (export "
                             f"it again with --device {self.device.type})")
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"{field}: {str(folder)!r} was compiled for cuda and no CUDA GPU is available here")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
        graph = self.graphs["unet"]
        self.inputs = [(spec["name"], _AOTI_DTYPES[spec["dtype"]]) for spec in graph["inputs"]]
        file = folder / graph["file"]
        # loading dlopens the package's shared library, whose constructors run at once: the members and the bytes
        # must be the exported ones before that
        check_package(folder, self.manifest, field)
        try:
            self._model = torch._inductor.aoti_load_package(str(file), device_index=self.device.index
                                                            if self.device.type == "cuda" else -1)
        except Exception as e:  # another torch build's package, a truncated file: the loader's own exceptions
            raise ValueError(f"{field}: {str(file)!r} could not be loaded ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); export it again with "
                             f"this torch ({torch.__version__})") from None

    def bind(self, engine) -> None:
        if engine.device.type != self.device.type:
            raise ValueError(f"device: the package was compiled for {self.device.type}, the engine runs on "
                             f"{engine.device.type} (export it on {engine.device.type}: `dreamfuse export aoti "
                             f"--device {engine.device.type}`)")
        dtype = str(engine.dtype).removeprefix("torch.")
        if dtype != self.manifest["dtype"]:
            raise ValueError(f"dtype: the package was compiled for {self.manifest['dtype']}, the engine runs {dtype} "
                             "(export with this dtype, --export-dtype, or load the engine in the package's)")
        super().bind(engine)

    def _run(self, graph, feeds, device):
        args = []
        for name, dtype in self.inputs:
            if name not in feeds:
                raise ValueError(f"{name}: the package takes it as an input and the call gives none")
            args.append(feeds[name].to(self.device, dtype).contiguous())
        with torch.no_grad():
            out = self._model(*args)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return {"noise_pred": out.to(device)}

    def _personalize_call(self, ctx, feeds, sample):
        raise ValueError("personalize: an AOTInductor package holds the plain UNet call; per-layer handlers "
                         "(DreamMatcher's AMA and foreground layers, decoder features) cannot cross it (use "
                         "unet_backend='torch', or an ONNX export made with --personalize)")
