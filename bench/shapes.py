"""Shapes dataset benchmark: render rate vs a PIL 4x-supersampling peer, scorer rate and accuracy.

    .venv/bin/python -m bench.shapes [--num=200] [--prepare]

Prints, per resolution, images/s of ``shapes.render`` (analytic anti-aliasing) and of the peer
(PIL ``ImageDraw`` at 4x, box-filtered down: the usual way to anti-alias with PIL), their ratio,
the scorer's images/s, and the scorer's accuracy on ground truth, mismatched captions and noise.
``--prepare`` also times ``imagen_shapes`` tfds preparation (array_record) of 1,000 images at 64 px.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

from imagen_jax.data import shapes
from imagen_jax.eval import shapes_score


def pil_supersampled(scene: shapes.Scene, resolution: int, factor: int = 4) -> np.ndarray:
    """Peer renderer: PIL polygons/ellipses at ``factor``x, then a box filter."""
    n = resolution * factor
    img = Image.new("RGB", (n, n), shapes.BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        r = shapes.DEFAULT_SPEC.radius(o.size) * n
        cx, cy = o.x * n, o.y * n
        verts = shapes.POLYGONS[o.shape]
        if verts is None:
            rr = shapes.CIRCLE_RADIUS * r
            draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=shapes.COLOURS[o.colour])
        else:
            draw.polygon(
                [(cx + x * r, cy + y * r) for x, y in verts], fill=shapes.COLOURS[o.colour]
            )
    return np.asarray(img.resize((resolution, resolution), Image.BOX))


def _rate(fn, items) -> float:
    start = time.perf_counter()
    for item in items:
        fn(item)
    return len(items) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=200, help="images per resolution (/10 at 1024)")
    parser.add_argument("--prepare", action="store_true", help="also time tfds preparation")
    args = parser.parse_args()

    print("| res | render img/s | PIL 4x img/s | ratio | score img/s | exact | shape | size |")
    print("|---|---|---|---|---|---|---|---|")
    for res in (16, 32, 64, 128, 256, 1024):
        n = args.num if res <= 256 else max(args.num // 10, 4)
        scenes = [shapes.sample_scene("train", i) for i in range(n)]
        ours = _rate(lambda s, r=res: shapes.render(s, r), scenes)
        peer = _rate(lambda s, r=res: pil_supersampled(s, r), scenes)
        images = np.stack([shapes.render(s, res) for s in scenes])
        captions = [s.caption for s in scenes]
        start = time.perf_counter()
        acc = shapes_score.score(images, captions)
        score_rate = n / (time.perf_counter() - start)
        print(
            f"| {res} | {ours:.0f} | {peer:.0f} | {ours / peer:.2f}x | {score_rate:.0f} | "
            f"{acc['exact_match']:.3f} | {acc['shape']:.3f} | {acc['size']:.3f} |"
        )

    n = args.num
    scenes = [shapes.sample_scene("train", i) for i in range(n)]
    images = np.stack([shapes.render(s, 64) for s in scenes])
    mismatched = [shapes.sample_scene("train", i, seed=1).caption for i in range(n)]
    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    for name, imgs, caps in (
        ("mismatched captions (64 px)", images, mismatched),
        ("uniform noise (64 px)", noise, [s.caption for s in scenes]),
    ):
        acc = shapes_score.score(imgs, caps)
        attrs = ", ".join(f"{k} {acc[k]:.3f}" for k in shapes_score.ATTRIBUTES)
        print(f"{name}: exact {acc['exact_match']:.3f}; {attrs}")
    print(f"chance: {shapes_score.chance_levels()}")

    if args.prepare:
        from imagen_jax.data import shapes_tfds

        config = shapes_tfds.ShapesConfig(
            name="bench64", resolution=64, num_train=1000, num_heldout=1
        )
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            shapes_tfds.prepare(config, tmp)
            dt = time.perf_counter() - start
        print(f"tfds prepare 1,001 images at 64 px: {dt:.1f} s ({1001 / dt:.0f} img/s)")


if __name__ == "__main__":
    main()
