"""Time grids for extraction: explicit t lists and granularities g (t_i = i / g), merged so each t is computed once."""

from fractions import Fraction

from trajrep.errors import TrajrepError


def grid_label(times: list[float]) -> int | str:
    """How tables name a probe's times: the granularity g of a grid {0, 1/g, ..., 1}, "-" for a single time, and
    the times themselves for any other set, so that two sets of several times never share a row."""
    if len(times) == 1:
        return "-"
    points = granularity_times(len(times) - 1)
    if len(points) == len(times) and all(abs(t - float(point)) < 1e-9 for t, point in zip(times, points)):
        return len(times) - 1
    return "t=" + ",".join(f"{t:g}" for t in times)


def granularity_times(g: int) -> list[Fraction]:
    """The paper's grid of granularity g: i / g for i = 0..g; g = 1 is the single point t = 0.5 (method §6)."""
    if g < 1:
        raise TrajrepError(f"granularity must be a positive integer, got {g}")
    if g == 1:
        return [Fraction(1, 2)]
    return [Fraction(i, g) for i in range(g + 1)]


def build_time_grid(times: list[float] | None = None, granularities: list[int] | None = None) -> list[float]:
    """Sorted union of explicit times and granularity grids; exact arithmetic so 2/10 and 1/5 are one point."""
    times = list(times or [])
    if any(later <= earlier for earlier, later in zip(times, times[1:])):
        raise TrajrepError(f"times must be strictly increasing (clean -> noisy), got {times}")
    points: set[Fraction] = set()
    for t in times:
        if not 0.0 <= t <= 1.0:
            raise TrajrepError(f"time {t} is outside [0, 1]; t = 0 is clean data and t = 1 the most noise")
        points.add(Fraction(t).limit_denominator(10**6))
    for g in granularities or []:
        points.update(granularity_times(g))
    if not points:
        raise TrajrepError("the time grid is empty; give `times` (values in [0, 1]) or `granularities` (e.g. [10])")
    return [float(p) for p in sorted(points)]


def select_times(available: list[float], wanted: list[float], tolerance: float = 1e-9) -> list[int]:
    """Indices of `wanted` times among `available` ones, in the order given; error if one is missing."""
    indices = []
    for t in wanted:
        matches = [i for i, a in enumerate(available) if abs(a - t) <= tolerance]
        if not matches:
            raise TrajrepError(f"time {t} is not in the cache (cached times: {', '.join(f'{a:g}' for a in available)});"
                               " extract a grid that contains it")
        indices.append(matches[0])
    return indices
