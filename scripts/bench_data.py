"""Multi-crop augmentation throughput: ssl_path's CPU path vs DINOv2's reference PIL/torchvision recipe.

Both run in this process on one thread, on the same in-memory JPEG tiles (224 px regions of the
bundled CMU slide, or tiles from a ``--root`` made by ``ssl-path-tile``), from JPEG bytes to a batch
of 2x224 + 8x98 normalised crops; rounds alternate between the two so machine noise hits both.
The last line is ``ratio: <ours / reference>``.

``--device cuda`` (or ``cpu``) instead measures the GPU path: the worker half (decode, parameters,
masks; per CPU core) and the device half (``finish_on_device``: crops, flips, rotations, colour,
HED, blur as batched tensor ops) in images/s on that device.

    python scripts/bench_data.py                       # CPU path vs reference, prints ratio
    python scripts/bench_data.py --device cuda --batch 256
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ssl_path.data import MaskingConfig, MultiCropCollate, MultiCropConfig, decode_tile, finish_on_device

SHARED = Path(
    os.environ.get("SSL_PATH_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)


def slide_jpegs(n: int, size: int = 224, quality: int = 90) -> list[bytes]:
    """``n`` JPEG tiles cut from the bundled CMU H&E slide (tissue-rich area), as a tiler would write."""
    import openslide

    slide = openslide.OpenSlide(str(SHARED / "slides" / "CMU-1-Small-Region.svs"))
    w, h = slide.dimensions
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        x, y = int(rng.integers(0, w - size)), int(rng.integers(0, h - size))
        buf = io.BytesIO()
        slide.read_region((x, y), 0, (size, size)).convert("RGB").save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def shard_jpegs(root: Path, n: int) -> list[bytes]:
    """The first ``n`` ``.jpg`` members of the shards listed in ``root/manifest.json``."""
    manifest = json.loads((root / "manifest.json").read_text())
    out: list[bytes] = []
    for entry in manifest["shards"]:
        with tarfile.open(root / entry["path"]) as tar:
            out += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
        if len(out) >= n:
            break
    return out[:n]


def reference_transform(local_size: int):
    """DINOv2's ``DataAugmentationDINO`` (dinov2/data/augmentations.py) with its default arguments."""
    from torchvision import transforms as T

    def blur(p: float):  # the intended probability (DINOv2's wrapper passes 1 - p; same work on average)
        return T.RandomApply([T.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=p)

    bicubic = T.InterpolationMode.BICUBIC
    flip_crop_g = T.Compose(
        [
            T.RandomResizedCrop(224, scale=(0.32, 1.0), interpolation=bicubic),
            T.RandomHorizontalFlip(),
        ]
    )
    flip_crop_l = T.Compose(
        [
            T.RandomResizedCrop(local_size, scale=(0.05, 0.32), interpolation=bicubic),
            T.RandomHorizontalFlip(),
        ]
    )
    colour = T.Compose([T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)])
    norm = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    g1 = T.Compose([colour, blur(1.0), norm])
    g2 = T.Compose([colour, blur(0.1), T.RandomSolarize(threshold=128, p=0.2), norm])
    loc = T.Compose([colour, blur(0.5), norm])

    def apply(img: Image.Image) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [g1(flip_crop_g(img)), g2(flip_crop_g(img))], [loc(flip_crop_l(img)) for _ in range(8)]

    return apply


def run_reference(jpegs: list[bytes], transform) -> dict:
    views = [transform(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs]
    g = torch.stack([v for gl, _ in views for v in gl])
    loc = torch.stack([v for _, lo in views for v in lo])
    return {"global_crops": g, "local_crops": loc}


def run_ours(jpegs: list[bytes], collate: MultiCropCollate, rng: np.random.Generator) -> dict:
    return collate([decode_tile(j) for j in jpegs], rng)


def bench_cpu(jpegs: list[bytes], batch: int, rounds: int) -> None:
    cfg = MultiCropConfig().resolved(14)
    collate = MultiCropCollate(cfg, MaskingConfig(), patch_size=14, device_augment=False)
    ref = reference_transform(cfg.local_crop_size)
    rng = np.random.default_rng(0)
    batches = [jpegs[i : i + batch] for i in range(0, len(jpegs) - batch + 1, batch)]
    run_ours(batches[0], collate, rng), run_reference(batches[0], ref)  # warm-up
    t_ours = t_ref = 0.0
    n = 0
    for r in range(rounds):
        b = batches[r % len(batches)]
        t0 = time.perf_counter()
        out = run_ours(b, collate, rng)
        t1 = time.perf_counter()
        run_reference(b, ref)
        t2 = time.perf_counter()
        t_ours, t_ref, n = t_ours + t1 - t0, t_ref + t2 - t1, n + len(b)
    assert out["global_crops"].shape == (2 * batch, 3, 224, 224) and out["local_crops"].shape[-1] == 98
    print(f"crops per image: 2x224 + 8x{cfg.local_crop_size}; batch {batch}; {n} images per method; 1 thread")
    print(f"reference (DINOv2 PIL/torchvision) img/s/core: {n / t_ref:.1f}")
    print(f"ssl_path CPU path img/s/core: {n / t_ours:.1f}")
    print(f"ratio: {t_ref / t_ours:.2f}")


def bench_device(jpegs: list[bytes], batch: int, rounds: int, device: str) -> None:
    cfg = MultiCropConfig().resolved(14)
    collate = MultiCropCollate(cfg, MaskingConfig(), patch_size=14, device_augment=True)
    rng = np.random.default_rng(0)
    reps = -(-batch // len(jpegs))
    data = (jpegs * reps)[:batch]
    t0 = time.perf_counter()
    host = [run_ours(data, collate, rng) for _ in range(2)]
    t_host = (time.perf_counter() - t0) / 2
    dev = torch.device(device)

    def step(i: int) -> dict:
        b = dict(host[i % 2])
        b["tiles"] = b["tiles"].to(dev, non_blocking=True)
        b["tile_params"] = {k: {n: t.to(dev) for n, t in p.items()} for k, p in b["tile_params"].items()}
        return finish_on_device(b, cfg)

    for i in range(2):
        step(i)  # warm-up (kernels, allocator)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(rounds):
        out = step(i)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t_dev = (time.perf_counter() - t0) / rounds
    assert (
        out["global_crops"].shape == (2 * batch, 3, 224, 224) and out["global_crops"].device.type == dev.type
    )
    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}), batch {batch}")
    print(f"worker half (decode + params + masks) img/s/core: {batch / t_host:.1f}")
    print(f"device half (crops + photometric, incl. H2D copy) img/s: {batch / t_dev:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--root", type=Path, default=None, help="tiled dataset (manifest.json); default: bundled slide"
    )
    ap.add_argument("--tiles", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--device", default=None, help="measure the GPU path on this device (cuda, cpu)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    jpegs = shard_jpegs(args.root, args.tiles) if args.root else slide_jpegs(args.tiles)
    if args.device:
        bench_device(jpegs, args.batch, args.rounds, args.device)
    else:
        bench_cpu(jpegs, min(args.batch, len(jpegs)), args.rounds)


if __name__ == "__main__":
    main()
