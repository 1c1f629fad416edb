"""Pure geometry in (y, x) order. Boxes are half-open: rows y0..y1-1, columns x0..x1-1."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Box:
    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    def is_empty(self) -> bool:
        return self.height <= 0 or self.width <= 0

    def intersect(self, other: Box) -> Box:
        box = Box(max(self.y0, other.y0), max(self.x0, other.x0), min(self.y1, other.y1), min(self.x1, other.x1))
        return box if not box.is_empty() else Box(box.y0, box.x0, box.y0, box.x0)

    def grow(self, margin: int) -> Box:
        return Box(self.y0 - margin, self.x0 - margin, self.y1 + margin, self.x1 + margin)

    def shift(self, dy: int, dx: int) -> Box:
        return Box(self.y0 + dy, self.x0 + dx, self.y1 + dy, self.x1 + dx)

    def relative_to(self, origin: Box) -> Box:
        """This box in the coordinates of ``origin``'s top-left corner."""
        return self.shift(-origin.y0, -origin.x0)

    def contains_point(self, y: float, x: float) -> bool:
        return self.y0 <= y < self.y1 and self.x0 <= x < self.x1

    def slices(self) -> tuple[slice, slice]:
        return (slice(self.y0, self.y1), slice(self.x0, self.x1))
