"""MABN's float64 reference: ``docs/mabn_spec.md`` written out in numpy, independent of
the layer's implementation. The tests compare MABN with it step by step; the benchmark's
"naive" candidate runs it."""
import numpy as np


class SpecMABN:
    """The spec's pseudo-code, line by line, in numpy float64 with explicit state.

    ``forward(x, w, b)`` is one training forward (advances ``t``, the ring buffers and
    ``running_var``), ``backward(dy)`` the matching training backward (writes
    ``buffer_gz``) returning ``(dx, dw, db)``; ``eval(x, w, b)`` the eval map. Arrays
    are ``(N, C, *)`` of any rank >= 2; ``w``, ``b`` are ``(C,)``.

    ``xp``: the array module, numpy (the tests) or torch (the benchmark's naive
    candidate, on float64 tensors): the same lines run on either.

    Beyond the spec, the package's non-finite guard (AMP overflow): a forward whose
    ``x2`` is not finite leaves ``t``, ``buffer_x2`` and ``running_var`` as they were,
    a backward whose ``gz`` is not finite leaves ``buffer_gz``.
    """

    def __init__(self, c, buffer_size, warmup_iters, renorm_iters, r_max, momentum, eps,
                 xp=np):
        self.B, self.warmup, self.renorm = buffer_size, warmup_iters, renorm_iters
        self.r_max, self.m, self.eps = r_max, momentum, eps
        self.xp = xp
        self.running_var = xp.ones(c, dtype=xp.float64)
        self.t = 0
        self.buffer_x2 = xp.zeros((buffer_size, c), dtype=xp.float64)
        self.buffer_gz = xp.zeros((buffer_size, c), dtype=xp.float64)

    def _per_channel(self, a):  # (N, C, *) -> (C, n)
        return self.xp.moveaxis(a, 1, 0).reshape(a.shape[1], -1)

    def _bc(self, v, like):  # (C,) -> broadcastable against (N, C, *)
        return v.reshape((1, -1) + (1, ) * (like.ndim - 2))

    def forward(self, x, w, b):
        t, B = self.t + 1, self.B
        x2 = (self._per_channel(x)**2).mean(1)
        finite = bool(self.xp.isfinite(x2).all())  # the guard: a non-finite step
        if finite:                                 # writes no state
            self.t = t
            self.buffer_x2[t % B] = x2
        self.step = t
        self.use_batch = (t <= B) or (t < self.warmup)
        s2 = x2 if self.use_batch else self.buffer_x2.mean(0)
        z = x / self._bc(self.xp.sqrt(s2 + self.eps), x)
        r = self.xp.sqrt(s2 + self.eps) / self.xp.sqrt(self.running_var + self.eps)
        if t <= max(self.renorm, self.warmup):
            r = self.xp.ones_like(r)
        else:
            r = self.xp.clip(r, 1 / self.r_max, self.r_max)
        y = self._bc(w, x) * (self._bc(r, x) * z) + self._bc(b, x)
        if finite:
            self.running_var = (1 - self.m) * self.running_var + self.m * s2
        self.saved = (z, r, s2, w)
        return y

    def backward(self, dy):
        z, r, s2, w = self.saved
        g = dy * self._bc(w, dy) * self._bc(r, dy)
        gz = self._per_channel(g * z).mean(1)
        if self.xp.isfinite(gz).all():
            self.buffer_gz[self.step % self.B] = gz
        mgz = gz if self.use_batch else self.buffer_gz.mean(0)
        dx = (g - z * self._bc(mgz, z)) / self._bc(self.xp.sqrt(s2 + self.eps), z)
        dw = self._per_channel(dy * self._bc(r, dy) * z).sum(1)
        db = self._per_channel(dy).sum(1)
        return dx, dw, db

    def eval(self, x, w, b):
        return (self._bc(w, x) * x / self._bc(self.xp.sqrt(self.running_var + self.eps), x) +
                self._bc(b, x))
