"""The one uint8 <-> [-1, 1] pixel conversion (imagen_jax.data.images) that the pipeline, the
cascade and the sample grids share."""

import numpy as np

from imagen_jax.data.images import uint8_to_unit, unit_to_uint8


def test_every_uint8_value_round_trips_and_lands_on_the_unit_interval():
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    unit = uint8_to_unit(pixels)
    assert unit.dtype == np.float32 and unit.min() == -1.0 and unit.max() == 1.0
    np.testing.assert_array_equal(unit_to_uint8(unit), pixels)


def test_out_of_range_values_clip_and_round_to_nearest():
    x = np.array([-3.0, -1.0, 0.0, 1.0, 7.0, 2 / 255 - 1 + 0.4 / 127.5], np.float32)
    np.testing.assert_array_equal(unit_to_uint8(x), [0, 0, 128, 255, 255, 1])
