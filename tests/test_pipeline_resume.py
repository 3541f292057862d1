"""Must show 3: take 7 batches, save the iterator state, restore it in a NEW process, take 3
more; they equal batches 8-10 of an uninterrupted run.

The child process imports only tests.support (light: no pytest, torch or TensorFlow).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

from imagen_jax.data import pipeline
from tests.support import REPO, resume_iterator

_CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from imagen_jax.data import pipeline
    from tests.support import resume_iterator

    if __name__ == "__main__":
        data_dir, state_path, out_path = sys.argv[1:]
        it = pipeline.restore_state(resume_iterator(data_dir), state_path)
        batches = pipeline.iterate(it, 3)
        it.close()
        np.savez(out_path, **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})
    """
)


def test_resume_in_new_process_matches_uninterrupted(pipeline_data_dir, tmp_path):
    it = resume_iterator(pipeline_data_dir)
    pipeline.iterate(it, 7)
    state_path = str(tmp_path / "iterator_state.json")
    pipeline.save_state(it, state_path)
    uninterrupted = pipeline.iterate(it, 3)  # batches 8-10 of the run that never stopped
    it.close()
    with open(state_path) as f:
        assert json.load(f)["pipeline"]  # plain JSON, as grain's orbax handler writes it
    out = str(tmp_path / "resumed.npz")
    child = tmp_path / "resume_child.py"
    child.write_text(_CHILD)
    subprocess.run([sys.executable, str(child), pipeline_data_dir, state_path, out],
                   cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), check=True, timeout=300)
    resumed = np.load(out)
    assert len(resumed.files) == 3 * len(uninterrupted[0])
    for i, batch in enumerate(uninterrupted):
        for key, value in batch.items():
            np.testing.assert_array_equal(resumed[f"{i}/{key}"], value,
                                          err_msg=f"batch {8 + i}, {key!r}")
