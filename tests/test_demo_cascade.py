"""The pretrained demo cascade shipped in `launch/demo_cascade/` (what `make demo` samples first):
it must load through `load_cascade` (a renamed parameter or a changed stage record breaks it) and
its base must still follow heldout prompts (a change to the sampler, the guidance or the text
path that the weights no longer fit shows here)."""

from __future__ import annotations

import json
import os

from imagen_jax import cascade as cascade_lib
from imagen_jax.data import shapes
from imagen_jax.eval import shapes_score
from launch import demo

NUM_PROMPTS = 32
# Well under the base's measured heldout exact match on these 32 prompts (bench/RESULTS.md,
# "Pretrained demo cascade") and far above what an untrained or text-blind base scores (0%).
EXACT_FLOOR = 0.5


def test_the_shipped_demo_cascade_loads_and_its_base_follows_heldout_prompts():
    provenance = json.loads(open(os.path.join(demo.PRETRAINED_DIR, "PROVENANCE.json")).read())
    assert set(provenance["steps"]) == set(demo.STAGES)
    dirs = demo.pretrained_stage_dirs(demo.PRETRAINED_DIR)
    cascade = cascade_lib.load_cascade(dirs, os.path.join(demo.PRETRAINED_DIR, "t5"))
    assert [s.resolution for s in cascade.stages] == [32, 128, 512]
    prompts = shapes.heldout_prompts(NUM_PROMPTS, demo.PRETRAINED_PRESET)
    images = cascade.sample(prompts, 0, stop=1, progress=False).images[0]
    scores = shapes_score.score(images, prompts, shapes_score.scorer_config(demo.PRETRAINED_PRESET))
    print({k: scores[k] for k in ("exact_match", "colour", "shape", "size", "position")})
    assert scores["exact_match"] >= EXACT_FLOOR, scores
