"""Image files -> pixel arrays for the vision towers, with one clear error per bad input.

LLaVA uses transformers' own CLIP image processor, configured by the model directory's
preprocessor_config.json (resize shortest edge, center crop, rescale, normalize). PIL and
transformers are imported inside the functions, so `import kvjax` stays light.
"""

from __future__ import annotations

import pathlib

import numpy as np

from kvjax.errors import CheckpointError, KVJaxError


class ImageError(KVJaxError):
    """An image file or object that cannot be used (missing, not an image, empty, odd mode)."""


# Modes PIL converts to RGB meaningfully; others (16-bit/float greyscale) would be silently clipped.
_CONVERTIBLE_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


def _check_image(image, name: str):
    """A PIL image (any convertible mode, non-zero size) -> RGB PIL image."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise ImageError(f"{name} is a {type(image).__name__}, not an image; pass a file path or a PIL image")
    width, height = image.size
    if width == 0 or height == 0:
        raise ImageError(f"{name} has zero size ({width}x{height}); use an image with pixels")
    if image.mode not in _CONVERTIBLE_MODES:
        raise ImageError(f"{name} has pixel mode {image.mode!r}, which kvjax does not convert to RGB; "
                         "save it as an 8-bit RGB or greyscale image (PNG/JPEG)")
    return image if image.mode == "RGB" else image.convert("RGB")


def open_image(source) -> "Image.Image":  # noqa: F821 (PIL imported lazily)
    """A path (str / Path) or PIL image -> RGB PIL image; raises ImageError naming the problem."""
    if not isinstance(source, (str, pathlib.Path)):
        return _check_image(source, "the image")
    path = pathlib.Path(source).expanduser()
    if not path.exists():
        raise ImageError(f"image file {str(path)!r} does not exist; check the --image path")
    if not path.is_file():
        raise ImageError(f"image path {str(path)!r} is not a file; pass an image file (PNG, JPEG, ...)")
    if path.stat().st_size == 0:
        raise ImageError(f"image file {str(path)!r} is empty (0 bytes); pass a real image file")
    return _decode(path, f"image file {str(path)!r}")


def image_from_bytes(data: bytes, name: str = "the image") -> "Image.Image":  # noqa: F821
    """Encoded image bytes (e.g. a data: URL's payload) -> RGB PIL image; raises ImageError."""
    import io

    if not data:
        raise ImageError(f"{name} is empty (0 bytes); send a real image")
    return _decode(io.BytesIO(data), name)


def _decode(source, name: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as image:
            image.load()  # decode now: truncated files fail here, not later
            return _check_image(image, name)
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not an image file PIL can read; pass a PNG, JPEG, GIF, BMP or WebP")
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name} is too large to decode safely ({e})")
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data
        raise ImageError(f"cannot decode {name} ({e}); it is corrupt or truncated")


def load_clip_processor(model_dir):
    """transformers' CLIP image processor from the model directory's preprocessor_config.json.

    The PIL backend is preferred: it needs neither torch nor torchvision.
    """
    path = pathlib.Path(model_dir)
    if not (path / "preprocessor_config.json").is_file():
        raise CheckpointError(f"no preprocessor_config.json in {path}; a LLaVA directory carries the "
                              "CLIPImageProcessor settings there")
    try:
        from transformers import CLIPImageProcessorPil as Processor  # transformers >= 5
    except ImportError:
        from transformers import CLIPImageProcessor as Processor  # 4.x: numpy/PIL implementation
    try:
        return Processor.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot read the image processor settings in {path}: {e}")


def clip_pixel_values(images, processor, image_size: int) -> np.ndarray:
    """Paths or PIL images -> float32 pixel_values [N, 3, image_size, image_size]."""
    rgb = [open_image(image) for image in images]
    pixels = np.asarray(processor(images=rgb, return_tensors="np")["pixel_values"], np.float32)
    if pixels.shape[1:] != (3, image_size, image_size):
        raise CheckpointError(f"the image processor makes {pixels.shape[2]}x{pixels.shape[3]} images but the "
                              f"vision tower expects {image_size}x{image_size}; fix preprocessor_config.json")
    return pixels
