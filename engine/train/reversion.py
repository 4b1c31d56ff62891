"""ReVersion training: learn a relation token ``<R>`` from exemplar images (eager PyTorch, SDPA attention).

What learns, and how: the token is added to the tokenizer and to the text encoder's embedding table
(initialized from ``init_token``, "and"), but the table stays frozen. The learned vector is its own
``nn.Parameter``; a forward hook on the token-embedding module replaces the output rows at the positions
where the token occurs by that parameter before the text encoder's transformer sees them. So the
optimizer only ever holds one ``(D,)`` vector (no whole-table gradient, no restore-the-other-rows step
as in the official code), and UNet, VAE and text encoder keep ``requires_grad=False``. At the end the
learned vector is written into the token's table row, so the engine used for training generates with it.

Training swaps the UNet's attention processors for diffusers' stock ``AttnProcessor2_0`` (PyTorch SDPA,
differentiable: the denoising loss back-propagates through the UNet's cross-attention into the text
embedding) and restores the engine's processors afterwards.

Losses (paper, Eq. 4-6): ``λdenoise · Ldenoise + λsteer · Lsteer`` with
- ``Ldenoise``: the usual ε-MSE (v-MSE for v-prediction models) at timesteps drawn from the relation-focal
  importance sampling ``f(t) ∝ 1 − α·cos(πt/T)`` over ``t = 0..T−1`` (α = 0.5), or uniformly (ablation);
- ``Lsteer``: multi-positive InfoNCE on L2-normalized *raw* token embeddings (table rows, not encoder
  outputs): anchor ``<R>``, positives ``num_positives`` prepositions drawn from the 56 basis prepositions
  (paper Table A4), negatives the words of the micro-batch's captions that are not stop words, prepositions
  or the token (special tokens never appear as words), τ = 0.07. No POS tagger, as in the official code.
  A word the tokenizer splits into several tokens (the tiny tokenizer does, for most prepositions) is
  represented by the mean of its token rows; on SD's CLIP vocabulary all 56 prepositions are single tokens,
  so this is exactly the official per-token embedding there.

Data: a folder with exemplar images and ``text.json`` mapping each image file name to a list of caption
templates with ``{}`` where the token goes (the ReVersion benchmark's layout).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import (
    MIXED_PRECISION,
    latest_checkpoint,
    read_checkpoint,
    resolve_amp,
    restore_training_state,
    write_checkpoint,
)

# Paper, supplementary Table A4: the 56 basis prepositions (positives of the steering loss).
BASIS_PREPOSITIONS = (
    "aboard", "about", "above", "across", "after", "against", "along", "alongside", "amid", "amidst", "among",
    "amongst", "anti", "around", "astride", "at", "atop", "before", "behind", "below", "beneath", "beside",
    "between", "beyond", "by", "down", "following", "from", "in", "including", "inside", "into", "near", "of",
    "off", "on", "onto", "opposite", "out", "outside", "over", "past", "regarding", "round", "through",
    "throughout", "to", "toward", "towards", "under", "underneath", "up", "upon", "versus", "with", "within",
)

# Function words that are never negatives: the common English stop words (articles, pronouns, auxiliaries,
# conjunctions, determiners, other prepositions). Captions are short entity descriptions, so what remains is
# mostly nouns and adjectives: the "other POS" words the paper pushes the token away from.
STOP_WORDS = frozenset("""
a an the and or but nor so yet if then than that this these those there here such both either neither each
every all any some no not only own same other another few more most much many very too also just
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers herself
it its itself they them their theirs themselves what which who whom whose when where why how
am is are was were be been being have has had having do does did doing will would shall should can could
may might must s t d ll m o re ve y don isn aren wasn weren hasn haven hadn doesn didn won wouldn shouldn
couldn mustn needn shan ain again further once while during until unless because as for since like unlike
per via without beside besides despite except plus minus next onto
""".split()) | frozenset(BASIS_PREPOSITIONS)

TEXT_JSON = "text.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
EMBEDS_FILE = "learned_embeds.bin"


@dataclass
class ReVersionConfig:
    """ReVersion training knobs. Defaults are the paper's (SD 1.5, supplementary A.1) unless noted."""

    token: str = "<R>"
    """The relation token added to the tokenizer; the key of ``learned_embeds.bin``."""

    init_token: str = "and"
    """A single-token word whose embedding initializes the relation token (paper: "and")."""

    steps: int = 3000
    """Optimizer steps (paper: 3,000)."""

    lr: float = 2.5e-4
    """AdamW learning rate, constant (paper: 2.5e-4)."""

    batch_size: int = 2
    """Images per micro-batch (paper: 2)."""

    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (effective batch = batch_size · grad_accum)."""

    weight_decay: float = 1e-2
    """AdamW weight decay (the diffusers textual-inversion script's default, which ReVersion's code uses)."""

    num_positives: int = 8
    """Basis prepositions drawn (without replacement) per micro-batch as steering positives (paper: 8)."""

    temperature: float = 0.07
    """InfoNCE temperature τ of the steering loss (paper: 0.07)."""

    lambda_steer: float = 0.01
    """Weight of the steering loss (paper: 0.01; 0 = the "w/o relation-steering" ablation)."""

    lambda_denoise: float = 1.0
    """Weight of the denoising loss (paper: 1.0)."""

    importance_sampling: bool = True
    """Relation-focal importance sampling of timesteps; False = uniform (the paper's ablation)."""

    alpha: float = 0.5
    """Skew of the importance sampling ``f(t) ∝ 1 − α·cos(πt/T)``, in (0, 1] (paper: 0.5)."""

    resolution: int | None = None
    """Training image size (square; center crop then bicubic resize). Default: the model's native size."""

    flip_p: float = 0.5
    """Probability of a horizontal flip per sample (the textual-inversion augmentation ReVersion's code
    inherits). Set 0 for relations that are not mirror-symmetric (left of / right of)."""

    mixed_precision: str = "auto"
    """``auto`` (bf16 autocast on CUDA where supported, else fp16; fp32 on CPU), ``no``, ``fp16``, ``bf16``.
    The learned vector and the optimizer stay fp32; fp16 uses a gradient scaler."""

    seed: int = 0
    """Seed of all training randomness (images, templates, flips, noise, timesteps, positives)."""

    checkpoint_every: int = 500
    """Write a resumable checkpoint every N optimizer steps into ``OUT/checkpoints`` (0 = never)."""

    resume: str | None = None
    """A checkpoint file to continue from, or ``"latest"`` (the newest in ``OUT/checkpoints``; a fresh start
    when there is none). The run then continues exactly as if it had never stopped."""

    progress: bool | None = None
    """Progress bar with the two losses (default: the engine config's ``progress``)."""

    def validate(self) -> ReVersionConfig:
        checks = [
            ("steps", self.steps >= 1, "must be >= 1"), ("lr", self.lr > 0, "must be > 0"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"), ("grad_accum", self.grad_accum >= 1, "must be >= 1"),
            ("num_positives", 1 <= self.num_positives <= len(BASIS_PREPOSITIONS),
             f"must be in 1..{len(BASIS_PREPOSITIONS)}"),
            ("temperature", self.temperature > 0, "must be > 0"),
            ("lambda_steer", self.lambda_steer >= 0, "must be >= 0"),
            ("lambda_denoise", self.lambda_denoise >= 0 and (self.lambda_denoise > 0 or self.lambda_steer > 0),
             "must be >= 0, and > 0 when lambda_steer is 0 (nothing would train)"),
            ("alpha", 0 < self.alpha <= 1, "must be in (0, 1]"),
            ("flip_p", 0 <= self.flip_p <= 1, "must be in [0, 1]"),
            ("mixed_precision", self.mixed_precision in MIXED_PRECISION,
             f"must be one of {', '.join(MIXED_PRECISION)}"),
            ("checkpoint_every", self.checkpoint_every >= 0, "must be >= 0"),
            ("resolution", self.resolution is None or (self.resolution >= 8 and self.resolution % 8 == 0),
             "must be a multiple of 8"),
            ("token", bool(self.token.strip()) and not any(c.isspace() for c in self.token),
             "must be non-empty, without spaces"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"{name}: {why}, got {getattr(self, name)!r}")
        return self


@dataclass
class TrainResult:
    token: str
    """The relation token."""
    embedding: torch.Tensor
    """The learned ``(D,)`` embedding (fp32, CPU)."""
    path: Path
    """The written ``learned_embeds.bin``."""
    losses: list[dict] = field(default_factory=list)
    """Per optimizer step: ``{"step", "loss", "denoise", "steer"}`` (including resumed history); ``steer`` is
    NaN when ``lambda_steer`` is 0 (not computed)."""


# ----------------------------------------------------------------------------------------------- pure parts
def timestep_probabilities(num_train_timesteps: int, alpha: float = 0.5) -> torch.Tensor:
    """Relation-focal importance sampling: ``p(t) ∝ 1 − α·cos(πt/T)`` for ``t = 0..T−1`` (float64, sums to 1)."""
    t = torch.arange(num_train_timesteps, dtype=torch.float64)
    w = 1 - alpha * torch.cos(torch.pi * t / num_train_timesteps)
    return w / w.sum()


def sample_timesteps(n: int, num_train_timesteps: int, *, importance: bool = True, alpha: float = 0.5,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` training timesteps (int64, CPU): importance-sampled (skewed towards large t) or uniform."""
    if not importance:
        return torch.randint(0, num_train_timesteps, (n,), generator=generator)
    return torch.multinomial(timestep_probabilities(num_train_timesteps, alpha), n, replacement=True,
                             generator=generator)


def steering_loss(anchor: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                  temperature: float = 0.07) -> torch.Tensor:
    """Multi-positive InfoNCE (paper Eq. 4) on L2-normalized embeddings.

    ``−log( Σ_l exp(r·P_l/τ) / (Σ_l exp(r·P_l/τ) + Σ_m exp(r·N_m/τ)) )`` with ``r`` = ``anchor`` ``(D,)``,
    ``P`` = ``positives`` ``(L, D)``, ``N`` = ``negatives`` ``(M, D)`` (M may be 0: the loss is then 0).
    Computed with log-sum-exp in fp32.
    """
    r = F.normalize(anchor.float(), dim=-1)
    pos = F.normalize(positives.float(), dim=-1) @ r / temperature
    neg = F.normalize(negatives.float().reshape(-1, r.shape[-1]), dim=-1) @ r / temperature
    return torch.logsumexp(torch.cat([pos, neg]), 0) - torch.logsumexp(pos, 0)


def negative_words(template: str) -> list[str]:
    """The steering negatives of a caption template (``{}`` = the token): its alphabetic words, lower-cased,
    that are neither stop words nor prepositions, in order (repeats kept, as the paper sums over them)."""
    return [w for w in re.findall(r"[^\W\d_]+", template.replace("{}", " ").lower()) if w not in STOP_WORDS]


def load_exemplars(data_dir: str | Path) -> list[tuple[Path, list[str]]]:
    """Read a ReVersion exemplar folder: ``[(image path, [caption templates])]`` in ``text.json`` order.

    Raises ``ValueError`` naming the problem: missing folder or ``text.json``, malformed JSON, an image that is
    listed but missing (or present but not listed), an empty template list, a template without ``{}``.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise ValueError(f"data: folder {str(root)!r} does not exist")
    text_path = root / TEXT_JSON
    if not text_path.is_file():
        raise ValueError(f"data: {TEXT_JSON} is missing in {str(root)!r} (it maps each image file name to a "
                         "list of caption templates with {} where the relation token goes)")
    try:
        table = json.loads(text_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"data: {str(text_path)!r} is not valid JSON ({e})") from None
    if not isinstance(table, dict) or not table:
        raise ValueError(f"data: {str(text_path)!r} must be a non-empty object {{image file name: [templates]}}")
    out = []
    for name, templates in table.items():
        image = root / name
        if not image.is_file():
            raise ValueError(f"data: image {name!r} listed in {TEXT_JSON} does not exist in {str(root)!r}")
        if isinstance(templates, str):
            templates = [templates]
        if not isinstance(templates, list) or not templates:
            raise ValueError(f"data: image {name!r} has an empty template list in {TEXT_JSON}")
        for tpl in templates:
            if not isinstance(tpl, str) or "{}" not in tpl:
                raise ValueError(f"data: template {tpl!r} of image {name!r} has no '{{}}' where the relation "
                                 "token goes")
        out.append((image, list(templates)))
    unlisted = sorted(p.name for p in root.iterdir()
                      if p.suffix.lower() in IMAGE_EXTENSIONS and p.name not in table)
    if unlisted:
        raise ValueError(f"data: image(s) {unlisted} have no captions in {TEXT_JSON}")
    return out


def _load_image(path: Path, size: int) -> torch.Tensor:
    """Center-crop to a square, bicubic resize to ``size``: ``(3, size, size)`` float in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"data: cannot read image {str(path)!r} ({e})") from None
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    img = img.resize((size, size), Image.Resampling.BICUBIC)
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1) / 255


# ----------------------------------------------------------------------------------------------- the trainer
class _TokenOverride:
    """Forward hook on the token-embedding module: rows whose input id is ``token_id`` become ``param``."""

    def __init__(self, module: torch.nn.Module, token_id: int, param: torch.nn.Parameter):
        self.token_id, self.param = token_id, param
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        mask = (inputs[0] == self.token_id).unsqueeze(-1)
        return torch.where(mask, self.param.to(output.dtype), output)

    def remove(self) -> None:
        self.handle.remove()


def save_embeds(path: str | Path, token: str, embedding: torch.Tensor) -> Path:
    """Write the official ``learned_embeds.bin``: ``torch.save({token: (D,) fp32 tensor})``."""
    path = Path(path)
    torch.save({token: embedding.detach().float().cpu().clone()}, str(path))
    return path


class _Trainer:
    def __init__(self, engine, exemplars, out: Path, cfg: ReVersionConfig):
        from diffusers import DDPMScheduler

        from ..relation import add_token, check_relation_model

        check_relation_model(engine)
        self.engine, self.cfg, self.out = engine, cfg, out
        self.device = engine.device
        self.amp = resolve_amp(cfg.mixed_precision, self.device)
        tok, te = engine.tokenizer, engine.text_encoder
        init_ids = tok(cfg.init_token, add_special_tokens=False).input_ids
        if len(init_ids) != 1:
            raise ValueError(f"init_token: {cfg.init_token!r} must be a single token of the tokenizer, it is "
                             f"{len(init_ids)}")
        init = te.get_input_embeddings().weight[init_ids[0]].detach().float().clone()
        self.token_id = add_token(engine, cfg.token, init)
        for m in (engine.unet, engine.vae, engine.text_encoder):
            m.requires_grad_(False)
        self.table = te.get_input_embeddings().weight  # frozen; read for the steering embeddings
        self.param = torch.nn.Parameter(init.to(self.device))
        self.noise_sched = DDPMScheduler.from_config(engine.scheduler.config)
        self.T = int(self.noise_sched.config.num_train_timesteps)
        self.prediction_type = self.noise_sched.config.prediction_type
        self._word_cache: dict[str, torch.Tensor] = {}
        self.positives = torch.stack([self.word_embedding(w) for w in BASIS_PREPOSITIONS])
        self.templates = [t for _, t in exemplars]
        size = cfg.resolution or engine.default_size
        self.posteriors = self._encode(exemplars, size)
        self.optimizer = torch.optim.AdamW([self.param], lr=cfg.lr, weight_decay=cfg.weight_decay)
        fp16 = self.device.type == "cuda" and torch.float16 in (self.amp, engine.dtype)
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        self.generator = torch.Generator("cpu").manual_seed(cfg.seed)
        self.step = 0
        self.losses: list[dict] = []

    # ---------------------------------------------------------------------------------------- setup
    @torch.no_grad()
    def word_embedding(self, word: str) -> torch.Tensor:
        """A word's raw embedding: the mean of its token rows (one row for single-token words), fp32."""
        if word not in self._word_cache:
            ids = self.engine.tokenizer(word, add_special_tokens=False).input_ids
            self._word_cache[word] = self.table[torch.tensor(ids, device=self.table.device)].float().mean(0)
        return self._word_cache[word]

    @torch.no_grad()
    def _encode(self, exemplars, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """VAE posterior (mean, std) per image; index ``2i + 1`` is the flipped image. The VAE is frozen, so
        each step only samples ``mean + std·ε`` (the same distribution as encoding per step)."""
        e = self.engine
        out = []
        for path, _ in exemplars:
            img = _load_image(path, size)
            batch = torch.stack([img, img.flip(-1)]).to(e.device, e.dtype) * 2 - 1
            dist = e.vae.encode(batch).latent_dist
            for i in range(2):
                out.append((dist.mean[i].float(), dist.std[i].float()))
        return out

    # ---------------------------------------------------------------------------------------- one step
    def _micro_batch(self, micro_index: int):
        cfg, g, n = self.cfg, self.generator, len(self.templates)
        images, captions, negatives = [], [], []
        for j in range(cfg.batch_size):
            # Epoch-wise shuffling derived from the sample counter alone, so a resumed run needs no sampler state.
            c = micro_index * cfg.batch_size + j
            perm = torch.randperm(n, generator=torch.Generator("cpu").manual_seed(cfg.seed * 1_000_003 + c // n))
            i = int(perm[c % n])
            templates = self.templates[i]
            tpl = templates[int(torch.randint(len(templates), (1,), generator=g))]
            flip = bool(torch.rand((), generator=g) < cfg.flip_p)
            images.append(2 * i + int(flip))
            captions.append(tpl.replace("{}", f" {cfg.token} ").strip())
            negatives += negative_words(tpl)
        mean = torch.stack([self.posteriors[k][0] for k in images])
        std = torch.stack([self.posteriors[k][1] for k in images])
        latents = (mean + std * torch.randn(mean.shape, generator=g).to(self.device))
        latents = latents * self.engine.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g).to(self.device)
        t = sample_timesteps(cfg.batch_size, self.T, importance=cfg.importance_sampling, alpha=cfg.alpha,
                             generator=g).to(self.device)
        pos = torch.randperm(len(BASIS_PREPOSITIONS), generator=g)[:cfg.num_positives]
        neg = (torch.stack([self.word_embedding(w) for w in negatives]) if negatives
               else self.positives.new_zeros(0, self.positives.shape[1]))
        return latents, noise, t, captions, self.positives[pos.to(self.device)], neg

    def _losses(self, micro_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        e, cfg = self.engine, self.cfg
        latents, noise, t, captions, pos, neg = self._micro_batch(micro_index)
        ids = e.tokenizer(captions, padding="max_length", max_length=e.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids.to(self.device)
        noisy = self.noise_sched.add_noise(latents, noise, t)
        target = noise if self.prediction_type == "epsilon" else self.noise_sched.get_velocity(latents, noise, t)
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            cond = e.text_encoder(ids)[0]
            pred = e.unet(noisy.to(e.dtype), t, encoder_hidden_states=cond.to(e.dtype), return_dict=False)[0]
        denoise = F.mse_loss(pred.float(), target.float())
        if cfg.lambda_steer == 0:  # ablation: not computed (the random stream is the same as with it)
            return denoise, torch.full((), float("nan"))
        steer = steering_loss(self.param, pos, neg, cfg.temperature)
        return denoise, steer

    def train_step(self) -> dict:
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        d_sum = s_sum = 0.0
        for a in range(cfg.grad_accum):
            denoise, steer = self._losses(self.step * cfg.grad_accum + a)
            loss = cfg.lambda_denoise * denoise
            if cfg.lambda_steer:
                loss = loss + cfg.lambda_steer * steer
            loss = loss / cfg.grad_accum
            self.scaler.scale(loss).backward()
            d_sum += float(denoise.detach())
            s_sum += float(steer.detach())
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        d, s = d_sum / cfg.grad_accum, s_sum / cfg.grad_accum
        total = cfg.lambda_denoise * d + (cfg.lambda_steer * s if cfg.lambda_steer else 0.0)
        rec = {"step": self.step, "loss": total, "denoise": d, "steer": s}
        self.losses.append(rec)
        return rec

    # ---------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        return write_checkpoint(self, {"token": self.cfg.token, "embedding": self.param.detach().cpu().clone()})

    def load_checkpoint(self, path: Path) -> None:
        state = read_checkpoint(path, "ReVersion", "embedding")
        if state["token"] != self.cfg.token:
            raise ValueError(f"resume: {str(path)!r} trains token {state['token']!r}, not {self.cfg.token!r}")
        if state["embedding"].shape != self.param.shape:
            raise ValueError(f"resume: {str(path)!r} holds a {tuple(state['embedding'].shape)} embedding; this "
                             f"model needs {tuple(self.param.shape)}")
        with torch.no_grad():
            self.param.copy_(state["embedding"].to(self.device))
        restore_training_state(self, state)


@contextlib.contextmanager
def training_session(engine, exemplars, out: str | Path, cfg: ReVersionConfig):
    """Prepare ``engine`` for ReVersion steps and yield the trainer (``train_step()``, ``save_checkpoint()``,
    ``load_checkpoint(path)``, ``param``, ``losses``); on exit the embedding hook is removed and the engine's
    attention processors are restored. :func:`train` is the usual entry point; this is for custom loops and
    the benchmark. ``exemplars`` is what :func:`load_exemplars` returns."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    saved_processors = engine.unet.attn_processors
    engine.unet.set_attn_processor(AttnProcessor2_0())  # stock SDPA: differentiable on every device
    hook = None
    try:
        trainer = _Trainer(engine, exemplars, Path(out), cfg)
        hook = _TokenOverride(engine.text_encoder.get_input_embeddings(), trainer.token_id, trainer.param)
        yield trainer
    finally:
        if hook is not None:
            hook.remove()
        engine.unet.set_attn_processor(saved_processors)
        engine.clear_prompt_cache()


def train(model="tiny", data: str | Path = ".", out: str | Path = "reversion-out",
          config: ReVersionConfig | None = None, **overrides) -> TrainResult:
    """Learn a ReVersion relation token from a folder of exemplar images; write ``OUT/learned_embeds.bin``.

    Args:
        model: an :class:`~dreamfuse.engine.engine.Engine` (trained in place: on return its tokenizer and
            text encoder hold the learned token, ready for ``engine.text2img("cat <R> box")``), or what
            ``Engine.from_pretrained`` takes (``"tiny"``, a diffusers folder, a ``.safetensors`` file), loaded
            in fp32 (mixed precision comes from autocast).
        data: the exemplar folder (images + ``text.json``); see :func:`load_exemplars`.
        out: output folder (created): ``learned_embeds.bin`` and ``checkpoints/step-NNNNNNN.pt``.
        config: a :class:`ReVersionConfig`; keyword ``overrides`` replace its fields (``steps=10``).

    Returns a :class:`TrainResult` with the learned embedding and the per-step losses.
    """
    from ..config import EngineConfig
    from ..engine import Engine

    cfg = dataclasses.replace(config or ReVersionConfig(), **overrides).validate()
    exemplars = load_exemplars(data)
    out = Path(out).expanduser()
    resume = None
    if cfg.resume == "latest":
        resume = latest_checkpoint(out)
    elif cfg.resume is not None:
        resume = Path(cfg.resume).expanduser()
        if not resume.is_file():
            raise FileNotFoundError(f"resume: checkpoint {str(resume)!r} does not exist")
    engine = model if isinstance(model, Engine) else Engine.from_pretrained(
        model, EngineConfig(dtype="fp32", backend="torch", progress=cfg.progress))
    out.mkdir(parents=True, exist_ok=True)

    with training_session(engine, exemplars, out, cfg) as trainer:
        if resume is not None:
            trainer.load_checkpoint(resume)
        with engine.progress(cfg.steps, "reversion", cfg.progress) as bar:
            bar.update(min(trainer.step, cfg.steps))
            while trainer.step < cfg.steps:
                rec = trainer.train_step()
                bar.set_postfix(denoise=f"{rec['denoise']:.4f}", steer=f"{rec['steer']:.4f}" if cfg.lambda_steer
                                else "off", refresh=False)
                bar.update(1)
                if cfg.checkpoint_every and trainer.step % cfg.checkpoint_every == 0:
                    trainer.save_checkpoint()
    with torch.no_grad():
        engine.text_encoder.get_input_embeddings().weight[trainer.token_id] = trainer.param.to(trainer.table.dtype)
    engine.clear_prompt_cache()
    embedding = trainer.param.detach().float().cpu().clone()
    path = save_embeds(out / EMBEDS_FILE, cfg.token, embedding)
    return TrainResult(token=cfg.token, embedding=embedding, path=path, losses=trainer.losses)


__all__ = [
    "BASIS_PREPOSITIONS", "STOP_WORDS", "ReVersionConfig", "TrainResult", "load_exemplars", "negative_words",
    "sample_timesteps", "save_embeds", "steering_loss", "timestep_probabilities", "train", "training_session",
]
