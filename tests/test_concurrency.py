"""One Engine, many callers: threads mixing text2img, IP-Adapter, personalize and compose on one engine give
bit-identical results to the same calls run one after another (every UNet call carries its own context; the
caches are locked; nothing reads the global RNG)."""

import threading

import numpy as np
import pytest
import torch
from dreamfuse.engine import Engine, EngineConfig
from dreamfuse.engine.tiny_adapters import build_tiny_ip_adapter

SIZE = 64
STEPS = 3


@pytest.fixture(scope="module")
def engine():
    e = Engine.from_pretrained("tiny", EngineConfig(device="cpu", backend="torch", progress=False))
    e.load_ip_adapter(build_tiny_ip_adapter(e, plus=True))
    return e


def _reference(seed: int) -> torch.Tensor:
    return torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _layout() -> np.ndarray:
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[:, : SIZE // 2] = (255, 0, 0)
    img[:, SIZE // 2:] = (0, 0, 255)
    return img


def _jobs(engine):
    """Calls of every kind (each a different seed, prompt or reference), as name -> zero-argument callable."""
    kw = dict(steps=STEPS, height=SIZE, width=SIZE, output_type="latent")
    jobs = {
        "text2img": lambda: engine.text2img(["a photo of a cat", "a red car"], seed=1, **kw),
        "text2img-ip": lambda: engine.text2img("a dog", ip_image=_reference(7), ip_scale=0.8, seed=2, **kw),
        "ip-other-image": lambda: engine.text2img("a dog", ip_image=_reference(8), ip_scale=0.5, seed=3, **kw),
        "personalize": lambda: engine.personalize("a photo of a sks dog", _reference(1), subject_token="sks",
                                                  seed=4, ama_start=1, lambda_g=2.0, **kw),
        "personalize-2": lambda: engine.personalize(["a sks dog on the beach", "a sks dog"], _reference(2),
                                                    subject_token="sks", seed=5, ama_start=1, **kw),
        "compose": lambda: engine.compose(_layout(), {"#ff0000": "a cat", "#0000ff": {"prompt": "a dog"}},
                                          prompt="two pets", seed=6, steps=STEPS, output_type="latent"),
    }
    return jobs


def test_threads_mixing_pipelines_equal_sequential_runs(engine):
    jobs = _jobs(engine)
    sequential = {name: fn() for name, fn in jobs.items()}
    engine.inversion_cache.clear()  # the threads invert the references again, concurrently
    engine.clear_prompt_cache()

    results, errors = {}, []
    barrier = threading.Barrier(2 * len(jobs))

    def run(key, fn):
        try:
            barrier.wait(timeout=60)
            results[key] = fn()
        except Exception as e:  # noqa: BLE001 - reported below with the job's name
            errors.append((key, repr(e)))

    threads = [threading.Thread(target=run, args=((name, rep), fn)) for rep in range(2) for name, fn in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    assert not errors, errors
    for (name, rep), out in results.items():
        assert torch.equal(out, sequential[name]), f"{name} (thread {rep}) differs from its sequential run"


def test_global_rng_is_neither_read_nor_changed(engine):
    """A pipeline result does not depend on the global RNG, and leaves it where it was."""
    kw = dict(steps=2, height=SIZE, width=SIZE, output_type="latent", seed=0)
    torch.manual_seed(123)
    a = engine.personalize("a sks dog", _reference(3), subject_token="sks", ama_start=1, **kw)
    state = torch.get_rng_state()
    torch.manual_seed(999)
    state_999 = torch.get_rng_state()
    b = engine.personalize("a sks dog", _reference(3), subject_token="sks", ama_start=1, **kw)
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state_999) and not torch.equal(state, state_999)


def test_tokenizing_threads_never_see_each_others_padding(engine):
    """A fast tokenizer keeps its padding/truncation settings in itself: the CI run that found this had a
    personalize thread read a subject word padded to 77 tokens by a text2img thread's encode. Every engine
    tokenization goes through the engine's lock."""
    from dreamfuse.engine.pipelines.personalize import subject_token_indices

    prompt = "a photo of a sks dog"
    expected = subject_token_indices(engine.tokenizer, prompt, "sks")
    padded = engine.tokenize([prompt], padding="max_length", max_length=77, truncation=True).input_ids
    found, errors = [], []
    barrier = threading.Barrier(4)

    def words():
        barrier.wait(timeout=30)
        for _ in range(300):
            found.append(subject_token_indices(engine.tokenizer, prompt, "sks", engine.tokenize))

    def pads():
        barrier.wait(timeout=30)
        for _ in range(300):
            if engine.tokenize([prompt], padding="max_length", max_length=77, truncation=True).input_ids != padded:
                errors.append("padded ids changed")

    def run(fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(fn,)) for fn in (words, pads, words, pads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]
    assert found == [expected] * 600
