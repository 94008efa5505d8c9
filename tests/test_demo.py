"""The demo runs end to end (in-process, to reuse the JAX runtime) and its data set is reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from numpyro_pavi.examples import demo


@pytest.mark.slow
def test_demo_quick_writes_plot_and_table(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert demo.main(["--quick", "--out", str(out), "--seed", "1"]) == 0
    assert out.exists() and out.stat().st_size > 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    table = printed[printed.index("ELBO (") :]
    assert "AutoPAVI" in table and "AutoNormal" in table and "exact" in table


def test_packaged_dataset_matches_generator(tmp_path):
    x = demo.load_dataset()
    assert x.shape == (demo.NUM_SUBJECTS, demo.NUM_TRIALS, len(demo.OUTCOMES))
    # The committed CSV is what make_dataset draws (values are stored with 4 decimals).
    np.testing.assert_allclose(x, demo.make_dataset(), atol=1e-4)
    path = tmp_path / "again.csv"
    demo.write_dataset(path)
    np.testing.assert_array_equal(demo.load_dataset(path), x)
    assert "SYNTHETIC" in path.read_text().splitlines()[0]
