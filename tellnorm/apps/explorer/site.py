"""The explorer's static site: page code (HTML/JS/CSS) and data (JSON) in separate files, no network.

Layout of ``write_site(docs, out)``::

    out/index.html                 the single page (routes: #/ index, #/feature/<layer>/<id>, #/norms/<layer>)
    out/assets/explorer.js, .css   page code
    out/assets/plotly.min.js       plotly.js, local (no CDN)
    out/data/<name>.json           the data (meta, corpus, norms, techniques, index_L<l>, features_L<l>_<k>)
    out/data/<name>.js             the same JSON wrapped in one call, so the page can load it lazily from
                                   ``file://`` too (browsers refuse fetch() of local files)

Per-layer files are loaded only when a view needs them (a feature page: one shard of its layer), so a large SAE
suite is never loaded at once. ``docs`` may be a stream of ``(name, doc)`` pairs
(:func:`tellnorm.apps.explorer.data.iter_explorer_docs`): each document is written as it comes and then dropped, so
writing holds one document at a time.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from tellnorm.apps.explorer.page import CSS, JS
from tellnorm.errors import TellnormError


def _write(path: Path, text: str) -> None:
    from tellnorm.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_doc(out: Path, name: str, doc: dict) -> None:
    """``data/<name>.json`` and its ``data/<name>.js`` wrapper (for ``file://``)."""
    text = json.dumps(doc, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    _write(out / "data" / f"{name}.json", text + "\n")
    wrapped = text.replace("</", "<\\/")
    _write(out / "data" / f"{name}.js", f"tnData({json.dumps(name)},{wrapped});\n")


def write_site(docs: Mapping[str, dict] | Iterable[tuple[str, dict]], out: str | Path, *,
               title: str | None = None) -> Path:
    """Write the site for ``docs`` (a dict from :func:`tellnorm.apps.explorer.data.build_explorer_data`, or the stream
    of :func:`tellnorm.apps.explorer.data.iter_explorer_docs`); return index.html (written last)."""
    import html

    from plotly.offline import get_plotlyjs

    from tellnorm.io import check_output_dir

    out = check_output_dir(out)
    if isinstance(docs, Mapping):
        if "meta" not in docs:
            raise TellnormError("not explorer data: no 'meta' document (build it with build_explorer_data)")
        docs = docs.items()
    docs = iter(docs)
    first = next(docs, None)  # a stream checks its arguments here: nothing is created before that
    if first is None:
        raise TellnormError("not explorer data: no documents (build them with iter_explorer_docs)")
    out.mkdir(parents=True, exist_ok=True)
    meta = None
    for name, doc in itertools.chain([first], docs):
        write_doc(out, name, doc)
        if name == "meta":
            meta = doc
        del doc  # the stream's next document is computed after this line: hold nothing of this one
    if meta is None:
        raise TellnormError("not explorer data: no 'meta' document (build it with iter_explorer_docs)")
    _write(out / "assets" / "plotly.min.js", get_plotlyjs())
    _write(out / "assets" / "explorer.js", JS)
    _write(out / "assets" / "explorer.css", CSS)
    title = title or f"tellnorm explorer: {meta.get('model', '')}"
    page = INDEX.replace("__TITLE__", html.escape(title))
    _write(out / "index.html", page)
    return out / "index.html"


INDEX = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<link rel="stylesheet" href="assets/explorer.css">
<script>window.PlotlyConfig = {MathJaxConfig: 'local'};</script>
<script src="assets/plotly.min.js"></script>
</head>
<body>
<header class="tn-top">
  <a class="tn-brand" href="#/">__TITLE__</a>
  <nav><a href="#/" data-route="index">Features</a><a href="#/norms" data-route="norms">Norm view</a></nav>
  <span class="tn-meta" id="tn-meta"></span>
</header>
<main id="tn-app"><p class="tn-empty">Loading…</p></main>
<script src="assets/explorer.js"></script>
<script src="data/meta.js"></script>
</body>
</html>
"""
