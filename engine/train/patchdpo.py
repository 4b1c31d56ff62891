"""PatchDPO training: patch-quality-weighted fine-tuning of an IP-Adapter(-Plus) (eager PyTorch, SDPA).

Scope: Stable Diffusion 1.x/2.x and SDXL (the official PatchDPO setting: SDXL IP-Adapter-Plus) UNets with a
standard IP-Adapter / IP-Adapter-Plus.

SDXL conditioning. Every UNet row carries the pooled text embedding of its prompt and its own six time ids
``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)`` (:func:`~dreamfuse.engine.engine.sdxl_time_ids`),
built per image: ``orig`` is that image's size on disk (a reference and its generated image usually differ),
the crop is ``(0, 0)`` because images are resized whole to the training resolution (never cropped: the quality
maps cover the whole image), and the target is the training resolution. The official training code scrambles
these ids; an adapter trained on scrambled micro-conditioning learns under conditioning that inference (which
passes correct ids) never gives it.

Data: ``DATA/<sample>/{ref.png, gen*.png, prompt.txt}``. Patch-quality maps come from
:func:`~dreamfuse.engine.patch_quality.quality_maps` with a :class:`PatchQualityEstimator` (a vision backbone
folder or an estimator object), at the latent grid of the training resolution, cached once in
``OUT/quality_cache``. Every (ref, gen) pair of every sample is one training item.

One micro-batch of ``B`` pairs (prompt, reference, one generated image, ``q_ref``, ``q_gen``):

- reference and generated image are resized to the training resolution and VAE-encoded (posterior mode; the VAE
  is frozen, so this is done once);
- the SAME noise ``ε`` and timestep ``t`` (uniform over the training timesteps) are used for both images of a
  pair (:func:`pair_batch`);
- the UNet sees ``[noisy_ref; noisy_gen]`` (2B rows), the prompt's text embedding for both halves and the IP
  tokens of the *reference* image for both halves (IP-Adapter conditioned on the reference, as in PatchDPO);
- loss (:func:`patchdpo_loss`) = ``mean((ε̂ − ε)² · w)`` over ``[ref; gen]`` with ``w = [1 − p̃(ref); p̃(gen)]`` at
  latent resolution, broadcast over channels: the form of DESIGN.md / the official code (``weight_power=1``,
  the default). The supplementary (Eq. in S1) writes the weighting inside the squared norm,
  ``‖(ε − ε̂) ⊙ p̃‖²``, i.e. ``w²`` on the squared error: ``weight_power=2``. Both give exactly zero gradient
  where ``w = 0``. For v-prediction models the target is the velocity instead of ``ε``.

What trains: only the IP-Adapter ``to_k_ip``/``to_v_ip`` weights (``train_projection`` adds the image projection);
UNet, VAE, text encoder and image encoder stay frozen. AdamW (lr 3e-5). During training every dreamfuse attention
processor runs the ``torch`` backend (PyTorch SDPA, differentiable; the decoupled cross-attention lives in those
processors); the backend is restored afterwards. Mixed precision is autocast on CUDA; fp32 on CPU. Trainable
weights and the optimizer stay fp32 (the engine must be fp32). Checkpoints hold the trainable weights, the
optimizer, the gradient scaler and all RNG states: a resumed run continues exactly.

Output: ``OUT/ip_adapter.bin`` (or ``.safetensors``), the standard IP-Adapter file (``save_ip_adapter``, written
atomically), which ``engine.load_ip_adapter(path, image_encoder)`` loads. Checkpoints are written atomically too;
resuming with other settings than the checkpoint's (``steps``, ``checkpoint_every``, ``progress`` and
``save_format`` may change) is refused with the differences listed, before any model loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..concurrency import changes_model
from ..limits import DEFAULT_LIMITS
from ..validation import is_int
from .common import (
    MIXED_PRECISION,
    RESUMABLE_CHANGES,
    check_against_trainer,
    check_batch_size,
    check_choice,
    check_int,
    check_numbers,
    check_resolution_and_resume,
    check_resume_config,
    check_training_state,
    check_weight,
    checkpoint_world_size,
    damaged,
    output_folder,
    read_checkpoint,
    resolve_amp,
    restore_training_state,
    resume_path,
    shared_resume_path,
    write_checkpoint,
)
from .distributed import SINGLE, Context, Trainable, launcher_mixed_precision, no_sync, rank_device, setup, wrap

SAVE_FORMATS = ("bin", "safetensors")
CACHE_DIR = "quality_cache"
RESUMABLE = RESUMABLE_CHANGES | {"save_format"}
"""Config fields a resumed run may change (``save_format`` only picks the output file's format)."""
MAX_BATCH = DEFAULT_LIMITS.max_images // 2
"""Largest ``batch_size``: the UNet sees ``[ref; gen]``, two rows per pair, in one call (``limits.max_images``)."""


@dataclass
class PatchDPOConfig:
    """PatchDPO training knobs. Defaults follow the official code (AdamW 3e-5, only to_k_ip/to_v_ip train)."""

    steps: int = 1000
    """Optimizer steps."""

    lr: float = 3e-5
    """AdamW learning rate, constant (official: 3e-5)."""

    batch_size: int = 1
    """(ref, gen) pairs per micro-batch; the UNet batch is twice that (``[ref; gen]``)."""

    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (effective batch = batch_size · grad_accum pairs)."""

    weight_decay: float = 1e-2
    """AdamW weight decay."""

    weight_power: int = 1
    """1: ``mean((ε̂ − ε)² · w)`` (DESIGN.md / official code); 2: ``mean(((ε̂ − ε) · w)²)`` (the supplementary's
    squared-norm form)."""

    train_projection: bool = False
    """Also train the image projection (``image_proj``: the 4-token projection or the Plus Resampler)."""

    ip_scale: float = 1.0
    """IP-Adapter scale of the image branch during training."""

    resolution: int | None = None
    """Training image size (square; images are resized, not cropped, as the estimator sees them). Default: the
    model's native size."""

    mixed_precision: str = "auto"
    """``auto`` (bf16 autocast on CUDA where supported, else fp16; fp32 on CPU), ``no``, ``fp16``, ``bf16``."""

    seed: int = 0
    """Seed of all training randomness (pair order, noise, timesteps)."""

    checkpoint_every: int = 500
    """Write a resumable checkpoint every N optimizer steps into ``OUT/checkpoints`` (0 = never)."""

    resume: str | None = None
    """A checkpoint file to continue from, or ``"latest"`` (the newest in ``OUT/checkpoints``; a fresh start when
    there is none)."""

    save_format: str = "bin"
    """Format of the output file: ``bin`` (``OUT/ip_adapter.bin``) or ``safetensors``."""

    progress: bool | None = None
    """Progress bar with the loss (default: the engine config's ``progress``)."""

    def validate(self) -> PatchDPOConfig:
        from ..validation import check_seed

        for name in ("steps", "batch_size", "grad_accum"):
            check_int(getattr(self, name), name, low=1)
        check_batch_size(self.batch_size, MAX_BATCH, "(ref, gen) pairs")
        check_int(self.checkpoint_every, "checkpoint_every", low=0)
        check_seed(self.seed)
        check_numbers(self, {"lr": {"low": 0, "low_open": True}, "weight_decay": {"low": 0},
                             "ip_scale": {"low": 0}})
        if not is_int(self.weight_power) or self.weight_power not in (1, 2):
            raise ValueError(f"weight_power: must be 1 or 2, got {self.weight_power!r}")
        if not isinstance(self.train_projection, bool):
            raise ValueError(f"train_projection: must be True or False, got {self.train_projection!r}")
        check_choice(self.mixed_precision, "mixed_precision", MIXED_PRECISION)
        check_choice(self.save_format, "save_format", SAVE_FORMATS)
        check_resolution_and_resume(self)
        return self


@dataclass
class TrainResult:
    path: Path
    """The written IP-Adapter file."""
    adapter: object
    """The trained :class:`~dreamfuse.engine.ip_adapter.IPAdapter` (loaded in the engine, frozen again)."""
    losses: list[dict] = field(default_factory=list)
    """Per optimizer step: ``{"step", "loss"}`` (including resumed history)."""


# ----------------------------------------------------------------------------------------------- pure parts
def pair_weights(q_ref: torch.Tensor, q_gen: torch.Tensor) -> torch.Tensor:
    """``[1 − q_ref; q_gen]``: ``(2B, h, w)`` loss weights of the UNet batch ``[ref; gen]``."""
    return torch.cat([1 - q_ref, q_gen])


def patchdpo_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, power: int = 1) -> torch.Tensor:
    """``mean((pred − target)² · w^power)``; ``pred``/``target`` ``(N, C, h, w)``, ``weights`` ``(N, h, w)``
    (broadcast over channels). Computed in fp32."""
    if weights.shape != (pred.shape[0], *pred.shape[2:]):
        raise ValueError(f"weights: shape {tuple(weights.shape)} does not fit predictions {tuple(pred.shape)}")
    w = weights.float()[:, None]
    return ((pred.float() - target.float()).square() * (w if power == 1 else w.square())).mean()


def pair_batch(ref_latents: torch.Tensor, gen_latents: torch.Tensor, noise_scheduler, generator: torch.Generator,
               *, shard: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The UNet batch of ``B`` pairs: ``(noisy, noise, t, clean)``, each ``2B`` rows ``[ref; gen]``, with the same
    noise and timestep for both images of a pair (drawn on the CPU ``generator``: device independent).

    ``shard = (rank, world_size)``: the ``B`` pairs are rank ``rank``'s rows of a global micro-batch of
    ``world_size · B`` pairs; the noise and timesteps are drawn for all of them (as one process with that batch
    draws them) and this rank's rows kept."""
    b = ref_latents.shape[0]
    rank, world = shard
    T = int(noise_scheduler.config.num_train_timesteps)
    rows = slice(rank * b, (rank + 1) * b)
    noise = torch.randn((world * b, *ref_latents.shape[1:]), generator=generator)[rows]
    noise = noise.to(ref_latents.device, ref_latents.dtype)
    t = torch.randint(0, T, (world * b,), generator=generator)[rows].to(ref_latents.device)
    clean = torch.cat([ref_latents, gen_latents])
    noise, t = torch.cat([noise, noise]), torch.cat([t, t])
    return noise_scheduler.add_noise(clean, noise, t), noise, t, clean


def check_dataset(data_dir) -> int:
    """Validate a PatchDPO dataset folder before any model work; returns the number of (ref, gen) pairs.
    Raises ``ValueError`` naming the problem."""
    from ..patch_quality import scan_sample

    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise ValueError(f"dataset: folder {str(data_dir)!r} does not exist")
    folders = [p for p in sorted(root.iterdir()) if p.is_dir()]
    if not folders:
        raise ValueError(f"dataset: {str(data_dir)!r} has no sample folders (<sample>/ref.png, gen*.png)")
    return sum(len(scan_sample(f)[1]) for f in folders)


def _load_resized(path, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(image (3, size, size) in [0, 1], original (height, width))``: the whole image resized (bicubic,
    antialiased, no crop), read by :func:`dreamfuse.engine.images.load_rgb` (EXIF orientation applied, so the
    original size is the upright one; 16-bit at real values; transparency over white)."""
    from ..images import load_rgb, resize_whole

    img = load_rgb(path, "dataset")
    original = (int(img.shape[1]), int(img.shape[2]))
    return resize_whole(img, size), original


@dataclass
class MicroBatch:
    """One micro-batch of ``B`` pairs as the UNet sees it: ``2B`` rows ``[ref; gen]``."""

    noisy: torch.Tensor
    """Noised latents ``(2B, C, h, w)``, the same noise and timestep for both images of a pair."""
    t: torch.Tensor
    """Timesteps ``(2B,)``."""
    target: torch.Tensor
    """What the UNet must predict: the noise (or the velocity for v-prediction models)."""
    weights: torch.Tensor
    """Loss weights ``(2B, h, w)``: ``[1 − q_ref; q_gen]``."""
    embeddings: torch.Tensor
    """Text embeddings ``(2B, 77, D)`` of each pair's prompt (both halves)."""
    image_features: torch.Tensor
    """Image-encoder features of each pair's reference (both halves); the projection makes the IP tokens."""
    pooled: torch.Tensor | None = None
    """SDXL: pooled text embeddings ``(2B, P)``."""
    time_ids: torch.Tensor | None = None
    """SDXL: ``(2B, 6)``, each row from its own image's original size (see the module docstring)."""


def check_checkpoint(state: dict, cfg: PatchDPOConfig, source: str, world_size: int = 1) -> None:
    """Everything in a PatchDPO checkpoint that can be checked without a model, before any of it is used
    (``ValueError`` naming ``resume``): ``params`` maps weight names to finite float tensors, the training state
    is sound (:func:`~dreamfuse.engine.train.common.check_training_state`: step, loss history, an optimizer state
    for those weights, gradient scaler, RNG states) and the settings are ``cfg``'s (``world_size``: the processes
    resuming it). The weights' names and shapes are checked against the adapter on load."""
    params = state.get("params")
    if not isinstance(params, dict) or not params or not all(isinstance(k, str) for k in params):
        raise damaged(source, f"params is {'missing' if params is None else repr(params)[:80]}, not a dict of "
                              "named weights")
    weights = [check_weight(v, f"params[{k[:80]!r}]", source) for k, v in params.items()]
    check_training_state(state, source, weights, ("loss",))
    check_resume_config(state["config"], cfg, source, ignore=RESUMABLE,
                        world=(checkpoint_world_size(state), world_size))


def check_resume(cfg: PatchDPOConfig, out, world_size: int = 1) -> None:
    """The checkpoint ``cfg.resume`` names (``"latest"``: in ``OUT/checkpoints``), read and checked as :func:`train`
    does (:func:`check_checkpoint`): for callers that load the model first, as the CLI, so that a bad checkpoint
    fails before the model loads."""
    path = resume_path(cfg.resume, output_folder(out))
    if path is not None:
        check_checkpoint(read_checkpoint(path, "PatchDPO", "params"), cfg, f"checkpoint {str(path)!r}", world_size)


class _Trainer:
    def __init__(self, engine, samples, out: Path, cfg: PatchDPOConfig, size: int, dist: Context = SINGLE):
        from diffusers import DDPMScheduler

        self.engine, self.cfg, self.out, self.dist = engine, cfg, out, dist
        self.device = engine.device
        self.amp = resolve_amp(cfg.mixed_precision, self.device)
        adapter = engine.ip_adapter
        self.adapter = adapter
        for m in (engine.unet, engine.vae, engine.text_encoder, engine.text_encoder_2, adapter):
            if m is not None:
                m.requires_grad_(False)
        adapter.layers.requires_grad_(True)
        if cfg.train_projection:
            adapter.image_proj.requires_grad_(True)
        self.params = {n: p for n, p in adapter.named_parameters() if p.requires_grad}
        # the unit DDP averages the gradients of: the IP layers (and the projection when it trains), nothing frozen
        parts = {"layers": adapter.layers, **({"image_proj": adapter.image_proj} if cfg.train_projection else {})}
        self.model = wrap(Trainable(parts), dist)
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.noise_sched = DDPMScheduler.from_config(engine.scheduler.config)
        self.prediction_type = self.noise_sched.config.prediction_type
        self.generator = torch.Generator("cpu").manual_seed(cfg.seed)
        self.step = 0
        self.losses: list[dict] = []
        self._prepare(samples, size)

    @torch.no_grad()
    def _prepare(self, samples, size: int) -> None:
        """Encode once what is frozen: VAE latents of every image, image-encoder features of every reference,
        SDXL time ids of every image; the items are all (sample, gen) pairs."""
        from ..engine import sdxl_time_ids

        e, a = self.engine, self.adapter
        self.items, self.ref_lat, self.gen_lat, self.feats, self.prompts = [], [], [], [], []
        self.q_ref, self.q_gen, self.ref_ids, self.gen_ids = [], [], [], []
        for s in samples:
            loaded = [_load_resized(p, size) for p in [s.ref, *s.gens]]
            imgs = torch.stack([img for img, _ in loaded])
            ids = [sdxl_time_ids(orig, (0, 0), (size, size)) for _, orig in loaded]
            lat = e.encode_image(imgs).float()
            self.ref_lat.append(lat[0])
            self.ref_ids.append(ids[0])
            pixels = a.preprocess([imgs[0]]).to(self.device, e.dtype)
            feats = (a.image_encoder(pixels, output_hidden_states=True).hidden_states[-2] if a.plus
                     else a.image_encoder(pixels).image_embeds)
            self.feats.append(feats[0])
            self.prompts.append(s.prompt)
            for g in range(len(s.gens)):
                self.items.append((len(self.ref_lat) - 1, len(self.gen_lat)))
                self.gen_lat.append(lat[1 + g])
                self.gen_ids.append(ids[1 + g])
                self.q_gen.append(s.q_gen[g].float().to(self.device))
                self.q_ref.append(s.q_ref[g].float().to(self.device))

    def micro_batch(self, micro_index: int) -> MicroBatch:
        """The :class:`MicroBatch` (2B rows) of micro-batch number ``micro_index``: this rank's ``B`` pairs of the
        global micro-batch (all of it in one process)."""
        cfg, n = self.cfg, len(self.items)
        picks = []
        first, world = self.dist.first_row(cfg.batch_size), self.dist.world_size
        for j in range(cfg.batch_size):
            # Epoch-wise shuffling derived from the sample counter alone: a resumed run needs no sampler state.
            # Several processes: this rank's rows of the global micro-batch (see distributed.py).
            c = micro_index * cfg.batch_size * world + first + j
            perm = torch.randperm(n, generator=torch.Generator("cpu").manual_seed(cfg.seed * 1_000_003 + c // n))
            picks.append(self.items[int(perm[c % n])])
        ref = torch.stack([self.ref_lat[r] for r, _ in picks])
        gen = torch.stack([self.gen_lat[g] for _, g in picks])
        noisy, noise, t, clean = pair_batch(ref, gen, self.noise_sched, self.generator,
                                            shard=(self.dist.rank, world))
        target = noise if self.prediction_type == "epsilon" else self.noise_sched.get_velocity(clean, noise, t)
        weights = pair_weights(torch.stack([self.q_ref[g] for _, g in picks]),
                               torch.stack([self.q_gen[g] for _, g in picks]))
        prompts = [self.prompts[r] for r, _ in picks]
        emb, pooled = self.engine.encode_text(prompts)
        feats = torch.stack([self.feats[r] for r, _ in picks])
        batch = MicroBatch(noisy, t, target, weights, torch.cat([emb, emb]), torch.cat([feats, feats]))
        if pooled is not None:
            batch.pooled = torch.cat([pooled, pooled])
            batch.time_ids = torch.stack([self.ref_ids[r] for r, _ in picks] + [self.gen_ids[g] for _, g in picks])
        return batch

    def micro_loss(self, micro_index: int) -> torch.Tensor:
        """This rank's loss of micro-batch ``micro_index`` (through the DDP module when there are several)."""
        return self.model(lambda: self._micro_loss(micro_index))

    def _micro_loss(self, micro_index: int) -> torch.Tensor:
        e = self.engine
        b = self.micro_batch(micro_index)
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            tokens = self.adapter.image_proj(b.image_features)
            pred = e.unet_call(b.noisy.to(e.dtype), b.t, b.embeddings, tokens.to(e.dtype), self.cfg.ip_scale,
                               pooled=b.pooled, time_ids=b.time_ids)
        return patchdpo_loss(pred, b.target, b.weights, self.cfg.weight_power)

    def train_step(self) -> dict:
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for a in range(cfg.grad_accum):
            with no_sync(self.model, last=a == cfg.grad_accum - 1):  # DDP reduces once, on the last backward
                loss = self.micro_loss(self.step * cfg.grad_accum + a) / cfg.grad_accum
                self.scaler.scale(loss).backward()
            total += float(loss.detach())
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        (total,) = self.dist.mean([total])  # the global batch's loss, the same on every rank
        rec = {"step": self.step, "loss": total}
        self.losses.append(rec)
        return rec

    # ---------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        return write_checkpoint(self, {"params": {n: p.detach().cpu().clone() for n, p in self.params.items()}})

    def load_checkpoint(self, checkpoint: Path | dict) -> None:
        """Continue from a checkpoint file (or the dict :func:`~dreamfuse.engine.train.common.read_checkpoint`
        returned for it); ``ValueError`` when it was trained with other settings (listed) or other weights."""
        source = f"checkpoint {str(checkpoint)!r}" if not isinstance(checkpoint, dict) else "the checkpoint"
        state = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint, "PatchDPO", "params")
        check_checkpoint(state, self.cfg, source, self.dist.world_size)  # all of it, before any of it is used
        if list(state["params"]) != list(self.params):  # same names, in the optimizer's order
            raise ValueError(f"resume: {source} trains other weights than this run (another adapter)")
        for n, p in self.params.items():
            if state["params"][n].shape != p.shape:
                raise ValueError(f"resume: {n} has shape {tuple(state['params'][n].shape)} in {source}, "
                                 f"this adapter needs {tuple(p.shape)}")
        check_against_trainer(self, state, source)
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state["params"][n].to(p.device, p.dtype))
        restore_training_state(self, state)


@contextlib.contextmanager
@changes_model("train")
def training_session(engine, samples, out: str | Path, cfg: PatchDPOConfig, size: int, dist: Context = SINGLE):
    """Prepare ``engine`` (with its IP-Adapter loaded) for PatchDPO steps and yield the trainer (``train_step()``,
    ``micro_batch(i)``, ``save_checkpoint()``, ``load_checkpoint(path)``, ``params``, ``losses``). Inside, every
    attention processor runs the torch (SDPA) backend; on exit the backends are restored and the adapter is
    frozen again. ``samples`` is what ``quality_maps`` returns, at the latent grid of ``size``. ``dist``: this
    process's place in a data-parallel run (:func:`~dreamfuse.engine.train.distributed.setup`); every rank then
    runs the same calls (``train_step`` and ``save_checkpoint`` are collectives)."""
    if engine.ip_adapter is None:
        raise ValueError("ip_adapter: no IP-Adapter is loaded in the engine")
    if engine.dtype != torch.float32:
        raise ValueError(f"dtype: PatchDPO trains an fp32 engine (mixed precision comes from autocast), got "
                         f"{engine.dtype}")
    saved = {name: proc.backend for name, proc in engine.processors.items()}
    for proc in engine.processors.values():
        proc.backend = "torch"  # SDPA: differentiable on every device
    trainer = None
    try:
        trainer = _Trainer(engine, samples, Path(out), cfg, size, dist)
        yield trainer
    finally:
        if trainer is not None:
            trainer.model = None  # DDP's gradient hooks go with it
        for name, proc in engine.processors.items():
            proc.backend = saved[name]
        engine.ip_adapter.requires_grad_(False)


def shared_quality_maps(data, estimator, latent: int, cache: Path, dist: Context = SINGLE) -> list:
    """:func:`~dreamfuse.engine.patch_quality.quality_maps` for every rank of a data-parallel run, each map computed
    once: every rank computes (and caches, atomically) the maps of its shard of the samples missing from the cache,
    then, after a barrier, every rank reads the whole dataset's maps from the cache. ``OUT`` on a filesystem all
    machines share makes that one computation per map; a machine that does not see the others' entries computes the
    missing ones itself (the same maps, more work)."""
    from ..patch_quality import quality_maps

    if dist.enabled:
        quality_maps(data, estimator, latent, cache, shard=(dist.rank, dist.world_size))
        dist.barrier()
    return quality_maps(data, estimator, latent, cache)


def train(model="tiny", ip_adapter=None, image_encoder=None, data: str | Path = ".", backbone=None,
          out: str | Path = "patchdpo-out", config: PatchDPOConfig | None = None, *, estimator=None,
          log=None, **overrides) -> TrainResult:
    """Fine-tune an IP-Adapter(-Plus) with PatchDPO; write ``OUT/ip_adapter.bin`` (or ``.safetensors``).

    Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1) every process calls this with the same
    arguments: the processes join the launcher's group (:mod:`~dreamfuse.engine.train.distributed`), each trains
    its rows of every global micro-batch (``batch_size`` pairs per process) and DDP averages the IP layers'
    gradients; rank 0 alone logs and writes the checkpoints and the output file. ``mixed_precision="auto"`` takes
    the launcher's ``--mixed_precision fp16|bf16``.

    Args:
        model: an :class:`~dreamfuse.engine.engine.Engine` (fp32; trained in place: on return its IP-Adapter is
            the trained one), or what ``Engine.from_pretrained`` takes, loaded fp32 with the torch backend.
        ip_adapter: a standard IP-Adapter file, state dict or :class:`IPAdapter`; None = the one loaded in
            ``model``.
        image_encoder: the CLIP image encoder folder or object (for a file or state dict).
        data: the dataset folder ``DATA/<sample>/{ref.png, gen*.png, prompt.txt}``.
        backbone: the patch-quality backbone (a local transformers vision model folder or module), or
        estimator: a ready :class:`~dreamfuse.engine.patch_quality.PatchQualityEstimator` (keyword).
        out: output folder (created): the IP-Adapter file, ``quality_cache/``, ``checkpoints/step-NNNNNNN.pt``.
        config: a :class:`PatchDPOConfig`; keyword ``overrides`` replace its fields (``steps=10``).
        log: called on rank 0 with the line stating the effective batch when training starts (the CLI prints it).
    """
    from ..config import EngineConfig
    from ..engine import Engine
    from ..ip_adapter import load_ip_adapter, save_ip_adapter
    from ..patch_quality import PatchQualityEstimator

    cfg = dataclasses.replace(config or PatchDPOConfig(), **overrides)
    if isinstance(cfg.resume, Path):
        cfg = dataclasses.replace(cfg, resume=str(cfg.resume))
    cfg = dataclasses.replace(cfg, mixed_precision=launcher_mixed_precision(cfg.mixed_precision))
    cfg.validate()
    check_dataset(data)
    if (backbone is None) == (estimator is None):
        raise ValueError("backbone: give exactly one of backbone (a vision model folder) or estimator")
    out = output_folder(out)
    device = model.device if isinstance(model, Engine) else torch.device(
        rank_device(None) or ("cuda" if torch.cuda.is_available() else "cpu"))
    dist = setup(device)
    resume = shared_resume_path(cfg.resume, out, dist)
    state = None
    if resume is not None:  # readable and trained with these settings: checked before any model loads
        state = read_checkpoint(resume, "PatchDPO", "params")
        check_checkpoint(state, cfg, f"checkpoint {str(resume)!r}", dist.world_size)
    engine = model if isinstance(model, Engine) else Engine.from_pretrained(
        model, EngineConfig(device=str(device), dtype="fp32", backend="torch",
                            progress=cfg.progress if dist.is_main else False))
    if ip_adapter is not None:
        load_ip_adapter(engine, ip_adapter, image_encoder)
    elif engine.ip_adapter is None:
        raise ValueError("ip_adapter: give IP-Adapter weights (none is loaded in the engine)")
    if estimator is None:
        estimator = PatchQualityEstimator(backbone)
        estimator.backbone.to(engine.device)
    size = cfg.resolution or engine.default_size
    latent = size // engine.vae_scale_factor
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    samples = shared_quality_maps(data, estimator, latent, out / CACHE_DIR, dist)

    with training_session(engine, samples, out, cfg, size, dist) as trainer:
        if state is not None:
            trainer.load_checkpoint(state)
        if log is not None and dist.is_main:
            log(f"patchdpo: {dist.describe(cfg.batch_size, cfg.grad_accum, '(ref, gen) pairs')}")
        with engine.progress(cfg.steps, "patchdpo", cfg.progress if dist.is_main else False) as bar:
            bar.update(min(trainer.step, cfg.steps))
            while trainer.step < cfg.steps:
                rec = trainer.train_step()
                bar.set_postfix(loss=f"{rec['loss']:.4f}", refresh=False)
                bar.update(1)
                if cfg.checkpoint_every and trainer.step % cfg.checkpoint_every == 0:
                    trainer.save_checkpoint()
    path = out / f"ip_adapter.{cfg.save_format}"
    if dist.is_main:  # the weights are the same on every rank (DDP)
        path = save_ip_adapter(engine.ip_adapter, path)
    dist.barrier()  # the file is complete on every rank's return
    return TrainResult(path=path, adapter=engine.ip_adapter, losses=trainer.losses)


__all__ = ["MAX_BATCH", "MicroBatch", "PatchDPOConfig", "TrainResult", "check_checkpoint", "check_dataset",
           "check_resume", "pair_batch", "pair_weights", "patchdpo_loss", "shared_quality_maps", "train",
           "training_session"]
