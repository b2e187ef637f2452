"""meshkit/percentile.py: linear interpolation between the nearest ranks."""
import statistics

import pytest

from meshkit.percentile import percentile


def test_the_p50_of_one_to_ten_is_the_median_between_its_middle_values():
    assert percentile(range(1, 11), 50) == 5.5


def test_the_p99_of_a_known_list_lies_between_its_two_largest_values():
    # Position (10 - 1) * 0.99 = 8.91: 91% of the way from 90 to 1000.
    values = [10, 20, 30, 40, 50, 60, 70, 80, 90, 1000]
    assert percentile(values, 99) == pytest.approx(90 + 0.91 * 910)


def test_percentiles_agree_with_statistics_quantiles_inclusive():
    values = [3.2, 0.4, 9.9, 1.1, 7.5, 2.0, 2.0, 15.0, 0.9, 4.4, 6.1]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    for p in (1, 5, 25, 50, 75, 95, 99):
        assert percentile(values, p) == pytest.approx(cuts[p - 1])


def test_the_ends_are_the_smallest_and_largest_values_and_one_value_is_every_percentile():
    assert (percentile([4.0, 1.0, 3.0], 0), percentile([4.0, 1.0, 3.0], 100)) == (1.0, 4.0)
    assert percentile([7.0], 99) == 7.0


def test_no_values_or_a_percentile_outside_0_to_100_is_an_error():
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)
