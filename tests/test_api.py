"""The public API as a whole: what every op's docstring and signature promise."""
import inspect
import typing

import pytest

import bjax
from bjax import _op

OPS = [getattr(bjax, name) for name in dir(bjax)
       if not name.startswith("_") and inspect.isfunction(getattr(bjax, name))]


@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_every_public_function_documents_what_it_raises(op):
    assert "Raises:" in (op.__doc__ or ""), op.__name__


@pytest.mark.parametrize("op", [f for f in OPS if "backend" in inspect.signature(f).parameters],
                         ids=lambda f: f.__name__)
def test_backend_is_typed_with_its_choices(op):
    assert typing.get_type_hints(op)["backend"] == _op.Backend
    assert typing.get_args(_op.BackendName) == _op.BACKENDS
