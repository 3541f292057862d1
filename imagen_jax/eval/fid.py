"""FID: streamed feature statistics, per-reference-set caches, Fréchet distance in float64.

A zero-shot FID-30K run (Imagen, Section 4.1 / Table 1: COCO, 30k samples) takes hours, so
samples go to a chunked :class:`SampleStore` that a preempted run resumes from, and statistics
are accumulated chunk by chunk with Chan et al.'s parallel mean/covariance update in float64
(never holding 30k x 2048 features, and no float32 sum-of-squares cancellation).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from imagen_jax.data.images import check_finite, read_rgb

SampleFn = Callable[[list[str], int], np.ndarray]  # (prompts, seed) -> uint8 [N, H, W, 3]
FeatureFn = Callable[[np.ndarray], np.ndarray]  # uint8 [N, H, W, 3] -> float [N, D]


# ----------------------------------------------------------------------------- statistics


@dataclasses.dataclass
class FeatureStats:
    """Running mean and scatter matrix of feature vectors, float64.

    ``m2`` is the sum of outer products of deviations from the mean, so ``sigma = m2 / (n - 1)``
    (the unbiased covariance ``np.cov`` and pytorch-fid use).
    """

    n: int
    mean: np.ndarray  # float64 [D]
    m2: np.ndarray  # float64 [D, D]
    meta: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def empty(cls, dim: int, **meta) -> FeatureStats:
        return cls(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64), dict(meta))

    @classmethod
    def from_features(cls, features: np.ndarray, **meta) -> FeatureStats:
        stats = cls.empty(features.shape[-1], **meta)
        stats.update(features)
        return stats

    def update(self, features: np.ndarray) -> FeatureStats:
        """Adds a batch float [B, D] in place (Chan, Golub & LeVeque's pairwise update)."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"features must be [B, {self.mean.shape[0]}], got {x.shape}")
        if not len(x):
            return self
        b_mean = x.mean(0)
        centred = x - b_mean
        b_m2 = centred.T @ centred
        n = self.n + len(x)
        delta = b_mean - self.mean
        self.m2 += b_m2 + np.outer(delta, delta) * (self.n * len(x) / n)
        self.mean += delta * (len(x) / n)
        self.n = n
        return self

    @property
    def mu(self) -> np.ndarray:
        return self.mean

    @property
    def sigma(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, have {self.n}")
        return self.m2 / (self.n - 1)

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, n=self.n, mu=self.mean, sigma=self.sigma, meta=json.dumps(self.meta))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> FeatureStats:
        """Reads our ``.npz`` (also pytorch-fid's ``--save-stats`` files: ``mu``, ``sigma``)."""
        with np.load(path) as data:
            n = int(data["n"]) if "n" in data.files else 2
            meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
            mu = data["mu"].astype(np.float64)
            sigma = data["sigma"].astype(np.float64)
        return cls(n, mu, sigma * (n - 1), meta)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64.

    tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric
    PSD matrix S1^(1/2) S2 S1^(1/2), which has the same spectrum as S1 S2. Unlike ``sqrtm`` of
    the non-symmetric product this never produces imaginary parts, and it handles the singular
    covariances of runs with fewer samples than feature dimensions without an epsilon offset.
    """
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    s1, s2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs "
            f"{s2.shape}; were they computed with the same feature extractor?"
        )
    evals, evecs = np.linalg.eigh((s1 + s1.T) / 2)
    sqrt_s1 = (evecs * np.sqrt(_zero_noise_eigenvalues(evals))) @ evecs.T
    middle = sqrt_s1 @ s2 @ sqrt_s1
    middle_evals = _zero_noise_eigenvalues(np.linalg.eigvalsh((middle + middle.T) / 2))
    tr_covmean = np.sqrt(middle_evals).sum()
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    # The distance is >= 0; a tiny negative value is rounding of identical statistics.
    return max(fd, 0.0)


def _zero_noise_eigenvalues(evals: np.ndarray) -> np.ndarray:
    """Sets eigenvalues below the float64 rounding floor of their matrix to 0.

    The null space of a singular covariance comes out as +-1e-16-sized eigenvalues whose square
    roots (1e-8 each) would otherwise add up to a visible error in the trace.
    """
    floor = np.abs(evals).max(initial=0.0) * len(evals) * np.finfo(np.float64).eps
    return np.where(evals > floor, evals, 0.0)


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    fa, fb = a.meta.get("extractor"), b.meta.get("extractor")
    if fa and fb and fa != fb:
        raise ValueError(
            f"statistics come from different feature extractors ({fa} vs {fb}); recompute the "
            "reference statistics with the same Inception weights"
        )
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def stats_of_images(
    batches: Iterable[np.ndarray], feature_fn: FeatureFn, dim: int, **meta
) -> FeatureStats:
    """Streams uint8 image batches through ``feature_fn`` into :class:`FeatureStats`."""
    stats = FeatureStats.empty(dim, **meta)
    for batch in batches:
        stats.update(feature_fn(batch))
    return stats


# ----------------------------------------------------------------------------- reference sets


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: central square crop, PIL bicubic resize."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(image[top : top + side, left : left + side]).convert("RGB")
    if side != size:
        crop = crop.resize((size, size), Image.BICUBIC)
    return np.asarray(crop, np.uint8)


_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def iter_reference(
    reference: str, *, resolution: int, max_images: int | None = None, data_dir: str | None = None
) -> Iterator[tuple[np.ndarray, str | None]]:
    """Yields (uint8 [resolution, resolution, 3], caption or None) from a reference set.

    ``reference`` is a directory of images (sorted, recursive) or ``tfds:NAME[/CONFIG][:SPLIT]``
    (e.g. ``tfds:coco_captions/2017:val``), read from an already prepared TFDS ``data_dir``:
    nothing is downloaded.

    Raises ``imagen_jax.data.images.NonFiniteImageError`` (a ValueError) naming the image if
    one holds NaN/Inf values (float TIFFs, float TFDS features): PIL would make them black.
    """
    count = 0
    if reference.startswith("tfds:"):
        spec = reference[len("tfds:") :]
        name, _, split = spec.partition(":")
        import tensorflow_datasets as tfds  # heavy (TensorFlow): tfds only

        try:
            builder = tfds.builder(name, data_dir=data_dir)
            ds = builder.as_dataset(split=split or "validation", shuffle_files=False)
        except Exception as e:  # noqa: BLE001 - TFDS raises many types for "not prepared"
            raise ValueError(
                f"cannot read TFDS reference {reference!r} from data_dir={data_dir!r}: {e}. "
                "Prepare the dataset offline (tfds build) and pass --tfds_data_dir."
            ) from e
        for ex in tfds.as_numpy(ds):
            if max_images is not None and count >= max_images:
                return
            caption = None
            caps = ex.get("captions")
            if isinstance(caps, dict) and len(caps.get("text", [])):
                caption = caps["text"][0].decode()
            image = check_finite(ex["image"], f"reference image {count} of {reference!r}")
            yield center_crop_resize(image, resolution), caption
            count += 1
        return
    if not os.path.isdir(reference):
        raise ValueError(
            f"reference {reference!r} is neither a directory of images nor tfds:NAME[:SPLIT]"
        )
    paths = sorted(
        p
        for p in glob.glob(os.path.join(reference, "**", "*"), recursive=True)
        if p.lower().endswith(_IMAGE_EXTS)
    )
    if not paths:
        raise ValueError(f"reference directory {reference!r} holds no images ({_IMAGE_EXTS})")
    for path in paths[:max_images]:
        yield center_crop_resize(read_rgb(path, f"reference image {path!r}"), resolution), None


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def reference_stats(
    reference: str,
    feature_fn: FeatureFn,
    *,
    extractor_id: str,
    cache_dir: str,
    resolution: int = 256,
    max_images: int | None = None,
    batch_size: int = 64,
    dim: int = 2048,
    data_dir: str | None = None,
) -> FeatureStats:
    """Statistics of a reference set, cached per (reference, resolution, count, extractor)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", reference.strip("/"))[-80:]
    path = os.path.join(
        cache_dir,
        f"{slug}__r{resolution}_n{max_images or 'all'}__{extractor_id.split(':')[-1]}.npz",
    )
    if os.path.exists(path):
        return FeatureStats.load(path)
    images = (
        im
        for im, _ in iter_reference(
            reference, resolution=resolution, max_images=max_images, data_dir=data_dir
        )
    )
    stats = stats_of_images(
        (np.stack(b) for b in _batched(images, batch_size)),
        feature_fn,
        dim,
        extractor=extractor_id,
        reference=reference,
        resolution=resolution,
    )
    stats.save(path)
    return stats


# ----------------------------------------------------------------------------- sample store


class SampleStore:
    """Chunked, resumable store of generated samples: ``DIR/chunk_000123.npz``.

    Chunk ``i`` holds samples ``[i * chunk_size, (i + 1) * chunk_size)`` and is written
    atomically (temp file + rename), so a preempted run loses at most the chunk in flight.
    Chunk ``i`` is always sampled with seed ``seed + i``, so a resumed run produces exactly the
    images an uninterrupted one would. ``manifest.json`` pins the settings; reopening with other
    settings is refused instead of silently mixing runs.
    """

    def __init__(self, directory: str, *, chunk_size: int, seed: int, settings: dict | None = None):
        self.directory = directory
        self.chunk_size = chunk_size
        self.seed = seed
        os.makedirs(directory, exist_ok=True)
        manifest = {"chunk_size": chunk_size, "seed": seed, "settings": settings or {}}
        path = os.path.join(directory, "manifest.json")
        if os.path.exists(path):
            with open(path) as f:
                existing = json.load(f)
            if existing != json.loads(json.dumps(manifest)):
                raise ValueError(
                    f"sample store {directory!r} was started with {existing}, not {manifest}; "
                    "use a fresh --out directory or the original settings to resume"
                )
        else:
            with open(path, "w") as f:
                json.dump(manifest, f, indent=1)

    @classmethod
    def open(cls, directory: str) -> SampleStore:
        """Reopens an existing store with its recorded settings (to read it)."""
        path = os.path.join(directory, "manifest.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{directory!r} is not a sample store (no manifest.json)")
        with open(path) as f:
            m = json.load(f)
        return cls(directory, chunk_size=m["chunk_size"], seed=m["seed"], settings=m["settings"])

    def _chunk_path(self, i: int) -> str:
        return os.path.join(self.directory, f"chunk_{i:06d}.npz")

    def num_chunks(self) -> int:
        """Number of consecutive complete chunks from 0."""
        i = 0
        while os.path.exists(self._chunk_path(i)):
            i += 1
        return i

    def num_samples(self) -> int:
        return sum(len(self.read_chunk(i)[1]) for i in range(self.num_chunks()))

    def write_chunk(self, i: int, images: np.ndarray, prompts: Sequence[str]) -> None:
        tmp = self._chunk_path(i) + ".tmp.npz"
        np.savez(tmp, images=np.asarray(images, np.uint8), prompts=np.asarray(list(prompts)))
        os.replace(tmp, self._chunk_path(i))

    def read_chunk(self, i: int) -> tuple[np.ndarray, list[str]]:
        with np.load(self._chunk_path(i)) as data:
            return data["images"], [str(p) for p in data["prompts"]]

    def iter_chunks(self) -> Iterator[tuple[np.ndarray, list[str]]]:
        for i in range(self.num_chunks()):
            yield self.read_chunk(i)

    def fill(
        self,
        sample_fn: SampleFn,
        prompts: Sequence[str],
        num_samples: int,
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Samples until the store holds ``num_samples`` images; prompts are cycled in order."""
        if not prompts:
            raise ValueError("no prompts to sample from")
        num_chunks = -(-num_samples // self.chunk_size)
        for i in range(self.num_chunks(), num_chunks):
            start = i * self.chunk_size
            stop = min(start + self.chunk_size, num_samples)
            chunk_prompts = [prompts[j % len(prompts)] for j in range(start, stop)]
            images = np.asarray(sample_fn(chunk_prompts, self.seed + i))
            if images.dtype != np.uint8 or images.shape[0] != len(chunk_prompts):
                raise ValueError(
                    f"sample_fn must return uint8 [{len(chunk_prompts)}, H, W, 3], got "
                    f"{images.dtype} {images.shape}"
                )
            self.write_chunk(i, images, chunk_prompts)
            if progress is not None:
                progress(stop, num_samples)

    def stats(self, feature_fn: FeatureFn, dim: int = 2048, **meta) -> FeatureStats:
        return stats_of_images((im for im, _ in self.iter_chunks()), feature_fn, dim, **meta)
