"""tellnorm.figures: the browser's temp folder is its own and goes on every exit path (Chromium leaves
``.org.chromium.*`` folders in ``TMPDIR``, sometimes after kaleido has returned)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tellnorm.figures import browser_temp


@pytest.mark.parametrize("raises", [False, True])
def test_the_browser_gets_a_temp_folder_of_its_own_removed_on_every_exit_path(raises, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    seen = []
    with pytest.raises(RuntimeError) if raises else _nothing(), browser_temp():
        folder = Path(os.environ["TMPDIR"])
        seen.append(folder)
        (folder / ".org.chromium.Chromium.planted").mkdir()  # what Chromium leaves behind
        if raises:
            raise RuntimeError("planted")
    assert os.environ["TMPDIR"] == str(tmp_path)  # restored
    assert seen and seen[0] != tmp_path and not seen[0].exists()  # its own folder, gone with what was left in it
    assert not list(tmp_path.iterdir())


def _nothing():
    import contextlib

    return contextlib.nullcontext()
