"""Tests for token-length statistics (qtune.data.stats)."""

from __future__ import annotations

import numpy as np
import pytest

from qtune.data.stats import length_summary, plot_lengths, text_histogram

ONE_TO_100 = list(range(1, 101))


def test_length_summary_one_to_100():
    # method="higher" takes the row at rank ceil(p/100 * (n-1)) of the sorted lengths 1..100 (value = rank + 1):
    #   p50: ceil(49.5) = 50 -> 51;  p90: ceil(89.1) = 90 -> 91;  p95: ceil(94.05) = 95 -> 96;  p99: ceil(98.01) = 99 -> 100
    # coverage 0.99 needs 100 -> next multiple of 8 is 104 -> no row longer than 104
    summary = length_summary(ONE_TO_100)
    assert summary == {"rows": 100, "mean": 50.5, "min": 1, "p50": 51, "p90": 91, "p95": 96, "p99": 100,
                       "max": 100, "suggested_max_length": 104, "coverage": 0.99,
                       "rows_truncated_at_suggestion": 0}


@pytest.mark.parametrize("coverage,multiple,suggested,truncated", [
    (0.9, 8, 96, 4),     # needs 91 -> 96; rows 97..100 are cut
    (0.95, 16, 96, 4),   # needs 96 -> 96 already a multiple of 16; rows 97..100 are cut
    (0.5, 8, 56, 44),    # needs 51 -> 56; rows 57..100 are cut
    (0.5, 1, 51, 49),    # needs 51, no rounding; rows 52..100 are cut
    (1.0, 32, 128, 0),   # needs 100 -> 128
])
def test_length_summary_coverage_and_multiple(coverage, multiple, suggested, truncated):
    summary = length_summary(ONE_TO_100, coverage=coverage, multiple=multiple)
    assert summary["suggested_max_length"] == suggested
    assert summary["rows_truncated_at_suggestion"] == truncated
    assert summary["coverage"] == coverage


def test_length_summary_unsorted_with_outlier():
    # sorted: 3, 5, 5, 7, 9, 10, 12, 12, 20, 400 (n = 10, sum 483)
    # p50: ceil(4.5) = 5 -> 10; p90: ceil(8.1) = 9 -> 400; p99 -> 400
    summary = length_summary([12, 5, 400, 3, 9, 7, 12, 5, 20, 10])
    assert summary["mean"] == pytest.approx(48.3)
    assert (summary["min"], summary["p50"], summary["p90"], summary["p99"], summary["max"]) == (3, 10, 400, 400, 400)
    assert summary["suggested_max_length"] == 400  # 400 is a multiple of 8
    summary = length_summary([12, 5, 400, 3, 9, 7, 12, 5, 20, 10], coverage=0.8)
    # 0.8 * 9 = 7.2 -> rank 8 -> 20 -> 24; only the 400 row is cut
    assert (summary["suggested_max_length"], summary["rows_truncated_at_suggestion"]) == (24, 1)


@pytest.mark.parametrize("lengths,suggested", [([1], 8), ([8] * 10, 8), ([9], 16)])
def test_suggestion_is_a_multiple_of_8(lengths, suggested):
    assert length_summary(lengths)["suggested_max_length"] == suggested


@pytest.mark.parametrize("seed", range(5))
def test_suggestion_covers_the_requested_share(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 300, rng.integers(1, 500)).tolist()
    summary = length_summary(lengths, coverage=0.95)
    s = summary["suggested_max_length"]
    assert s % 8 == 0
    covered = sum(length <= s for length in lengths)
    assert covered >= 0.95 * len(lengths)
    assert summary["rows_truncated_at_suggestion"] == len(lengths) - covered
    assert summary["p50"] <= summary["p90"] <= summary["p95"] <= summary["p99"] <= summary["max"]


def test_summary_values_are_plain_python_numbers():
    summary = length_summary(np.array([3, 4, 5], dtype=np.int32))
    for key, value in summary.items():
        assert type(value) in (int, float), key


def test_length_summary_empty():
    with pytest.raises(ValueError, match="no lengths"):
        length_summary([])


def histogram_counts(text: str) -> list[int]:
    return [int(line.rsplit(" ", 1)[1]) for line in text.splitlines()]


@pytest.mark.parametrize("bins", [1, 5, 12])
def test_text_histogram_lines_and_counts(bins):
    lengths = [3, 3, 4, 10, 17, 17, 17, 25, 60, 61, 99]
    text = text_histogram(lengths, bins=bins)
    assert len(text.splitlines()) == bins
    assert sum(histogram_counts(text)) == len(lengths)


def test_text_histogram_default_bins_and_bar_width():
    lengths = list(range(1, 101)) + [50] * 100
    text = text_histogram(lengths, width=20)
    lines = text.splitlines()
    assert len(lines) == 12
    assert sum(histogram_counts(text)) == 200
    bars = [line.count("#") for line in lines]
    assert max(bars) == 20  # the fullest bin gets the full width
    assert bars.index(20) == histogram_counts(text).index(max(histogram_counts(text)))
    assert lines[0].startswith("     1-")


def test_text_histogram_single_value():
    text = text_histogram([7] * 5, bins=4)
    assert len(text.splitlines()) == 4
    assert sum(histogram_counts(text)) == 5


def test_plot_lengths_writes_a_png(tmp_path):
    lengths = [5, 8, 8, 13, 21, 34, 55, 89]
    path = tmp_path / "plots" / "lengths.png"
    plot_lengths(lengths, length_summary(lengths), path, title="train.csv")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 1000
    assert [p.name for p in path.parent.iterdir()] == ["lengths.png"]  # no temp file left


def test_plot_lengths_overwrites(tmp_path):
    path = tmp_path / "lengths.png"
    path.write_bytes(b"old")
    plot_lengths(ONE_TO_100, length_summary(ONE_TO_100), path, title="t")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lengths.png"]
