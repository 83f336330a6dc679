"""Counts the hints an event source gives (wake / poke), in place of a dispatcher."""

from __future__ import annotations


class Hints:
    def __init__(self) -> None:
        self.wakes = 0
        self.pokes = 0

    def wake(self) -> None:
        self.wakes += 1

    def poke(self) -> None:
        self.pokes += 1
