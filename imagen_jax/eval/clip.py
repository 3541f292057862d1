"""CLIP ViT image and text towers in Flax, and the CLIP score (Radford et al. 2021).

Imagen reports CLIP score against FID over guidance weights (Section 4.1, Figure 4 / A.11).
Weights load from local files in either layout:
  * OpenAI / open_clip ``state_dict`` (``visual.transformer.resblocks.N.attn.in_proj_weight`` ...),
    as ``.pt``/``.pth``/``.bin`` pickles, ``.safetensors`` or ``.npz``;
  * Hugging Face ``transformers.CLIPModel`` (``vision_model.encoder.layers.N.self_attn.q_proj``
    ...), a directory with ``config.json`` + ``model.safetensors``/``pytorch_model.bin``.
OpenAI's original ``ViT-B-32.pt`` files are TorchScript archives, which cannot be read without
torch: re-save them once with ``torch.jit.load(p).state_dict()`` (see README.md (Evaluation)).

CLIP score (as in the text-to-image literature, e.g. torchmetrics): 100 * max(cos(img, txt), 0).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import freeze
from jax.sharding import Mesh

from imagen_jax import partitioning
from imagen_jax.eval.weights import load_state_dict

# CLIP's image normalisation (the statistics its image tower was trained with).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Architecture of both towers. ``eos_token_id=None`` pools the text at the highest token id
    (OpenAI's rule: end-of-text is the last vocabulary entry); otherwise at its first occurrence
    (Hugging Face's rule)."""

    embed_dim: int = 512
    image_size: int = 224
    patch_size: int = 32
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp_dim: int = 3072
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_mlp_dim: int = 2048
    vocab_size: int = 49408
    context_length: int = 77
    activation: str = "quick_gelu"  # OpenAI models; LAION open_clip models use "gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int | None = None
    precision: str | None = "highest"

    def tower(self, kind: str) -> TowerSpec:
        """The transformer of the ``"vision"`` tower (bidirectional) or the ``"text"`` tower
        (causal), from this config's ``{kind}_width`` / ``_layers`` / ``_heads`` / ``_mlp_dim``
        and the settings both towers share. Raises ValueError for another ``kind``."""
        if kind not in ("vision", "text"):
            raise ValueError(f"unknown CLIP tower {kind!r}; use 'vision' or 'text'")
        per_tower = ("width", "layers", "heads", "mlp_dim")
        return TowerSpec(
            **{field: getattr(self, f"{kind}_{field}") for field in per_tower},
            activation=self.activation,
            causal=kind == "text",
            eps=self.layer_norm_eps,
            precision=self.precision,
        )


@dataclasses.dataclass(frozen=True)
class TowerSpec:
    """One tower's transformer: ``layers`` pre-LN blocks of ``width`` channels, ``heads``
    attention heads and an MLP of ``mlp_dim``; ``causal`` masks attention to earlier tokens (text
    tower); ``eps`` is the LayerNorm epsilon, ``precision`` the matmul precision."""

    width: int
    layers: int
    heads: int
    mlp_dim: int
    activation: str
    causal: bool
    eps: float
    precision: str | None


CLIP_CONFIGS: dict[str, CLIPConfig] = {
    "ViT-B/32": CLIPConfig(),
    "ViT-L/14": CLIPConfig(
        embed_dim=768,
        patch_size=14,
        vision_width=1024,
        vision_layers=24,
        vision_heads=16,
        vision_mlp_dim=4096,
        text_width=768,
        text_layers=12,
        text_heads=12,
        text_mlp_dim=3072,
    ),
}


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    raise ValueError(f"unknown CLIP activation {name!r}; use 'quick_gelu' or 'gelu'")


def _dense(features: int, axes: tuple[str, str], precision, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        precision=precision,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        name=name,
    )


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)); x + mlp(ln_2(x))."""

    spec: TowerSpec

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, L, width]
        s = self.spec
        b, length, _ = x.shape
        head_dim = s.width // s.heads
        h = nn.LayerNorm(epsilon=s.eps, name="ln_1")(x)
        q, k, v = (
            _dense(s.width, ("embed", "heads"), s.precision, f"attn_{n}")(h).reshape(
                b, length, s.heads, head_dim
            )
            for n in ("q", "k", "v")
        )
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=s.precision) / np.sqrt(head_dim)
        if s.causal:
            mask = jnp.tril(jnp.ones((length, length), bool))
            logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        attn = jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=s.precision)
        attn = attn.reshape(b, length, s.width)
        x = x + _dense(s.width, ("heads", "embed"), s.precision, "attn_out")(attn)
        h = nn.LayerNorm(epsilon=s.eps, name="ln_2")(x)
        h = _dense(s.mlp_dim, ("embed", "mlp"), s.precision, "mlp_fc")(h)
        h = _activation(s.activation)(h)
        return x + _dense(s.width, ("mlp", "embed"), s.precision, "mlp_proj")(h)


class Transformer(nn.Module):
    """``spec.layers`` residual attention blocks: [B, L, width] -> [B, L, width]."""

    spec: TowerSpec

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.spec.layers):
            x = ResidualAttentionBlock(self.spec, name=f"resblocks_{i}")(x)
        return x


class VisionTower(nn.Module):
    """Normalised pixels float [B, S, S, 3] -> image embedding [B, embed_dim] (unnormalised)."""

    config: CLIPConfig

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        c = self.config
        p = c.patch_size
        x = nn.Conv(
            c.vision_width,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=False,
            precision=c.precision,
            name="conv1",
        )(pixels)  # [B, S/p, S/p, width]
        b = x.shape[0]
        x = x.reshape(b, -1, c.vision_width)
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (c.vision_width,))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c.vision_width)), x], axis=1)
        num_pos = (c.image_size // p) ** 2 + 1
        pos = self.param(
            "positional_embedding", nn.initializers.normal(0.01), (num_pos, c.vision_width)
        )
        if x.shape[1] != num_pos:
            raise ValueError(
                f"image of {pixels.shape[1]}x{pixels.shape[2]} gives {x.shape[1] - 1} patches; "
                f"this CLIP expects {c.image_size}x{c.image_size} (use preprocess_images)"
            )
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="ln_pre")(x + pos)
        x = Transformer(c.tower("vision"), name="transformer")(x)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="ln_post")(x[:, 0])
        proj = self.param("proj", nn.initializers.lecun_normal(), (c.vision_width, c.embed_dim))
        return jnp.dot(x, proj, precision=c.precision)


class TextTower(nn.Module):
    """Token ids int32 [B, context_length] -> text embedding [B, embed_dim] (unnormalised)."""

    config: CLIPConfig

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        c = self.config
        x = nn.Embed(c.vocab_size, c.text_width, name="token_embedding")(ids)
        pos = self.param(
            "positional_embedding", nn.initializers.normal(0.01), (c.context_length, c.text_width)
        )
        x = x + pos[: ids.shape[1]]
        x = Transformer(c.tower("text"), name="transformer")(x)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="ln_final")(x)
        if c.eos_token_id is None:
            eos = jnp.argmax(ids, axis=-1)
        else:
            eos = jnp.argmax(ids == c.eos_token_id, axis=-1)
        x = x[jnp.arange(x.shape[0]), eos]  # [B, text_width]
        proj = self.param(
            "text_projection", nn.initializers.lecun_normal(), (c.text_width, c.embed_dim)
        )
        return jnp.dot(x, proj, precision=c.precision)


class CLIP(nn.Module):
    config: CLIPConfig

    def setup(self):
        self.visual = VisionTower(self.config)
        self.text = TextTower(self.config)

    def encode_image(self, pixels: jax.Array) -> jax.Array:
        return self.visual(pixels)

    def encode_text(self, ids: jax.Array) -> jax.Array:
        return self.text(ids)

    def __call__(self, pixels: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.visual(pixels), self.text(ids)


# ----------------------------------------------------------------------------- preprocessing


def preprocess_images(images: jax.Array, size: int) -> jax.Array:
    """uint8 [B, H, W, 3] or float in [-1, 1] -> CLIP-normalised float32 [B, size, size, 3].

    Central square crop, anti-aliased bicubic resize (as CLIP's PIL pipeline), then the CLIP
    mean/std normalisation.
    """
    x = images.astype(jnp.float32)
    x = x / 255.0 if images.dtype == jnp.uint8 else (x + 1.0) / 2.0
    h, w = x.shape[1:3]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[:, top : top + side, left : left + side]
    if side != size:
        x = jax.image.resize(x, (x.shape[0], size, size, 3), "bicubic", antialias=True)
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


# ----------------------------------------------------------------------------- weights


def _ln(sd, name):
    return {"scale": sd[f"{name}.weight"], "bias": sd[f"{name}.bias"]}


def _lin(sd, name):
    return {"kernel": sd[f"{name}.weight"].T, "bias": sd[f"{name}.bias"]}


def _openai_blocks(sd, prefix, layers):
    blocks = {}
    for i in range(layers):
        p = f"{prefix}.resblocks.{i}"
        qkv_w = np.split(sd[f"{p}.attn.in_proj_weight"], 3, axis=0)  # [3W, W] packed q, k, v
        qkv_b = np.split(sd[f"{p}.attn.in_proj_bias"], 3)
        block = {f"attn_{n}": {"kernel": w.T, "bias": b} for n, w, b in zip("qkv", qkv_w, qkv_b)}
        block.update(
            ln_1=_ln(sd, f"{p}.ln_1"),
            ln_2=_ln(sd, f"{p}.ln_2"),
            attn_out=_lin(sd, f"{p}.attn.out_proj"),
            mlp_fc=_lin(sd, f"{p}.mlp.c_fc"),
            mlp_proj=_lin(sd, f"{p}.mlp.c_proj"),
        )
        blocks[f"resblocks_{i}"] = block
    return blocks


def _hf_blocks(sd, prefix, layers):
    blocks = {}
    for i in range(layers):
        p = f"{prefix}.encoder.layers.{i}"
        blocks[f"resblocks_{i}"] = {
            "ln_1": _ln(sd, f"{p}.layer_norm1"),
            "ln_2": _ln(sd, f"{p}.layer_norm2"),
            "attn_q": _lin(sd, f"{p}.self_attn.q_proj"),
            "attn_k": _lin(sd, f"{p}.self_attn.k_proj"),
            "attn_v": _lin(sd, f"{p}.self_attn.v_proj"),
            "attn_out": _lin(sd, f"{p}.self_attn.out_proj"),
            "mlp_fc": _lin(sd, f"{p}.mlp.fc1"),
            "mlp_proj": _lin(sd, f"{p}.mlp.fc2"),
        }
    return blocks


def _count_layers(sd: Mapping[str, Any], prefix: str) -> int:
    idx = {int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def is_hf_state_dict(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith("vision_model.") for k in sd)


# Tensors that give the architecture away: the patch conv, the position tables, each tower's
# block prefix and first MLP weight [mlp_dim, width], the token table. Role: (name in Hugging
# Face's layout, name in OpenAI's / open_clip's).
_SHAPE_TENSORS = {
    "conv": ("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight"),
    "vision_pos": ("vision_model.embeddings.position_embedding.weight",
                   "visual.positional_embedding"),
    "vision_blocks": ("vision_model.encoder.layers.", "visual.transformer.resblocks."),
    "text_blocks": ("text_model.encoder.layers.", "transformer.resblocks."),
    "mlp_in": ("mlp.fc1.weight", "mlp.c_fc.weight"),
    "tokens": ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
    "text_pos": ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
}
HEAD_DIM = 64  # CLIP's convention: heads = width / 64 (head counts are not in the tensor shapes)


def config_from_state_dict(sd: Mapping[str, np.ndarray], **overrides) -> CLIPConfig:
    """Infers the architecture from tensor shapes (heads = width / 64, the CLIP convention)."""
    hf = is_hf_state_dict(sd)
    names = {role: pair[0 if hf else 1] for role, pair in _SHAPE_TENSORS.items()}
    conv, tokens = sd[names["conv"]], sd[names["tokens"]]
    patch = conv.shape[-1]
    kw = dict(
        # The image projection is [embed, width] in Hugging Face's layout, [width, embed] in
        # OpenAI's.
        embed_dim=sd["visual_projection.weight"].shape[0] if hf else sd["visual.proj"].shape[1],
        patch_size=patch,
        image_size=int(round((sd[names["vision_pos"]].shape[0] - 1) ** 0.5)) * patch,
        vision_width=conv.shape[0],
        text_width=tokens.shape[1],
        vocab_size=tokens.shape[0],
        context_length=sd[names["text_pos"]].shape[0],
    )
    for kind in ("vision", "text"):
        blocks = names[f"{kind}_blocks"]
        kw[f"{kind}_layers"] = _count_layers(sd, blocks)
        kw[f"{kind}_mlp_dim"] = sd[f"{blocks}0.{names['mlp_in']}"].shape[0]
        kw[f"{kind}_heads"] = max(1, kw[f"{kind}_width"] // HEAD_DIM)
    kw.update(overrides)
    return CLIPConfig(**kw)


def params_from_state_dict(sd: Mapping[str, np.ndarray], config: CLIPConfig) -> dict[str, Any]:
    """OpenAI/open_clip or Hugging Face CLIP state dict -> Flax params of :class:`CLIP`."""
    sd = {k: np.asarray(v, np.float32) for k, v in sd.items()}
    try:
        if is_hf_state_dict(sd):
            v, t = "vision_model", "text_model"
            visual = {
                "conv1": {
                    "kernel": sd[f"{v}.embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0)
                },
                "class_embedding": sd[f"{v}.embeddings.class_embedding"],
                "positional_embedding": sd[f"{v}.embeddings.position_embedding.weight"],
                "ln_pre": _ln(sd, f"{v}.pre_layrnorm"),
                "transformer": _hf_blocks(sd, v, config.vision_layers),
                "ln_post": _ln(sd, f"{v}.post_layernorm"),
                "proj": sd["visual_projection.weight"].T,
            }
            text = {
                "token_embedding": {"embedding": sd[f"{t}.embeddings.token_embedding.weight"]},
                "positional_embedding": sd[f"{t}.embeddings.position_embedding.weight"],
                "transformer": _hf_blocks(sd, t, config.text_layers),
                "ln_final": _ln(sd, f"{t}.final_layer_norm"),
                "text_projection": sd["text_projection.weight"].T,
            }
        else:
            visual = {
                "conv1": {"kernel": sd["visual.conv1.weight"].transpose(2, 3, 1, 0)},
                "class_embedding": sd["visual.class_embedding"],
                "positional_embedding": sd["visual.positional_embedding"],
                "ln_pre": _ln(sd, "visual.ln_pre"),
                "transformer": _openai_blocks(sd, "visual.transformer", config.vision_layers),
                "ln_post": _ln(sd, "visual.ln_post"),
                "proj": sd["visual.proj"],
            }
            text = {
                "token_embedding": {"embedding": sd["token_embedding.weight"]},
                "positional_embedding": sd["positional_embedding"],
                "transformer": _openai_blocks(sd, "transformer", config.text_layers),
                "ln_final": _ln(sd, "ln_final"),
                "text_projection": sd["text_projection"],
            }
    except KeyError as e:
        raise ValueError(
            f"CLIP weights lack tensor {e}; expected an OpenAI/open_clip or Hugging Face "
            "CLIPModel state_dict of a ViT CLIP (ResNet CLIPs are not supported)"
        ) from e
    params = {"visual": visual, "text": text}
    abstract = jax.eval_shape(
        CLIP(config).init,
        jax.random.PRNGKey(0),
        jnp.zeros((1, config.image_size, config.image_size, 3)),
        jnp.zeros((1, config.context_length), jnp.int32),
    )["params"]
    expected = {
        jax.tree_util.keystr(k): v.shape
        for k, v in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(abstract))
    }
    got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)}
    if expected != got:
        diff = sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))
        raise ValueError(f"CLIP weights do not match config {config}: differing tensors {diff[:5]}")
    return params


def load_clip(path: str, config: CLIPConfig | str | None = None) -> tuple[CLIPConfig, dict]:
    """Reads CLIP weights from a file or a Hugging Face directory -> (config, params).

    ``config``: a :class:`CLIPConfig`, a name in ``CLIP_CONFIGS`` (``"ViT-B/32"``,
    ``"ViT-L/14"``), or None to infer it (from ``config.json`` in a HF directory, else shapes).
    """
    if os.path.isdir(path):
        files = [
            f
            for f in (
                "model.safetensors",
                "pytorch_model.bin",
                "open_clip_pytorch_model.bin",
                "open_clip_model.safetensors",
            )
            if os.path.exists(os.path.join(path, f))
        ]
        if not files:
            raise FileNotFoundError(
                f"no CLIP weights (model.safetensors / pytorch_model.bin) in {path}"
            )
        sd = load_state_dict(os.path.join(path, files[0]))
        cfg_path = os.path.join(path, "config.json")
        if config is None and os.path.exists(cfg_path) and is_hf_state_dict(sd):
            config = _config_from_hf_json(cfg_path)
    else:
        sd = load_state_dict(path)
    if isinstance(config, str):
        if config not in CLIP_CONFIGS:
            raise ValueError(f"unknown CLIP config {config!r}; choose from {sorted(CLIP_CONFIGS)}")
        config = CLIP_CONFIGS[config]
    if config is None:
        config = config_from_state_dict(sd)
    return config, params_from_state_dict(sd, config)


# Hugging Face config.json keys of the CLIPConfig fields: (sub-config, key) per field, and the
# keys of each tower's transformer in its sub-config ("vision_config" / "text_config").
_HF_KEYS = {
    "embed_dim": (None, "projection_dim"),
    "image_size": ("vision_config", "image_size"),
    "patch_size": ("vision_config", "patch_size"),
    "vocab_size": ("text_config", "vocab_size"),
    "context_length": ("text_config", "max_position_embeddings"),
    "activation": ("text_config", "hidden_act"),
    "layer_norm_eps": ("text_config", "layer_norm_eps"),
}
_HF_TOWER_KEYS = {"width": "hidden_size", "layers": "num_hidden_layers",
                  "heads": "num_attention_heads", "mlp_dim": "intermediate_size"}
_HF_LEGACY_EOS = 2  # transformers: eos id 2 is the legacy config meaning "argmax" pooling


def _config_from_hf_json(path: str) -> CLIPConfig:
    """CLIPConfig of a Hugging Face ``config.json``; a key it lacks keeps CLIPConfig's default
    (ViT-B/32, which is also what transformers assumes)."""
    with open(path) as f:
        cfg = json.load(f)
    kw = {}
    for name, (sub, key) in _HF_KEYS.items():
        section = cfg.get(sub, {}) if sub else cfg
        if key in section:
            kw[name] = section[key]
    for kind in ("vision", "text"):
        section = cfg.get(f"{kind}_config", {})
        kw.update({f"{kind}_{field}": section[key] for field, key in _HF_TOWER_KEYS.items()
                   if key in section})
    eos = cfg.get("text_config", {}).get("eos_token_id", _HF_LEGACY_EOS)
    return CLIPConfig(**kw, eos_token_id=None if eos == _HF_LEGACY_EOS else eos)


# ----------------------------------------------------------------------------- tokenizer


TokenizeFn = Callable[[Sequence[str]], np.ndarray]  # texts -> int32 [B, context_length]


def load_clip_tokenizer(path: str, context_length: int = 77) -> TokenizeFn:
    """CLIP BPE tokenizer from a local directory with ``vocab.json`` + ``merges.txt``.

    Texts longer than the context are truncated (keeping the end-of-text token), as CLIP does.
    """
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    if not all(os.path.exists(os.path.join(directory, f)) for f in ("vocab.json", "merges.txt")):
        raise FileNotFoundError(
            f"no CLIP tokenizer (vocab.json + merges.txt) in {directory!r}; pass --clip_tokenizer "
            "pointing at a Hugging Face CLIP directory"
        )
    # heavy: only the CLIP tokenizer is used, and only when CLIP is scored
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(directory, local_files_only=True)

    def tokenize(texts: Sequence[str]) -> np.ndarray:
        out = tok(list(texts), padding="max_length", truncation=True, max_length=context_length)
        return np.asarray(out["input_ids"], np.int32)

    return tokenize


# ----------------------------------------------------------------------------- scoring


def clip_score_from_embeddings(image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
    """100 * max(cos(image, text), 0) per pair, float [B]."""
    img = image_embeds / jnp.linalg.norm(image_embeds, axis=-1, keepdims=True)
    txt = text_embeds / jnp.linalg.norm(text_embeds, axis=-1, keepdims=True)
    return 100.0 * jnp.maximum(jnp.sum(img * txt, axis=-1), 0.0)


class CLIPScorer:
    """``scorer(images uint8 [N, H, W, 3], prompts) -> float32 [N]`` CLIP scores on a mesh."""

    def __init__(
        self,
        config: CLIPConfig,
        params: Mapping[str, Any],
        tokenize: TokenizeFn,
        *,
        batch_size: int = 64,
        mesh: Mesh | None = None,
    ):
        self.config = config
        self.tokenize = tokenize
        self.mesh = mesh if mesh is not None else partitioning.make_mesh()
        n_shards = int(np.prod([self.mesh.shape[a] for a in partitioning.BATCH_AXES]))
        self.batch_size = -(-batch_size // n_shards) * n_shards
        self.model = CLIP(config)
        self.params = jax.device_put(freeze(params), partitioning.replicated(self.mesh))
        self._img_sharding = partitioning.batch_sharding(self.mesh, 4)
        self._ids_sharding = partitioning.batch_sharding(self.mesh, 2)

        def score(params, images, ids):
            pixels = preprocess_images(images, config.image_size)
            img, txt = self.model.apply({"params": params}, pixels, ids)
            return clip_score_from_embeddings(img, txt)

        self._score = jax.jit(score)

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        images = np.asarray(images)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        ids = self.tokenize(prompts)
        out = []
        for start in range(0, len(images), self.batch_size):
            im, tk = images[start : start + self.batch_size], ids[start : start + self.batch_size]
            n = len(im)
            if n < self.batch_size:
                im = np.concatenate([im, np.zeros((self.batch_size - n, *im.shape[1:]), im.dtype)])
                tk = np.concatenate([tk, np.repeat(tk[-1:], self.batch_size - n, 0)])
            s = self._score(
                self.params,
                jax.device_put(im, self._img_sharding),
                jax.device_put(tk, self._ids_sharding),
            )
            out.append(np.asarray(s)[:n])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)


@gin.configurable
def make_clip_scorer(
    weights_path: str = gin.REQUIRED,
    tokenizer_path: str | None = None,
    config: str | None = None,
    batch_size: int = 64,
    mesh: Mesh | None = None,
) -> CLIPScorer:
    """CLIP scorer from local weights (file or HF dir) and tokenizer dir (default: weights dir)."""
    cfg, params = load_clip(weights_path, config)
    tokenize = load_clip_tokenizer(tokenizer_path or weights_path, cfg.context_length)
    return CLIPScorer(cfg, params, tokenize, batch_size=batch_size, mesh=mesh)
