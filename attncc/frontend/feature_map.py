"""Feature maps of linear attention: the named ones and user callables, as expressions of one element ``x``."""

from __future__ import annotations

import sympy

from attncc.errors import ModError, SpecError
from attncc.frontend.mod import TracedMod
from attncc.ir.expr import feature

x = feature

# phi(x) per element. elu+1 is Katharopoulos et al.'s map: elu(x) + 1 > 0.
FEATURE_MAPS = {
    "elu+1": sympy.Piecewise((x + 1, x > 0), (sympy.exp(x), True)),
    "relu": sympy.Piecewise((x, x > 0), (sympy.Integer(0), True)),
    "identity": x,
}


def feature_map_name(value) -> str | None:
    """The name of a built-in feature map, None for a callable or traced map; SpecError for anything else."""
    if isinstance(value, str):
        if value not in FEATURE_MAPS:
            raise SpecError(
                f"feature_map={value!r} is invalid: allowed are {', '.join(repr(n) for n in FEATURE_MAPS)} "
                "or a callable phi(x) of one tensor, element-wise"
            )
        return value
    if isinstance(value, TracedMod) or callable(value):
        return None
    raise SpecError(
        f"feature_map={value!r} is invalid: allowed are {', '.join(repr(n) for n in FEATURE_MAPS)} "
        "or a callable phi(x) of one tensor, element-wise"
    )


def feature_map_expr(value) -> sympy.Expr:
    """phi as an expression of ``x``: a built-in by name, or a callable traced with torch.fx (never run per element).

    Max, Min and Abs become Piecewise so that the derivative the backends take is piecewise too.
    """
    from attncc.frontend.trace import trace_feature_map

    if feature_map_name(value) is not None:
        return FEATURE_MAPS[value]
    expr = trace_feature_map(value).expr
    unknown = sorted(str(s) for s in expr.free_symbols if s != x)
    if unknown:
        raise ModError(
            f"feature_map {getattr(value, '__name__', value)!r} reads {', '.join(unknown)}: a feature map is a "
            "function of its one argument x and constants only"
        )
    expr = expr.rewrite(sympy.Piecewise) if expr.has(sympy.Max, sympy.Min, sympy.Abs) else expr
    derivative = sympy.diff(expr, x)
    if derivative.has(sympy.Derivative, sympy.Heaviside, sympy.DiracDelta, sympy.sign):
        raise ModError(f"feature_map {expr} has no closed-form derivative attncc can print (d/dx = {derivative})")
    return expr
