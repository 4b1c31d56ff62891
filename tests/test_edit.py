"""img2img and inpainting on the tiny models: what they keep and change, batch invariance, inputs, the errors that
name the field before any work, IP-Adapter (diffusers parity is in test_edit_parity.py)."""

import numpy as np
import pytest
import torch
from dreamfuse.engine import Engine, EngineConfig
from dreamfuse.engine.limits import Limits
from dreamfuse.engine.pipelines.img2img import check_edit, img2img_program
from dreamfuse.engine.pipelines.inpaint import inpaint_program
from edit_inputs import box_mask, nine_channel, picture
from PIL import Image

SIZE = 64
STEPS = 4


def _config(**kw):
    return EngineConfig(device="cpu", backend="torch", progress=False, **kw)


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("tiny", _config())


def _latents(engine, image, seed):
    """The input's VAE latents as image ``seed``'s generator draws them (its first draw)."""
    x = torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)[None].contiguous() * 2 - 1
    g = torch.Generator().manual_seed(seed)
    return engine.vae.encode(x).latent_dist.sample(generator=g) * engine.vae.config.scaling_factor


def test_inpaint_keeps_the_known_region_and_changes_the_masked_one(engine):
    """A regular UNet: after the last step the known region is the input's own latents, exactly; the masked
    region is generated (and differs between seeds)."""
    img, mask = picture(0), box_mask()
    out = engine.inpaint(["a cat", "a cat"], img, mask, steps=STEPS, seed=[3, 4], output_type="latent")
    m = torch.from_numpy(np.asarray(mask) > 127)[::8, ::8]  # the latent grid, nearest
    for i, seed in enumerate([3, 4]):
        x0 = _latents(engine, img, seed)[0]
        assert torch.equal(out[i][:, ~m], x0[:, ~m])
        assert (out[i][:, m] - x0[:, m]).abs().mean() > 0.1
    assert (out[0][:, m] - out[1][:, m]).abs().mean() > 0.1


def test_img2img_strength_moves_away_from_the_input(engine):
    img = picture(1)
    x0 = _latents(engine, img, 3)
    dist = [float((engine.img2img("a red car", img, strength=s, steps=5, seed=3, output_type="latent") - x0)
                  .abs().mean()) for s in (0.2, 0.6, 1.0)]
    assert dist[0] < dist[1] < dist[2], dist


@pytest.mark.parametrize("sampler", ["ddim", "euler-a", "dpmpp-2m"])
def test_batch_invariance(engine, sampler):
    """An image depends on its prompt, input, mask and seed only: alone or inside a batch (one input for all, or
    one per prompt), the same latents; stochastic and multistep samplers included."""
    imgs, masks = [picture(2), picture(3)], [box_mask(), box_mask(box=(0, 32, 0, 64))]
    kw = dict(steps=STEPS, guidance_scale=5.0, output_type="latent", sampler=sampler)
    batch = engine.img2img(["a dog", "a cat"], imgs, strength=0.75, seed=[5, 6], **kw)
    alone = engine.img2img("a cat", imgs[1], strength=0.75, seed=6, **kw)
    torch.testing.assert_close(batch[1:], alone, atol=1e-4, rtol=1e-4)
    batch = engine.inpaint(["a dog", "a cat", "a car"], imgs[0], masks * 1 + [masks[0]], seed=[5, 6, 7], **kw)
    alone = engine.inpaint("a cat", imgs[0], masks[1], seed=6, **kw)
    torch.testing.assert_close(batch[1:2], alone, atol=1e-4, rtol=1e-4)
    assert not torch.equal(batch[0], batch[2])  # same input and mask, other seed


def _request(engine, image, mask=None, **kw):
    """The checked request (inputs read, resized, masks binarized): what the pipelines run on."""
    return check_edit(engine, "a cat", image, strength=kw.pop("strength", 0.5), negative_prompt=None, steps=STEPS,
                      guidance_scale=7.5, height=kw.pop("height", None), width=kw.pop("width", None), seed=0,
                      output_type="pil", ip_image=None, ip_scale=0.6, sampler="ddim", mask=mask,
                      inpaint=mask is not None)


def test_images_info_sizes_and_inputs(engine, tmp_path):
    img = picture(4, 64, 96)
    out = engine.img2img(["a cat", "a dog"], img, strength=0.5, steps=STEPS, seed=9)
    assert [o.size for o in out] == [(96, 64)] * 2  # the input's size
    assert out[1].info["seed"] == "10" and out[0].info["strength"] == "0.5"
    path = tmp_path / "in.png"
    img.save(path)
    ref = _request(engine, img).images[0]
    assert ref.shape == (1, 3, 64, 96) and ref.is_contiguous()
    for same in (path, str(path), np.asarray(img), np.asarray(img).astype(np.float32) / 255,
                 torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255):
        assert torch.equal(_request(engine, same).images[0], ref)
    big = picture(4, 128, 192)  # resized to the requested size (same aspect ratio)
    r = _request(engine, big, height=64, width=96)
    assert (r.height, r.width) == (64, 96) and r.images[0].shape == (1, 3, 64, 96)
    (inp,) = engine.inpaint("a cat", img, box_mask(64, 96), steps=STEPS, seed=9)
    assert inp.size == (96, 64) and inp.info["strength"] == "1.0"


def test_inpaint_mask_forms(engine, tmp_path):
    """Bool/uint8/float arrays, L/RGB/RGBA/palette/1-bit images, tensors and files read alike; a transparent pixel
    is black (keep) whatever colour is stored under it; grey levels binarize at 0.5; a mask of another size than
    the generation's is resized with its image."""
    img = picture(5)
    m = np.zeros((SIZE, SIZE), bool)
    m[16:48, 8:40] = True
    ref = _request(engine, img, m).masks[0]
    assert ref.shape == (1, 1, SIZE, SIZE) and torch.equal(ref[0, 0], torch.from_numpy(m).float())
    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
    rgba[..., :3] = 255  # white stored under full transparency
    rgba[m] = (255, 255, 255, 255)
    grey = np.where(m, 128, 127).astype(np.uint8)
    forms = [m.astype(np.uint8) * 255, m.astype(np.float32), grey, Image.fromarray(m),
             Image.fromarray(m.astype(np.uint8) * 255), Image.fromarray(grey),
             Image.fromarray(np.repeat(m[..., None], 3, -1).astype(np.uint8) * 255), Image.fromarray(rgba),
             Image.fromarray(m.astype(np.uint8) * 255).convert("P"), torch.from_numpy(m).float(),
             torch.from_numpy(m).float()[None].expand(3, -1, -1)]
    path = tmp_path / "mask.png"
    Image.fromarray(rgba).save(path)
    forms.append(path)
    for i, form in enumerate(forms):
        assert torch.equal(_request(engine, img, form).masks[0], ref), i
    big = _request(engine, picture(5, 128, 128), Image.fromarray(np.kron(m, np.ones((2, 2), bool))), height=64,
                   width=64)
    assert torch.equal(big.masks[0], ref)
    out = engine.inpaint("a cat", img, m, steps=2, seed=1, output_type="latent")
    torch.testing.assert_close(engine.inpaint("a cat", img, path, steps=2, seed=1, output_type="latent"), out)


def test_all_white_mask_is_img2img_of_the_whole_image(engine):
    """Everything repainted: the known region is empty, so nothing is blended in."""
    img = picture(6)
    white = np.ones((SIZE, SIZE), bool)
    kw = dict(steps=STEPS, seed=2, output_type="latent", strength=0.7)
    torch.testing.assert_close(engine.inpaint("a cat", img, white, **kw), engine.img2img("a cat", img, **kw))


def test_ip_adapter_with_img2img_and_inpaint(engine):
    from dreamfuse.engine.tiny_adapters import build_tiny_ip_adapter

    img, mask, ref = picture(7), box_mask(), picture(8, 32, 32)
    kw = dict(steps=STEPS, seed=[1, 2], output_type="latent")
    plain = engine.img2img(["a cat", "a dog"], img, strength=0.8, **kw)
    engine.load_ip_adapter(build_tiny_ip_adapter(engine))
    try:
        zero = engine.img2img(["a cat", "a dog"], img, strength=0.8, ip_image=ref, ip_scale=0.0, **kw)
        with_ip = engine.img2img(["a cat", "a dog"], img, strength=0.8, ip_image=ref, ip_scale=0.8, **kw)
        alone = engine.img2img("a dog", img, strength=0.8, ip_image=ref, ip_scale=0.8, steps=STEPS, seed=2,
                               output_type="latent")
        inp = engine.inpaint("a cat", img, mask, ip_image=ref, ip_scale=0.8, steps=STEPS, seed=1,
                             output_type="pil")
    finally:
        engine.unload_ip_adapter()
    torch.testing.assert_close(zero, plain, atol=1e-5, rtol=0)
    assert (with_ip - plain).abs().mean() > 1e-2
    torch.testing.assert_close(with_ip[1:], alone, atol=1e-4, rtol=1e-4)
    assert inp[0].info["ip_scale"] == "0.8"


def test_ip_adapter_img2img_equals_diffusers(engine, tmp_path):
    """The tiny IP-Adapter-Plus as a standard file: dreamfuse's img2img with it and diffusers' img2img pipeline
    with the same file loaded by diffusers' own loader (a separate copy of the model)."""
    from diffusers import StableDiffusionImg2ImgPipeline
    from dreamfuse.engine.ip_adapter import save_tiny_ip_adapter
    from dreamfuse.engine.tiny import build_components
    from transformers import CLIPImageProcessor

    weights, encoder = save_tiny_ip_adapter(engine, tmp_path, plus=True)
    img, ref = picture(9), picture(10, 32, 32)
    engine.load_ip_adapter(weights, encoder)
    try:
        ours = engine.img2img(["a cat", "a dog"], img, strength=0.6, steps=STEPS, seed=[3, 4], ip_image=ref,
                              ip_scale=0.7, output_type="latent")
    finally:
        engine.unload_ip_adapter()
    c = build_components()
    c["scheduler"] = engine.new_scheduler(STEPS)
    fe = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe = StableDiffusionImg2ImgPipeline(**c, safety_checker=None, feature_extractor=fe,
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name=weights.name, image_encoder_folder=str(encoder))
    pipe.set_ip_adapter_scale(0.7)
    want = pipe(["a cat", "a dog"], image=img, strength=0.6, ip_adapter_image=ref, num_inference_steps=STEPS,
                generator=[torch.Generator().manual_seed(s) for s in (3, 4)], output_type="latent").images
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-4)


def test_sdxl_edits_run_and_keep_their_region():
    xl = Engine.from_pretrained("tiny-xl", _config())
    img, mask = picture(11, 64, 96), box_mask(64, 96, box=(8, 56, 40, 88))
    out = xl.img2img("a cat", img, strength=0.5, steps=STEPS, seed=1)
    assert out[0].size == (96, 64)
    lat = xl.inpaint("a cat", img, mask, steps=STEPS, seed=1, output_type="latent")
    m = torch.from_numpy(np.asarray(mask) > 127)[::8, ::8]
    assert torch.equal(lat[0][:, ~m], _latents(xl, img, 1)[0][:, ~m])


def test_nine_channel_unet_needs_inpaint():
    from dreamfuse.engine.tiny import build_components

    e9 = Engine(nine_channel(build_components()), _config())
    with pytest.raises(ValueError, match=r"^model: this UNet takes 9 input channels.*use inpaint"):
        e9.img2img("a cat", picture(0), steps=2)
    out = e9.inpaint("a cat", picture(0), box_mask(), steps=2, seed=0, output_type="latent")
    assert out.shape == (1, 4, 8, 8)


# --------------------------------------------------------------------------------------------- errors
def _no_work(engine, monkeypatch):
    """Any model work fails the test: errors must come before it."""
    def boom(*a, **k):
        raise AssertionError("model work before the arguments were checked")

    monkeypatch.setattr(engine, "unet_call", boom)
    monkeypatch.setattr(engine, "encode_text", boom)
    monkeypatch.setattr(engine.vae, "encode", boom)


@pytest.mark.parametrize("kwargs, match", [
    (dict(strength=0), r"^strength: must be > 0, got 0"),
    (dict(strength=-0.5), r"^strength: must be > 0"),
    (dict(strength=float("nan")), r"^strength: must be a finite number"),
    (dict(strength=1.5), r"^strength: must be <= 1"),
    (dict(strength=True), r"^strength: must be a number"),
    (dict(strength="0.5"), r"^strength: must be a number"),
    (dict(strength=0.1, steps=5), r"^strength: 0.1 of 5 steps leaves no step to run"),
    (dict(steps=0), r"^steps: must be an integer >= 1"),
    (dict(height=60), r"^height: must be a positive multiple of 8"),
    (dict(height=48), r"^image: aspect ratio of 64x64 does not match the generation size 64x48"),
    (dict(guidance_scale=float("inf")), r"^guidance_scale: must be a finite number"),
    (dict(sampler="nope"), r"^sampler: unknown sampler"),
    (dict(seed=[1, 2]), r"^seed: give an int or exactly one int per prompt \(1\), got 2"),
    (dict(output_type="np"), r"^output_type"),
    (dict(negative_prompt=["a", "b"]), r"^negative_prompt: give one for all prompts or one per prompt \(1\)"),
    (dict(ip_image=np.zeros((8, 8, 3), np.uint8)), r"^ip_image: no IP-Adapter is loaded"),
])
def test_bad_arguments_are_value_errors_before_any_work(engine, monkeypatch, kwargs, match):
    _no_work(engine, monkeypatch)
    kwargs = {"steps": STEPS, **kwargs}
    for program in (lambda: img2img_program(engine, "a cat", picture(0), **kwargs),
                    lambda: inpaint_program(engine, "a cat", picture(0), box_mask(), **kwargs)):
        with pytest.raises(ValueError, match=match):
            program()


def test_bad_images_and_masks_are_value_errors_before_any_work(engine, monkeypatch, tmp_path):
    _no_work(engine, monkeypatch)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    img, mask = picture(0), box_mask()
    cases = [
        (dict(image=None), r"^image: missing"),
        (dict(image=str(tmp_path / "missing.png")), r"^image: file .* does not exist"),
        (dict(image=str(text)), r"^image: cannot read .* as an image"),
        (dict(image=picture(0, 60, 60)), r"^image: 60x60 is not a multiple of 8.*pass height and width"),
        (dict(image=[img, img]), r"^image: give one for all prompts or one per prompt \(1\), got 2"),
        (dict(image=np.zeros((64, 64), np.uint8)), r"^image: array must be \(H, W, 3\)"),
        (dict(mask=None), r"^mask: missing"),
        (dict(mask=str(text)), r"^mask: cannot read"),
        (dict(mask=box_mask(32, 32)), r"^mask: 32x32 does not match image's 64x64"),
        (dict(mask=np.zeros((64, 64), np.uint8)), r"^mask: no pixel is white"),
        (dict(mask=np.full((64, 64), 0.4, np.float32)), r"^mask: no pixel is white"),
        (dict(mask=box_mask(box=(1, 7, 1, 7))), r"^mask: the white area misses every 8x8 latent cell"),
        (dict(mask=np.full((64, 64), 2.0, np.float32)), r"^mask: values must be finite and in \[0, 1\]"),
        (dict(mask=np.full((64, 64), np.nan, np.float32)), r"^mask: values must be finite"),
        (dict(mask=np.zeros((64, 64, 2), np.uint8)), r"^mask: array must be \(H, W\) or \(H, W, 3\)"),
        (dict(mask=np.zeros((64, 64), np.int64)), r"^mask: array must be bool, uint8 or float"),
        (dict(mask=torch.zeros(2, 64, 64)), r"^mask: tensor must be"),
        (dict(mask=[mask, mask]), r"^mask: give one for all prompts or one per prompt \(1\), got 2"),
        (dict(mask=12), r"^mask: unsupported type int"),
    ]
    for fields, match in cases:
        args = {"image": img, "mask": mask, **fields}
        with pytest.raises(ValueError, match=match):
            inpaint_program(engine, "a cat", args["image"], args["mask"], steps=STEPS)
    with pytest.raises(ValueError, match=r"^mask\[1\]: 32x32 does not match image\[1\]'s 64x64"):
        inpaint_program(engine, ["a", "b"], [img, img], [mask, box_mask(32, 32)], steps=STEPS)
    with pytest.raises(ValueError, match=r"^image\[1\]: aspect ratio"):
        img2img_program(engine, ["a", "b"], [img, picture(0, 64, 96)], steps=STEPS)


def test_limits_apply():
    e = Engine.from_pretrained("tiny", _config(limits=Limits(max_input_pixels=4000, max_side=64, max_images=2)))
    with pytest.raises(ValueError, match=r"^image: 64x64 is 4096 pixels, the limit for input images is 4000"):
        e.img2img("a cat", picture(0), steps=2)
    small = picture(0, 56, 56)
    with pytest.raises(ValueError, match=r"^mask: 64x64 is 4096 pixels"):
        e.inpaint("a cat", small, box_mask(), steps=2)
    with pytest.raises(ValueError, match=r"^height: 112 pixels, the limit is 64"):
        e.img2img("a cat", small, steps=2, height=112, width=112)
    with pytest.raises(ValueError, match=r"^prompts: 3 images in one call, the limit is 2"):
        e.img2img(["a", "b", "c"], small, steps=2)


# --------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit")
    picture(12).save(root / "in.png")
    box_mask().save(root / "mask.png")
    box_mask(32, 32).save(root / "small_mask.png")
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(root / "black.png")
    picture(12, 60, 60).save(root / "odd.png")
    (root / "notes.png").write_text("not an image")
    return root


def test_cli_edit_writes_img2img_and_inpainting(engine, files, tmp_path):
    from dreamfuse.engine.cli import main

    out = tmp_path / "i2i.png"
    assert main(["edit", "--image", str(files / "in.png"), "--prompt", "a cat", "--strength", "0.5", "--steps", "4",
                 "--seed", "3", "--out", str(out), "--no-progress"]) == 0
    (want,) = engine.img2img("a cat", files / "in.png", strength=0.5, steps=4, seed=3)
    got = Image.open(out)
    assert np.array_equal(np.asarray(got), np.asarray(want)) and got.text["strength"] == "0.5"
    out = tmp_path / "inp.png"
    assert main(["edit", "--image", str(files / "in.png"), "--mask", str(files / "mask.png"), "--prompt", "a dog",
                 "--steps", "3", "--seed", "4", "--num-images", "2", "--sampler", "euler-a", "--out", str(out),
                 "--no-progress"]) == 0
    want = engine.inpaint(["a dog"] * 2, files / "in.png", files / "mask.png", steps=3, seed=4, sampler="euler-a")
    for i in range(2):
        got = Image.open(tmp_path / f"inp-{i}.png")
        assert np.array_equal(np.asarray(got), np.asarray(want[i])) and got.text["strength"] == "1.0"


@pytest.mark.parametrize("args, needle", [
    (["--strength", "0"], "--strength must be > 0"),
    (["--strength", "-0.5"], "--strength must be > 0"),
    (["--strength", "nan"], "--strength must be a finite number"),
    (["--strength", "1.5"], "--strength must be <= 1"),
    (["--strength", "0.05", "--steps", "10"], "--strength: 0.05 of 10 steps leaves no step to run"),
    (["--image", "{root}/missing.png"], "--image: file"),
    (["--image", "{root}/notes.png"], "--image: cannot read"),
    (["--image", "{root}/odd.png"], "--image: 60x60 is not a multiple of 8"),
    (["--mask", "{root}/notes.png"], "--mask: cannot read"),
    (["--mask", "{root}/small_mask.png"], "--mask: 32x32 does not match --image's 64x64"),
    (["--mask", "{root}/black.png"], "--mask: no pixel is white"),
    (["--height", "48"], "--image: aspect ratio of 64x64 does not match the generation size 64x48"),
    (["--ip-image", "{root}/in.png"], "--ip-image needs --ip-adapter"),
    (["--out", "x.txt"], "--out"),
])
def test_cli_edit_bad_input_is_one_line_before_the_model_loads(files, monkeypatch, capsys, args, needle):
    from dreamfuse.engine.cli import edit, main

    monkeypatch.setattr(edit, "load_engine", lambda *a, **k: pytest.fail("the model loaded before the check"))
    argv = ["edit", "--image", str(files / "in.png"), "--prompt", "a cat", "--no-progress"]
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(argv + [a.format(root=files) for a in args]))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and needle in err, err


def test_cli_edit_help_and_listing(capsys):
    from dreamfuse.engine.cli import main

    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--mask" in text and "white = repaint" in text and "examples:" in text and "int(steps * strength)" in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "edit" in capsys.readouterr().out
