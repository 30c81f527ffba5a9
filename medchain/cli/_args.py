"""argparse ``type`` functions shared by the command modules: numbers checked at parse time, so a
bad value is a usage error (exit 2) that names the allowed range, before anything starts."""
from __future__ import annotations

import argparse


def number(kind: type, *, low: float | None = None, high: float | None = None, low_open: bool = False,
            high_open: bool = False):
    """An argparse ``type`` that parses ``kind`` (int or float) and checks the range at parse time, so a
    bad value is a clear usage error (exit 2) before anything starts."""
    lo_b, hi_b = ("(" if low_open else "["), (")" if high_open else "]")
    span = f"{lo_b}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi_b}"

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") \
                from None
        if kind is float and v != v or v in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if (low is not None and (v < low or (low_open and v == low))) or \
                (high is not None and (v > high or (high_open and v == high))):
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be in {span}")
        return v
    parse.__name__ = kind.__name__       # argparse names the type in its messages
    return parse


POS_INT = number(int, low=1)
NONNEG_INT = number(int, low=0)
POS_FLOAT = number(float, low=0, low_open=True)
NONNEG_FLOAT = number(float, low=0)
FRACTION = number(float, low=0, high=1, low_open=True)
PORT = number(int, low=1, high=65535)
