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
