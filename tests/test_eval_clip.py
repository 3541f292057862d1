"""CLIP towers: parity with a tiny random transformers.CLIPModel in both weight layouts."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.convert_slow_tokenizer import bytes_to_unicode

from imagen_jax.eval import clip
from imagen_jax.eval.weights import load_state_dict

VOCAB = 514  # 256 byte symbols, 256 end-of-word variants, start/end of text


def write_tiny_tokenizer(directory) -> None:
    """A character-level CLIP BPE vocabulary (no merges): every byte is a token."""
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=VOCAB - 2,
            eos_token_id=VOCAB - 1,
            pad_token_id=VOCAB - 1,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        projection_dim=24,
    )
    model = transformers.CLIPModel(cfg).eval()
    # Random init leaves LayerNorms at identity and biases at 0: perturb every tensor so the
    # conversion of each one is exercised.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _hf_features(model, pixels_nchw, ids):
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels_nchw)
        txt = model.get_text_features(input_ids=ids)
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    return img.numpy(), txt.numpy()


def _inputs(seed=0, batch=3, length=16):
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn((batch, 3, 32, 32), generator=gen)
    ids = torch.randint(0, VOCAB - 2, (batch, length), generator=gen)
    ids[:, 0] = VOCAB - 2
    for i, eos_at in enumerate([5, 15, 9][:batch]):
        ids[i, eos_at] = VOCAB - 1
        ids[i, eos_at + 1 :] = VOCAB - 1  # padded with eos like the HF tokenizer config above
    return pixels, ids


def _ours(config, params, pixels_nchw, ids):
    model = clip.CLIP(config)
    pixels = jnp.asarray(pixels_nchw.permute(0, 2, 3, 1).numpy())
    img, txt = jax.jit(model.apply)({"params": params}, pixels, jnp.asarray(ids.numpy()))
    return np.asarray(img), np.asarray(txt)


def test_hf_layout_parity(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    config, params = clip.load_clip(str(tmp_path))
    assert config.eos_token_id == VOCAB - 1 and config.text_heads == 4
    pixels, ids = _inputs()
    exp_img, exp_txt = _hf_features(hf_model, pixels, ids)
    img, txt = _ours(config, params, pixels, ids)
    assert np.abs(exp_img).mean() > 0.05 and np.abs(exp_txt).mean() > 0.05
    np.testing.assert_allclose(img, exp_img, atol=1e-4, rtol=0)
    np.testing.assert_allclose(txt, exp_txt, atol=1e-4, rtol=0)


def to_openai_layout(hf_sd):
    """Transcribes HF CLIP tensor names into the OpenAI/open_clip state_dict layout."""
    sd = {k: v.numpy() for k, v in hf_sd.items()}
    out = {}

    def blocks(src, dst):
        i = 0
        while f"{src}.encoder.layers.{i}.layer_norm1.weight" in sd:
            s, d = f"{src}.encoder.layers.{i}", f"{dst}.resblocks.{i}"
            out[f"{d}.attn.in_proj_weight"] = np.concatenate(
                [sd[f"{s}.self_attn.{n}_proj.weight"] for n in "qkv"]
            )
            out[f"{d}.attn.in_proj_bias"] = np.concatenate(
                [sd[f"{s}.self_attn.{n}_proj.bias"] for n in "qkv"]
            )
            for a, b in [
                ("self_attn.out_proj", "attn.out_proj"),
                ("layer_norm1", "ln_1"),
                ("layer_norm2", "ln_2"),
                ("mlp.fc1", "mlp.c_fc"),
                ("mlp.fc2", "mlp.c_proj"),
            ]:
                for leaf in ("weight", "bias"):
                    out[f"{d}.{b}.{leaf}"] = sd[f"{s}.{a}.{leaf}"]
            i += 1

    blocks("vision_model", "visual.transformer")
    blocks("text_model", "transformer")
    v, t = "vision_model", "text_model"
    out["visual.conv1.weight"] = sd[f"{v}.embeddings.patch_embedding.weight"]
    out["visual.class_embedding"] = sd[f"{v}.embeddings.class_embedding"]
    out["visual.positional_embedding"] = sd[f"{v}.embeddings.position_embedding.weight"]
    for a, b in [
        (f"{v}.pre_layrnorm", "visual.ln_pre"),
        (f"{v}.post_layernorm", "visual.ln_post"),
        (f"{t}.final_layer_norm", "ln_final"),
    ]:
        out[f"{b}.weight"], out[f"{b}.bias"] = sd[f"{a}.weight"], sd[f"{a}.bias"]
    out["visual.proj"] = sd["visual_projection.weight"].T
    out["token_embedding.weight"] = sd[f"{t}.embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd[f"{t}.embeddings.position_embedding.weight"]
    out["text_projection"] = sd["text_projection.weight"].T
    out["logit_scale"] = sd["logit_scale"]
    return out


def test_openai_layout_parity(hf_model, tmp_path):
    path = str(tmp_path / "open_clip_tiny.pth")
    torch.save(
        {k: torch.from_numpy(v) for k, v in to_openai_layout(hf_model.state_dict()).items()}, path
    )
    # Head counts cannot be read from tensor shapes; the rest of the config is inferred.
    config = clip.config_from_state_dict(load_state_dict(path), vision_heads=4, text_heads=4)
    assert (
        config.vision_width,
        config.vision_layers,
        config.patch_size,
        config.image_size,
        config.embed_dim,
        config.context_length,
    ) == (48, 2, 8, 32, 24, 16)
    config, params = clip.load_clip(path, config)
    pixels, ids = _inputs(seed=1)
    exp_img, exp_txt = _hf_features(hf_model, pixels, ids)
    img, txt = _ours(config, params, pixels, ids)  # argmax pooling (OpenAI rule)
    np.testing.assert_allclose(img, exp_img, atol=1e-4, rtol=0)
    np.testing.assert_allclose(txt, exp_txt, atol=1e-4, rtol=0)


def test_clip_scorer_matches_reference_formula(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    write_tiny_tokenizer(tmp_path)
    scorer = clip.make_clip_scorer(weights_path=str(tmp_path), batch_size=8)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    prompts = ["a red cube", "two dogs", "x", "a very long prompt that will be cut", "blue"]
    got = scorer(images, prompts)

    tok = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    ids = torch.tensor(
        tok(prompts, padding="max_length", truncation=True, max_length=16)["input_ids"]
    )
    pixels = (
        torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        - torch.tensor(clip.CLIP_MEAN)[:, None, None]
    ) / torch.tensor(clip.CLIP_STD)[:, None, None]
    img, txt = _hf_features(hf_model, pixels, ids)
    cos = (img * txt).sum(-1) / np.linalg.norm(img, axis=-1) / np.linalg.norm(txt, axis=-1)
    np.testing.assert_allclose(got, 100 * np.maximum(cos, 0), atol=1e-3)
    assert (got >= 0).all() and (got <= 100).all()
    with pytest.raises(ValueError, match="5 images but 1 prompts"):
        scorer(images, prompts[:1])


@pytest.mark.parametrize("name,expected", [("ViT-B/32", 151_277_312), ("ViT-L/14", 427_616_512)])
def test_published_configs_have_published_sizes(name, expected):
    """Parameter counts of OpenAI's released models (without the logit scale)."""
    cfg = clip.CLIP_CONFIGS[name]
    shapes = jax.eval_shape(
        clip.CLIP(cfg).init,
        jax.random.PRNGKey(0),
        jnp.zeros((1, cfg.image_size, cfg.image_size, 3)),
        jnp.zeros((1, 77), jnp.int32),
    )
    assert sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)) == expected


def test_bad_weights_error(tmp_path):
    path = str(tmp_path / "bad.npz")
    np.savez(path, **{"visual.conv1.weight": np.zeros((8, 3, 4, 4), np.float32)})
    with pytest.raises(ValueError, match="CLIP weights lack tensor 'visual.class_embedding'"):
        clip.load_clip(path, "ViT-B/32")
