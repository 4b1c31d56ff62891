"""The `dreamfuse` CLI: it writes images, and bad input is one clear line with a non-zero exit."""

import subprocess
import sys

import pytest
from dreamfuse.engine.cli import main
from PIL import Image


def test_generate_writes_png_with_metadata(tmp_path):
    out = tmp_path / "cat.png"
    assert main(["generate", "--prompt", "a cat", "--steps", "2", "--seed", "3", "--out", str(out),
                 "--no-progress"]) == 0
    img = Image.open(out)
    assert img.size == (64, 64)
    assert img.text["seed"] == "3" and img.text["prompt"] == "a cat"


def test_generate_several_images_numbered(tmp_path):
    out = tmp_path / "x.png"
    assert main(["generate", "--prompt", "a", "--prompt", "b", "--num-images", "2", "--steps", "1",
                 "--guidance", "1", "--seed", "0", "--out", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-0.png", "x-1.png", "x-2.png", "x-3.png"]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--steps", "0"], "--steps"),
        (["--height", "60"], "--height"),
        (["--width", "abc"], "--width"),
        (["--dtype", "fp8"], "dtype"),
        (["--model", "/nonexistent/model"], "--model"),
        (["--out", "/nonexistent/dir/x.png"], "--out"),
        (["--out", "x.txt"], "--out"),
    ],
)
def test_bad_input_is_one_line_no_traceback(args, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        code = main(["generate", "--prompt", "a cat", "--no-progress", *args])
        raise SystemExit(code)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and needle in err


def test_console_entry_point_help_and_error():
    run = lambda *a: subprocess.run([sys.executable, "-m", "dreamfuse.engine.cli", *a], capture_output=True,
                                    text=True, timeout=120)
    help_ = run("generate", "--help")
    assert help_.returncode == 0 and "--prompt" in help_.stdout and "examples" in help_.stdout
    bad = run("generate", "--prompt", "x", "--model", "/nope")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "dreamfuse.engine.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_help_version_and_relation_prompts_do_not_import_torch():
    code = ("import sys\nfrom dreamfuse.engine.cli import main\nfor argv in ({argv!r}):\n"
            "    try:\n        main(list(argv))\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules)")
    argvs = (["--help"], ["--version"], ["relation-prompts", "-e", "cat,dog", "-e", "box"])
    r = subprocess.run([sys.executable, "-c", code.format(argv=argvs)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False", r.stdout
    assert "cat <R> box" in r.stdout and "dreamfuse 0." in r.stdout


def test_pipelines_import_no_cli():
    code = ("import sys\nimport dreamfuse.engine.pipelines.text2img, dreamfuse.engine.pipelines.personalize\n"
            "import dreamfuse.engine.pipelines.composite, dreamfuse.engine.train.reversion\n"
            "import dreamfuse.engine.train.patchdpo, dreamfuse.engine.patch_quality, dreamfuse.engine.relation\n"
            "print(sorted(m for m in sys.modules if m.startswith('dreamfuse.engine.cli')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_loading_a_folder_is_quiet_when_not_a_terminal(tmp_path):
    """No library progress bars or notices (diffusers' 'Loading pipeline components', accelerate, torchvision) when
    stderr is not a terminal: only the 'wrote' line on stdout."""
    from dreamfuse.engine.tiny import save_tiny

    model = save_tiny(tmp_path / "model")
    r = _run("generate", "--model", str(model), "--prompt", "a cat", "--steps", "1", "--seed", "0", "--out",
             str(tmp_path / "x.png"))
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and r.stdout.startswith("wrote ")


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare on single spaces


def test_help_texts_teach(capsys):
    gen = _help(capsys, "generate")
    assert "SD 1.x/2.x and SDXL" in gen and "dreamfuse-0.png" in gen  # the IP group is not SD 1.x only; OUT pattern
    assert "required unless --no-ama" in _help(capsys, "personalize")
    compose = _help(capsys, "compose")
    assert "--tolerance" in compose and "RGB distance" in compose and '"subject"' in compose
    assert "a program" in compose  # --sal-model is TorchScript: code runs on load
    for method in ("reversion", "patchdpo"):
        train = _help(capsys, "train", method)
        assert "--max-steps" in train and "--compile" not in train
    assert "--dtype" not in _help(capsys, "train", "patchdpo")
