"""Draw assets/sample.png, the project's own sample image for image chat (no third-party pixels).

    python scripts/make_sample_image.py [--out assets/sample.png]
"""

import argparse
from pathlib import Path

from PIL import Image, ImageDraw


def draw(size=(160, 120)) -> Image.Image:
    """A harbour scene: sky, sea, a sun, a lighthouse and a boat."""
    w, h = size
    image = Image.new("RGB", size, (135, 190, 235))
    d = ImageDraw.Draw(image)
    d.rectangle([0, int(h * 0.62), w, h], fill=(30, 90, 150))  # sea
    d.ellipse([w - 46, 10, w - 14, 42], fill=(250, 210, 60))  # sun
    d.rectangle([22, 30, 38, int(h * 0.66)], fill=(235, 235, 235))  # lighthouse tower
    for y in range(40, int(h * 0.62), 16):
        d.rectangle([22, y, 38, y + 6], fill=(200, 40, 40))  # stripes
    d.polygon([(18, 30), (42, 30), (30, 16)], fill=(60, 60, 60))  # lamp roof
    d.polygon([(80, 88), (136, 88), (126, 102), (90, 102)], fill=(120, 70, 30))  # hull
    d.line([(108, 88), (108, 52)], fill=(40, 40, 40), width=2)  # mast
    d.polygon([(110, 54), (110, 86), (132, 86)], fill=(250, 250, 245))  # sail
    return image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "assets" / "sample.png"))
    args = p.parse_args()
    draw().save(args.out, optimize=True)
    print(args.out)


if __name__ == "__main__":
    main()
