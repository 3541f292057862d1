"""Helpers shared by the evaluation tests: a stand-in sampler, a headless-Chromium page probe,
and pytorch-fid's InceptionV3 with random weights as the FID reference.

Not a test module. torch, torchvision and pytorch-fid are imported inside the functions that use
them, so the launcher can load ``tests.support_eval:stand_in_factory`` cheaply.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from typing import Any
from unittest import mock

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def stand_in_factory(guidance: float | None = None,
                     resolution: int = 32) -> Callable[[list[str], int], np.ndarray]:
    """A fast stand-in for the cascade: a flat image whose colour hashes (prompt, seed).

    Returns ``sample_fn(prompts, seed) -> uint8 [len(prompts), resolution, resolution, 3]``.
    Guidance darkens the image so that sweeps see metrics change with the weight.
    """
    scale = 1.0 / (1.0 + 0.1 * (guidance or 1.0))

    def sample_fn(prompts: list[str], seed: int) -> np.ndarray:
        out = np.empty((len(prompts), resolution, resolution, 3), np.uint8)
        for i, p in enumerate(prompts):
            digest = hashlib.sha256(f"{p}|{seed}|{i}".encode()).digest()
            out[i] = (np.frombuffer(digest[:3], np.uint8) * scale).astype(np.uint8)
            out[i, : resolution // 4] = 255  # a band, so images are not flat
        return out

    return sample_fn


def chromium_dump(page: str, tmp_path) -> str:
    """The DOM of ``page`` (a local HTML file) after headless Chromium loaded it and ran its
    scripts (20 s of virtual time). Fails the test if Chromium is missing or exits non-zero."""
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: run tools/install_system_deps.sh (make setup-test)")
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--allow-file-access-from-files",
        "--virtual-time-budget=20000",
        "--dump-dom",
        f"file://{page}",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


# Appended to a copy of a page: after load, writes image counts (and optional JS results) into
# the DOM so --dump-dom reports them.
_PROBE = """
<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(im => im.complete && im.naturalWidth > 0).length;
  const pre = document.createElement('pre');
  pre.id = 'probe';
  let extra = null;
  try { extra = (typeof probeExtra === 'function') ? probeExtra() : null; }
  catch (e) { extra = String(e); }
  pre.textContent = JSON.stringify({total: imgs.length, loaded: ok, extra: extra});
  document.body.appendChild(pre);
});
</script>
"""


def chromium_probe(page: str, tmp_path, extra_js: str = "") -> dict[str, Any]:
    """Opens a copy of ``page`` (``*_probe.html`` next to it) in headless Chromium and returns
    ``{"total": <img elements>, "loaded": <images decoded>, "extra": probeExtra() or None}``;
    ``extra_js`` may define ``function probeExtra()`` whose JSON-able result lands in "extra"."""
    probe_page = page.replace(".html", "_probe.html")
    with open(page, encoding="utf-8") as f:
        text = f.read()
    with open(probe_page, "w", encoding="utf-8") as f:
        f.write(text.replace("</body>", f"<script>{extra_js}</script>{_PROBE}</body>"))
    dom = chromium_dump(probe_page, tmp_path)
    match = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert match, dom[-2000:]
    return json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))


@functools.lru_cache(maxsize=1)
def build_reference_inception(seed: int = 0):
    """pytorch-fid's FID InceptionV3 with random weights, built without any download.

    Returns (wrapper, published-format state dict). ``fid_inception_v3`` fetches the TF-ported
    weights; we patch the fetch and the load so the network keeps random weights, and capture
    the inner torchvision module to get the published file's (torchvision) key names.
    Cached: the eval test modules share one network (building it is a few CPU seconds).
    """
    import torch
    import torchvision
    from pytorch_fid import inception as pfi

    captured = []

    def fake_load(self, state_dict, *args, **kwargs):
        captured.append(self)

    with (
        mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(torchvision.models.inception.Inception3, "load_state_dict", fake_load),
    ):
        model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    model.eval()
    # torch's default init shrinks activations layer after layer, which would make the parity
    # check trivially pass on near-zero features: use He-scaled kernels and non-trivial BN stats.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in captured[0].modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen))
                module.weight.mul_((2.0 / fan_in) ** 0.5)
            elif isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(0.8 + 0.4 * torch.rand(n, generator=gen))
                module.bias.copy_(0.1 * torch.randn(n, generator=gen))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                module.running_var.copy_(0.7 + 0.6 * torch.rand(n, generator=gen))
    return model, captured[0].state_dict()


def torch_features(model, images_uint8: np.ndarray) -> np.ndarray:
    """pytorch-fid pool3 features, float32 [N, 2048], of uint8 [N, H, W, 3] images (the
    wrapper resizes to 299 and rescales to [-1, 1] itself)."""
    import torch

    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 255.0  # pytorch-fid input
    with torch.no_grad():
        return model(x)[0][:, :, 0, 0].numpy()
