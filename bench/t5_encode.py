"""Tokens/s of our jitted T5 encoder vs transformers.T5EncoderModel (PyTorch) on CPU.

Both encode the same padded batch with the same random T5-base-sized v1.1 weights (written once
in Hugging Face format and read by both libraries), float32, in one process. Prints the ratio.

    .venv/bin/python -m bench.t5_encode [--batch_size=8] [--length=128] [--size=base]
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402

from bench.timing import median_time  # noqa: E402

flags.DEFINE_integer("batch_size", 8, "prompts per batch")
flags.DEFINE_integer("length", 128, "max_length (tokens per prompt, EOS included)")
flags.DEFINE_string("size", "base", "T5 preset size (small/base/large...)")
flags.DEFINE_string("variant", "v1_1", "v1_0 (ReLU) or v1_1 (gated GELU)")
flags.DEFINE_integer("iters", 5, "timed iterations per implementation (median reported)")
F = flags.FLAGS


def main(argv):
    del argv
    import jax
    import numpy as np
    import torch
    from transformers import T5EncoderModel

    from imagen_jax.text import load_t5
    from imagen_jax.text.testing import drawbench_prompts, write_random_t5

    prompts = drawbench_prompts()
    batch = [" ".join(prompts[i: i + 1 + 3 * i]) for i in range(F.batch_size)]  # mixed lengths
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_t5(tmp, texts=prompts, size=F.size, variant=F.variant,
                               vocab_size=32128)
        enc = load_t5(path, max_length=F.length)
        ref = T5EncoderModel.from_pretrained(path).eval()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # long prompts truncate on purpose
        ids, mask = enc.tokenize(batch)
    n_tokens = ids.size  # both implementations compute every (padded) position

    def ours():
        enc.encode(ids, mask).block_until_ready()

    ids_t = torch.from_numpy(ids.astype(np.int64))
    mask_t = torch.from_numpy(mask.astype(np.int64))

    def theirs():
        with torch.inference_mode():
            ref(input_ids=ids_t, attention_mask=mask_t)

    t_ours = median_time(ours, F.iters)
    t_ref = median_time(theirs, F.iters)
    with torch.inference_mode():
        ref_out = ref(input_ids=ids_t, attention_mask=mask_t).last_hidden_state.numpy()
    err = np.abs(np.asarray(enc.encode(ids, mask)) - ref_out)[mask].max()
    print(f"T5 {F.variant} {F.size} encoder, float32, batch {F.batch_size} x {F.length} tokens, "
          f"{jax.devices()[0].platform} ({os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()})")
    print(f"  imagen_jax (jit): {n_tokens / t_ours:10.1f} tokens/s  ({t_ours * 1e3:.1f} ms)")
    print(f"  transformers    : {n_tokens / t_ref:10.1f} tokens/s  ({t_ref * 1e3:.1f} ms)")
    print(f"  ratio (ours / transformers): {t_ref / t_ours:.2f}x   max|diff| {err:.1e}")


if __name__ == "__main__":
    app.run(main)
