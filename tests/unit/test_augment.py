"""`[finetune] shift_pixels`: random translations of fine-tuning images, in-process."""

from __future__ import annotations

import numpy as np
import pytest

from dbnps.common.augment import Shifter
from dbnps.common.config import from_dict
from dbnps.common.errors import ConfigError


def test_each_image_moves_by_its_own_draw_with_zeros_shifted_in():
    side, s, B = 6, 2, 50
    x = np.zeros((B, side * side), np.float32)
    x.reshape(B, side, side)[:, 2, 3] = 1.0  # one lit pixel per image, at (2, 3)
    x.reshape(B, side, side)[:, 0, 0] = 0.5  # and one in the corner
    Shifter(B, side, s)(x, np.random.default_rng(7))
    dy, dx = np.random.default_rng(7).integers(-s, s + 1, size=(2, B))  # the same draws
    img = x.reshape(B, side, side)
    for b in range(B):
        assert img[b, 2 + dy[b], 3 + dx[b]] == 1.0
        corner_in = dy[b] >= 0 and dx[b] >= 0
        expected = 1.5 if corner_in else 1.0  # a pixel shifted off the image is gone
        assert img[b].sum() == pytest.approx(expected)
    assert len({(a, c) for a, c in zip(dy, dx, strict=True)}) > 10  # not one shift for all


def test_a_shorter_last_batch_and_reuse_of_the_buffers():
    sh = Shifter(8, 4, 1)
    rng = np.random.default_rng(0)
    for n in (8, 3, 8):
        x = np.ones((n, 16), np.float32)
        sh(x, rng)
        # a 1-pixel shift of an all-ones image keeps at least 3 x 3 of its 4 x 4 ones
        assert (x.reshape(n, 4, 4).sum(axis=(1, 2)) >= 9).all()


@pytest.mark.parametrize("shift", [28, -1])
def test_bad_shift_settings_are_refused(shift):
    with pytest.raises(ConfigError, match="shift_pixels"):
        from_dict({"finetune": {"shift_pixels": shift}})


def test_fine_tuning_steps_see_shifted_images_and_leave_the_data_alone():
    """StepGradient with shift_pixels: the batch it trains on is a translation of the
    data rows it drew (same pixel mass for digits away from the border); X is unchanged."""
    from dbnps.common.dbn import init_params
    from dbnps.common.layout import Layout
    from dbnps.common.steps import StepGradient

    rng = np.random.default_rng(0)
    X = np.zeros((40, 784), np.float32)
    X.reshape(40, 28, 28)[:, 10:18, 10:18] = rng.random((40, 8, 8), dtype=np.float32)
    y = rng.integers(0, 10, 40)
    cfg = from_dict({"model": {"sizes": [784, 16]}, "finetune": {"shift_pixels": 1}})
    layout = Layout([784, 16])
    p, g = init_params(layout, rng, X), layout.zeros()
    sg = StepGradient(layout, cfg, X, y, np.random.default_rng(1))
    sg.begin_phase(layout.finetune_phase, p)
    X0 = X.copy()
    moved = 0
    for _ in range(sg.steps_per_pass()):
        sg.step(p, g, epoch=0.0)
        assert np.isfinite(g.flat).all()
        batch = sg._ws.x.reshape(-1, 28, 28)
        drawn = X[sg._perm[sg._pos - sg.batch : sg._pos]].reshape(-1, 28, 28)
        np.testing.assert_allclose(batch.sum(axis=(1, 2)), drawn.sum(axis=(1, 2)), rtol=1e-5)
        moved += int((batch != drawn).any(axis=(1, 2)).sum())
    np.testing.assert_array_equal(X, X0)
    assert moved > 20  # 8 of 9 shifts move the image
