"""The compiled cascade sampler: text -> base image -> super-resolved images in ONE jitted program.

Imagen (Saharia et al. 2022, Section 2 and Appendix F) chains a 64x64 text-conditional base model
with two text-conditional super-resolution models (64->256, 256->1024). Here the whole chain --
optional T5 encoding, the base stage's sampling loop, then for every SR stage the noise
augmentation of the previous stage's output at the stage's ``aug_level`` and its own sampling loop
-- is traced into a single XLA program: no host round-trips between stages, one loop per stage
(``imagen_jax.diffusion.sample``), the step count only a loop bound (programs for 10 and 50 steps
have the same size).

Any contiguous slice of the cascade runs the same way: ``start=0, stop=1`` is the base stage only;
``start=1`` upsamples a user's own low-resolution images.

The batch is split over the mesh's data axes (``partitioning.BATCH_AXES``); parameters use the
same logical-axis rules the trainer shards them with, so a cascade restored onto any mesh samples
without gathering weights on one device.

Reproducibility: the same prompts, seed, cascade and settings give bitwise the same images on the
same backend (all randomness comes from ``jax.random.fold_in(PRNGKey(seed), stage_index)``).


Layout: `program` (the pure per-stage program), `runtime` (`Cascade`: sharding, chunking,
compiled programs), `loading` (checkpoints -> stages), `export` (small shippable stages),
`params`, `progress`.
"""

from imagen_jax.cascade.export import (
    export_stage,
    is_exported_stage,
    load_exported_stage,
    read_export_record,
)
from imagen_jax.cascade.loading import (
    IF_PREFIX,
    SAMPLING_FIELDS,
    gin_sampling_overrides,
    load_cascade,
    load_if_stage,
    load_stage,
)
from imagen_jax.cascade.params import init_params, param_shardings, random_params
from imagen_jax.cascade.program import check_chain, sample_cascade
from imagen_jax.cascade.runtime import Cascade, CascadeOutput, from_uint8, to_uint8
from imagen_jax.diffusion import SamplingConfig
from imagen_jax.errors import CascadeError
from imagen_jax.stage import Stage, abstract_params, sample_stage

__all__ = [
    "IF_PREFIX",
    "SAMPLING_FIELDS",
    "Cascade",
    "CascadeError",
    "CascadeOutput",
    "SamplingConfig",
    "Stage",
    "abstract_params",
    "check_chain",
    "export_stage",
    "from_uint8",
    "gin_sampling_overrides",
    "init_params",
    "is_exported_stage",
    "load_cascade",
    "load_exported_stage",
    "load_if_stage",
    "load_stage",
    "param_shardings",
    "random_params",
    "read_export_record",
    "sample_cascade",
    "sample_stage",
    "to_uint8",
]
