"""Argument checks shared by the layers, the NormEval builder and the hooks: each error
names the owner and the parameter, and says which values are accepted."""
import math


def check_int(owner: str, name: str, value, minimum: int) -> None:
    """An int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f'{owner}: {name} must be an integer >= {minimum}, got {value!r}')


def check_bool(owner: str, name: str, value) -> None:
    """A bool (a string such as 'False' would read as True)."""
    if not isinstance(value, bool):
        raise ValueError(f'{owner}: {name} must be True or False, got {value!r}')


def check_real(owner: str, name: str, value, ok, accepted: str) -> None:
    """A finite real number (not a bool) for which ``ok(value)`` holds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or not ok(value):
        raise ValueError(f'{owner}: {name} must be {accepted}, got {value!r}')


def check_bn_args(owner: str, num_features, eps, momentum, affine,
                  track_running_stats=True, momentum_none_ok: bool = True) -> None:
    """``nn.BatchNorm2d``'s arguments: C >= 1, finite ``eps`` > 0, ``momentum`` in [0, 1]
    (or None: cumulative average), bool flags."""
    check_int(owner, 'num_features', num_features, 1)
    check_real(owner, 'eps', eps, lambda v: v > 0, 'a finite number > 0')
    if not (momentum is None and momentum_none_ok):
        check_real(owner, 'momentum', momentum, lambda v: 0 <= v <= 1,
                   'a number in [0, 1]' + (' or None' if momentum_none_ok else ''))
    check_bool(owner, 'affine', affine)
    check_bool(owner, 'track_running_stats', track_running_stats)


def check_choice(owner: str, name: str, value, choices) -> None:
    """One of ``choices``."""
    if value not in choices:
        raise ValueError(f'{owner}: {name} must be one of {", ".join(map(repr, choices))}, '
                         f'got {value!r}')
