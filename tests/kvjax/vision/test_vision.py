"""Image inputs: clear errors for bad files, CLIP preprocessing from the model dir, image chat CLI."""

import pathlib

import numpy as np
import pytest
from PIL import Image

from kvjax.vision.images import ImageError, clip_pixel_values, load_clip_processor, open_image

SAMPLE = pathlib.Path(__file__).parents[3] / "assets" / "sample.png"


@pytest.fixture(scope="module")
def demo_llava(tmp_path_factory):
    """The tiny random LLaVA demo checkpoint, where `--demo llava` writes it under KVJAX_HOME."""
    from kvjax.testing.vlm import write_vlm_checkpoint

    return write_vlm_checkpoint(tmp_path_factory.mktemp("kvjax_home") / "demo-llava", "llava")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("not an image\n")
    png = SAMPLE.read_bytes()
    (root / "truncated.png").write_bytes(png[:len(png) // 2])
    Image.fromarray(np.zeros((4, 4), np.float32), mode="F").save(root / "float.tiff")
    (root / "folder").mkdir()
    return root


@pytest.mark.parametrize("name, message", [
    ("missing.png", "does not exist"), ("folder", "is not a file"), ("empty.png", "is empty"),
    ("text.png", "not an image file"), ("truncated.png", "corrupt or truncated"), ("float.tiff", "pixel mode 'F'"),
])
def test_bad_image_files_raise_one_clear_error(bad_files, name, message):
    with pytest.raises(ImageError, match=message):
        open_image(bad_files / name)


def test_zero_size_and_non_image_objects():
    with pytest.raises(ImageError, match="zero size"):
        open_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageError, match="not an image"):
        open_image(np.zeros((3, 4, 4)))
    assert open_image(Image.new("RGBA", (3, 2))).mode == "RGB"
    assert open_image(SAMPLE).size == (160, 120)


def test_clip_preprocessing_reads_the_model_dir(demo_llava):
    processor = load_clip_processor(demo_llava)
    pixels = clip_pixel_values([SAMPLE, Image.new("L", (90, 30), 255)], processor, 56)
    assert pixels.shape == (2, 3, 56, 56) and pixels.dtype == np.float32
    # white after CLIP normalisation: (1 - mean) / std per channel
    expected = (1 - np.array([0.48145466, 0.4578275, 0.40821073])) / np.array([0.26862954, 0.26130258, 0.27577711])
    np.testing.assert_allclose(pixels[1, :, 28, 28], expected, rtol=1e-5)
    with pytest.raises(ImageError):
        clip_pixel_values([SAMPLE.parent / "nope.png"], processor, 56)


@pytest.mark.parametrize("name", ["empty.png", "text.png", "missing.png"])
def test_chat_exits_2_with_one_line_for_bad_images(bad_files, tmp_path, monkeypatch, capsys, name):
    from kvjax.cli.chat import main

    monkeypatch.setenv("KVJAX_HOME", str(tmp_path))
    assert main(["--demo", "llava", "--image", str(bad_files / name), "--question", "hi"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line and not line.startswith("kvjax:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0], lines


def test_image_chat_runs_offline_on_the_llava_demo(demo_llava, monkeypatch, capsys):
    from kvjax.cli.chat import main
    from tests.kvjax.cli.test_chat_cli import run_chat

    home = demo_llava.parent  # the fixture wrote demo-llava under this KVJAX_HOME
    proc = run_chat("--demo", "llava", "--image", str(SAMPLE), "--question", "What is in the picture?",
                    "--max-new-tokens", "6", "--time", home=home)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and "[time] prompt" in proc.stderr
    monkeypatch.setenv("KVJAX_HOME", str(home))
    assert main(["--model-dir", str(demo_llava), "--question", "hi", "--max-new-tokens", "3", "--quiet"]) == 0
    assert capsys.readouterr().out.strip()
