import pytest

from trajrep.errors import TrajrepError
from trajrep.timegrid import build_time_grid, granularity_times, grid_label, select_times

PAPER_GRANULARITIES = [2, 5, 7, 10, 17, 25, 37, 50]


def test_paper_grids_share_points():
    grid = build_time_grid(granularities=PAPER_GRANULARITIES)
    # 161 grid points in total, of which 109 are distinct (every g dividing 50 is a subset of g = 50).
    assert sum(g + 1 for g in PAPER_GRANULARITIES) == 161
    assert len(grid) == 109
    assert grid == sorted(grid) and grid[0] == 0.0 and grid[-1] == 1.0


def test_equal_fractions_are_one_point_and_g1_is_midpoint():
    assert build_time_grid(times=[0.2], granularities=[5, 10]) == [i / 10 for i in range(11)]
    assert build_time_grid(granularities=[1]) == [0.5]


@pytest.mark.parametrize("kwargs,message", [
    (dict(times=[1.5]), "outside \\[0, 1\\]"),
    (dict(times=[-0.1]), "outside \\[0, 1\\]"),
    (dict(), "empty"),
    (dict(times=[0.5, 0.1]), "strictly increasing"),
    (dict(granularities=[0]), "positive integer"),
])
def test_bad_grids_are_rejected(kwargs, message):
    with pytest.raises(TrajrepError, match=message):
        build_time_grid(**kwargs)


def test_select_times_finds_indices_and_reports_missing():
    grid = build_time_grid(granularities=[10])
    assert select_times(grid, [0.0, 0.5, 1.0]) == [0, 5, 10]
    with pytest.raises(TrajrepError, match="not in the cache"):
        select_times(grid, [0.55])


def test_tables_name_a_grid_by_g_and_other_time_sets_by_their_times():
    assert grid_label([float(t) for t in granularity_times(10)]) == 10
    assert grid_label([0.0, 0.5, 1.0]) == 2 and grid_label([0.5]) == "-"
    assert grid_label([0.0, 0.3, 0.9]) == "t=0,0.3,0.9" != grid_label([0.0, 0.4, 0.9])  # not g = 2, nor one row
    assert grid_label([0.5, 0.9]) == "t=0.5,0.9"  # g = 1 is the single point 0.5
