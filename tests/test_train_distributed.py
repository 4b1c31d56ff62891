"""Data-parallel PatchDPO and ReVersion on CPU with the gloo backend (2 processes, tiny models, a few steps).

- 2 processes × batch 1 train the same weights as 1 process × batch 2 on the same samples (float tolerance);
- a 2-process run killed (SIGKILL of one rank) after a checkpoint resumes on 2 processes exactly as the
  uninterrupted 2-process run;
- only rank 0 writes (each rank writes only its own shard of PatchDPO's quality cache);
- the outputs load in the inference engine and change generation;
- the CLI runs unchanged under the real launchers (torchrun; accelerate launch where installed).

The library runs start their 2 processes with torch.multiprocessing from a fork server that has imported torch,
diffusers and dreamfuse once per session (a fresh interpreter per process would spend most of each test importing);
the CLI runs are real ``torchrun`` / ``accelerate launch`` subprocesses on 127.0.0.1 with a free port.
"""

from __future__ import annotations

import importlib.util
import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dreamfuse.engine import Engine, EngineConfig
from dreamfuse.engine.ip_adapter import save_tiny_ip_adapter
from dreamfuse.engine.patch_quality import PatchQualityEstimator
from dreamfuse.engine.train import distributed, patchdpo, reversion
from dreamfuse.engine.train.common import check_resume_config
from dreamfuse.engine.train.distributed import Context, free_port
from PIL import Image
from transformers import ViTConfig, ViTModel

pytestmark = [pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason="needs torch.distributed with the gloo backend"),
              pytest.mark.usefixtures("one_thread")]

ROOT = Path(__file__).resolve().parents[1]
PRELOAD = ["torch", "diffusers.models.unets.unet_2d_condition", "diffusers.models.autoencoders.autoencoder_kl",
           "diffusers.loaders", "transformers.models.clip.modeling_clip", "transformers.models.vit.modeling_vit",
           "dreamfuse.engine.tiny", "dreamfuse.engine.ip_adapter", "dreamfuse.engine.patch_quality",
           "dreamfuse.engine.train.patchdpo", "dreamfuse.engine.train.reversion", __name__]
"""What the fork server imports once: the 2 processes of every launch start with it (the first tiny engine built
in a fresh interpreter spends seconds in diffusers' and transformers' lazy imports)."""

PDPO = dict(steps=4, lr=1e-3, grad_accum=2, checkpoint_every=2, progress=False)
"""4 steps × 2 micro-batches × 2 pairs = 16 pairs of the 4: four epochs, a checkpoint at step 2."""
REV = dict(steps=4, lr=0.02, grad_accum=1, num_positives=4, checkpoint_every=2, progress=False)


# ------------------------------------------------------------------------------------------------ processes
def _spawn(job, *args, nprocs: int = 2) -> None:
    """``job(rank, *args)`` in ``nprocs`` processes that form a gloo group on 127.0.0.1 through the launcher's
    environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), as torchrun sets them."""
    multiprocessing.set_forkserver_preload(PRELOAD)
    mp.start_processes(_entry, args=(nprocs, free_port(), job, args), nprocs=nprocs, start_method="forkserver")


def _entry(rank: int, world: int, port: int, job, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        job(rank, *args)
    finally:
        distributed.shutdown()


def _record_writes(root: Path) -> list[str]:
    """Paths under ``root`` this process opens for writing or renames into place (audit hooks see both the
    ``mkstemp`` of an atomic write and its ``os.replace``), relative to ``root``."""
    root_s = os.path.realpath(root)
    seen: list[str] = []
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & write_flags)
        elif event == "os.rename":
            path, writing = args[1], True
        else:
            return
        if writing and isinstance(path, (str, bytes, os.PathLike)):
            p = os.path.realpath(os.fsdecode(path))
            if p.startswith(root_s + os.sep):
                seen.append(os.path.relpath(p, root_s))

    sys.addaudithook(hook)
    return seen


def _die_at(trainer_cls, step: int) -> None:
    """SIGKILL this process when its trainer is about to run step ``step + 1`` (a machine lost mid-run)."""
    real = trainer_cls.train_step

    def train_step(self):
        if self.step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self)

    trainer_cls.train_step = train_step


def _engine() -> Engine:
    return Engine.from_pretrained("tiny", EngineConfig(device="cpu", dtype="fp32", backend="torch", progress=False))


def _and_row() -> torch.Tensor:
    """The row ``<R>`` starts from (the init token "and")."""
    engine = _engine()
    table = engine.text_encoder.get_input_embeddings().weight
    return table[engine.tokenizer.convert_tokens_to_ids("and</w>")].detach().float().clone()


def _ip_params(engine) -> dict:
    return {k: v.detach().clone() for k, v in engine.ip_adapter.layers.state_dict().items()}


def _pdpo(assets, out, **kw):
    engine = _engine()
    result = patchdpo.train(engine, assets["weights"], assets["enc"], assets["data"], out=out,
                            estimator=PatchQualityEstimator(ViTModel.from_pretrained(assets["vit"])), **kw)
    return engine, result


def _pdpo_job(rank, assets, out, harness, kw, die_at=None):
    writes = _record_writes(out)
    if die_at is not None and rank == 1:
        _die_at(patchdpo._Trainer, die_at)
    engine, result = _pdpo(assets, out, **kw)
    torch.save({"losses": result.losses, "params": _ip_params(engine)}, harness / f"rank{rank}.pt")
    (harness / f"writes{rank}.json").write_text(json.dumps(writes))


def _rev_job(rank, data, out, harness, kw, die_at=None):
    writes = _record_writes(out)
    if die_at is not None and rank == 1:
        _die_at(reversion._Trainer, die_at)
    result = reversion.train(_engine(), data, out, reversion.ReVersionConfig(**kw))
    torch.save({"losses": result.losses, "embedding": result.embedding}, harness / f"rank{rank}.pt")
    (harness / f"writes{rank}.json").write_text(json.dumps(writes))


def _launch(job, first_arg, out: Path, kw: dict, die_at=None, tag: str = "") -> dict:
    """Run ``job`` on 2 processes into ``out``; returns what each rank reported (``ranks``) and wrote
    (``writes``), read from a folder next to ``out`` (``tag`` tells launches into one ``out`` apart)."""
    harness = out.parent / f"{out.name}-harness{tag}"
    harness.mkdir(parents=True)
    _spawn(job, first_arg, out, harness, kw, die_at)
    return {"ranks": [torch.load(harness / f"rank{r}.pt", weights_only=True) for r in range(2)],
            "writes": [json.loads((harness / f"writes{r}.json").read_text()) for r in range(2)], "out": out}


# ------------------------------------------------------------------------------------------------ data
def _img(seed: int, size: int = 64) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    x = torch.stack([yy, xx, 0.5 + 0.5 * torch.sin(6 * (xx + yy) + seed)])
    x[:, :16, :16] = torch.rand(3, 16, 16, generator=g)
    return (x.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny IP-Adapter-Plus, a tiny ViT backbone and 2 PatchDPO samples × 2 generated images (4 pairs)."""
    root = tmp_path_factory.mktemp("pdpo-assets")
    weights, enc = save_tiny_ip_adapter(_engine(), root / "ipa", plus=True, fmt="bin")
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64), add_pooling_layer=False).eval()
    vit.save_pretrained(root / "vit")
    data = root / "data"
    for s, prompt in enumerate(["a photo of a cat", "a red toy"]):
        d = data / f"s{s}"
        d.mkdir(parents=True)
        Image.fromarray(_img(10 * s)).save(d / "ref.png")
        for g in range(2):
            Image.fromarray(_img(10 * s + g + 1)).save(d / f"gen{g}.png")
        (d / "prompt.txt").write_text(prompt)
    return {"weights": weights, "enc": enc, "vit": root / "vit", "data": data}


@pytest.fixture(scope="module")
def rev_data(tmp_path_factory):
    """3 exemplar images with two caption templates each (the ReVersion benchmark layout)."""
    root = tmp_path_factory.mktemp("rev") / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    table = {}
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / f"{i}.png")
        table[f"{i}.png"] = ["cat {} box", "an orange cat {} a black box, with trees"]
    (root / "text.json").write_text(json.dumps(table))
    return root


@pytest.fixture(scope="module")
def pdpo_runs(assets, tmp_path_factory):
    """One process × batch 2 (here) and an uninterrupted 2-process run × batch 1, same settings otherwise."""
    root = tmp_path_factory.mktemp("pdpo-runs")
    engine, single = _pdpo(assets, root / "one", batch_size=2, **PDPO)
    two = _launch(_pdpo_job, assets, root / "two", {"batch_size": 1, **PDPO})
    return {"one": single, "one_params": _ip_params(engine), "two": two}


@pytest.fixture(scope="module")
def rev_runs(rev_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("rev-runs")
    single = reversion.train(_engine(), rev_data, root / "one", reversion.ReVersionConfig(batch_size=2, **REV))
    two = _launch(_rev_job, rev_data, root / "two", {"batch_size": 1, **REV})
    return {"one": single, "two": two}


def _close(a: torch.Tensor, b: torch.Tensor, moved: torch.Tensor) -> None:
    """``a`` equals ``b`` to float rounding, measured against ``moved``, what training changed the weights by: a
    sample or a noise draw out of place changes the result by about ``moved`` itself (relative error ~1); a micro-batch
    split across processes only sums in another order (~1e-7 relative per step, which Adam's normalisation can lift
    to ~1e-3 of an update in an element whose gradient is near zero: hence the norm, and a looser elementwise bound)."""
    err = float((a - b).norm())
    assert err <= 1e-3 * float(moved.norm()) + 1e-7, (err, float(moved.norm()))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-2 * float(moved.abs().max()) + 1e-7)


# ------------------------------------------------------------------------------------------------ equivalence
def test_patchdpo_two_processes_batch_1_equal_one_process_batch_2(pdpo_runs, assets):
    one, two = pdpo_runs["one"], pdpo_runs["two"]
    rank0, rank1 = two["ranks"]
    for k in rank0["params"]:  # DDP keeps the ranks' weights identical
        assert torch.equal(rank0["params"][k], rank1["params"][k]), k
    assert rank0["losses"] == rank1["losses"]  # the logged loss is the global batch's on every rank
    initial = torch.load(assets["weights"], weights_only=True)["ip_adapter"]
    saved = torch.load(two["out"] / "ip_adapter.bin", weights_only=True)["ip_adapter"]
    want = pdpo_runs["one_params"]
    assert set(saved) == set(want)
    for k in want:
        moved = want[k] - initial[k]
        assert moved.abs().max() > 1e-4, k  # training moved every IP weight
        _close(saved[k], want[k], moved)
        _close(rank0["params"][k], want[k], moved)
    got, ref = [r["loss"] for r in rank0["losses"]], [r["loss"] for r in one.losses]
    assert len(got) == len(ref) == PDPO["steps"]
    assert got == pytest.approx(ref, rel=1e-4)


def test_reversion_two_processes_batch_1_equal_one_process_batch_2(rev_runs):
    one, two = rev_runs["one"], rev_runs["two"]
    rank0, rank1 = two["ranks"]
    assert torch.equal(rank0["embedding"], rank1["embedding"])
    saved = torch.load(two["out"] / "learned_embeds.bin", weights_only=True)
    assert list(saved) == ["<R>"] and torch.equal(saved["<R>"], rank0["embedding"])
    moved = one.embedding - _and_row()
    assert moved.abs().max() > 1e-3
    _close(saved["<R>"], one.embedding, moved)
    for key in ("loss", "denoise", "steer"):  # the steering loss covers the whole global micro-batch on each rank
        assert [r[key] for r in rank0["losses"]] == pytest.approx([r[key] for r in one.losses], rel=1e-4), key


# ------------------------------------------------------------------------------------------------ kill + resume
@pytest.mark.parametrize("method", ["patchdpo", "reversion"])
def test_killed_run_resumes_on_two_processes_exactly(method, request, tmp_path):
    if method == "patchdpo":
        runs, job, first, kw = request.getfixturevalue("pdpo_runs"), _pdpo_job, request.getfixturevalue("assets"), \
            {"batch_size": 1, **PDPO}
    else:
        runs, job, first, kw = request.getfixturevalue("rev_runs"), _rev_job, request.getfixturevalue("rev_data"), \
            {"batch_size": 1, **REV}
    out = tmp_path / "out"
    # rank 1 is SIGKILLed before step 3; rank 0 goes down with it (torn down, or its collective fails)
    with pytest.raises((mp.ProcessExitedException, mp.ProcessRaisedException)):
        _launch(job, first, out, kw, die_at=2)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002.pt"]
    assert not any(out.glob("*.bin"))
    resumed = _launch(job, first, out, {**kw, "resume": "latest"}, tag="-resume")["ranks"][0]
    straight = runs["two"]["ranks"][0]
    assert resumed["losses"] == straight["losses"]  # steps 1-2 from the checkpoint, 3-4 recomputed: bitwise
    if method == "patchdpo":
        a = torch.load(out / "ip_adapter.bin", weights_only=True)
        b = torch.load(runs["two"]["out"] / "ip_adapter.bin", weights_only=True)
        assert all(torch.equal(a["ip_adapter"][k], b["ip_adapter"][k]) for k in b["ip_adapter"])
    else:
        assert torch.equal(resumed["embedding"], straight["embedding"])
    state = torch.load(out / "checkpoints" / "step-0000004.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2


# ------------------------------------------------------------------------------------------------ files
def test_only_rank_0_writes(pdpo_runs, rev_runs):
    pdpo0, pdpo1 = pdpo_runs["two"]["writes"]
    out = pdpo_runs["two"]["out"]
    finals = {"ip_adapter.bin", "checkpoints/step-0000002.pt", "checkpoints/step-0000004.pt"}
    assert finals <= set(pdpo0)
    assert not [w for w in pdpo1 if not w.startswith("quality_cache/")]  # rank 1: its cache shard, nothing else
    cache0 = {w for w in pdpo0 if w.startswith("quality_cache/") and w.endswith(".pt") and "/." not in w}
    cache1 = {w for w in pdpo1 if w.endswith(".pt") and "/." not in w}
    entries = {f"quality_cache/{p.name}" for p in (out / "quality_cache").iterdir()}
    assert cache0 and cache1 and not cache0 & cache1 and cache0 | cache1 == entries  # each map computed once
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "ip_adapter.bin", "quality_cache"]
    rev0, rev1 = rev_runs["two"]["writes"]
    assert {"learned_embeds.bin", "checkpoints/step-0000004.pt"} <= set(rev0) and rev1 == []
    assert sorted(p.name for p in rev_runs["two"]["out"].iterdir()) == ["checkpoints", "learned_embeds.bin"]


def test_outputs_load_and_change_generation(pdpo_runs, rev_runs, assets):
    ref = assets["data"] / "s0" / "ref.png"

    def gen(weights):
        engine = _engine()
        engine.load_ip_adapter(weights, assets["enc"])
        return engine.text2img("a photo of a cat", steps=2, seed=1, ip_image=ref, output_type="latent")

    trained, untrained = gen(pdpo_runs["two"]["out"] / "ip_adapter.bin"), gen(assets["weights"])
    assert torch.isfinite(trained).all() and (trained - untrained).abs().max() > 1e-4
    torch.testing.assert_close(trained, gen(pdpo_runs["one"].path), rtol=1e-3, atol=1e-4)

    engine = _engine()
    assert engine.load_relation(str(rev_runs["two"]["out"] / "learned_embeds.bin")) == "<R>"
    kw = dict(steps=2, seed=0, guidance_scale=1.0, output_type="pt", progress=False)
    with_r, with_and = engine.text2img("a cat <R> a box", **kw), engine.text2img("a cat and a box", **kw)
    assert (with_r - with_and).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------ launchers
def _launcher_env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def test_cli_under_torchrun(rev_data, tmp_path):
    """``torchrun --nproc_per_node 2 -m dreamfuse.engine.cli train reversion``: the effective batch is printed once,
    the output once, and 2 × batch 1 × accumulation 2 is 1 × batch 2 × accumulation 2."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "dreamfuse.engine.cli", "train", "reversion", "--data",
           str(rev_data), "--out", str(out), "--steps", "2", "--batch-size", "1", "--grad-accum", "2", "--lr", "0.02",
           "--checkpoint-every", "2", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_launcher_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines.count("reversion: effective batch 4 images per optimizer step = 1 per device × accumulation 2 × "
                       "2 processes") == 1, proc.stdout
    assert sum(line.startswith("wrote ") for line in lines) == 1, proc.stdout
    state = torch.load(out / "checkpoints" / "step-0000002.pt", weights_only=True)
    assert state["world_size"] == 2 and state["config"]["batch_size"] == 1
    one = reversion.train(_engine(), rev_data, tmp_path / "one", reversion.ReVersionConfig(
        steps=2, batch_size=2, grad_accum=2, lr=0.02, checkpoint_every=0, progress=False))
    two = torch.load(out / "learned_embeds.bin", weights_only=True)["<R>"]
    _close(two, one.embedding, one.embedding - _and_row())


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="accelerate is not installed")
def test_accelerate_launch_and_its_mixed_precision_switch(assets, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2 --mixed_precision bf16``: the processes join through the
    environment accelerate sets, and ``--mixed-precision auto`` takes the launcher's bf16 (bf16 autocast runs on
    CPU; fp16 needs CUDA)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), "-m", "dreamfuse.engine.cli", "train", "patchdpo", "--ip-adapter", str(assets["weights"]),
           "--image-encoder", str(assets["enc"]), "--data", str(assets["data"]), "--backbone", str(assets["vit"]),
           "--out", str(out), "--steps", "2", "--checkpoint-every", "2", "--no-progress"]
    env = {**_launcher_env(), "HF_HOME": str(tmp_path / "hf")}  # no accelerate config file of this machine
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("effective batch 2 (ref, gen) pairs per optimizer step") == 1, proc.stdout
    state = torch.load(out / "checkpoints" / "step-0000002.pt", weights_only=True)
    assert state["config"]["mixed_precision"] == "bf16" and state["world_size"] == 2
    assert all(math.isfinite(r["loss"]) for r in state["losses"])
    _engine().load_ip_adapter(out / "ip_adapter.bin", assets["enc"])


# ------------------------------------------------------------------------------------------------ mixed precision
def _fp16_job(rank, assets, out, harness, kw, die_at=None):
    """fp16 autocast with an enabled gradient scaler, which the trainer uses on CUDA only: forced on CPU here (CPU
    autocast runs fp16) to run the scaler's scale / unscale / inf check / step path under DDP."""
    patchdpo.resolve_amp = lambda mode, device: torch.float16
    _pdpo_job(rank, assets, out, harness, kw)


def test_fp16_gradient_scaler_path_under_ddp(assets, tmp_path):
    run = _launch(_fp16_job, assets, tmp_path / "out", {"batch_size": 1, **PDPO, "steps": 2})
    rank0, rank1 = run["ranks"]
    assert all(torch.equal(rank0["params"][k], rank1["params"][k]) for k in rank0["params"])
    assert all(math.isfinite(r["loss"]) for r in rank0["losses"])
    state = torch.load(run["out"] / "checkpoints" / "step-0000002.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0 and state["scaler"]["_growth_tracker"] >= 1  # the scaler stepped
    initial = torch.load(assets["weights"], weights_only=True)["ip_adapter"]
    assert all(not torch.equal(rank0["params"][k], initial[k]) for k in initial)


# ------------------------------------------------------------------------------------------------ units
def test_each_rank_trains_its_rows_of_the_single_process_batch(assets, rev_data, tmp_path, monkeypatch):
    """Without processes: a trainer told it is rank r of 2 (DDP left out) builds exactly rows r of the 1-process
    batch-2 micro-batch (samples, noise, timesteps, weights); over an epoch the ranks see every sample once."""
    from dreamfuse.engine.patch_quality import quality_maps

    monkeypatch.setattr(patchdpo, "wrap", lambda module, ctx: module)
    monkeypatch.setattr(reversion, "wrap", lambda module, ctx: module)
    engine = _engine()
    engine.load_ip_adapter(assets["weights"], assets["enc"])
    samples = quality_maps(assets["data"], PatchQualityEstimator(ViTModel.from_pretrained(assets["vit"])), 8,
                           tmp_path / "cache")
    cfg = patchdpo.PatchDPOConfig(batch_size=2, checkpoint_every=0, progress=False)

    def batches(cfg, ctx, n):
        with patchdpo.training_session(engine, samples, tmp_path / "o", cfg, 64, ctx) as t:
            return [t.micro_batch(i) for i in range(n)], t.items

    single, items = batches(cfg, Context(), 4)
    ranks = [batches(patchdpo.PatchDPOConfig(batch_size=1, checkpoint_every=0), Context(r, 2, r), 4)[0]
             for r in range(2)]
    for i, b in enumerate(single):
        for r in range(2):
            mine = ranks[r][i]
            for field in ("noisy", "t", "target", "weights", "embeddings", "image_features"):
                whole = getattr(b, field)
                assert torch.equal(getattr(mine, field), torch.stack([whole[r], whole[2 + r]])), field
    # every pair once per epoch: 4 pairs = 2 micro-batches of the global batch 2
    seen = [tuple(b.weights[0].flatten()[:4].tolist()) for bs in ranks for b in bs[:2]]
    assert len(set(seen)) == len(items) == 4

    rcfg = reversion.ReVersionConfig(batch_size=2, grad_accum=1, checkpoint_every=0, progress=False)
    exemplars = reversion.load_exemplars(rev_data)
    rengine = _engine()
    with reversion.training_session(rengine, exemplars, tmp_path / "r", rcfg) as t:
        whole = [t.micro_batch(i) for i in range(3)]
    for r in range(2):
        with reversion.training_session(rengine, exemplars, tmp_path / "r",
                                        reversion.ReVersionConfig(batch_size=1, grad_accum=1, checkpoint_every=0),
                                        Context(r, 2, r)) as t:
            for i, w in enumerate(whole):
                mine = t.micro_batch(i)
                for field in ("latents", "noise", "t", "input_ids"):
                    assert torch.equal(getattr(mine, field), getattr(w, field)[r:r + 1]), field
                assert mine.captions == w.captions[r:r + 1]
                assert mine.positive_words == w.positive_words  # steering: the whole global micro-batch
                assert torch.equal(mine.positives, w.positives) and torch.equal(mine.negatives, w.negatives)


def test_resume_on_another_process_count_needs_the_same_global_batch():
    cfg = patchdpo.PatchDPOConfig(batch_size=1)
    saved = {**vars(patchdpo.PatchDPOConfig(batch_size=2))}
    check_resume_config(saved, cfg, "ckpt", ignore=patchdpo.RESUMABLE, world=(1, 2))  # 1 × 2 = 2 × 1
    with pytest.raises(ValueError, match=r"batch_size × processes: 2 × 1 in the checkpoint, 1 × 4 now"):
        check_resume_config(saved, cfg, "ckpt", ignore=patchdpo.RESUMABLE, world=(1, 4))
    with pytest.raises(ValueError, match=r"batch_size: 2 in the checkpoint, 1 now"):  # same processes: as before
        check_resume_config(saved, cfg, "ckpt", ignore=patchdpo.RESUMABLE, world=(2, 2))


def test_launcher_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", distributed.MIXED_PRECISION_ENV):
        monkeypatch.delenv(name, raising=False)
    assert distributed.env_context() == Context() and distributed.setup("cpu") is distributed.SINGLE
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = distributed.env_context()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main, ctx.first_row(3)) == (3, 4, 1, False, 9)
    assert ctx.describe(4, 2, "pairs") == ("effective batch 32 pairs per optimizer step = 4 per device × "
                                           "accumulation 2 × 4 processes")
    assert distributed.rank_device("cpu", ctx) == "cpu"
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK: 4 is not below WORLD_SIZE 4"):
        distributed.env_context()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="^RANK: "):
        distributed.env_context()
    assert distributed.launcher_mixed_precision("auto") == "auto"
    for launcher, mode, want in [("bf16", "auto", "bf16"), ("fp16", "auto", "fp16"), ("no", "auto", "auto"),
                                 ("bf16", "no", "no"), ("fp16", "bf16", "bf16")]:
        monkeypatch.setenv(distributed.MIXED_PRECISION_ENV, launcher)
        assert distributed.launcher_mixed_precision(mode) == want, (launcher, mode)
