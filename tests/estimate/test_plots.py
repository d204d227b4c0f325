import pytest

from estimate.plots import Interval, Point, predicted_vs_reported, projection_range, series_vs_size

PNG = b"\x89PNG"


def test_predicted_vs_reported(tmp_path):
    pts = [Point("a", 1e6, 1.2e6, 0.9e6, 2e6), Point("b", 3e7, 2.5e7)]
    path = predicted_vs_reported(pts, tmp_path / "v.png", xlabel="x", ylabel="y", title="t")
    assert path.read_bytes()[:4] == PNG
    with pytest.raises(ValueError):
        predicted_vs_reported([], tmp_path / "e.png", xlabel="x", ylabel="y", title="t")


def test_projection_range(tmp_path):
    panels = {"days": [Interval("one", 40, 58, 170), Interval("two", 50, 80, 150)],
              "hours (M)": [Interval("one", 2, 2.9, 8.4), Interval("two", 22, 32, 59)]}
    assert projection_range(panels, tmp_path / "r.png", title="t").read_bytes()[:4] == PNG


def test_series_vs_size(tmp_path):
    path = series_vs_size([1e6, 1e7, 1e8], {"measured": [3e5, 5e4, 6e3], "predicted": [4e5, 5e4, 5e3]},
                          tmp_path / "s.png", xlabel="params", ylabel="tokens/s", title="t")
    assert path.read_bytes()[:4] == PNG
    with pytest.raises(ValueError, match="values for"):
        series_vs_size([1, 2], {"m": [1]}, tmp_path / "x.png", xlabel="", ylabel="", title="")
