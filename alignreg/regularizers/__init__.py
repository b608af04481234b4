"""Regularizer terms. Every module in this package registers one term under its module name
(``regularizers/lp_reg.py`` <-> ``name: lp_reg`` <-> metrics ``reg/lp_reg/*``)."""
import importlib
import pkgutil

from alignreg.regularizers.base import (  # noqa: F401
    REGULARIZERS,
    ActiveTerm,
    AggNorm,
    LossContext,
    Regularizer,
    RegularizerSet,
    StatRequest,
    StepView,
    TermOutput,
    build_regularizers,
)

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")
