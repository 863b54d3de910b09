"""The solvers' bars count what bounds the work: Lanczos's total is the products predicted to
convergence (not its budget), the trace bar moves during each pass over the data."""
import math

import pytest
import torch
from torch import nn

import analysis
import analysis.core.progress as progress
from analysis import supervised
from analysis.core.progress import ConvergenceBar, batch_done, batch_progress, gap
from tests.oracles import classification_data, mlp, uneven_batches

CE = supervised(nn.CrossEntropyLoss())


class Recorder:
    """A tqdm stand-in recording ``(n, total)`` at every change."""

    made: list["Recorder"] = []

    def __init__(self, *args, total=None, desc="", disable=False, **kwargs):
        self.n, self.total, self.desc, self.log = 0, total, desc, []
        Recorder.made.append(self)

    def update(self, k=1):
        self.n += k
        self.log.append((self.n, self.total))

    def refresh(self):
        self.log.append((self.n, self.total))

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *args):
        self.close()


@pytest.fixture
def recorded(monkeypatch):
    Recorder.made = []
    monkeypatch.setattr(progress, "tqdm", Recorder)
    monkeypatch.setattr(analysis.trace, "tqdm", Recorder)
    return Recorder.made


def test_the_total_is_the_extrapolated_convergence_within_the_budget():
    bar = ConvergenceBar(300, "test", bar=Recorder())
    bar.update(1, 14.0)
    bar.update(2, 10.0)
    assert bar.bar.total is None          # the start vector's drop says nothing about the rate
    for products, g in [(3, 9.0), (4, 8.0), (5, 7.0)]:
        bar.update(products, g)
    assert bar.bar.total == 12                       # 7 more at one per product
    bar.update(6, 7.5)                                # a rise: the mean slope since the second
    assert bar.bar.total == 6 + math.ceil(7.5 * 4 / 2.5)
    bar.update(7, -0.1)
    assert bar.bar.total == 7                        # converged
    flat = ConvergenceBar(300, "test", bar=Recorder())
    for products in range(1, 6):
        flat.update(products, 3.0)
    assert flat.bar.total is None
    slow = ConvergenceBar(50, "test", bar=Recorder())
    for products, g in [(1, 10.0), (2, 9.99), (3, 9.98), (4, 9.97)]:
        slow.update(products, g)
    assert slow.bar.total == 50                      # never past the budget
    assert gap(torch.tensor([1e-3, 4e-3]), torch.tensor([1e-3, 1e-3])) == pytest.approx(
        math.log(4))


@pytest.mark.parametrize("after", [0, 10])
def test_a_geometric_residual_decay_is_predicted_exactly(after):
    """Residuals r_j = r_0 q^j after a start vector that drops fast: the predicted total is
    the product where r_j meets its bound, plus the products spent after convergence (the
    search for more copies), from the third product to the end of that search."""
    r0, q, bound = 1.0, 0.5, 1e-6
    meets = math.ceil(math.log(r0 / bound) / -math.log(q))     # 20: r_20 <= 1e-6
    bar = ConvergenceBar(300, "test", bar=Recorder(), after=after)
    bar.update(1, math.log(1e3 * r0 / bound))                    # the start vector
    totals = []
    for j in range(2, meets + 1):
        bar.update(j, math.log(r0 * q ** j / bound))
        totals.append(bar.bar.total)
    assert totals[0] is None and set(totals[1:]) == {meets + after}
    for j in range(meets + 1, meets + after + 1):                # the search: the gap is met
        bar.update(j, -1.0)
        assert bar.bar.total == meets + after
    bar.settled = meets + after                                  # a copy found: another search
    bar.update(meets + after + 1, -1.0)
    assert bar.bar.total == 2 * (meets + after) - meets if after else meets + 1


def test_lanczos_bar_ends_at_the_products_spent_not_the_budget(recorded):
    x, y = classification_data(n=40, d=6)
    model, data = mlp((6, 8, 3)), uneven_batches(x, y, sizes=(10, 10, 20))
    result = analysis.top_eigenvalues(model, CE, data, k=2, check_deterministic=False)
    (bar,) = [b for b in recorded if b.desc == "lanczos"]
    totals = [t for _, t in bar.log if t is not None]
    assert result.n_hvp < 300 and totals and totals[-1] == result.n_hvp
    late = [t for n, t in bar.log if t is not None and n >= result.n_hvp / 2]
    assert all(t <= 2 * result.n_hvp for t in late), late   # the old bar: 300 throughout


def test_trace_bar_moves_during_a_pass(recorded):
    x, y = classification_data(n=40, d=6)
    model, data = mlp((6, 8, 3)), uneven_batches(x, y, sizes=(10, 10, 10, 10))
    analysis.hessian_trace(model, CE, data, n_hvp=8, chunk=8, check_deterministic=False,
                           method="hutchinson")
    (bar,) = [b for b in recorded if b.desc == "hutchinson"]
    assert bar.total == 8 and bar.n == pytest.approx(8)
    assert [n for n, _ in bar.log][:4] == pytest.approx([2, 4, 6, 8])   # one step per batch


def test_batch_progress_reaches_the_innermost_block():
    seen = []
    batch_done(0.5)                                  # no block: nothing happens
    with batch_progress(lambda f: seen.append(("outer", f))):
        with batch_progress(lambda f: seen.append(("inner", f))):
            batch_done(0.25)
        batch_done(0.5)
    assert seen == [("inner", 0.25), ("outer", 0.5)]
