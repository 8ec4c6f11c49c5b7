"""Random translations of fine-tuning images (no MPI).

`[finetune] shift_pixels = s`: each image of a fine-tuning minibatch moves by
its own (dy, dx), uniform in [-s, s]^2, with zeros shifted in.  A translated
digit is still the same digit, so the network sees more of the input
distribution than the 60,000 fixed images.  That is the cheapest of the
distortions of Simard et al. 2003, who report it worth ~0.5 points of error
on MNIST for an MLP.  Pretraining is unchanged: the RBMs model the images as
they are.

    out[b, i, j] = img[b, i - dy_b, j - dx_b]   (0 outside the image)

One gather from a zero-padded copy of the batch: `pad` holds each image at
offset (s, s), and row i of image b is read from padded row i + s - dy_b.
The buffers are made once per batch shape and reused.
"""

from __future__ import annotations

import numpy as np


class Shifter:
    def __init__(self, batch: int, side: int, shift: int):
        self.side, self.shift = side, shift
        w = side + 2 * shift
        self.pad = np.zeros((batch, w, w), dtype=np.float32)
        self._base = np.arange(side)
        self._b = np.arange(batch)[:, None, None]

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> None:
        """Translate each row of `x` (batch, side * side), in place."""
        B, s, n = len(x), self.shift, self.side
        self.pad[:B, s : s + n, s : s + n] = x.reshape(B, n, n)
        dy, dx = rng.integers(-s, s + 1, size=(2, B))
        rows = self._base[None, :] + (s - dy)[:, None]  # (B, n)
        cols = self._base[None, :] + (s - dx)[:, None]
        x.reshape(B, n, n)[...] = self.pad[self._b[:B], rows[:, :, None], cols[:, None, :]]
