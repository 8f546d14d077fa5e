"""Tables are written rounded to what is reported, atomically."""

import math

import numpy as np
import pandas as pd

from tellnorm.io import CSV_SIGNIFICANT_DIGITS, write_csv


def test_csv_holds_significant_digits_integers_and_nan_exactly(tmp_path):
    values = [1.23456789, 123456.789, 1e-7 / 3, math.nan]
    df = pd.DataFrame({"x": values, "n": [1, 2, 3, 4], "name": list("abcd")})
    back = pd.read_csv(write_csv(df, tmp_path / "t.csv"))
    expected = [float(np.format_float_positional(v, precision=CSV_SIGNIFICANT_DIGITS, unique=False, fractional=False))
                if not math.isnan(v) else v for v in values]
    np.testing.assert_array_equal(back["x"].to_numpy(), np.array(expected))
    assert back["n"].tolist() == [1, 2, 3, 4] and back["name"].tolist() == list("abcd")
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]  # no partial file left behind
