"""The optimizers' calling conventions: keyword-only ``model=`` (positional deprecated), one
exception style for hyperparameters (ArgumentTypeError for the wrong kind, ValueError for the
range, "NAME must be <accepted range>, got VALUE")."""
import inspect
import re
import warnings

import pytest
import torch

import optim
from optim import _validation
from tests.oracles import mlp

SAM_FAMILY = {
    # name -> (factory(params, *positional, **kw), positional arguments before model)
    "SAM": (lambda ps, *a, **kw: optim.SAM(torch.optim.SGD(ps, lr=0.1), *a, **kw), (0.05, False)),
    "WSAM": (lambda ps, *a, **kw: optim.WSAM(torch.optim.SGD(ps, lr=0.1), *a, **kw),
             (0.05, 0.9, False, True, None)),
    "AdaSAM": (lambda ps, *a, **kw: optim.AdaSAM(ps, *a, **kw), (1e-3, (0.9, 0.999), 0.05, 1e-8)),
    "SALA": (lambda ps, *a, **kw: optim.SALA(torch.optim.SGD(ps, lr=0.1), *a, **kw),
             (5, 0.8, 0.05)),
}


@pytest.mark.parametrize("name", SAM_FAMILY)
def test_model_is_keyword_only_and_positional_model_is_deprecated(name):
    make, before = SAM_FAMILY[name]
    cls = getattr(optim, name)
    assert inspect.signature(cls).parameters["model"].kind is inspect.Parameter.KEYWORD_ONLY
    model = mlp(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert make(model.parameters(), model=model).model is model
    with pytest.warns(DeprecationWarning, match="model="):
        opt = make(model.parameters(), *before, model)
    assert opt.model is model
    with pytest.raises(TypeError, match="multiple values"):
        make(model.parameters(), *before, model, model=model)
    with pytest.raises(TypeError, match="positional"):
        make(model.parameters(), *before, model, model)


def test_exception_class_matches_analysis_and_keeps_its_old_name():
    assert _validation.ArgumentTypeError.__name__ == "ArgumentTypeError"
    assert _validation.HyperparameterTypeError is _validation.ArgumentTypeError
    assert issubclass(_validation.ArgumentTypeError, TypeError)
    assert issubclass(_validation.ArgumentTypeError, ValueError)


FORMAT = re.compile(r"^(\S+) must be .+, got .+$")

BAD = [  # (factory, kind of error)
    (lambda ps: optim.AGD(ps, lr=-1.0), ValueError),
    (lambda ps: optim.AGD(ps, delta="x"), TypeError),
    (lambda ps: optim.AGD(ps, betas=(0.9,)), TypeError),
    (lambda ps: optim.AGD(ps, betas=(0.9, 1.0)), ValueError),
    (lambda ps: optim.AGD(ps, clip=0.0), ValueError),
    (lambda ps: optim.NDAdam(ps, eps=-1.0), ValueError),
    (lambda ps: optim.NDAdam([{"params": ps, "nd": "yes"}]), TypeError),
    (lambda ps: optim.NDAdam([{"params": [torch.zeros(3, requires_grad=True)], "nd": True}]),
     ValueError),
    (lambda ps: optim.AdaSAM(ps, eps=0.0), ValueError),
    (lambda ps: optim.AdaSAM(ps, rho=float("nan")), ValueError),
    (lambda ps: optim.SAM(torch.optim.SGD(ps, lr=0.1), rho=-0.1), ValueError),
    (lambda ps: optim.SAM(ps), TypeError),
    (lambda ps: optim.SAM(torch.optim.SGD(ps, lr=0.1), model="net"), TypeError),
    (lambda ps: optim.WSAM(torch.optim.SGD(ps, lr=0.1), gamma=1.0), ValueError),
    (lambda ps: optim.WSAM(torch.optim.SGD(ps, lr=0.1), max_norm=-1), ValueError),
    (lambda ps: optim.Lookahead(torch.optim.SGD(ps, lr=0.1), alpha=0.0), ValueError),
    (lambda ps: optim.Lookahead(torch.optim.SGD(ps, lr=0.1), k=0), ValueError),
    (lambda ps: optim.SALA(torch.optim.SGD(ps, lr=0.1), k=1), ValueError),
    (lambda ps: optim.SALA(torch.optim.SGD(ps, lr=0.1), k=2.0), TypeError),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_every_hyperparameter_error_has_one_format(i):
    make, kind = BAD[i]
    with pytest.raises(ValueError) as info:
        make(list(mlp(seed=0).parameters()))
    assert isinstance(info.value, kind)
    assert isinstance(info.value, _validation.ArgumentTypeError) == (kind is TypeError)
    assert FORMAT.match(str(info.value)), str(info.value)
