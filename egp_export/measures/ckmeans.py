"""Optimal 1-D k-means (the Ckmeans.1d.dp problem, Wang & Song 2011), exact by dynamic programming.

Sort the values x_1 <= ... <= x_n; an optimal clustering is a split of that
order into k contiguous runs. With SSE(j, i) the sum of squared deviations
of x_j..x_i from their mean (O(1) from prefix sums of x and x^2):

    D[1][i] = SSE(1, i)
    D[m][i] = min over j in [m, i] of D[m-1][j-1] + SSE(j, i)            O(k n^2)

Ties are broken deterministically: values are sorted stably (equal values
keep their input order), and among equal-cost splits the last run starts at
the smallest j (so, recursively, earlier runs are as short as they can be
at equal cost). Every run is non-empty; ``k`` above n is lowered to n. The
reference's ``mcfd/ckmeans.py`` uses ``np.float_`` (gone in NumPy 2) and its
results on ties depend on float comparison order; this module replaces it.
"""

from __future__ import annotations

from collections.abc import Sequence


def ckmeans(values: Sequence[float], k: int) -> list[list[int]]:
    """Indices into ``values`` of each of the (at most) ``k`` optimal clusters, clusters in increasing value order."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    count = len(values)
    if count == 0:
        return []
    k = min(k, count)
    order = sorted(range(count), key=lambda index: values[index])
    data = [float(values[index]) for index in order]
    prefix, prefix_squares = [0.0], [0.0]
    for value in data:
        prefix.append(prefix[-1] + value)
        prefix_squares.append(prefix_squares[-1] + value * value)

    def sse(first: int, last: int) -> float:
        # sum (x - mean)^2 = sum x^2 - (sum x)^2 / size, over positions first..last (0-based, inclusive)
        size = last - first + 1
        total = prefix[last + 1] - prefix[first]
        return max(prefix_squares[last + 1] - prefix_squares[first] - total * total / size, 0.0)

    cost = [[sse(0, last) for last in range(count)]]
    start = [[0] * count]
    for clusters in range(2, k + 1):
        row, starts = [float("inf")] * count, [0] * count
        for last in range(clusters - 1, count):
            for first in range(clusters - 1, last + 1):
                candidate = cost[-1][first - 1] + sse(first, last)
                if candidate < row[last]:  # strict: the smallest start wins a tie
                    row[last], starts[last] = candidate, first
        cost.append(row)
        start.append(starts)
    groups, last = [], count - 1
    for clusters in range(k, 0, -1):
        first = start[clusters - 1][last]
        groups.append([order[position] for position in range(first, last + 1)])
        last = first - 1
    return groups[::-1]
