"""Triton compiles a kernel only if every module-level value it reads is a ``tl.constexpr``
(the interpreter on a CPU does not check): a plain int or float global read inside an
``@triton.jit`` function fails on the GPU alone. Checked here for every kernel module."""

import importlib
import pkgutil

import pytest

triton = pytest.importorskip("triton")


def _kernel_modules():
    import commvq.kernels

    for info in pkgutil.iter_modules(commvq.kernels.__path__):
        yield importlib.import_module(f"commvq.kernels.{info.name}")


def test_jit_functions_read_only_constexpr_globals():
    from triton.runtime.jit import JITFunction

    bad = []
    for module in _kernel_modules():
        for name, obj in vars(module).items():
            if not isinstance(obj, JITFunction):
                continue
            for g in obj.fn.__code__.co_names:
                value = module.__dict__.get(g)
                if isinstance(value, (bool, int, float)):
                    bad.append(f"{module.__name__}.{name} reads {g} = {value!r}")
    assert not bad, bad
