"""Problems and checks shared by several analysis test modules."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from analysis import supervised
from tests.oracles import assert_unchanged, classification_data, cnn_bn, snapshot, uneven_batches

CE = supervised(nn.CrossEntropyLoss())
LOSS = CE
DATA = [(torch.zeros(1), torch.zeros(1))]  # the quadratic's loss ignores the batch
QUIET = dict(progress=False)


# ----------------------------------------------------------------------------- quadratics
class Quadratic(nn.Module):
    """``L(w) = 1/2 (w - w*)' A (w - w*) + c`` over one parameter of any shape
    (a 1-D ``A`` is the diagonal of a diagonal Hessian)."""

    def __init__(self, A, w_star, w=None, c=0.0):
        super().__init__()
        self.A, self.w_star, self.c = A, w_star, c
        self.w = nn.Parameter((w_star if w is None else w).clone())

    def loss(self):
        d = (self.w - self.w_star).reshape(-1)
        curvature = self.A * d if self.A.dim() == 1 else self.A @ d
        return 0.5 * d @ curvature + self.c


def quad_loss(model, batch):
    return model.loss()


def w_star(shape, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64) + 0.5


def check_restored_on_failure(run, failure, after=7):
    """``run(model, loss_fn, data)`` with a loss that turns NaN or raises after ``after`` calls
    must raise and leave the model (a CNN with BatchNorm) exactly as it was."""
    x, y = classification_data(n=23, d=12)
    model = cnn_bn()
    snap = snapshot(model)
    calls = [0]

    def flaky(model, batch):
        calls[0] += 1
        loss = CE(model, batch)
        if calls[0] > after and failure == "raise":
            raise RuntimeError("boom")
        return loss * float("nan") if calls[0] > after else loss

    error, match = (RuntimeError, "boom") if failure == "raise" else (ValueError, "non-finite")
    with pytest.raises(error, match=match):
        run(model, flaky, uneven_batches(x, y))
    assert_unchanged(model, snap)


# ----------------------------------------------------------------------------- eigenpairs
def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def expected(H, k, which):
    ev = torch.linalg.eigvalsh(H).numpy()
    if which == "LA":
        return ev[::-1][:k]
    if which == "SA":
        return ev[:k]
    return ev[np.argsort(-np.abs(ev))][:k]


def check_pairs(result, H, tol):
    """Eigenvectors: unit, Rayleigh quotients equal the eigenvalues, true residuals small."""
    U = result.eigenvectors
    lam = torch.as_tensor(result.eigenvalues)
    torch.testing.assert_close(torch.linalg.vector_norm(U, dim=1), torch.ones(len(U)).double())
    torch.testing.assert_close(torch.einsum("kn,nm,km->k", U, H, U), lam, rtol=1e-10, atol=1e-12)
    true = torch.linalg.vector_norm(U @ H - lam[:, None] * U, dim=1)
    assert (true <= tol * lam.abs() * 1.01 + 1e-12).all()
    np.testing.assert_allclose(result.residuals, true.numpy(), rtol=1e-3, atol=1e-12)


# ----------------------------------------------------------------------------- training
def closure_for(model, opt, batch):
    def closure():
        opt.zero_grad()
        loss = LOSS(model, batch)
        loss.backward()
        return loss
    return closure
