"""Command-line option types both CLIs (`ssd-train`, `ssd-client`) use."""

from __future__ import annotations

import math

import click


class FiniteRange(click.FloatRange):
    """A FloatRange that refuses nan and inf too (nan passes any range check: every comparison is False)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number
