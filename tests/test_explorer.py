"""``tellnorm explore``: the organism's explorer data against an independent recomputation, the technique markers
against a rerun of each edit, the build streamed one layer at a time, bad inputs refused before any work, and the
site driven in headless Chromium (search, sort, feature page, norm view with technique rows; no console output;
screenshots kept in tests/artifacts)."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import sae_reference

from tellnorm.errors import TellnormError

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHECK_LAYERS = (2, 6)
# ERSS with the paper's constants (a streak of 40 low tokens) never injects in the organism's short responses: the
# fixture uses a shorter streak so every marker kind occurs (the CLI keeps the paper's constants).
ERSS_TEST = dict(low_k=8, p_inject=0.5, cooldown=16, cos_min=0.3)


@pytest.fixture(scope="module")
def organism():
    from tellnorm.backends import load_model
    from tellnorm.saes import load_saes

    model = load_model("organism")
    return model, load_saes("organism", model)


@pytest.fixture(scope="module")
def built(organism, tmp_path_factory):
    from tellnorm.apps.explorer import build_explorer_data, explorer_corpus, write_site
    from tellnorm.techniques import ERSSConfig

    model, saes = organism
    corpus, difficulties = explorer_corpus(model, 1)  # one problem per difficulty, both modes: 20 responses
    docs = build_explorer_data(model, saes, corpus, difficulties=difficulties, erss=ERSSConfig(**ERSS_TEST))
    out = tmp_path_factory.mktemp("explorer") / "site"
    index = write_site(docs, out)
    return corpus, docs, index


def _feature(docs, layer, f):
    shard = docs[f"features_L{layer}_{f // docs['meta']['shard']}"]
    return shard["features"][f - shard["start"]]


def test_data_matches_an_independent_recomputation(organism, built):
    model, saes = organism
    corpus, docs, _ = built
    assert docs["meta"]["n_sequences"] == len(corpus.sequences) == 20
    assert sorted(d["layer"] for d in docs["meta"]["layers"]) == sorted(saes)
    for layer in CHECK_LAYERS:
        sae = saes[layer]
        acts, norms = sae_reference(model, sae, layer, corpus.sequences)
        a = np.concatenate([x[1:] for x in acts])  # [tokens, d_sae], position 0 excluded
        y = np.concatenate([n[1:] for n in norms])
        scale = sae.W_dec.detach().double().norm(dim=-1).numpy()
        gen = [np.arange(1, len(s)) >= k for s, k in zip(corpus.sequences, corpus.n_prompt)]
        think = np.concatenate([g & (m == "thinking") for g, m in zip(gen, corpus.modes)])
        nothink = np.concatenate([g & (m == "non-thinking") for g, m in zip(gen, corpus.modes)])
        rows = docs[f"index_L{layer}"]["features"]
        assert len(rows["id"]) == int(sae.cfg.d_sae) == len(rows["top_tokens"])
        density = (a > 0).mean(0)
        chosen = [int(np.argmax(density)), int(np.argsort(density)[len(density) // 2]), 7]
        for f in chosen:
            x = a[:, f]
            assert rows["density"][f] == pytest.approx(density[f], rel=1e-3, abs=1e-6)
            assert rows["mean"][f] == pytest.approx(x.mean(), rel=2e-3, abs=1e-6)
            assert rows["max"][f] == pytest.approx(x.max(), rel=2e-3, abs=1e-6)
            if x.std() > 0:
                assert rows["corr"][f] == pytest.approx(np.corrcoef(x, y)[0, 1], abs=2e-3)
            delta = (x[think].mean() - x[nothink].mean()) * scale[f]
            assert rows["delta"][f] == pytest.approx(delta, rel=2e-3, abs=1e-5)
            detail = _feature(docs, layer, f)
            assert detail["n_active"] == int((x > 0).sum())
            if detail["examples"]:
                assert detail["examples"][0]["act"] == pytest.approx(x.max(), rel=2e-3)
                ex = detail["examples"][0]
                assert acts[ex["seq"]][ex["pos"], f] == pytest.approx(ex["act"], rel=2e-3)
                assert sum(detail["histogram"]["counts"]) + detail["histogram"]["n_zero"] == len(x)
        # the norm view's norms and the calibrated threshold of this layer
        r0 = docs["norms"]["responses"][0]
        np.testing.assert_allclose(r0["norms"][str(layer)][1:], norms[r0["seq"]][1:], rtol=1e-3)
        assert docs["norms"]["thresholds"][str(layer)] is not None


def _rerun(model, name, layers, taus, prompts, rids):
    """The technique's edit built from the public API (as ``tellnorm evaluate`` / the suppression study build it)
    and one greedy decode of the prompts."""
    from tellnorm.generation import SamplingConfig, generate
    from tellnorm.interventions import AboveThreshold, Scale
    from tellnorm.techniques import ALRR, ERSS, ALRRConfig, ERSSConfig, threshold_for

    fixed = {l: taus[l] for l in layers}
    if name == "alrr":
        edit = ALRR(model, threshold_for("calibrated", fixed=fixed), ALRRConfig(layers=tuple(layers)))
    elif name == "erss":
        edit = ERSS(model, threshold_for("calibrated", fixed=fixed), ERSSConfig(layers=tuple(layers), **ERSS_TEST))
    else:
        edit = Scale(model, layers, 0.1, selection=AboveThreshold("fixed", fixed=fixed))
    gens = generate(model, prompts, SamplingConfig(max_new_tokens=240), request_ids=rids, batch_size=50,
                    observers=[edit])
    return edit, gens


def test_technique_marks_are_the_edits_own_decisions(organism, built):
    """Each technique rerun here on the norm view's prompts: the page marks exactly the tokens its EditRecord says
    it edited (ALRR kept/rejected from its state and its report), and shows the technique's own response."""
    from tellnorm.apps.dashboards.data import display_tokens
    from tellnorm.thresholds import calibrated_thresholds

    model, _ = organism
    corpus, docs, _ = built
    tech = docs["techniques"]
    assert [t["key"] for t in tech["techniques"]] == ["alrr", "erss", "suppression"]
    late = model.late_layers()
    # τ: the calibrated threshold of the corpus's generated-token norms, recomputed from run_with_cache
    taus = {int(l): t for l, t in tech["thresholds"].items()}
    ref = {}
    with torch.no_grad():
        for layer in late:
            hook, values = model.hook_name(layer), []
            for seq, k in zip(corpus.sequences, corpus.n_prompt):
                _, cache = model.bridge.run_with_cache(torch.tensor([seq]), names_filter=lambda n, hook=hook: n == hook)
                values.append(cache[hook][0, max(k, 1):].double().norm(dim=-1).numpy())
            ref[layer] = np.concatenate(values)
    for layer, tau in calibrated_thresholds(ref).values.items():
        assert taus[layer] == pytest.approx(tau, rel=1e-5)
        assert docs["norms"]["thresholds"][str(layer)] == pytest.approx(tau, rel=1e-3)
    chosen = [r["seq"] for r in docs["norms"]["responses"]]
    prompts = [list(corpus.sequences[i][:corpus.n_prompt[i]]) for i in chosen]
    kinds = {}
    for t in tech["techniques"]:
        assert t["error"] is None and t["layers"] == late
        edit, gens = _rerun(model, t["key"], t["layers"], taus, prompts, chosen)
        frame = edit.record.frame()
        edited = frame[frame.edited]
        report = edit.report().set_index("request_id") if t["key"] == "alrr" else None
        assert [r["seq"] for r in t["runs"]] == chosen
        for run, g in zip(t["runs"], gens):
            rid = run["seq"]
            assert run["tokens"] == display_tokens(model, g.generated_ids) and run["n_prompt"] == len(g.prompt_ids)
            assert run["same"] == (g.ids == list(corpus.sequences[rid]))
            mine = edited[edited.request_id == rid]
            assert sorted((m[0], m[1]) for m in run["marks"]) == sorted(zip(mine.position.tolist(), mine.layer.tolist()))
            assert all(m[0] >= run["n_prompt"] for m in run["marks"])  # generated tokens only
            for m in run["marks"]:
                kinds[m[2]] = kinds.get(m[2], 0) + 1
                if t["key"] == "alrr":
                    kept = edit.state(rid, m[1])["kept"][m[0]]
                    assert (m[2], m[3]) == (("kept", kept) if kept else ("tried", 0))
            if t["key"] == "alrr" and run["marks"]:
                assert report.loc[rid, "alrr_band_tokens"].sum() == len(run["marks"])
                assert report.loc[rid, "alrr_kept_passes"].sum() == sum(m[3] for m in run["marks"])
        assert sum(t["counts"].values()) == len(edited)
    assert all(kinds.get(k, 0) > 0 for k in ("kept", "tried", "injected", "scaled")), kinds
    # suppression changes the response (its own tokens are shown); ALRR here never does
    supp = tech["techniques"][2]["runs"]
    assert any(not r["same"] and r["first_diff"] >= r["n_prompt"] for r in supp)


def test_build_streams_one_layer_at_a_time(organism, built, tmp_path, monkeypatch):
    """The per-layer data is computed and written one layer at a time: a layer's SAE is not touched before the
    previous layer's files are on disk, and at most one layer's computation is alive (peak = 1), both when the
    first pass keeps the vectors and when every layer gets its own pass of the model."""
    import gc
    import weakref

    import tellnorm.apps.explorer.data as data
    import tellnorm.apps.explorer.site as site
    from tellnorm.apps.explorer import iter_explorer_docs, write_site

    model, saes = organism
    corpus, docs, _ = built
    layers = [2, 6]
    live, events, peak = weakref.WeakSet(), [], [0]
    original_layer_docs, original_write = data._layer_docs, site.write_doc

    def layer_docs(*args, **kwargs):
        gen = original_layer_docs(*args, **kwargs)
        live.add(gen)
        return gen

    def spy(layer, encode):
        def wrapped(x):
            if not events or events[-1] != ("encode", layer):
                gc.collect()
                peak[0] = max(peak[0], len(live))
                events.append(("encode", layer))
            return encode(x)
        return wrapped

    monkeypatch.setattr(data, "_layer_docs", layer_docs)
    monkeypatch.setattr(site, "write_doc", lambda out, name, doc: (events.append(("write", name)),
                                                                   original_write(out, name, doc)))
    for l in layers:
        monkeypatch.setattr(saes[l], "encode", spy(l, saes[l].encode))
    passes = []
    original_forward = data._forward
    monkeypatch.setattr(data, "_forward", lambda model, c, observer, s, b: (
        passes.append((sorted(observer.layers), sorted(observer.saes))), original_forward(model, c, observer, s, b)))
    for cache in (data.RESIDUAL_CACHE_BYTES, 0):
        events.clear(), passes.clear()
        peak[0] = 0
        out = tmp_path / f"site-{cache}"
        stream = iter_explorer_docs(model, {l: saes[l] for l in layers}, corpus, techniques=(),
                                    residual_cache_bytes=cache)
        assert not isinstance(stream, dict)
        write_site(stream, out)
        assert peak[0] == 1, peak  # one layer's computation alive whenever an SAE encodes
        # encode(L) ... write(L's files) ... encode(next L): never interleaved, never ahead
        order = [e for e in events if e[0] == "encode" or e[1].startswith(("features_L", "index_L"))]
        expected = []
        for l in layers:
            expected += [("encode", l), ("write", f"features_L{l}_0"), ("write", f"index_L{l}")]
        assert order == expected, order
        assert [e[1] for e in events if e[0] == "write"][-1] == "meta"
        if cache:  # one pass keeps the vectors; layers are encoded from them
            assert passes == [(layers, [])]
        else:  # a norms pass, then one pass per layer with that layer's SAE only
            assert passes == [(layers, [])] + [([l], [l]) for l in layers]
        for l in layers:
            on_disk = json.loads((out / "data" / f"index_L{l}.json").read_text(encoding="utf-8"))
            assert on_disk == docs[f"index_L{l}"]


def test_site_files_are_separate_and_offline(built):
    _, docs, index = built
    out = index.parent
    for name, doc in docs.items():
        assert json.loads((out / "data" / f"{name}.json").read_text(encoding="utf-8")) == doc
        wrapped = (out / "data" / f"{name}.js").read_text(encoding="utf-8")
        assert wrapped.startswith(f'tnData("{name}",')
    page = index.read_text(encoding="utf-8")
    loads = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert loads and all(not re.match(r"(https?:)?//", u) for u in loads)
    assert "assets/plotly.min.js" in loads and (out / "assets" / "plotly.min.js").stat().st_size > 1_000_000
    assert "http" not in (out / "assets" / "explorer.js").read_text(encoding="utf-8")


def test_bad_input_fails_with_one_clear_line_before_any_work(organism, tmp_path, monkeypatch, capsys):
    from sae_lens import StandardSAE, StandardSAEConfig

    import tellnorm.apps.explorer as explorer
    import tellnorm.backends
    import tellnorm.saes
    from tellnorm.apps import cli

    model, saes = organism
    wrong = {l: StandardSAE(StandardSAEConfig(d_in=32, d_sae=16)) for l in saes}
    current = {"saes": saes}
    monkeypatch.setattr(tellnorm.backends, "load_model", lambda *a, **k: model)
    monkeypatch.setattr(tellnorm.saes, "load_saes", lambda *a, **k: current["saes"])

    def no_work(*a, **k):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(explorer, "explorer_corpus", no_work)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [
        (["--out", str(a_file)], "is a file"),
        (["--feature", "6:512"], "feature 512 does not exist at layer 6"),
        (["--feature", "9:1"], "no SAE for layer 9"),
        (["--layers", "3,12"], r"no SAE for layer\(s\) \[12\]"),
        (["--n", "0"], "--n must be ≥ 1"),
    ]
    for args, match in cases:
        assert cli.main(["explore", "--out", str(tmp_path / "site"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(match, err), err
    current["saes"] = wrong
    assert cli.main(["explore", "--out", str(tmp_path / "site")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "d_in=32" in err and "d_model=" in err, err
    with pytest.raises(TellnormError, match="trained on"):
        explorer.check_saes(model, {5: saes[6]})
    # the Python API: the same checks, one line each, before the corpus is made
    for kwargs, out, match in (({}, a_file, "is a file"), ({"techniques": ["alrr", "lrs"]}, tmp_path / "site",
                                                             r"unknown technique\(s\) \['lrs'\]"),
                               ({"saes": wrong}, tmp_path / "site", "d_in=32")):
        with pytest.raises(TellnormError, match=match) as info:
            explorer.build_explorer(model, kwargs.pop("saes", saes), out, **kwargs)
        assert len(str(info.value).splitlines()) == 1
    stream = explorer.iter_explorer_docs(model, {6: saes[6]}, object(), techniques=("suppression",),
                                         suppression_factor=0)
    with pytest.raises(TellnormError, match="suppression factor must be a finite number > 0"):
        explorer.write_site(stream, tmp_path / "site")
    assert not (tmp_path / "site").exists()


def _chromium(*args, tmp_path, budget=15000) -> subprocess.CompletedProcess:
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.iterdir()))}"
    profile.mkdir()
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", f"--virtual-time-budget={budget}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


def _console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]


# Drives the real page: types a search, clicks a column header twice, clicks a row, opens the norm view, and
# writes what it saw into <pre id="tn-test-result"> for --dump-dom.
DRIVER = """
<script>
(function () {
  var out = {errors: [], steps: []};
  window.addEventListener("error", function (e) { out.errors.push(String(e.message)); });
  function finish() { var pre = document.createElement("pre"); pre.id = "tn-test-result";
    pre.textContent = JSON.stringify(out); document.body.appendChild(pre); }
  function until(cond, then, name, n) {
    n = n || 0;
    var ok = false; try { ok = cond(); } catch (e) {}
    if (ok) { out.steps.push(name); then(); }
    else if (n > 400) { out.timeout = name; finish(); }
    else setTimeout(function () { until(cond, then, name, n + 1); }, 25);
  }
  function rows() { return Array.prototype.slice.call(document.querySelectorAll("#tn-rows tr")); }
  function total() { return +document.getElementById("tn-rows").getAttribute("data-total"); }
  function ids() { return rows().slice(0, 30).map(function (r) { return r.getAttribute("data-layer") + ":" + r.getAttribute("data-id"); }); }
  function col(i) { return rows().slice(0, 200).map(function (r) { return parseFloat(r.cells[i].textContent); }); }
  until(function () { return rows().length > 0; }, function () {
    out.total = total(); out.first = ids();
    var s = document.getElementById("tn-search");
    s.value = __QUERY__; s.dispatchEvent(new Event("input"));
    until(function () { return total() < out.total; }, function () {
      out.filtered = total();
      out.filtered_tokens = rows().map(function (r) { return r.cells[8].textContent; });
      s.value = ""; s.dispatchEvent(new Event("input"));
      until(function () { return total() === out.total; }, function () {
        document.querySelector('th[data-col="density"]').click();
        until(function () { return document.querySelector("th.tn-sorted").getAttribute("data-col") === "density" && rows().length; }, function () {
          out.density_desc = col(2); out.sorted_first = ids();
          document.querySelector('th[data-col="density"]').click();
          until(function () { return document.querySelector("th.tn-sorted").textContent.indexOf("▲") >= 0 && rows().length; }, function () {
            out.density_asc = col(2);
            var row = rows()[rows().length - 1];
            out.clicked = row.getAttribute("data-layer") + ":" + row.getAttribute("data-id");
            row.click();
            until(function () { return document.querySelectorAll(".tn-ex").length > 0 && document.querySelector("#tn-hist .main-svg"); }, function () {
              out.hash = location.hash; out.n_examples = document.querySelectorAll(".tn-ex").length;
              out.n_highlighted = document.querySelectorAll(".tn-ctx .tn-tok[style]").length;
              out.feature_title = document.querySelector(".tn-card h2").textContent;
              location.hash = "#/norms/6";
              until(function () { return document.querySelectorAll("#tn-normview .tn-strip").length > 0; }, function () {
                out.n_responses = document.querySelectorAll("#tn-normview .tn-resp").length;
                out.modes = Array.prototype.map.call(document.querySelectorAll("#tn-normview .tn-resp"), function (r) { return r.getAttribute("data-mode"); });
                out.n_peaks = document.querySelectorAll(".tn-peak").length;
                out.labelled = Array.prototype.filter.call(document.querySelectorAll(".tn-strip .tn-tok"), function (t) {
                  return / · [a-z_]+$/.test(t.getAttribute("title") || ""); }).length;
                out.tech = {};
                ["alrr", "erss", "suppression"].forEach(function (k) {
                  var marks = {};
                  document.querySelectorAll('.tn-tech[data-tech="' + k + '"] .tn-mark').forEach(function (m) {
                    var kind = m.getAttribute("data-kind"); marks[kind] = (marks[kind] || 0) + 1; });
                  out.tech[k] = {rows: document.querySelectorAll('.tn-tech[data-tech="' + k + '"]').length, marks: marks};
                });
                var legend = document.querySelector(".tn-tech-legend");
                out.legend = legend ? legend.textContent : null;
                out.swatches = document.querySelectorAll(".tn-tech-legend .tn-sw").length;
                out.n_diff = document.querySelectorAll(".tn-tech .tn-diff").length;
                out.mark_bg = {};
                ["kept", "injected", "scaled"].forEach(function (k) {
                  var m = document.querySelector(".tn-tech .tn-m-" + k);
                  out.mark_bg[k] = m ? getComputedStyle(m).backgroundColor : null; });
                var tried = document.querySelector(".tn-tech .tn-m-tried");
                out.tried_shadow = tried ? getComputedStyle(tried).boxShadow : null;
                var sel = document.getElementById("tn-tech-rows");
                sel.value = "erss"; sel.dispatchEvent(new Event("change"));
                until(function () { return document.querySelectorAll('.tn-tech[data-tech="alrr"]').length === 0 &&
                                           document.querySelectorAll('.tn-tech[data-tech="erss"]').length > 0; }, function () {
                  out.only_erss = Array.prototype.map.call(document.querySelectorAll(".tn-tech"), function (r) { return r.getAttribute("data-tech"); });
                  sel = document.getElementById("tn-tech-rows");
                  sel.value = "all"; sel.dispatchEvent(new Event("change"));
                  until(function () { return document.querySelectorAll('.tn-tech[data-tech="alrr"]').length > 0; }, finish, "rows-all");
                }, "rows-erss");
              }, "norms");
            }, "feature");
          }, "sort-asc");
        }, "sort-desc");
      }, "clear");
    }, "search");
  }, "index");
})();
</script>
"""


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium: cannot drive the explorer headless")
def test_site_works_in_headless_chromium(built, tmp_path):
    _, docs, index = built
    # a top token some features have and most do not: the search must narrow the table
    counts = {}
    for layer in docs["meta"]["layers"]:
        for toks in docs[f"index_L{layer['layer']}"]["features"]["top_tokens"]:
            for t in set(toks):
                if t.strip() and t.strip().isalpha():
                    counts[t.strip()] = counts.get(t.strip(), 0) + 1
    query = min((c, t) for t, c in counts.items() if c >= 3)[1]
    driver = index.parent / "driver.html"
    driver.write_text(index.read_text(encoding="utf-8").replace("</body>", DRIVER.replace("__QUERY__", json.dumps(query))
                                                                + "</body>"), encoding="utf-8")
    run = _chromium("--dump-dom", driver.resolve().as_uri(), tmp_path=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert _console_lines(run.stderr) == []
    found = re.search(r'<pre id="tn-test-result">(.*?)</pre>', run.stdout, flags=re.S)
    assert found, run.stdout[-3000:]
    import html

    res = json.loads(html.unescape(found.group(1)))
    assert res["errors"] == [] and "timeout" not in res, res
    n_features = sum(l["d_sae"] for l in docs["meta"]["layers"])
    assert res["total"] == n_features  # every feature of every layer
    assert 0 < res["filtered"] < res["total"]
    assert all(query.lower() in t.lower() for t in res["filtered_tokens"])
    desc, asc = res["density_desc"], res["density_asc"]
    assert desc == sorted(desc, reverse=True) and asc == sorted(asc) and desc[0] > asc[0]
    assert res["sorted_first"] != res["first"]  # sorting reordered the table
    layer, fid = res["clicked"].split(":")
    assert res["hash"] == f"#/feature/{layer}/{fid}" and res["feature_title"] == f"Layer {layer} · feature {fid}"
    assert res["n_examples"] > 0 and res["n_highlighted"] > 0
    assert res["n_responses"] == len(docs["norms"]["responses"]) == 20
    assert set(res["modes"]) == {"thinking", "non-thinking"}
    assert res["n_peaks"] > 0 and res["labelled"] > 0
    # technique rows: one per response and technique, one marked token per decision (one layer here), a legend
    for t in docs["techniques"]["techniques"]:
        assert res["tech"][t["key"]]["rows"] == len(t["runs"]) == 20
        assert res["tech"][t["key"]]["marks"] == {k: v for k, v in t["counts"].items() if v}, (t["key"], res["tech"])
    assert res["swatches"] == 5 and "own generated tokens" in res["legend"] and "differs" in res["legend"]
    n_diff = sum(len(r["tokens"]) - (r["first_diff"] - r["n_prompt"]) for t in docs["techniques"]["techniques"]
                 for r in t["runs"] if not r["same"] and r["first_diff"] >= r["n_prompt"])
    assert res["n_diff"] == n_diff > 0
    assert all(bg and bg not in ("rgba(0, 0, 0, 0)", "transparent") for bg in res["mark_bg"].values()), res["mark_bg"]
    assert len(set(res["mark_bg"].values())) == 3 and res["tried_shadow"] not in (None, "none")
    assert set(res["only_erss"]) == {"erss"} and len(res["only_erss"]) == 20
    # screenshots of the three views, kept as artifacts (look at them)
    ARTIFACTS.mkdir(exist_ok=True)
    best = max(range(len(docs["index_L6"]["features"]["id"])), key=lambda f: docs["index_L6"]["features"]["density"][f])
    for name, frag, height in (("index", "", 1200), ("feature", f"#/feature/6/{best}", 1300), ("norms", "#/norms/6", 1900)):
        shot = tmp_path / f"explorer_{name}.png"
        run = _chromium(f"--screenshot={shot}", f"--window-size=1280,{height}", index.resolve().as_uri() + frag,
                        tmp_path=tmp_path, budget=5000)
        assert run.returncode == 0 and _console_lines(run.stderr) == [], run.stderr[-2000:]
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 30_000
        shutil.copyfile(shot, ARTIFACTS / f"explorer_{name}.png")
