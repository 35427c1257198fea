"""Our versions of a few functions mlx-lm's models call, for one model's modules only.

mlx-lm's model classes call module-level functions by name: an attention
layer calls ``scaled_dot_product_attention`` (imported from
``mlx_lm.models.base``), an MLP calls ``swiglu``. ``trainer.model.attention``
and ``trainer.model.fused`` compute those differently on a CPU. Rewriting the
names in mlx-lm's modules would change every model in the process, the user's
own included. Instead, each module of *this* model whose ``__call__`` reads one
of those names gets a subclass of its class (made once per class and
replacement) whose ``__call__`` is the same code with its own copy of the
globals, the names replaced: the model object is ours, mlx-lm's modules and
classes stay as they are, and :func:`route` with no replacements puts the
original classes back.
"""

import types

_classes: dict = {}


def _routed_class(cls: type, replacements: tuple) -> type:
    """``cls`` with a ``__call__`` whose globals see ``replacements`` (``((name, value), ...)``)."""
    key = (cls, replacements)
    if key not in _classes:
        call = cls.__call__
        namespace = {**call.__globals__, **dict(replacements)}
        routed = types.FunctionType(call.__code__, namespace, call.__name__, call.__defaults__, call.__closure__)
        routed.__kwdefaults__ = call.__kwdefaults__
        routed.__qualname__, routed.__doc__ = call.__qualname__, call.__doc__
        _classes[key] = type(cls.__name__, (cls,), {"__call__": routed, "__module__": cls.__module__,
                                                    "_routed_from": cls, "_routes": dict(replacements)})
    return _classes[key]


def _base(module) -> type:
    return getattr(type(module), "_routed_from", type(module))


def route(model, originals: dict, replacements: dict) -> list[str]:
    """Route the modules of ``model`` that call any of ``originals`` to ``replacements`` instead.

    Args:
        model (nn.Module): The model (its modules change class; nothing else does).
        originals (dict): Name to the function mlx-lm's modules hold under that name; a module is
            routed only where its class's ``__call__`` reads the name and it is this function.
        replacements (dict): Name to our function; a name left out (or an empty dict) keeps, or
            puts back, mlx-lm's.

    Returns:
        list[str]: Python modules of the classes now routed (sorted, once each).
    """
    routed = set()
    for _, module in model.named_modules():
        base = _base(module)
        call = getattr(base, "__call__", None)
        code, names = getattr(call, "__code__", None), getattr(call, "__globals__", {})
        wanted = tuple(sorted((name, fn) for name, fn in replacements.items()
                              if code is not None and name in code.co_names and names.get(name) is originals[name]))
        # other routes this module already has (from another call of route) are kept
        kept = tuple(sorted((n, f) for n, f in getattr(type(module), "_routes", {}).items() if n not in originals))
        combined = tuple(sorted(kept + wanted))
        module.__class__ = _routed_class(base, combined) if combined else base
        if wanted:
            routed.add(base.__module__)
    return sorted(routed)
