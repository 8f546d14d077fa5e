"""Writing outputs so that a failure never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


def check_output_dir(out: str | Path) -> Path:
    """Refuse an output folder that cannot be one (an existing file, an unwritable place) before any work."""
    from tellnorm.errors import TellnormError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TellnormError(f"--out {out} is a file: give a folder to write into (it is created if missing)")
    parent = next((p for p in [out, *out.parents] if p.exists()), None)
    if parent is not None and not os.access(parent, os.W_OK):
        raise TellnormError(f"cannot write to {parent}: choose another --out")
    return out


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; it replaces ``path`` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


CSV_SIGNIFICANT_DIGITS = 5  # tables report 3–4 digits; 5 keeps reruns on other machines byte-identical


def write_csv(df: pd.DataFrame, path: str | Path, *, significant_digits: int = CSV_SIGNIFICANT_DIGITS) -> Path:
    """Write a table rounded to what is reported, so a rerun elsewhere leaves ``git status`` clean."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format=f"%.{significant_digits}g")
    return Path(path)


def write_json(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as indented JSON (numpy numbers as floats), atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    return Path(path)


def write_parquet(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a table as parquet (no index), atomically; returns the path."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return Path(path)


def markdown_table(df: pd.DataFrame, *, float_format: str = "{:.3g}") -> str:
    """A DataFrame as a GitHub markdown table (floats through ``float_format``; NaN as a dash)."""
    import math

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "—" if math.isnan(value) else float_format.format(value)
        return str(value)

    header = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "---|" * len(df.columns)
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule] + rows)
