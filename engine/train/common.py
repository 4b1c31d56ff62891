"""Pieces the trainers share: config checks, mixed-precision resolution, the output folder and checkpoints."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from ..files import check_file, torch_save_atomic
from ..limits import DEFAULT_LIMITS
from ..validation import check_number, is_int, shown_int

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
CHECKPOINT_DIR = "checkpoints"
MAX_RESOLUTION = int(DEFAULT_LIMITS.max_pixels**0.5) // 8 * 8
"""Largest training ``resolution``: the side of a square image of the engine's ``limits.max_pixels`` (2048)."""

RESUMABLE_CHANGES = frozenset({"steps", "resume", "progress", "checkpoint_every"})
"""Config fields a resumed run may change: more (or fewer) steps extend (or end) the run, the others only
say where to read from, what to show and how often to save. Any other difference means the checkpoint's
optimizer state and loss history belong to another run."""


def check_int(value, field: str, *, low: int = 1) -> int:
    """An integer (bool refused) ``>= low``; ``ValueError`` naming ``field``."""
    if not is_int(value):
        raise ValueError(f"{field}: must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{field}: must be >= {low}, got {value!r}")
    return value


def check_choice(value, field: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"{field}: must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_numbers(cfg, bounds: dict) -> None:
    """``bounds``: field -> keyword arguments of :func:`~dreamfuse.engine.validation.check_number` (finite
    numbers only: NaN and inf are refused whatever the bounds)."""
    for name, kw in bounds.items():
        check_number(getattr(cfg, name), name, **kw)


def check_batch_size(value, most: int, unit: str) -> int:
    """``batch_size``: an integer in ``[1, most]`` (``most`` comes from the engine's ``limits.max_images``: what one
    UNet call may hold)."""
    check_int(value, "batch_size", low=1)
    if value > most:
        raise ValueError(f"batch_size: {shown_int(value)} {unit} per micro-batch, the limit is {most} "
                         "(limits.max_images)")
    return value


def check_resolution_and_resume(cfg) -> None:
    """The two fields every trainer config shares beyond numbers: ``resolution`` (None or a multiple of 8 within
    the engine's size limits, :data:`MAX_RESOLUTION`) and ``resume`` (None, ``"latest"`` or a checkpoint path)."""
    if cfg.resolution is not None:
        check_int(cfg.resolution, "resolution", low=8)
        if cfg.resolution % 8:
            raise ValueError(f"resolution: must be a multiple of 8, got {cfg.resolution!r}")
        if cfg.resolution > MAX_RESOLUTION:
            raise ValueError(f"resolution: {shown_int(cfg.resolution)}, the limit is {MAX_RESOLUTION} (a square of "
                             "limits.max_pixels)")
    if cfg.resume is not None and not isinstance(cfg.resume, str):
        raise ValueError(f"resume: must be 'latest' or a checkpoint path, got {cfg.resume!r}")


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``mode``: ``auto`` = bf16 (fp16 without bf16 support) on CUDA, none on CPU."""
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "fp16" and device.type != "cuda":
        raise ValueError("mixed_precision: fp16 autocast needs CUDA (use 'no' or 'bf16' on CPU)")
    return {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[mode]


def output_folder(out, field: str = "out") -> Path:
    """The trainer's output folder (created later): refused when a file (or anything but a folder) is in the
    way, before any model is loaded."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{field}: {str(out)!r} exists and is not a folder")
    return path


def latest_checkpoint(out: Path) -> Path | None:
    """The newest ``OUT/checkpoints/step-*.pt``, or None."""
    found = sorted((out / CHECKPOINT_DIR).glob("step-*.pt"))
    return found[-1] if found else None


def resume_path(resume: str | None, out: Path) -> Path | None:
    """The checkpoint ``resume`` names: ``"latest"`` = the newest in ``OUT/checkpoints`` (None when there is
    none: a fresh start), a file path (``FileNotFoundError`` when missing), or None."""
    if resume is None:
        return None
    if resume == "latest":
        return latest_checkpoint(out)
    return check_file(resume, "resume", "checkpoint")


def shared_resume_path(resume: str | None, out: Path, dist) -> Path | None:
    """:func:`resume_path` on every rank of a data-parallel run (``dist``, a
    :class:`~dreamfuse.engine.train.distributed.Context`), rank 0's choice binding: a rank that resolves
    ``"latest"`` to another checkpoint (or none) does not see rank 0's ``OUT`` (``ValueError``: ``OUT`` must be a
    folder that every machine shares)."""
    mine = resume_path(resume, out)
    name = None if mine is None else str(mine)
    chosen = dist.broadcast(name)
    if name != chosen:
        raise ValueError(f"resume: rank {dist.rank} finds {name or 'no checkpoint'} in {str(out)!r} but rank 0 "
                         f"resumes from {chosen or 'no checkpoint'}; OUT must be a folder every machine shares")
    return mine


def _rng_state() -> dict:
    return {"torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def write_checkpoint(trainer, weights: dict) -> Path:
    """Write ``OUT/checkpoints/step-NNNNNNN.pt`` atomically (:func:`~dreamfuse.engine.files.torch_save_atomic`):
    the trainer's ``weights`` entries plus what makes a resumed run continue exactly (step, optimizer, gradient
    scaler, the CPU sampling generator, torch and CUDA RNG states, loss history, config). ``trainer`` has
    ``out``, ``step``, ``optimizer``, ``scaler``, ``generator``, ``losses`` and ``cfg`` (a dataclass), and ``dist``
    (a :class:`~dreamfuse.engine.train.distributed.Context`; absent = one process).

    Data-parallel runs: every rank calls this (a collective); the torch/CUDA RNG states of all ranks are gathered
    into ``ranks`` (rank 0's are also the top-level ones), ``world_size`` is recorded, rank 0 alone writes, and no
    rank returns before the file is complete. The generator, the weights and the optimizer are the same on every
    rank (the same draws, DDP-averaged gradients), so rank 0's stand for all."""
    from .distributed import SINGLE

    ctx = getattr(trainer, "dist", SINGLE)
    ranks = ctx.all_gather(_rng_state())
    path = trainer.out / CHECKPOINT_DIR / f"step-{trainer.step:07d}.pt"
    if ctx.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "step": trainer.step, **weights,
            "optimizer": trainer.optimizer.state_dict(), "scaler": trainer.scaler.state_dict(),
            "generator": trainer.generator.get_state(), **ranks[0],
            "losses": list(trainer.losses), "config": dataclasses.asdict(trainer.cfg),
            "world_size": ctx.world_size, "ranks": ranks,
        }
        torch_save_atomic(state, path)
    ctx.barrier()
    return path


def read_checkpoint(path: Path, kind: str, weights_key: str) -> dict:
    """Load a checkpoint written by :func:`write_checkpoint` (``ValueError`` when unreadable or not a ``kind``
    checkpoint, i.e. not a dict holding ``weights_key``). Nothing in it is checked further here: the trainer's
    ``check_checkpoint`` validates all of it (:func:`check_training_state`) before any of it is used."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # garbage raises anything from zipfile, pickle, struct...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"resume: cannot read checkpoint {str(path)!r} ({type(e).__name__}: {first})") from None
    if not isinstance(state, dict) or weights_key not in state:
        raise ValueError(f"resume: {str(path)!r} is not a {kind} checkpoint")
    return state


# ------------------------------------------------------------------------------------------------ checkpoint checks
TRAINING_STATE_KEYS = ("step", "optimizer", "scaler", "generator", "torch_rng", "cuda_rng", "losses", "config")
"""What :func:`write_checkpoint` saves besides the trainer's weights (``world_size`` and ``ranks`` too, since data
parallelism: optional, a checkpoint from before reads as one process)."""
_ADAM_STATE = frozenset({"step", "exp_avg", "exp_avg_sq"})
_ADAM_HYPER = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")
"""The param-group entries that change AdamW's arithmetic; a resumed optimizer must have the run's."""
_SCALER_KEYS = frozenset({"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"})


def damaged(source: str, problem: str) -> ValueError:
    """The error of a checkpoint that is not what :func:`write_checkpoint` writes."""
    return ValueError(f"resume: {source} is damaged or not a dreamfuse checkpoint: {problem}")


def _kind(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_weight(value, what: str, source: str, shape: tuple | None = None) -> torch.Tensor:
    """A saved weight: a finite floating-point tensor (of ``shape`` when given)."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise damaged(source, f"{what} is {_kind(value)}, not a floating-point tensor")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise damaged(source, f"{what} has shape {tuple(value.shape)}, not {tuple(shape)}")
    if not bool(torch.isfinite(value).all()):
        raise damaged(source, f"{what} holds NaN or inf")
    return value


def _check_rng(value, what: str, source: str) -> None:
    """A CPU generator state: what ``torch.Generator.set_state`` accepts (tried on a scratch generator)."""
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.ndim != 1:
        raise damaged(source, f"{what} is {_kind(value)}, not a generator state (uint8 tensor)")
    try:
        torch.Generator().set_state(value)
    except (RuntimeError, TypeError, ValueError) as e:
        raise damaged(source, f"{what} is not a valid generator state ({str(e).splitlines()[0][:120]})") from None


def _check_rank_rngs(entry, prefix: str, source: str) -> None:
    """``entry["torch_rng"]`` and ``entry["cuda_rng"]`` (``prefix`` names ``entry`` in messages: ``"ranks[1]."``)."""
    if not isinstance(entry, dict) or not {"torch_rng", "cuda_rng"} <= set(entry):
        raise damaged(source, f"{prefix.rstrip('.')} is {_kind(entry)} without torch_rng and cuda_rng")
    _check_rng(entry["torch_rng"], f"{prefix}torch_rng", source)
    cuda = entry["cuda_rng"]
    if not isinstance(cuda, list) or not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.ndim == 1
                                             for t in cuda):
        raise damaged(source, f"{prefix}cuda_rng is not a list of CUDA generator states (uint8 tensors)")


def _check_losses(losses, step: int, loss_keys: tuple[str, ...], source: str) -> None:
    """One record per step, ``{"step": i + 1, key: number...}``: the history a resumed run returns."""
    if not isinstance(losses, list):
        raise damaged(source, f"losses is {_kind(losses)}, not a list")
    if len(losses) != step:
        raise damaged(source, f"it is at step {step} but records the losses of {len(losses)} steps")
    keys = {"step", *loss_keys}
    for i, rec in enumerate(losses):
        if (not isinstance(rec, dict) or set(rec) != keys or not is_int(rec["step"]) or rec["step"] != i + 1
                or not all(_is_number(rec[k]) for k in loss_keys)):
            shown = repr(rec)[:80]
            raise damaged(source, f"losses[{i}] is {shown}, not {{'step': {i + 1}, {', '.join(map(repr, loss_keys))}: "
                                  "numbers}")


def _check_scaler(scaler, source: str) -> None:
    """``GradScaler.state_dict()``: empty (the scaler was off: no fp16) or its five entries."""
    if not isinstance(scaler, dict):
        raise damaged(source, f"scaler is {_kind(scaler)}, not a gradient scaler state")
    if not scaler:
        return
    if set(scaler) != _SCALER_KEYS:
        raise damaged(source, f"scaler holds {sorted(map(str, scaler))}, not {sorted(_SCALER_KEYS)}")
    floats = [scaler[k] for k in ("scale", "growth_factor", "backoff_factor")]
    if (not all(_is_number(v) and math.isfinite(v) and v > 0 for v in floats) or not is_int(scaler["growth_interval"])
            or scaler["growth_interval"] < 1 or not is_int(scaler["_growth_tracker"]) or scaler["_growth_tracker"] < 0):
        raise damaged(source, f"scaler holds {scaler!r}"[:200])


def _check_optimizer(opt, params: list[torch.Tensor], step: int, source: str) -> None:
    """An AdamW ``state_dict()`` for ``params`` (in order): param groups that list exactly their indices with finite
    hyper-parameters, and per parameter either no state yet or ``step`` (0..``step``), ``exp_avg`` and
    ``exp_avg_sq`` (>= 0) of the parameter's shape, all finite."""
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) or not isinstance(
            opt.get("param_groups"), list) or not opt["param_groups"]:
        raise damaged(source, "optimizer is not an optimizer state (state and param_groups)")
    listed = []
    for g, group in enumerate(opt["param_groups"]):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list) or not all(
                is_int(i) for i in group["params"]):
            raise damaged(source, f"optimizer param group {g} does not list parameter indices")
        listed += group["params"]
        for key in ("lr", "eps", "weight_decay"):
            if key in group and not (_is_number(group[key]) and math.isfinite(group[key]) and group[key] >= 0):
                raise damaged(source, f"optimizer param group {g} has {key} {group[key]!r}"[:200])
        betas = group.get("betas", (0.9, 0.999))
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1
                                                                             for b in betas)):
            raise damaged(source, f"optimizer param group {g} has betas {betas!r}"[:200])
    if listed != list(range(len(params))):
        raise damaged(source, f"the optimizer holds parameters {listed[:8]}, the checkpoint's weights are "
                              f"{len(params)}")
    for index, entry in opt["state"].items():
        if not is_int(index) or not 0 <= index < len(params):
            raise damaged(source, f"the optimizer has state for a parameter {index!r} it does not hold")
        if not isinstance(entry, dict) or set(entry) != _ADAM_STATE:
            keys = sorted(map(str, entry)) if isinstance(entry, dict) else _kind(entry)
            raise damaged(source, f"the optimizer state of parameter {index} holds {keys}, not AdamW's "
                                  f"{sorted(_ADAM_STATE)}")
        t = entry["step"]
        if (not isinstance(t, torch.Tensor) or t.numel() != 1 or not t.is_floating_point()
                or not 0 <= float(t) <= step):
            raise damaged(source, f"the optimizer state of parameter {index} is at step "
                                  f"{float(t) if isinstance(t, torch.Tensor) and t.numel() == 1 else _kind(t)}, "
                                  f"the checkpoint at step {step}")
        for key in ("exp_avg", "exp_avg_sq"):
            check_weight(entry[key], f"the optimizer's {key} of parameter {index}", source, params[index].shape)
        if bool((entry["exp_avg_sq"] < 0).any()):
            raise damaged(source, f"the optimizer's exp_avg_sq of parameter {index} is negative")


def check_training_state(state: dict, source: str, params: list[torch.Tensor], loss_keys: tuple[str, ...]) -> None:
    """Validate everything :func:`write_checkpoint` saved besides the trainer's weights, before any of it is used:
    ``ValueError`` (:func:`damaged`) on a missing entry or one of the wrong type, shape or value. ``params``: the
    checkpoint's trainable weights in the optimizer's order (already checked by the trainer); ``loss_keys``: the
    numbers of a loss record besides ``step``."""
    missing = [k for k in TRAINING_STATE_KEYS if k not in state]
    if missing:
        raise damaged(source, f"it lacks {', '.join(missing)}")
    step = state["step"]
    if not is_int(step) or step < 0:
        raise damaged(source, f"step is {step!r}"[:120] + ", not an integer >= 0")
    _check_losses(state["losses"], step, loss_keys, source)
    if not isinstance(state["config"], dict) or not all(isinstance(k, str) for k in state["config"]):
        raise damaged(source, f"config is {_kind(state['config'])}, not the run's settings")
    _check_rng(state["generator"], "generator", source)
    _check_rank_rngs(state, "", source)
    world = state.get("world_size", 1)
    if not is_int(world) or world < 1:
        raise damaged(source, f"world_size is {world!r}"[:120] + ", not an integer >= 1")
    if "ranks" in state:
        ranks = state["ranks"]
        if not isinstance(ranks, list) or len(ranks) != world:
            raise damaged(source, f"ranks is {_kind(ranks)} of {len(ranks) if isinstance(ranks, list) else 0} "
                                  f"entries, not one per process ({world})")
        for r, entry in enumerate(ranks):
            _check_rank_rngs(entry, f"ranks[{r}].", source)
    _check_scaler(state["scaler"], source)
    _check_optimizer(state["optimizer"], params, step, source)


def check_against_trainer(trainer, state: dict, source: str) -> None:
    """What only the built trainer can say about a checkpoint (its weights' shapes are the trainer's to check):
    the optimizer's hyper-parameters are the run's, and an fp16 run (gradient scaler on) has a scaler state."""
    groups = state["optimizer"]["param_groups"]
    if len(trainer.optimizer.param_groups) != len(groups):
        raise damaged(source, f"its optimizer has {len(groups)} parameter groups, the run "
                              f"{len(trainer.optimizer.param_groups)}")
    for mine, saved in zip(trainer.optimizer.param_groups, groups):
        for key in _ADAM_HYPER:
            if key in saved and key in mine and not _same(saved[key], mine[key]):
                raise damaged(source, f"its optimizer has {key} {_shown(saved[key])}, the run {mine[key]!r}")
    if trainer.scaler.is_enabled() and not state["scaler"]:
        raise ValueError(f"resume: {source} was written without fp16 gradient scaling, which this run uses (another "
                         "device or mixed precision); resume where it was trained")


def _same(a, b) -> bool:
    """Equal config values: plain values of the same kind (``True`` is not ``1``; a tensor is never a setting)."""
    plain = (str, int, float, type(None))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if not isinstance(a, plain) or not isinstance(b, plain) or isinstance(a, bool) != isinstance(b, bool):
        return False
    return a == b


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_resume_config(saved: dict, cfg, source: str, ignore=RESUMABLE_CHANGES,
                        world: tuple[int, int] = (1, 1)) -> None:
    """Refuse to resume with other hyper-parameters than the checkpoint's: ``ValueError`` listing every field
    that differs (``lr: 0.002 in the checkpoint, 0.001 now``), except the ``ignore`` fields. A field this version
    has and the checkpoint lacks counts as a difference (the run that wrote it may have behaved otherwise).

    ``world``: the number of processes that wrote the checkpoint and that resume it. When they differ,
    ``batch_size`` (per process) may differ too as long as the global micro-batch ``batch_size × processes`` is the
    same: the samples, the noise and the data position are functions of that alone (see
    :mod:`~dreamfuse.engine.train.distributed`)."""
    now = dataclasses.asdict(cfg)
    diffs = []
    then_w, now_w = world
    if then_w != now_w and is_int(saved.get("batch_size")) and "batch_size" in now:
        ignore = frozenset(ignore) | {"batch_size"}
        if saved["batch_size"] * then_w != now["batch_size"] * now_w:
            diffs.append(f"batch_size × processes: {saved['batch_size']} × {then_w} in the checkpoint, "
                         f"{now['batch_size']} × {now_w} now")
    for name, value in now.items():
        if name in ignore:
            continue
        if name not in saved:
            diffs.append(f"{name}: not recorded in the checkpoint, {value!r} now")
        elif not _same(saved[name], value):
            diffs.append(f"{name}: {_shown(saved[name])} in the checkpoint, {value!r} now")
    diffs += [f"{_shown(name)}: {_shown(saved[name])} in the checkpoint, unknown now" for name in saved
              if name not in now and name not in ignore]
    if diffs:
        raise ValueError(f"resume: {source} was trained with other settings ({'; '.join(diffs)}); resume with the "
                         "checkpoint's settings or start a new output folder")


def checkpoint_world_size(state: dict) -> int:
    """The number of processes that wrote a checkpoint (1 for checkpoints from before data parallelism)."""
    world = state.get("world_size", 1)
    return world if is_int(world) and world >= 1 else 1  # a bad one is refused by check_training_state


def restore_training_state(trainer, state: dict) -> None:
    """Put back what :func:`write_checkpoint` saved besides the weights: rank ``r`` takes the torch/CUDA RNG state
    of rank ``r`` (of ``r mod`` the writing run's process count, when that differed)."""
    from .distributed import SINGLE

    ctx = getattr(trainer, "dist", SINGLE)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.generator.set_state(state["generator"])
    ranks = state.get("ranks") or [state]
    mine = ranks[ctx.rank % len(ranks)]
    torch.set_rng_state(mine["torch_rng"])
    if mine["cuda_rng"] and torch.cuda.is_available():  # the GPUs this process sees (a run may move to fewer)
        for device, rng in enumerate(mine["cuda_rng"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(rng, device)
    trainer.step = int(state["step"])
    trainer.losses = list(state["losses"])
