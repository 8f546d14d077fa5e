"""One figure style for every tellnorm plot, and writing figures as offline HTML plus PNG.

HTML pages load plotly.js from a ``plotly.min.js`` written once beside them (no CDN), so every page opens with
no network and a folder of figures carries one copy of the library. PNG export goes through kaleido, which
drives a local Chrome/Chromium (Debian's ``chromium`` package); without one, figures are written as HTML only
and the caller is told once how to get PNGs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from tellnorm.io import atomic_path

if TYPE_CHECKING:
    import plotly.graph_objects as go

THINKING_COLOR = "#c0392b"
NON_THINKING_COLOR = "#2471a3"
MODE_COLORS = {"thinking": THINKING_COLOR, "non-thinking": NON_THINKING_COLOR}
NEUTRAL_COLOR = "#555555"
FONT = "Inter, Helvetica, Arial, sans-serif"
PNG_SCALE = 2  # crisp on high-density screens and in the README


def style(fig: go.Figure, *, title: str | None = None, x_title: str | None = None, y_title: str | None = None,
          height: int = 420, width: int = 720) -> go.Figure:
    """Apply tellnorm's style (white background, light grid, titles, legend on top) to ``fig``; returns it."""
    fig.update_layout(
        template="plotly_white", font={"family": FONT, "size": 13}, height=height, width=width,
        title={"text": title, "x": 0.02, "xanchor": "left"} if title else None,
        # the legend gets its own row above the plot area, clear of subplot titles
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.10, "x": 0.0},
        margin={"l": 70, "r": 30, "t": 120 if title else 70, "b": 60},
    )
    if x_title:
        fig.update_xaxes(title_text=x_title)
    if y_title:
        fig.update_yaxes(title_text=y_title)
    return fig


def chromium_path() -> str | None:
    """The first Chrome/Chromium executable on PATH (kaleido's browser for PNGs), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def write_figure(fig: go.Figure, stem: str | Path, *, png: bool = True) -> list[Path]:
    """Write ``stem.html`` (with ``plotly.min.js`` beside it) and, when a browser is available, ``stem.png``.

    Files are written to a temporary name and renamed, so an interrupted export leaves no half-written figure.
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(stem.with_suffix(".html")) as tmp:
        # a fixed div id (plotly's default is random), so rewriting an unchanged figure leaves the file unchanged
        fig.write_html(str(tmp), include_plotlyjs="directory", full_html=True, div_id=f"tellnorm-{stem.name}")
    written = [stem.with_suffix(".html")]
    if png:
        browser = chromium_path()
        if browser is None:
            warnings.warn("no Chromium found: wrote HTML only; install Debian's 'chromium' for PNG figures",
                          stacklevel=2)
        else:
            os.environ.setdefault("BROWSER_PATH", browser)  # kaleido looks here for its browser
            with atomic_path(stem.with_suffix(".png")) as tmp:
                _write_png(fig, tmp)
            written.append(stem.with_suffix(".png"))
    return written


PNG_ATTEMPTS = 3


@contextmanager
def browser_temp() -> Iterator[None]:
    """A temp folder of its own for the browsers kaleido starts inside the block (Chromium leaves
    ``.org.chromium.*`` folders in ``TMPDIR``, sometimes after its parent has returned), removed on every exit path.
    Short, under the system's temp folder: Chromium's socket path inside it must stay under 108 bytes."""
    folder = tempfile.mkdtemp(prefix="tn-browser-")
    previous = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = folder
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = previous
        shutil.rmtree(folder, ignore_errors=True)


def _write_png(fig, path: Path) -> None:
    with browser_temp():  # a browser started for this figure alone leaves nothing behind
        _write_png_attempts(fig, path)


def _write_png_attempts(fig, path: Path) -> None:
    for attempt in range(PNG_ATTEMPTS):
        try:
            with warnings.catch_warnings():  # plotly passes kaleido options a running png_session() ignores
                warnings.filterwarnings("ignore", message="The kopts argument is ignored")
                fig.write_image(str(path), format="png", scale=PNG_SCALE)
            return
        except Exception as err:
            # kaleido can call into its page before the page's script has loaded when the CPU is busy
            # ("kaleido_scopes is not defined"); the tab is reloaded after a failure, so a retry renders
            if "kaleido_scopes is not defined" not in str(err) or attempt == PNG_ATTEMPTS - 1:
                raise


PNG_SESSION_START_S = 60  # a cold browser start on a busy machine takes seconds


@contextmanager
def png_session() -> Iterator[None]:
    """Keep one browser open for every PNG written inside the block (otherwise kaleido starts one per figure,
    about 2 s each); nothing happens without a browser."""
    browser = chromium_path()
    if browser is None:
        yield
        return
    import kaleido

    os.environ.setdefault("BROWSER_PATH", browser)
    with browser_temp():
        kaleido.start_sync_server(silence_warnings=True)
        try:
            if not _png_server_answers(kaleido):
                # kaleido's server thread dies quietly when its browser fails to start, and every later call would
                # wait forever: go back to a browser per figure, which raises the browser's error instead
                kaleido.stop_sync_server(silence_warnings=True)
            yield
        finally:
            kaleido.stop_sync_server(silence_warnings=True)


def _png_server_answers(kaleido) -> bool:
    answered = []

    def probe():
        try:
            kaleido.calc_fig_sync({"data": [], "layout": {}}, opts={"format": "png", "width": 10, "height": 10})
            answered.append(True)
        except Exception:
            answered.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # daemon: a probe of a dead server never returns
    thread.start()
    thread.join(PNG_SESSION_START_S)
    return answered == [True]
