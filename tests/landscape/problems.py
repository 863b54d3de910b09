"""Problems shared by the landscape tests: a quadratic with a closed form, a plain loss."""
import torch
from torch import nn


def ce(model, batch):  # no model.parameters() call, so it also runs on the oracle's view
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


class Quadratic(nn.Module):
    """L(w) = mean_i (1/2 w'Aw + c_i'w) over the samples c_i of the batch."""

    def __init__(self, A, w):
        super().__init__()
        self.register_buffer("A", A)
        self.w = nn.Parameter(w.clone())

    def forward(self, c):
        return 0.5 * self.w @ self.A @ self.w + c @ self.w


def quad_loss(model, batch):
    return model(batch[0]).mean()


def quadratic_problem(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    A = q @ torch.diag(torch.tensor([3.0, 1.0, 0.5, -0.7, 2.0], dtype=torch.float64)[:n]) @ q.T
    model = Quadratic(A, torch.randn(n, generator=g, dtype=torch.float64))
    c = torch.randn(11, n, generator=g, dtype=torch.float64)
    data = [(c[:4],), (c[4:5],), (c[5:],)]
    d1 = {"w": torch.randn(n, generator=g, dtype=torch.float64)}
    d2 = {"w": torch.randn(n, generator=g, dtype=torch.float64)}
    return model, data, c.mean(0), d1, d2
