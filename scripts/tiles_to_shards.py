"""Write a folder of pre-cut tiles (PNG/JPEG, any depth) as an ssl_path dataset: shards + manifest.json.

A diagnostic, not the tiler: it exists to ask "would the same recipe learn on other images?"
(docs/learning.md, "Trained on the evaluation images themselves"). Labels are never read: folder
names are ignored and the files are spread over ``--shards`` pseudo-slides by a hash of their
path, so a shard is not a class. Each image is resized to ``--native-size`` (its size at the scan's
resolution), then cut into its four corner crops and centre crop of ``--tile-size``, plus the whole
image resized to ``--tile-size``: six tiles per image, as the tiler cuts overlapping tiles at two
magnifications.

    python scripts/tiles_to_shards.py ../shared/data/tiles/kather2016-100 runs/data/kather_unlabelled
"""

from __future__ import annotations

import argparse
import hashlib
import io
from pathlib import Path

from PIL import Image

from ssl_path.eval.datasets import IMG_EXTENSIONS
from ssl_path.tiling.manifest import build_manifest, save_manifest
from ssl_path.tiling.writer import SlideShardWriter


def tiles_of(image: Image.Image, native_size: int, tile_size: int) -> list[Image.Image]:
    """Four corner crops, the centre crop and the whole image, each ``tile_size`` square."""
    im = image.convert("RGB").resize((native_size, native_size), Image.Resampling.BICUBIC)
    far, mid = native_size - tile_size, (native_size - tile_size) // 2
    corners = [(0, 0), (far, 0), (0, far), (far, far), (mid, mid)]
    crops = [im.crop((x, y, x + tile_size, y + tile_size)) for x, y in corners]
    return [*crops, im.resize((tile_size, tile_size), Image.Resampling.BICUBIC)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--native-size", type=int, default=150)
    parser.add_argument("--tile-size", type=int, default=112)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--jpeg-quality", type=int, default=90)
    args = parser.parse_args(argv)
    if not 0 < args.tile_size <= args.native_size:
        parser.error("need 0 < --tile-size <= --native-size")
    files = sorted(p for p in args.input.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        parser.error(f"no images under {args.input}")
    groups: dict[str, list[Path]] = {}
    for p in files:
        h = int(hashlib.sha256(str(p.relative_to(args.input)).encode()).hexdigest(), 16)
        groups.setdefault(f"tiles-{h % args.shards}", []).append(p)
    shards_dir = args.output / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    slides = {}
    for slide_id, paths in sorted(groups.items()):
        writer = SlideShardWriter(shards_dir, slide_id, max_count=1000, max_size=500_000_000)
        n = 0
        for i, p in enumerate(paths):
            with Image.open(p) as image:
                for j, tile in enumerate(tiles_of(image, args.native_size, args.tile_size)):
                    buf = io.BytesIO()
                    tile.save(buf, "JPEG", quality=args.jpeg_quality)
                    writer.write(f"{slide_id}_{i:05d}_{j}", buf.getvalue(), {"slide_id": slide_id})
                    n += 1
        slides[slide_id] = {
            "source": str(args.input),
            "status": "ok",
            "reason": None,
            "tiles": n,
            "shards": writer.commit(),
        }
    config = {
        "source": "scripts/tiles_to_shards.py",
        "native_size": args.native_size,
        "tile_size": args.tile_size,
        "jpeg_quality": args.jpeg_quality,
    }
    path = save_manifest(args.output, build_manifest(config, slides))
    print(
        f"{sum(s['tiles'] for s in slides.values())} tiles from {len(files)} images in "
        f"{len(slides)} shards: {path}"
    )


if __name__ == "__main__":
    main()
