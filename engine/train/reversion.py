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
  outputs), τ = 0.07, anchor ``<R>``. No POS tagger, as in the official code. With ``negatives="tokens"``
  (the default) positives and negatives are token ids, as the official ``train.py`` computes them:

  - negatives: every token of the micro-batch's tokenized captions (truncated to the tokenizer's 77) whose
    id is not a stop-word or preposition id, not a special token (BOS/EOS/pad; padding positions are never
    negatives, whatever the tokenizer's pad token) and not ``<R>``. BPE pieces
    and punctuation are negatives too ("trees," on a tokenizer that splits it gives its pieces and the
    comma). The excluded ids are those of the official stop-word list (:data:`STOP_WORDS`, the repository's
    ``templates/stop_words.py``) plus the 56 basis prepositions (paper Table A4, ``templates/relation_words.py``)
    tokenized without special tokens: *every* piece of a word the tokenizer splits is excluded, wherever the
    same id occurs (the official ``train.py`` tokenizes the space-joined stop words and prepositions once and
    drops each caption id found among those ids, the BOS/EOS ids and the placeholder's);
  - positives: each image of the micro-batch draws ``num_positives`` basis prepositions (without
    replacement; the images draw independently, as the official dataset does per sample), and every token
    of the drawn words is one positive row (the official code tokenizes the drawn words joined by spaces and
    keeps every non-special token). Not every basis preposition is a single CLIP token ("astride" is not),
    so a split preposition contributes each of its pieces as a positive, as in the official code.

  ``negatives="words"`` is the word-level variant: negatives are the captions' alphabetic words that are
  neither stop words nor prepositions (:func:`negative_words`), and every word, negative or positive, is
  represented by the mean of its token rows (one row for a single-token word).

Data (:func:`load_exemplars`): a folder with exemplar images and ``text.json`` mapping each image file name
to a list of caption templates with ``{}`` where the token goes (the ReVersion benchmark's layout). As in
the official dataset, each image is resized whole to the training resolution (no centre crop; a non-square
image is stretched) and not flipped (``flip_p = 0``; the official code: a flip "might affect the relation").

Recipes (:data:`RECIPES`, :meth:`ReVersionConfig.from_recipe`): the defaults are the official run's (README:
``--train_batch_size 2 --gradient_accumulation_steps 4 --learning_rate 2.5e-04 --scale_lr``, i.e. lr
2.5e-4 × 2 × 4 = 2e-3 over 8 images per optimizer step, ``--num_positives 4``, 3000 steps); ``"paper"`` is
the supplementary's literal recipe (lr 2.5e-4, batch 2, no accumulation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..concurrency import changes_model
from ..limits import DEFAULT_LIMITS
from .common import (
    MIXED_PRECISION,
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

# Paper, supplementary Table A4 (= the official templates/relation_words.py): the 56 basis prepositions.
BASIS_PREPOSITIONS = (
    "aboard", "about", "above", "across", "after", "against", "along", "alongside", "amid", "amidst", "among",
    "amongst", "anti", "around", "astride", "at", "atop", "before", "behind", "below", "beneath", "beside",
    "between", "beyond", "by", "down", "following", "from", "in", "including", "inside", "into", "near", "of",
    "off", "on", "onto", "opposite", "out", "outside", "over", "past", "regarding", "round", "through",
    "throughout", "to", "toward", "towards", "under", "underneath", "up", "upon", "versus", "with", "within",
)

# The official stop-word list (templates/stop_words.py of the ReVersion repository: NLTK's English stop
# words), in its order. Together with the basis prepositions, the words that are never steering negatives.
STOP_WORDS = tuple("""
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers
herself it its itself they them their theirs themselves what which who whom this that these those am is are
was were be been being have has had having do does did doing a an the and but if or because as until while
of at by for with about against between into through during before after above below to from up down in out
on off over under again further then once here there when where why how all any both each few more most
other some such no nor not only own same so than too very s t can will just don should now
""".split())

NEGATIVE_MODES = ("tokens", "words")

RECIPES = {
    "official": {"lr": 2.5e-4 * 2 * 4, "batch_size": 2, "grad_accum": 4},
    "paper": {"lr": 2.5e-4, "batch_size": 2, "grad_accum": 1},
}
"""``official``: the official README's run (lr 2.5e-4 scaled by batch 2 × accumulation 4 = 2e-3, 8 images per
optimizer step); ``paper``: supplementary A.1 as written (lr 2.5e-4, batch 2, no accumulation)."""

TEXT_JSON = "text.json"
MAX_TEXT_JSON_BYTES = 4 * 2**20
"""Largest ``text.json`` read: the benchmark's files are a few KiB (about ten images with a few templates
each), so 4 MiB leaves three orders of magnitude of room while a mistaken or hostile file never fills memory."""
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
EMBEDS_FILE = "learned_embeds.bin"
MAX_BATCH = DEFAULT_LIMITS.max_images
"""Largest ``batch_size``: the images of a micro-batch go through the UNet in one call (``limits.max_images``)."""


@dataclass
class ReVersionConfig:
    """ReVersion training knobs. Defaults are the official run's (README of the official code, SD 1.5; see
    :data:`RECIPES`; :meth:`from_recipe` ``("paper")`` gives the supplementary's literal lr and batch)."""

    token: str = "<R>"
    """The relation token added to the tokenizer; the key of ``learned_embeds.bin``."""

    init_token: str = "and"
    """A single-token word whose embedding initializes the relation token (paper: "and")."""

    steps: int = 3000
    """Optimizer steps (paper and official run: 3,000)."""

    lr: float = RECIPES["official"]["lr"]
    """AdamW learning rate, constant. Default 2e-3: the official run's 2.5e-4 scaled by batch 2 × accumulation
    4 (``--scale_lr``); the paper states 2.5e-4 (recipe ``"paper"``). Changed from 2.5e-4."""

    batch_size: int = RECIPES["official"]["batch_size"]
    """Images per micro-batch (paper and official run: 2)."""

    grad_accum: int = RECIPES["official"]["grad_accum"]
    """Micro-batches accumulated per optimizer step (effective batch = batch_size · grad_accum). Default 4, the
    official run's (8 images per step); recipe ``"paper"``: 1. Changed from 1."""

    weight_decay: float = 1e-2
    """AdamW weight decay (the official script's ``--adam_weight_decay`` default)."""

    num_positives: int = 4
    """Basis prepositions drawn (without replacement) *per image* of the micro-batch as steering positives:
    the official dataset draws them per sample (``--num_positives 4`` in the official run, so 8 per micro-batch
    of 2: the paper's "8 positive samples"). Changed from 8 per micro-batch."""

    negatives: str = "tokens"
    """``tokens`` (default, the official computation: token ids, BPE pieces and punctuation included, see the
    module docstring) or ``words`` (alphabetic words, each the mean of its token rows; the former behaviour)."""

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
    """Training image size (square). Images are resized whole to it (bicubic, no centre crop, as the official
    dataset does; a non-square image is stretched). Default: the model's native size. Was centre crop."""

    flip_p: float = 0.0
    """Probability of a horizontal flip per sample. Default 0, as the official dataset ("do not flip
    horizontally, otherwise might affect the relation": left of / right of are not mirror-symmetric).
    Changed from 0.5."""

    mixed_precision: str = "auto"
    """``auto`` (bf16 autocast on CUDA where supported, else fp16; fp32 on CPU), ``no``, ``fp16``, ``bf16``.
    The learned vector and the optimizer stay fp32; fp16 uses a gradient scaler."""

    seed: int = 0
    """Seed of all training randomness (images, templates, flips, noise, timesteps, positives)."""

    checkpoint_every: int = 500
    """Write a resumable checkpoint every N optimizer steps into ``OUT/checkpoints`` (0 = never)."""

    resume: str | None = None
    """A checkpoint file to continue from, or ``"latest"`` (the newest in ``OUT/checkpoints``; a fresh start
    when there is none). The run then continues exactly as if it had never stopped. The settings must be the
    checkpoint's (``steps``, ``checkpoint_every`` and ``progress`` may change; a mismatch is listed)."""

    progress: bool | None = None
    """Progress bar with the two losses (default: the engine config's ``progress``)."""

    @classmethod
    def from_recipe(cls, recipe: str = "official", **overrides) -> ReVersionConfig:
        """The config of a :data:`RECIPES` entry (lr, batch_size, grad_accum); ``overrides`` win over it."""
        check_choice(recipe, "recipe", tuple(RECIPES))
        return cls(**{**RECIPES[recipe], **overrides})

    def validate(self) -> ReVersionConfig:
        from ..validation import check_seed, check_text

        for name in ("token", "init_token"):
            check_text(getattr(self, name), name, max_chars=100)
        if not self.token.strip() or any(c.isspace() for c in self.token):
            raise ValueError(f"token: must be non-empty, without spaces, got {self.token!r}")
        for name in ("steps", "batch_size", "grad_accum", "num_positives"):
            check_int(getattr(self, name), name, low=1)
        check_batch_size(self.batch_size, MAX_BATCH, "images")
        if self.num_positives > len(BASIS_PREPOSITIONS):
            raise ValueError(f"num_positives: must be in 1..{len(BASIS_PREPOSITIONS)}, got {self.num_positives!r}")
        check_int(self.checkpoint_every, "checkpoint_every", low=0)
        check_seed(self.seed)
        check_numbers(self, {
            "lr": {"low": 0, "low_open": True}, "weight_decay": {"low": 0},
            "temperature": {"low": 0, "low_open": True}, "lambda_steer": {"low": 0}, "lambda_denoise": {"low": 0},
            "alpha": {"low": 0, "low_open": True, "high": 1}, "flip_p": {"low": 0, "high": 1},
        })
        if self.lambda_denoise == 0 and self.lambda_steer == 0:
            raise ValueError("lambda_denoise: must be > 0 when lambda_steer is 0 (nothing would train), got 0")
        check_choice(self.negatives, "negatives", NEGATIVE_MODES)
        check_choice(self.mixed_precision, "mixed_precision", MIXED_PRECISION)
        if not isinstance(self.importance_sampling, bool):
            raise ValueError(f"importance_sampling: must be True or False, got {self.importance_sampling!r}")
        check_resolution_and_resume(self)
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
    """The word-level steering negatives of a caption template (``{}`` = the token; ``negatives="words"``): its
    alphabetic words, lower-cased, that are neither stop words nor basis prepositions, in order (repeats kept,
    as the paper sums over them)."""
    return [w for w in re.findall(r"[^\W\d_]+", template.replace("{}", " ").lower()) if w not in _NOT_NEGATIVE]


_NOT_NEGATIVE = frozenset(STOP_WORDS) | frozenset(BASIS_PREPOSITIONS)


def word_token_ids(tokenizer, words) -> list[list[int]]:
    """Each word's token ids, without special tokens (a word the tokenizer splits has several)."""
    return tokenizer(list(words), add_special_tokens=False).input_ids


def excluded_token_ids(tokenizer, token_id: int) -> torch.Tensor:
    """The ids that are never steering negatives (``negatives="tokens"``): every token of the stop words and
    the basis prepositions, the tokenizer's special tokens (BOS, EOS, pad, unk) and the relation token.
    Sorted int64 on CPU. Tokenizing each word alone gives the ids the official code gets from the words joined
    by spaces (CLIP's tokenizer splits on whitespace before BPE)."""
    ids = {i for word in word_token_ids(tokenizer, STOP_WORDS + BASIS_PREPOSITIONS) for i in word}
    ids |= set(tokenizer.all_special_ids) | {int(token_id)}
    return torch.tensor(sorted(ids), dtype=torch.long)


def negative_token_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """The steering negatives of tokenized captions (``negatives="tokens"``): the ids of ``input_ids``
    ``(B, L)`` at real (``attention_mask``) positions that are not in ``excluded``
    (:func:`excluded_token_ids`), caption after caption, repeats kept. ``(M,)`` int64."""
    keep = attention_mask.bool() & ~torch.isin(input_ids, excluded.to(input_ids.device))
    return input_ids[keep]


def _image_in_folder(root: Path, name: str, text_path: Path) -> Path:
    """``root / name`` for a ``text.json`` key that names a file inside ``root``: no absolute path, no ``..``,
    no symlink (or folder symlink) leading out of it."""
    from ..validation import check_text

    check_text(name, f"data: image name {name!r} in {TEXT_JSON}")
    rel = Path(name)
    if not name.strip() or rel.is_absolute() or rel.drive or ".." in rel.parts:
        raise ValueError(f"data: image name {name!r} in {str(text_path)!r} must be a file name inside the data "
                         "folder (no absolute path, no '..')")
    path = root / rel
    if not path.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"data: image {name!r} in {str(text_path)!r} leads out of the data folder "
                         f"{str(root)!r} (a symlink?)")
    return path


def load_exemplars(data_dir: str | Path) -> list[tuple[Path, list[str]]]:
    """Read a ReVersion exemplar folder: ``[(image path, [caption templates])]`` in ``text.json`` order.

    Raises ``ValueError`` naming the problem: missing folder or ``text.json``; a ``text.json`` that is larger
    than :data:`MAX_TEXT_JSON_BYTES`, not UTF-8, not valid JSON, nested too deeply, or has a key twice; a key
    that is an absolute path or leads out of the folder (``..``, a symlink); an image that is listed but
    missing (or present but not listed); an empty template list; a template without ``{}``.
    """
    from ..files import check_file, read_json
    from ..validation import check_text

    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise ValueError(f"data: folder {str(root)!r} does not exist")
    text_path = root / TEXT_JSON
    if not text_path.exists():
        raise ValueError(f"data: {TEXT_JSON} is missing in {str(root)!r} (it maps each image file name to a "
                         "list of caption templates with {} where the relation token goes)")
    table = read_json(text_path, "data", "a caption file", MAX_TEXT_JSON_BYTES)
    if not isinstance(table, dict) or not table:
        raise ValueError(f"data: {str(text_path)!r} must be a non-empty object {{image file name: [templates]}}")
    out, seen = [], {}
    for name, templates in table.items():
        image = _image_in_folder(root, name, text_path)
        if not image.exists():
            raise ValueError(f"data: image {name!r} listed in {TEXT_JSON} does not exist in {str(root)!r}")
        check_file(image, "data", "image")
        key = image.resolve()
        if key in seen:
            raise ValueError(f"data: {TEXT_JSON} lists the image {name!r} twice (also as {seen[key]!r})")
        seen[key] = name
        if isinstance(templates, str):
            templates = [templates]
        if not isinstance(templates, list) or not templates:
            raise ValueError(f"data: image {name!r} has an empty template list in {TEXT_JSON}")
        for tpl in templates:
            if not isinstance(tpl, str) or "{}" not in tpl:
                raise ValueError(f"data: template {tpl!r} of image {name!r} has no '{{}}' where the relation "
                                 "token goes")
            check_text(tpl, f"data: template of image {name!r}", max_chars=DEFAULT_LIMITS.max_prompt_chars)
        out.append((image, list(templates)))
    unlisted = sorted(p.name for p in root.iterdir()
                      if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and p.resolve() not in seen)
    if unlisted:
        raise ValueError(f"data: image(s) {unlisted} have no captions in {TEXT_JSON}")
    return out


def _load_image(path: Path, size: int) -> torch.Tensor:
    """The whole image resized to ``size`` x ``size`` (bicubic, antialiased, no crop: the official dataset
    resizes the whole image), read by :func:`dreamfuse.engine.images.load_rgb` (EXIF orientation, 16-bit,
    transparency over white): ``(3, size, size)`` float32 in [0, 1]."""
    from ..images import load_rgb, resize_whole

    return resize_whole(load_rgb(path, "data"), size)


LOSS_KEYS = ("loss", "denoise", "steer")
"""The numbers of a loss record (``TrainResult.losses``) besides ``step``."""


def check_checkpoint(state: dict, cfg: ReVersionConfig, source: str, world_size: int = 1) -> None:
    """Everything in a ReVersion checkpoint that can be checked without a model, before any of it is used
    (``ValueError`` naming ``resume``): ``token`` is the run's token, ``embedding`` a finite ``(D,)`` float vector,
    the training state is sound (:func:`~dreamfuse.engine.train.common.check_training_state`: step, loss history,
    optimizer state of the embedding's shape, gradient scaler, RNG states) and the settings are ``cfg``'s
    (``world_size``: the processes resuming it). The embedding's size is checked against the model on load."""
    missing = [k for k in ("token", "embedding") if k not in state]
    if missing:
        raise damaged(source, f"it lacks {', '.join(missing)}")
    token = state["token"]
    if not isinstance(token, str):
        raise damaged(source, f"token is {token!r}"[:100] + ", not a string")
    embedding = check_weight(state["embedding"], "embedding", source)
    if embedding.ndim != 1 or not len(embedding):
        raise damaged(source, f"embedding has shape {tuple(embedding.shape)}, not (D,)")
    check_training_state(state, source, [embedding], LOSS_KEYS)
    check_resume_config(state["config"], cfg, source, world=(checkpoint_world_size(state), world_size))
    if token != cfg.token:
        raise ValueError(f"resume: {source} trains token {token[:100]!r}, not {cfg.token!r}")


def check_resume(cfg: ReVersionConfig, out, world_size: int = 1) -> None:
    """The checkpoint ``cfg.resume`` names (``"latest"``: in ``OUT/checkpoints``), read and checked as :func:`train`
    does (:func:`check_checkpoint`): for callers that load the model first, as the CLI, so that a bad checkpoint
    fails before the model loads."""
    path = resume_path(cfg.resume, output_folder(out))
    if path is not None:
        check_checkpoint(read_checkpoint(path, "ReVersion", "embedding"), cfg, f"checkpoint {str(path)!r}", world_size)


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
    """Write the official ``learned_embeds.bin``, ``torch.save({token: (D,) fp32 tensor})``, atomically (a
    temporary file renamed into place: an interrupted run never leaves a truncated file)."""
    from ..files import torch_save_atomic

    return torch_save_atomic({token: embedding.detach().float().cpu().clone()}, Path(path))


@dataclass
class MicroBatch:
    """One micro-batch of ``B`` images as the trainer uses it. In a data-parallel run the denoising fields
    (``latents`` to ``input_ids``) are this rank's ``B`` rows and the steering fields (``positive_words`` to
    ``negative_ids``) the whole global micro-batch's: every rank computes the steering loss of all ``W·B`` images
    (cheap: table rows), so its DDP average is the single-process loss of that batch."""

    latents: torch.Tensor
    """Clean latents ``(B, C, h, w)`` (scaled by the VAE's scaling factor)."""
    noise: torch.Tensor
    t: torch.Tensor
    captions: list[str]
    """The captions, ``<R>`` in place of ``{}``."""
    input_ids: torch.Tensor
    """``(B, 77)`` token ids of the captions, padded to the tokenizer's length, truncated past it."""
    positive_words: list[list[str]]
    """The basis prepositions each image drew."""
    positives: torch.Tensor
    """``(L, D)`` fp32 steering positives (token rows, or word means with ``negatives="words"``)."""
    negatives: torch.Tensor
    """``(M, D)`` fp32 steering negatives (``M`` may be 0)."""
    positive_ids: torch.Tensor | None = None
    """``(L,)`` the positives' token ids (``negatives="tokens"``)."""
    negative_ids: torch.Tensor | None = None
    """``(M,)`` the negatives' token ids (``negatives="tokens"``)."""


class _Trainer:
    def __init__(self, engine, exemplars, out: Path, cfg: ReVersionConfig, dist: Context = SINGLE):
        from diffusers import DDPMScheduler

        from ..relation import add_token, check_relation_model

        check_relation_model(engine)
        self.engine, self.cfg, self.out, self.dist = engine, cfg, out, dist
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
        self.model = wrap(Trainable(params={"token_embedding": self.param}), dist)  # DDP averages <R>'s gradient
        self.noise_sched = DDPMScheduler.from_config(engine.scheduler.config)
        self.T = int(self.noise_sched.config.num_train_timesteps)
        self.prediction_type = self.noise_sched.config.prediction_type
        self._word_cache: dict[str, torch.Tensor] = {}
        self.preposition_ids = [torch.tensor(ids, dtype=torch.long)
                                for ids in word_token_ids(tok, BASIS_PREPOSITIONS)]
        self.excluded_ids = excluded_token_ids(tok, self.token_id)
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
            ids = self.engine.tokenize(word, add_special_tokens=False).input_ids
            self._word_cache[word] = self.table[torch.tensor(ids, device=self.table.device)].float().mean(0)
        return self._word_cache[word]

    @torch.no_grad()
    def _encode(self, exemplars, size: int) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """VAE posterior (mean, std) per image; index ``2i + 1`` is the flipped image (None when ``flip_p`` is
        0: never drawn). The VAE is frozen, so each step only samples ``mean + std·ε`` (the same distribution as
        encoding per step)."""
        e = self.engine
        flips = self.cfg.flip_p > 0
        out = []
        for path, _ in exemplars:
            img = _load_image(path, size)
            batch = (torch.stack([img, img.flip(-1)]) if flips else img[None]).to(e.device, e.dtype) * 2 - 1
            dist = e.vae.encode(batch).latent_dist
            out.append((dist.mean[0].float(), dist.std[0].float()))
            out.append((dist.mean[1].float(), dist.std[1].float()) if flips else None)
        return out

    # ---------------------------------------------------------------------------------------- one step
    @torch.no_grad()
    def micro_batch(self, micro_index: int) -> MicroBatch:
        """The :class:`MicroBatch` of micro-batch number ``micro_index`` (draws from the trainer's generator)."""
        cfg, g, n, e = self.cfg, self.generator, len(self.templates), self.engine
        # Several processes: every rank draws for the whole global micro-batch of G images, in the single-process
        # order, and keeps its rows [lo, hi) for the denoising loss (see distributed.py).
        G = cfg.batch_size * self.dist.world_size
        lo = self.dist.first_row(cfg.batch_size)
        hi = lo + cfg.batch_size
        images, captions, drawn, word_negatives = [], [], [], []
        for j in range(G):
            # Epoch-wise shuffling derived from the sample counter alone, so a resumed run needs no sampler state.
            c = micro_index * G + j
            perm = torch.randperm(n, generator=torch.Generator("cpu").manual_seed(cfg.seed * 1_000_003 + c // n))
            i = int(perm[c % n])
            templates = self.templates[i]
            tpl = templates[int(torch.randint(len(templates), (1,), generator=g))]
            flip = bool(torch.rand((), generator=g) < cfg.flip_p)
            drawn.append(torch.randperm(len(BASIS_PREPOSITIONS), generator=g)[:cfg.num_positives].tolist())
            images.append(2 * i + int(flip))
            captions.append(tpl.replace("{}", f" {cfg.token} ").strip())
            word_negatives += negative_words(tpl)
        mean = torch.stack([self.posteriors[k][0] for k in images[lo:hi]])
        std = torch.stack([self.posteriors[k][1] for k in images[lo:hi]])
        shape = (G, *mean.shape[1:])
        latents = (mean + std * torch.randn(shape, generator=g)[lo:hi].to(self.device))
        latents = latents * e.vae.config.scaling_factor
        noise = torch.randn(shape, generator=g)[lo:hi].to(self.device)
        t = sample_timesteps(G, self.T, importance=cfg.importance_sampling, alpha=cfg.alpha,
                             generator=g)[lo:hi].to(self.device)
        tokens = e.tokenize(captions, padding="max_length", max_length=e.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt")
        words = [[BASIS_PREPOSITIONS[k] for k in ks] for ks in drawn]
        rows = self.table.device
        if cfg.negatives == "tokens":
            pos_ids = torch.cat([self.preposition_ids[k] for ks in drawn for k in ks])
            neg_ids = negative_token_ids(tokens.input_ids, tokens.attention_mask, self.excluded_ids)
            pos, neg = (self.table[ids.to(rows)].float() for ids in (pos_ids, neg_ids))
        else:
            pos_ids = neg_ids = None
            pos = torch.stack([self.word_embedding(w) for ws in words for w in ws])
            neg = (torch.stack([self.word_embedding(w) for w in word_negatives]) if word_negatives
                   else pos.new_zeros(0, pos.shape[1]))
        return MicroBatch(latents, noise, t, captions[lo:hi], tokens.input_ids[lo:hi].to(self.device), words,
                          pos.to(self.device), neg.to(self.device), pos_ids, neg_ids)

    def _losses(self, micro_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``(denoise, steer)`` of micro-batch ``micro_index`` (through the DDP module when there are
        several)."""
        return self.model(lambda: self._micro_losses(micro_index))

    def _micro_losses(self, micro_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        e, cfg = self.engine, self.cfg
        b = self.micro_batch(micro_index)
        noisy = self.noise_sched.add_noise(b.latents, b.noise, b.t)
        target = (b.noise if self.prediction_type == "epsilon"
                  else self.noise_sched.get_velocity(b.latents, b.noise, b.t))
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            cond = e.text_encoder(b.input_ids)[0]
            pred = e.unet(noisy.to(e.dtype), b.t, encoder_hidden_states=cond.to(e.dtype), return_dict=False)[0]
        denoise = F.mse_loss(pred.float(), target.float())
        if cfg.lambda_steer == 0:  # ablation: not computed (the random stream is the same as with it)
            return denoise, torch.full((), float("nan"))
        return denoise, steering_loss(self.param, b.positives, b.negatives, cfg.temperature)

    def train_step(self) -> dict:
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        d_sum = s_sum = 0.0
        for a in range(cfg.grad_accum):
            with no_sync(self.model, last=a == cfg.grad_accum - 1):  # DDP reduces once, on the last backward
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
        if self.dist.enabled:  # the global batch's losses, the same on every rank (steer already is)
            d_sum, s_sum = self.dist.mean([d_sum, s_sum])
        d, s = d_sum / cfg.grad_accum, s_sum / cfg.grad_accum
        total = cfg.lambda_denoise * d + (cfg.lambda_steer * s if cfg.lambda_steer else 0.0)
        rec = {"step": self.step, "loss": total, "denoise": d, "steer": s}
        self.losses.append(rec)
        return rec

    # ---------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        return write_checkpoint(self, {"token": self.cfg.token, "embedding": self.param.detach().cpu().clone()})

    def load_checkpoint(self, checkpoint: Path | dict) -> None:
        """Continue from a checkpoint file (or the dict :func:`~dreamfuse.engine.train.common.read_checkpoint`
        returned for it); ``ValueError`` when it was trained with other settings (listed)."""
        source = f"checkpoint {str(checkpoint)!r}" if not isinstance(checkpoint, dict) else "the checkpoint"
        state = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint, "ReVersion", "embedding")
        check_checkpoint(state, self.cfg, source, self.dist.world_size)  # all of it, before any of it is used
        if state["embedding"].shape != self.param.shape:
            raise ValueError(f"resume: {source} holds a {tuple(state['embedding'].shape)} embedding; this "
                             f"model needs {tuple(self.param.shape)}")
        check_against_trainer(self, state, source)
        with torch.no_grad():
            self.param.copy_(state["embedding"].to(self.device))
        restore_training_state(self, state)


@contextlib.contextmanager
@changes_model("train")
def training_session(engine, exemplars, out: str | Path, cfg: ReVersionConfig, dist: Context = SINGLE):
    """Prepare ``engine`` for ReVersion steps and yield the trainer (``train_step()``, ``micro_batch(i)``,
    ``save_checkpoint()``, ``load_checkpoint(path)``, ``param``, ``losses``); on exit the embedding hook is
    removed and the engine's attention processors are restored. :func:`train` is the usual entry point; this is
    for custom loops and the benchmark. ``exemplars`` is what :func:`load_exemplars` returns. ``dist``: this
    process's place in a data-parallel run (:func:`~dreamfuse.engine.train.distributed.setup`); every rank then
    runs the same calls (``train_step`` and ``save_checkpoint`` are collectives)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    saved_processors = engine.unet.attn_processors
    engine.unet.set_attn_processor(AttnProcessor2_0())  # stock SDPA: differentiable on every device
    hook = trainer = None
    try:
        trainer = _Trainer(engine, exemplars, Path(out), cfg, dist)
        hook = _TokenOverride(engine.text_encoder.get_input_embeddings(), trainer.token_id, trainer.param)
        yield trainer
    finally:
        if trainer is not None:
            trainer.model = None  # DDP's gradient hooks go with it
        if hook is not None:
            hook.remove()
        engine.unet.set_attn_processor(saved_processors)
        engine.clear_prompt_cache()


def train(model="tiny", data: str | Path = ".", out: str | Path = "reversion-out",
          config: ReVersionConfig | None = None, *, log=None, **overrides) -> TrainResult:
    """Learn a ReVersion relation token from a folder of exemplar images; write ``OUT/learned_embeds.bin``.

    Args:
        model: an :class:`~dreamfuse.engine.engine.Engine` (trained in place: on return its tokenizer and
            text encoder hold the learned token, ready for ``engine.text2img("cat <R> box")``), or what
            ``Engine.from_pretrained`` takes (``"tiny"``, a diffusers folder, a ``.safetensors`` file), loaded
            in fp32 (mixed precision comes from autocast).
        data: the exemplar folder (images + ``text.json``); see :func:`load_exemplars`.
        out: output folder (created): ``learned_embeds.bin`` and ``checkpoints/step-NNNNNNN.pt``.
        config: a :class:`ReVersionConfig` (default: the official recipe; ``ReVersionConfig.from_recipe("paper")``
            for the paper's); keyword ``overrides`` replace its fields (``steps=10``).
        log: called on rank 0 with the line stating the effective batch when training starts (the CLI prints it).

    Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1) every process calls this with the same
    arguments: the processes join the launcher's group (:mod:`~dreamfuse.engine.train.distributed`), each
    denoises its rows of every global micro-batch (``batch_size`` images per process; the steering loss covers the
    whole global micro-batch on every rank) and DDP averages ``<R>``'s gradient; rank 0 alone logs and writes the
    checkpoints and ``learned_embeds.bin``. ``mixed_precision="auto"`` takes the launcher's
    ``--mixed_precision fp16|bf16``.

    Everything that can be checked without a model is checked before one is loaded: the config, the data, the
    output folder, and a checkpoint to resume (readable, and trained with the same settings).

    Returns a :class:`TrainResult` with the learned embedding and the per-step losses.
    """
    from ..config import EngineConfig
    from ..engine import Engine

    cfg = dataclasses.replace(config or ReVersionConfig(), **overrides)
    if isinstance(cfg.resume, Path):
        cfg = dataclasses.replace(cfg, resume=str(cfg.resume))
    cfg = dataclasses.replace(cfg, mixed_precision=launcher_mixed_precision(cfg.mixed_precision))
    cfg.validate()
    exemplars = load_exemplars(data)
    out = output_folder(out)
    device = model.device if isinstance(model, Engine) else torch.device(
        rank_device(None) or ("cuda" if torch.cuda.is_available() else "cpu"))
    dist = setup(device)
    resume = shared_resume_path(cfg.resume, out, dist)
    state = None
    if resume is not None:
        state = read_checkpoint(resume, "ReVersion", "embedding")
        check_checkpoint(state, cfg, f"checkpoint {str(resume)!r}", dist.world_size)
    engine = model if isinstance(model, Engine) else Engine.from_pretrained(
        model, EngineConfig(device=str(device), dtype="fp32", backend="torch",
                            progress=cfg.progress if dist.is_main else False))
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)

    with training_session(engine, exemplars, out, cfg, dist) as trainer:
        if state is not None:
            trainer.load_checkpoint(state)
        if log is not None and dist.is_main:
            log(f"reversion: {dist.describe(cfg.batch_size, cfg.grad_accum, 'images')}")
        with engine.progress(cfg.steps, "reversion", cfg.progress if dist.is_main else False) as bar:
            bar.update(min(trainer.step, cfg.steps))
            while trainer.step < cfg.steps:
                rec = trainer.train_step()
                bar.set_postfix(denoise=f"{rec['denoise']:.4f}", steer=f"{rec['steer']:.4f}" if cfg.lambda_steer
                                else "off", refresh=False)
                bar.update(1)
                if cfg.checkpoint_every and trainer.step % cfg.checkpoint_every == 0:
                    trainer.save_checkpoint()
    embedding = trainer.param.detach().float().cpu().clone()
    if not bool(torch.isfinite(embedding).all()):
        raise ValueError(f"lr: training diverged (the learned embedding holds NaN or inf after {trainer.step} "
                         f"steps at lr {cfg.lr:g}); nothing was written, try a smaller lr")
    with torch.no_grad():
        engine.text_encoder.get_input_embeddings().weight[trainer.token_id] = trainer.param.to(trainer.table.dtype)
    engine.clear_prompt_cache()
    path = out / EMBEDS_FILE
    if dist.is_main:  # the embedding is the same on every rank (DDP)
        path = save_embeds(path, cfg.token, embedding)
    dist.barrier()  # the file is complete on every rank's return
    return TrainResult(token=cfg.token, embedding=embedding, path=path, losses=trainer.losses)


__all__ = [
    "BASIS_PREPOSITIONS", "MAX_BATCH", "NEGATIVE_MODES", "RECIPES", "STOP_WORDS", "MicroBatch", "ReVersionConfig",
    "TrainResult", "check_checkpoint", "check_resume", "excluded_token_ids", "load_exemplars", "negative_token_ids",
    "negative_words", "sample_timesteps", "save_embeds", "steering_loss", "timestep_probabilities", "train",
    "training_session", "word_token_ids",
]
