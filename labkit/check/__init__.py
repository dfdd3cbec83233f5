"""Exercise checkers: the learner writes a small NumPy function, a checker here judges it.

`check.magnitude_mask(magnitude_mask)` runs the learner's function on cases worked by hand, then
on random ones against labkit (and the library where the chapter does) and prints "correct" or
"not attempted", or raises an ExerciseError that names the likely mistake; `check.solution(name)`
prints one solution. The checkers live beside their chapter (baseline.py, pruning.py, ...), and
`python -m labkit.check solutions` writes every solution and answer for instructors.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

import numpy as np

from labkit.check import solutions


class ExerciseError(AssertionError):
    """A learner's answer is wrong; the message says what is most likely wrong."""


class NotAttempted(Exception):
    """The learner's function is still the blank."""


@dataclass(frozen=True)
class Exercise:
    name: str
    notebook: str        # "02"
    reference: str       # what settles it, e.g. "pruning.magnitude_mask" (labkit's) or a library's
    signature: str       # what the learner writes, e.g. "magnitude_mask(weights, sparsity) -> mask"


EXERCISES: dict[str, Exercise] = {}   # filled by the chapter modules as they are imported
STATUS: dict[str, str] = {}           # name -> "correct" | "not attempted", for this session


def exercise(name: str, notebook: str, reference: str, signature: str):
    """Register a checker: `@exercise("magnitude_mask", "02", "pruning.magnitude_mask", "...")`.

    The decorated function takes `call` (the learner's function, guarded) and runs the cases;
    it returns a short description of what was checked, e.g. "3 cases by hand, 40 random ones".
    The public checker takes the learner's function itself.
    """
    def register(cases):
        entry = Exercise(name, notebook, reference, signature)
        EXERCISES[name] = entry

        def checker(fn) -> None:
            return _judge(entry, fn, cases)
        checker.__name__ = name
        checker.__qualname__ = name
        checker.__doc__ = (f"Check your `{signature}` (notebook {notebook}); "
                           f"the reference is `{reference}`.\n\n{cases.__doc__ or ''}")
        return checker
    return register


def _judge(entry: Exercise, fn, cases) -> None:
    if not callable(fn):
        raise ExerciseError(f"{entry.name}: pass your function itself, e.g. "
                            f"check.{entry.name}({entry.name}), not {type(fn).__name__}")
    try:
        checked = cases(guarded(fn, entry.name))
    except NotAttempted:
        STATUS[entry.name] = "not attempted"
        print(f"○ {entry.name}: not attempted yet (the body still raises NotImplementedError or "
              f"returns ...). The notebook goes on with `{entry.reference}`; "
              f"check.solution({entry.name!r}) shows one solution.")
        return None
    STATUS[entry.name] = "correct"
    print(f"✓ {entry.name}: correct ({checked}).")
    return None


def guarded(fn, name: str):
    """`fn` as the cases call it: the blank becomes NotAttempted, a crash an ExerciseError that
    shows the inputs."""
    def call(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
        except NotImplementedError:
            raise NotAttempted() from None
        except ExerciseError:
            raise
        except Exception as error:  # the learner's code crashed: say on what
            raise ExerciseError(f"{name}: your function raised {type(error).__name__}: {error}\n"
                                f"  on {describe_args(args, kwargs)}") from error
        if result is Ellipsis:
            raise NotAttempted()
        return result
    return call


def describe_args(args, kwargs) -> str:
    """Inputs as a learner can read them: small arrays in full, large ones by shape."""
    def one(value):
        if isinstance(value, np.ndarray):
            if value.size <= 12:
                return np.array2string(value, precision=4, separator=", ").replace("\n", "")
            return f"an array of shape {value.shape} ({value.dtype})"
        return repr(value)
    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"


def fail(name: str, message: str, args=(), kwargs=None) -> None:
    """Raise the ExerciseError for `name`, with the inputs of the failing case when given."""
    where = f"\n  on {describe_args(args, kwargs or {})}" if args or kwargs else ""
    raise ExerciseError(f"{name}: {message}{where}")


def solution(name: str) -> None:
    """Print one solution of exercise `name` (the notebooks hold only the blanks)."""
    _load_chapters()
    if name not in EXERCISES or not hasattr(solutions, name):
        raise ValueError(f"no exercise called {name!r}; the exercises are {sorted(EXERCISES)}")
    entry = EXERCISES[name]
    print(f"# One solution of exercise {name} (notebook {entry.notebook}); "
          f"the book's reference is `{entry.reference}`.\n")
    print(inspect.getsource(getattr(solutions, name)))


CHAPTERS = ("baseline", "pruning", "clustering", "quantization", "graph", "pipeline", "search",
            "roofline")
SUBMODULES = (*CHAPTERS, "solutions", "instructor", "__main__")


def _chapter_modules() -> list:
    return [importlib.import_module(f"labkit.check.{chapter}") for chapter in CHAPTERS]


def _load_chapters() -> None:
    """Import every chapter module so that EXERCISES is complete."""
    _chapter_modules()


def __getattr__(name: str):
    """`check.magnitude_mask` and friends: the chapter modules load on first
    use (some import TensorFlow)."""
    if name.startswith("_") or name in SUBMODULES:   # a submodule being imported: not a checker
        raise AttributeError(name)
    for module in _chapter_modules():
        if name in EXERCISES and hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"labkit.check has no {name!r}; the exercises are {sorted(EXERCISES)}")
