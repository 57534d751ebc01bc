"""Reading traced programs in tests: every equation of a jaxpr, those of nested jaxprs (jit, custom rules,
control flow) included."""


def all_equations(jaxpr):
    """Every equation of `jaxpr` (a `Jaxpr`) and of the jaxprs its equations hold, depth first."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                yield from all_equations(inner)
