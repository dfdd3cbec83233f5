"""Claims: what a notebook says its measurement shows, checked where it is measured.

`knobs = labkit.knobs(sparsity=0.8)` holds a section's settings at the book's values, and
`labkit.claim(size_ratio > 3, "gzip makes the pruned file at least 3x smaller", measured=...,
knobs=knobs)` states a finding. In the tests and CI (LABKIT_STRICT=1) a claim that does not hold
fails the run, as an assert would; in a learner's session it shows a note instead (what was
measured, what the book expected, the likely reason) and the notebook runs on: a learner who
changed a knob, or whose laptop was busy, is not told that their own code is wrong.
"""
from __future__ import annotations

import html
import os

try:   # IPython is there in a notebook; a plain script prints its notes instead
    from IPython import get_ipython
    from IPython.display import display
except ImportError:
    get_ipython = display = None


class ClaimError(AssertionError):
    """A claim did not hold in strict mode (the test suite, CI, the headless book run)."""


def strict() -> bool:
    """True where a failed claim must fail the run: LABKIT_STRICT=1 (set by the tests and CI)."""
    return os.environ.get("LABKIT_STRICT", "") == "1"


class Knobs:
    """A section's settings: the book's values, and whatever a learner sets on top of them."""

    def __init__(self, **book):
        object.__setattr__(self, "_book", dict(book))
        for name, value in book.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        if name not in self._book:
            raise AttributeError(f"this section has no setting {name!r}; its settings are "
                                 f"{sorted(self._book)}")
        object.__setattr__(self, name, value)

    def changed(self) -> dict:
        """{name: (your value, the book's value)} for every setting that differs from the book's."""
        return {name: (getattr(self, name), book) for name, book in self._book.items()
                if getattr(self, name) != book}

    def at_book_values(self) -> bool:
        return not self.changed()

    def __repr__(self) -> str:
        values = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._book)
        changed = self.changed()
        note = "" if not changed else "  # book: " + ", ".join(
            f"{n}={b!r}" for n, (_, b) in changed.items())
        return f"knobs({values}){note}"


def knobs(**book) -> Knobs:
    """The settings at the top of a section, at the book's values: `knobs = labkit.knobs(k=16)`."""
    return Knobs(**book)


def likely_reason(knobs: Knobs | None, timing: bool) -> str:
    if knobs is not None and knobs.changed():
        changes = ", ".join(f"{name} = {mine!r} (book: {book!r})"
                            for name, (mine, book) in knobs.changed().items())
        return (f"your settings differ from the book's: {changes}. The claim was written for the "
                "book's settings.")
    if timing:
        return ("timings are noisy: the machine may have been busy. Close other programs and run "
                "this cell again; if it still misses, your CPU simply behaves differently.")
    return ("your machine or library versions gave a different figure than the book's; if you "
            "edited a cell above, that may be why.")


def claim(holds, what: str, measured: str = "", *, expected: str = "", timing: bool = False,
          knobs: Knobs | None = None) -> None:
    """State what a measurement shows. Strict mode raises ClaimError when it does not hold; a
    learner's session shows a note and goes on. `timing=True` marks a claim about speed.
    Returns None, so a cell that ends with a claim prints nothing more."""
    if bool(holds):
        return None
    figures = "; ".join(part for part in (f"measured: {measured}" if measured else "",
                                           f"the book expects: {expected}" if expected else "")
                        if part)
    if strict():
        raise ClaimError(f"claim did not hold: {what}" + (f" ({figures})" if figures else ""))
    reason = likely_reason(knobs, timing)
    _show_note(what, figures, reason)
    return None


def _show_note(what: str, figures: str, reason: str) -> None:
    text = (f"Claim not met: {what}." + (f" {figures[0].upper() + figures[1:]}." if figures else "")
            + f" Likely reason: {reason} The notebook goes on.")
    in_notebook = (get_ipython is not None and get_ipython() is not None
                   and "IPKernelApp" in get_ipython().config)
    if not in_notebook:
        print("NOTE · " + text)
        return
    body = (f"<b>Claim not met:</b> {html.escape(what)}."
            + (f"<br>{html.escape(figures[0].upper() + figures[1:])}." if figures else "")
            + f"<br><b>Likely reason:</b> {html.escape(reason)}<br>The notebook goes on.")
    box = ('<div style="border-left: 4px solid #e0a800; background: #fff8e1; color: #333; '
           f'padding: 6px 10px; margin: 4px 0">{body}</div>')
    display({"text/html": box, "text/plain": "NOTE · " + text}, raw=True)
