"""How the tools report bad input: one or two clean lines on stderr and exit code 2, no
traceback. Internal errors keep their traceback (and exit code 1).

The errors subclass the built-in type a caller would expect (``FileNotFoundError``,
``KeyError``, ``ValueError``, ``OSError``, ``RuntimeError``), so code calling the checks
directly can catch them as usual.

Imported first by every tool (its own import section, see pyproject.toml): it silences
the one warning every start of the stack prints, setuptools' "pkg_resources is
deprecated" from mmengine and mmcv (which need it: setuptools is pinned below 81).
"""
import sys
import warnings

warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)


class InputError(Exception):
    """A problem with what the user gave (a path, a config value, an option)."""

    def __str__(self):
        return str(self.args[0]) if self.args else ''


class MissingInput(InputError, FileNotFoundError):
    """A file or directory the user named, or the config names, does not exist."""


class UnknownName(InputError, KeyError):
    """A registered name (a norm type, ...) that is not registered."""


class BadValue(InputError, ValueError):
    """A value outside what is accepted."""


class UnwritableOutput(InputError, OSError):
    """An output the tool cannot write: not a regular file, in no writable directory, a
    full disk, ..."""


class UnsupportedHere(InputError, RuntimeError):
    """A request this machine cannot serve (e.g. --amp without CUDA)."""


def run(main, argv=None) -> None:
    """Call ``main(argv)`` and exit with the code it returns (None: 0); an
    :class:`InputError` becomes ``error: ...`` and exit code 2."""
    try:
        code = main(argv)
    except InputError as err:
        print(f'error: {err}', file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
