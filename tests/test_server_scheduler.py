"""The step scheduler: continuous batching gives every request the image it gets alone, whatever shares its
steps; admission, priority, deadlines, cancellation, failure isolation, shutdown; nothing lost."""

import threading
import time

import numpy as np
import pytest
import torch
from dreamfuse.engine import Engine, EngineConfig
from dreamfuse.engine.server import JOB_STATES, QueueFull, SchedulerClosed, StepScheduler
from dreamfuse.engine.server.histogram import cumulative

SIZE = 64


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("tiny", EngineConfig(device="cpu", backend="torch", progress=False))


@pytest.fixture
def sched(engine):
    s = StepScheduler(engine, max_batch_rows=16)
    yield s
    s.shutdown(grace_s=0)


def _pixels(img) -> np.ndarray:
    return np.asarray(img).astype(np.int16)


def _solo(engine, kind, n=1, seed=0, **fields):
    prompt = fields.pop("prompt")
    if kind == "text2img":
        return engine.text2img([prompt] * n, seed=seed, **fields)
    if kind == "personalize":
        return engine.personalize([prompt] * n, fields.pop("reference_image"), seed=seed, **fields)
    if kind == "img2img":
        return engine.img2img([prompt] * n, fields.pop("image"), seed=seed, **fields)
    if kind == "inpaint":
        return engine.inpaint([prompt] * n, fields.pop("image"), fields.pop("mask"), seed=seed, **fields)
    from dreamfuse.engine.pipelines.composite import ComposeRequest, compose_batch

    req = ComposeRequest(fields.pop("layout"), fields.pop("segments"), prompt, fields.pop("negative_prompt", None))
    return compose_batch(engine, [req] * n, seed=seed, **fields)


def _assert_same_as_solo(engine, job, kind, fields):
    assert job.wait(120) and job.state == "done", (job.state, job.error)
    solo = _solo(engine, kind, n=len(job.seeds), seed=job.seeds, **dict(fields))
    for got, ref in zip(job.images, solo):
        assert np.abs(_pixels(got) - _pixels(ref)).max() <= 1  # batched rounding: at most 1/255
        assert got.info["seed"] == ref.info["seed"]


def test_per_row_timesteps_equal_separate_unet_calls(engine):
    """What continuous batching rests on: diffusers' UNet with one timestep per row gives each row what a call
    at that row's timestep alone gives."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    emb = engine.encode_prompts(["a cat", "a dog", "a car"])
    t = torch.tensor([901, 500, 21])
    together = engine.unet_call(x, t, emb)
    for i in range(3):
        torch.testing.assert_close(together[i : i + 1], engine.unet_call(x[i : i + 1], t[i], emb[i : i + 1]),
                                   atol=1e-5, rtol=1e-5)


def test_staggered_mixed_requests_equal_their_solo_images(engine, sched):
    """Arrivals while others are mid-way, mixed steps, guidance, sizes, samplers, image counts: each image is
    its solo generation's, and calls really carried rows of several requests at different timesteps."""
    seen_t = []
    real = engine.unet_call

    def spy(latents, t, *a, **k):
        seen_t.append(torch.as_tensor(t).reshape(-1).tolist())
        return real(latents, t, *a, **k)

    engine.unet_call = spy
    try:
        requests = [
            dict(prompt="a photo of a cat", steps=6, guidance_scale=7.5, sampler="ddim", height=SIZE, width=SIZE),
            dict(prompt="a red car", steps=4, guidance_scale=3.0, sampler="euler-a", height=SIZE, width=SIZE),
            dict(prompt="a dog", steps=5, guidance_scale=1.0, sampler="dpmpp-2m", height=SIZE, width=SIZE),
            dict(prompt="a house", steps=3, guidance_scale=5.0, sampler="heun", height=SIZE, width=96),
            dict(prompt="a tree", steps=4, guidance_scale=6.0, sampler="ddim", height=SIZE, width=SIZE,
                 negative_prompt="blurry"),
        ]
        jobs = []
        for i, r in enumerate(requests):
            n = 2 if i == 1 else 1
            jobs.append((sched.submit("text2img", n=n, seed=10 * i, **r), r))
            if i < 2:  # the next ones arrive while these are running
                first = jobs[-1][0]
                while first.step < 2 and not first.done():
                    time.sleep(0.01)
        for job, _ in jobs:
            assert job.wait(120)
    finally:
        del engine.unet_call
    for job, r in jobs:
        _assert_same_as_solo(engine, job, "text2img", r)
    mixed = [ts for ts in seen_t if len(set(ts)) > 1]
    assert mixed, "no call carried rows at different timesteps"
    rows = sched.stats()["rows_per_call"]
    assert dict(cumulative(rows))[4] < rows["count"]  # some call carried more than 4 rows


def test_personalize_and_compose_are_served_beside_text2img(engine, sched):
    ref = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    layout = np.zeros((SIZE, SIZE, 3), np.uint8)
    layout[:, : SIZE // 2] = (255, 0, 0)
    layout[:, SIZE // 2:] = (0, 0, 255)
    per = dict(prompt="a photo of a sks dog", reference_image=ref, subject_token="sks", steps=3, height=SIZE,
               width=SIZE)
    com = dict(prompt="a pet pair", layout=layout, segments={"#ff0000": "a cat", "#0000ff": "a dog"}, steps=3,
               global_steps=1, scaffold_fraction=0.34)
    t2i = dict(prompt="a cat", steps=3, height=SIZE, width=SIZE)
    jobs = [(sched.submit("personalize", seed=1, **per), "personalize", per),
            (sched.submit("compose", seed=2, **com), "compose", com),
            (sched.submit("text2img", seed=3, **t2i), "text2img", t2i)]
    for job, kind, fields in jobs:
        _assert_same_as_solo(engine, job, kind, fields)


def test_events_progress_and_preview(engine):
    s = StepScheduler(engine, preview_every=2)
    try:
        job = s.submit("text2img", prompt="a cat", steps=4, seed=0, height=SIZE, width=SIZE)
        assert job.wait(60) and job.state == "done"
        events = job.events_since(0)
    finally:
        s.shutdown(grace_s=0)
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["queued", "started"] and kinds[-1] == "done"
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3, 4]
    previews = [e for e in events if e["type"] == "preview"]
    assert [p["step"] for p in previews] == [2, 4]
    import base64
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(base64.b64decode(previews[-1]["png_b64"])))
    assert img.size == (SIZE // 8, SIZE // 8)


def test_priority_orders_admission(engine):
    s = StepScheduler(engine, max_batch_rows=2)  # one CFG request at a time
    try:
        first = s.submit("text2img", prompt="a", steps=4, seed=0, height=SIZE, width=SIZE)
        low = s.submit("text2img", prompt="b", steps=2, seed=0, height=SIZE, width=SIZE, priority=0)
        high = s.submit("text2img", prompt="c", steps=2, seed=0, height=SIZE, width=SIZE, priority=5)
        for j in (first, low, high):
            assert j.wait(60) and j.state == "done"
        assert high.started < low.started
    finally:
        s.shutdown(grace_s=0)


def test_deadlines_drop_work_that_cannot_finish(engine):
    s = StepScheduler(engine, max_batch_rows=2)
    try:
        long = s.submit("text2img", prompt="a", steps=8, seed=0, height=SIZE, width=SIZE)
        queued = s.submit("text2img", prompt="b", steps=8, seed=0, height=SIZE, width=SIZE, deadline_s=0.05)
        assert queued.wait(60) and queued.state == "timed_out" and queued.step == 0  # never computed
        assert long.wait(60) and long.state == "done"
        running = s.submit("text2img", prompt="c", steps=200, seed=0, height=SIZE, width=SIZE, deadline_s=1.0)
        assert running.wait(60) and running.state == "timed_out" and running.step < 200
        assert "deadline" in running.error
    finally:
        s.shutdown(grace_s=0)


def test_queued_jobs_end_on_time_while_the_worker_is_inside_a_long_tick(engine, monkeypatch):
    # red team: a queued request's 30 s deadline was answered after 91 s, behind ticks of a 2048x1024 request;
    # the queue is swept beside the worker, not only between ticks
    s = StepScheduler(engine, max_batch_rows=2)  # one CFG request at a time: the others wait in the queue
    slow = threading.Event()
    unet = StepScheduler._loop_unet

    def slow_unet(self, *args):
        if slow.is_set():
            time.sleep(2.0)  # one long UNet call
        return unet(self, *args)

    monkeypatch.setattr(StepScheduler, "_loop_unet", slow_unet)
    try:
        slow.set()
        running = s.submit("text2img", prompt="a", steps=3, seed=0, height=SIZE, width=SIZE)
        wait = time.monotonic() + 30
        while running.state != "running" and time.monotonic() < wait:
            time.sleep(0.01)
        t0 = time.monotonic()
        expiring = s.submit("text2img", prompt="b", steps=2, seed=0, height=SIZE, width=SIZE, deadline_s=0.3)
        cancelled = s.submit("text2img", prompt="c", steps=2, seed=0, height=SIZE, width=SIZE)
        cancelled.cancel()
        assert cancelled.wait(1.0) and cancelled.state == "cancelled" and cancelled.started is None
        assert expiring.wait(1.5) and expiring.state == "timed_out" and "queued" in expiring.error
        assert time.monotonic() - t0 < 1.5  # both well inside the 2 s call the worker is in
        slow.clear()
        assert running.wait(60) and running.state == "done"
        assert s.stats()["cancelled"] == 1 and s.stats()["timed_out"] == 1
    finally:
        s.shutdown(grace_s=0)


def test_cancel_between_steps(engine, sched):
    job = sched.submit("text2img", prompt="a cat", steps=100, seed=0, height=SIZE, width=SIZE)
    while job.step < 1:
        time.sleep(0.01)
    job.cancel()
    assert job.wait(30) and job.state == "cancelled" and job.step < 100
    assert job.events_since(0)[-1]["type"] == "cancelled"
    queued_then_cancelled = StepScheduler(engine, max_batch_rows=2)
    try:
        a = queued_then_cancelled.submit("text2img", prompt="a", steps=6, seed=0, height=SIZE, width=SIZE)
        b = queued_then_cancelled.submit("text2img", prompt="b", steps=6, seed=0, height=SIZE, width=SIZE)
        b.cancel()
        assert b.wait(30) and b.state == "cancelled" and b.started is None
        assert a.wait(60) and a.state == "done"
    finally:
        queued_then_cancelled.shutdown(grace_s=0)


def test_full_queue_rejects_at_once_and_nothing_is_lost(engine):
    s = StepScheduler(engine, max_batch_rows=2, max_queue=3)
    accepted, rejected = [], 0
    try:
        for i in range(10):
            try:
                accepted.append(s.submit("text2img", prompt=f"p{i}", steps=2, seed=i, height=SIZE, width=SIZE))
            except QueueFull as e:
                rejected += 1
                assert e.retry_after_s >= 1.0
        for j in accepted:
            assert j.wait(60)
    finally:
        s.shutdown(grace_s=0)
    assert rejected >= 1 and len(accepted) + rejected == 10
    assert s.stats()["rejected"] == rejected
    for j in accepted:
        events = j.events_since(0)
        terminal = [e for e in events if e["type"] in JOB_STATES[2:]]
        assert len(terminal) == 1 and events[-1] is terminal[0] and j.state == "done"


def test_a_failing_request_fails_alone(engine, sched):
    """A request whose latents blow up (a guidance scale far too large) fails with the reason; the requests that
    shared its calls finish as if alone."""
    bad = sched.submit("text2img", prompt="a cat", steps=3, seed=0, height=SIZE, width=SIZE, guidance_scale=1e38)
    good = sched.submit("text2img", prompt="a dog", steps=3, seed=1, height=SIZE, width=SIZE)
    assert bad.wait(60) and bad.state == "failed" and "NonFiniteOutputError" in bad.error
    _assert_same_as_solo(engine, good, "text2img", dict(prompt="a dog", steps=3, height=SIZE, width=SIZE))
    later = sched.submit("text2img", prompt="a car", steps=2, seed=2, height=SIZE, width=SIZE)
    assert later.wait(60) and later.state == "done"


def test_bad_fields_are_value_errors_at_submit(sched):
    for fields, field in [(dict(prompt="a", steps=0), "steps"), (dict(prompt="a", sampler="nope"), "sampler"),
                          (dict(steps=2), "prompt"), (dict(prompt="a", height=12), "height"),
                          (dict(prompt="a", n=0), "n"), (dict(prompt="a", deadline_s=-1), "deadline_s")]:
        with pytest.raises(ValueError, match=rf"^{field}"):
            sched.submit("text2img", **fields)
    with pytest.raises(ValueError, match="^kind"):
        sched.submit("video", prompt="a")
    with pytest.raises(ValueError, match="^reference_image"):
        sched.submit("personalize", prompt="a sks dog", subject_token="sks")


def test_shutdown_finishes_within_grace_then_cancels(engine):
    s = StepScheduler(engine, max_batch_rows=4)
    quick = s.submit("text2img", prompt="a", steps=3, seed=0, height=SIZE, width=SIZE)
    slow = s.submit("text2img", prompt="b", steps=900, seed=0, height=SIZE, width=SIZE)
    while quick.step < 1:
        time.sleep(0.01)
    done = threading.Event()
    threading.Thread(target=lambda: (s.shutdown(grace_s=3.0), done.set()), daemon=True).start()
    assert done.wait(60)
    assert quick.state == "done" and slow.state == "cancelled" and "shutting down" in slow.error
    with pytest.raises(SchedulerClosed):
        s.submit("text2img", prompt="c", steps=2)


# ------------------------------------------------------------------------------------------ bounded ticks
def _counting_scheduler(engine, monkeypatch, **kwargs):
    """A scheduler whose UNet calls' rows and the engine's decodes' images are recorded (lists, in order)."""
    s = StepScheduler(engine, **kwargs)
    rows_seen, decoded = [], []
    unet, decode = s._unet, engine.decode
    s._unet = lambda pieces: (rows_seen.append(sum(n for _, n in pieces)), unet(pieces))[1]
    monkeypatch.setattr(engine, "decode", lambda latents: (decoded.append(latents.shape[0]), decode(latents))[1])
    return s, rows_seen, decoded


def test_an_oversized_request_runs_in_pieces_beside_small_ones(engine, monkeypatch):
    """A red-team request (n 64, 999 steps, 512²) ran 128-row UNet calls whatever max_batch_rows said and held the
    worker for minutes. Every call now stays within max_batch_rows, the big request advances in pieces, a small
    request admitted beside it is not starved, and both equal their solo images."""
    s, rows_seen, decoded = _counting_scheduler(engine, monkeypatch, max_batch_rows=4)
    try:
        big_fields = dict(prompt="a cat", steps=3, height=SIZE, width=SIZE)
        big = s.submit("text2img", n=5, seed=0, **big_fields)  # 10 CFG rows: three pieces a step
        small_fields = dict(prompt="a dog", steps=3, height=SIZE // 2, width=SIZE // 2)
        small = s.submit("text2img", seed=9, **small_fields)  # a quarter of a row's cost
        for job in (big, small):
            assert job.wait(120) and job.state == "done", (job.state, job.error)
    finally:
        s.shutdown(grace_s=0)
    assert rows_seen and max(rows_seen) <= 4
    assert max(decoded) <= 4  # decodes in pieces too
    assert small.finished < big.finished  # served beside the big one, not after it
    _assert_same_as_solo(engine, big, "text2img", big_fields)
    _assert_same_as_solo(engine, small, "text2img", small_fields)


def test_rows_dearer_than_the_budget_run_one_at_a_time(engine, monkeypatch):
    """Own red-team pass: two 1024x1024 n=10 requests beside a 2048x1024 one made ticks of 8 rows at 1024x1024
    (256x the budget of a 64x64 row each), a cancel waited 34 s. A row that costs more than the whole budget now
    runs alone: one row per UNet call and per decode."""
    s, rows_seen, decoded = _counting_scheduler(engine, monkeypatch, max_batch_rows=4)
    try:
        fields = dict(prompt="a cat", steps=2, height=3 * SIZE, width=3 * SIZE)  # 9x a native row's cost
        big = s.submit("text2img", n=2, seed=0, **fields)
        assert big.wait(120) and big.state == "done", (big.state, big.error)
    finally:
        s.shutdown(grace_s=0)
    assert rows_seen == [1] * 8  # 2 images x CFG x 2 steps, a row per call
    assert decoded == [1, 1]
    _assert_same_as_solo(engine, big, "text2img", fields)


def test_cancel_and_deadlines_act_within_a_tick_of_an_oversized_request(engine):
    s = StepScheduler(engine, max_batch_rows=2)
    try:
        big = s.submit("text2img", prompt="a cat", n=6, steps=50, seed=0, height=SIZE, width=SIZE)
        while big.step < 1:
            time.sleep(0.005)
        calls = s.stats()["unet_calls"]
        big.cancel()
        assert big.wait(60) and big.state == "cancelled"
        assert s.stats()["unet_calls"] - calls <= 1  # one call of the running tick at most, not the rest of a step
        big = s.submit("text2img", prompt="a cat", n=6, steps=50, seed=0, height=SIZE, width=SIZE)
        while big.step < 1:
            time.sleep(0.005)
        t0 = time.monotonic()
        big.cancel()
        late = s.submit("text2img", prompt="a dog", steps=2, seed=0, height=SIZE, width=SIZE, deadline_s=0.01)
        assert late.wait(60) and late.state == "timed_out"
        assert big.wait(60) and time.monotonic() - t0 < 30
    finally:
        s.shutdown(grace_s=0)


def test_per_request_limits_of_a_server(engine):
    from dreamfuse.engine.limits import Limits

    s = StepScheduler(engine, limits=Limits(max_images=2, max_steps=10, max_pixels=64 * 64, max_side=64))
    try:
        for fields, needle in [(dict(n=3), r"^n: must be an integer in \[1, 2\]"),
                               (dict(steps=11), r"^steps: 11, the limit of this server is 10"),
                               (dict(height=128, width=32), r"^height: 128 pixels, the limit of this server is 64"),
                               (dict(height=64, width=72), r"^width: 72 pixels")]:
            with pytest.raises(ValueError, match=needle):
                s.submit("text2img", prompt="a", **fields)
        assert s.submit("text2img", prompt="a", n=2, steps=2, seed=0).wait(60)
    finally:
        s.shutdown(grace_s=0)
    with pytest.raises(ValueError, match="^limits"):
        StepScheduler(engine, limits=[2])
    with pytest.raises(ValueError, match="^limits"):
        StepScheduler(engine, limits={"max_imagez": 2})
    s = StepScheduler(engine, limits={"max_images": 2})  # plain data (a Ray replica's options)
    try:
        assert s.limits.max_images == 2 and s.limits.max_steps == engine.config.limits.max_steps
    finally:
        s.shutdown(grace_s=0)


def test_img2img_and_inpaint_share_ticks_with_text2img(engine, sched):
    """An img2img and an inpaint request (a stochastic sampler, two images) merged into the same UNet calls as a
    text2img request, at different timesteps: each image is its solo run's."""
    seen = []
    real = engine.unet_call

    def spy(latents, t, *a, **k):
        seen.append(torch.as_tensor(t).reshape(-1).tolist())
        return real(latents, t, *a, **k)

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), bool)
    mask[16:48, 8:40] = True
    i2i = dict(prompt="a red car", image=image, strength=0.5, steps=8, guidance_scale=5.0)
    inp = dict(prompt="a cat", image=image, mask=mask, steps=5, sampler="euler-a")
    t2i = dict(prompt="a dog", steps=4, height=SIZE, width=SIZE)
    engine.unet_call = spy
    try:
        jobs = [(sched.submit("img2img", seed=1, **i2i), "img2img", i2i),
                (sched.submit("inpaint", n=2, seed=2, **inp), "inpaint", inp),
                (sched.submit("text2img", seed=3, **t2i), "text2img", t2i)]
        for job, _, _ in jobs:
            assert job.wait(120)
    finally:
        del engine.unet_call
    for job, kind, fields in jobs:
        _assert_same_as_solo(engine, job, kind, fields)
    assert jobs[0][0].images[0].info["strength"] == "0.5"
    assert any(len(ts) == 8 and len(set(ts)) == 3 for ts in seen), "the three requests never shared a call"


def test_inpainting_unet_requests_with_previews():
    """A 9-channel inpainting UNet's model input carries mask channels: previews read its latent channels only."""
    from dreamfuse.engine.tiny import build_components
    from edit_inputs import box_mask, nine_channel, picture

    e9 = Engine(nine_channel(build_components()), EngineConfig(device="cpu", backend="torch", progress=False))
    s = StepScheduler(e9, preview_every=1)
    try:
        job = s.submit("inpaint", prompt="a cat", image=picture(0), mask=box_mask(), steps=2, seed=0)
        assert job.wait(60) and job.state == "done", job.error
        assert [e["step"] for e in job.events_since(0) if e["type"] == "preview"] == [1, 2]
        with pytest.raises(ValueError, match="^image: missing"):
            s.submit("img2img", prompt="a cat")
        with pytest.raises(ValueError, match="^mask: missing"):
            s.submit("inpaint", prompt="a cat", image=picture(0))
        with pytest.raises(ValueError, match="^model: this UNet takes 9 input channels"):
            s.submit("img2img", prompt="a cat", image=picture(0))
    finally:
        s.shutdown(grace_s=0)


def test_ddim_requests_run_as_one_persistent_batch(engine):
    """DDIM text2img requests hand their loops over: joining and leaving at different ticks, with different
    guidance and step counts, they share one UNet call per tick and each image equals its solo run."""
    s = StepScheduler(engine, max_batch_rows=16)
    calls = []
    unet = s._loop_unet
    s._loop_unet = lambda *a: (calls.append(int(a[0].shape[0])), unet(*a))[1]
    fields = [dict(prompt=f"a cat {i}", steps=3 + i, guidance_scale=[7.5, 1.0, 4.0][i % 3], height=SIZE, width=SIZE)
              for i in range(5)]
    try:
        jobs = []
        for i, f in enumerate(fields):
            jobs.append(s.submit("text2img", seed=10 + i, **f))
            time.sleep(0.02 * i)
        for j in jobs:
            assert j.wait(120) and j.state == "done", (j.state, j.error)
    finally:
        s.shutdown(grace_s=0)
    assert calls and max(calls) <= 16
    assert any(c > 2 for c in calls)  # requests shared calls
    for job, f in zip(jobs, fields):
        _assert_same_as_solo(engine, job, "text2img", f)
