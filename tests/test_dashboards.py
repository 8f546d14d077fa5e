"""Feature dashboards: streamed data against an independent per-sequence reference, bad inputs, JSON, and the page
rendered by headless Chromium (DOM elements, plotly drawn, no console output, screenshot kept)."""

import copy
import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import active_hook_count, organism_prompts, sae_reference, tiny_organism_like

from tellnorm.apps.dashboards import (
    FeatureDashboardData,
    collect_dashboard_data,
    dashboard_html,
    load_dashboard_data,
    render_dashboard,
    save_dashboard_data,
    top_feature_ids,
)
from tellnorm.errors import TellnormError

LAYER = 2
D_SAE = 128
FEATURES = [5, 17, 3, 90]
N_EXAMPLES = 6
CONTEXT = (5, 3)
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@pytest.fixture(scope="module")
def model():
    return tiny_organism_like(n_layers=3)


@pytest.fixture(scope="module")
def sae():
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(0)
    return StandardSAE(StandardSAEConfig(d_in=64, d_sae=D_SAE)).eval()


@pytest.fixture(scope="module")
def sequences(model):
    prompts = organism_prompts(model, 9, seed=1)
    return [prompts[0]] * 3 + prompts[1:]  # one batch of three copies: its top tokens are all repeats


@pytest.fixture(scope="module")
def scores():
    return {f: {"reason_score": 0.1 * (i + 1), "differential": -0.5 + i} for i, f in enumerate(FEATURES)}


@pytest.fixture(scope="module")
def data(model, sae, sequences, scores):
    # batch_size 3: prompts of different lengths share left-padded batches
    return collect_dashboard_data(model, sae, LAYER, FEATURES, sequences, scores=scores, n_examples=N_EXAMPLES,
                                  context=CONTEXT, batch_size=3)


def test_streamed_data_matches_an_independent_reference(model, sae, sequences, data, scores):
    acts, norms = sae_reference(model, sae, LAYER, sequences, FEATURES)
    assert active_hook_count(model) == 0
    eligible = sum(len(s) - 1 for s in sequences)  # no padding, no position 0
    assert [d.feature for d in data] == FEATURES
    deduplicated = 0
    for j, d in enumerate(data):
        assert (d.layer, d.d_sae, d.hook_name) == (LAYER, D_SAE, model.hook_name(LAYER))
        assert d.scores == scores[d.feature]
        flat = [(a[p, j], s, p) for s, a in enumerate(acts) for p in range(1, len(a))]
        values = np.array([v for v, _, _ in flat])
        positive = values[values > 0]
        assert len(positive) > N_EXAMPLES  # the check below is not vacuous
        # top examples: values and positions; a repeated prefix (the shared chat template) counts once
        by_prefix = {}
        for v, s, p in flat:
            if v > 0:
                by_prefix.setdefault(tuple(sequences[s][: p + 1]), (v, s, p))
        top = sorted(by_prefix.values(), key=lambda t: -t[0])[:N_EXAMPLES]
        deduplicated += len(positive) - len(by_prefix)
        assert [(tuple(sequences[e.sequence][: e.position + 1]), e.position) for e in d.examples] == \
            [(tuple(sequences[s][: p + 1]), p) for _, s, p in top]
        np.testing.assert_allclose([e.activation for e in d.examples], [v for v, _, _ in top], rtol=1e-4, atol=1e-7)
        for e in d.examples:
            seq, a = sequences[e.sequence], acts[e.sequence][:, j]
            lo, hi = max(e.position - CONTEXT[0], 0), min(e.position + CONTEXT[1] + 1, len(seq))
            assert e.start == lo and e.token_ids == seq[lo:hi] and len(e.tokens) == hi - lo
            assert e.tokens[e.center] == model.tokenizer.decode([seq[e.position]])
            for k, value in enumerate(e.activations):
                if lo + k == 0:
                    assert value is None  # position 0 is shown but carries no activation
                else:
                    assert value == pytest.approx(a[lo + k], rel=1e-4, abs=1e-7)
        # histogram: every eligible token counted once; bins match numpy on the same edges
        h = d.histogram
        assert h.total == d.n_tokens == eligible
        assert sum(h.counts) == d.n_active == len(positive)
        np.testing.assert_array_equal(h.counts, np.histogram(positive, bins=h.edges)[0])
        assert h.edges[-2] <= positive.max() < h.edges[-1]
        assert d.max_activation == pytest.approx(positive.max(), rel=1e-4)
        # correlation with the layer norm over the same tokens
        all_norms = np.array([n[p] for s, n in enumerate(norms) for p in range(1, len(n))])
        c = d.norm_correlation
        assert c.n == eligible
        assert c.r == pytest.approx(np.corrcoef(values, all_norms)[0, 1], abs=1e-4)
        assert c.mean_norm_active == pytest.approx(all_norms[values > 0].mean(), rel=1e-4)
        assert c.mean_norm_inactive == pytest.approx(all_norms[values <= 0].mean(), rel=1e-4)
        # logit effects: an independent topk of W_dec[f] @ W_U
        effect = sae.W_dec[d.feature].detach() @ model.hf_model.lm_head.weight.detach().T
        up, down = torch.topk(effect, 10), torch.topk(-effect, 10)
        assert [t.token_id for t in d.promoted] == up.indices.tolist()
        assert [t.token_id for t in d.suppressed] == down.indices.tolist()
        np.testing.assert_allclose([t.value for t in d.promoted], up.values.numpy(), rtol=1e-5)
        np.testing.assert_allclose([t.value for t in d.suppressed], (-down.values).numpy(), rtol=1e-5)
        assert [t.token for t in d.promoted] == [model.tokenizer.decode([i]) for i in up.indices.tolist()]
    assert deduplicated > 0  # the prompts share a chat-template prefix: repeated prefixes were exercised


def test_batch_size_and_encode_chunks_do_not_change_the_data(model, sae, sequences, data, scores, monkeypatch):
    import tellnorm.apps.dashboards.data as dashboard_data

    monkeypatch.setattr(dashboard_data, "ENCODE_BUDGET", 7 * D_SAE)  # encode 7 tokens at a time
    alone = collect_dashboard_data(model, sae, LAYER, FEATURES[:2], sequences, scores=scores, n_examples=N_EXAMPLES,
                                   context=CONTEXT, batch_size=1)
    for a, b in zip(alone, data[:2]):
        assert [e.position for e in a.examples] == [e.position for e in b.examples]
        np.testing.assert_allclose([e.activation for e in a.examples], [e.activation for e in b.examples], rtol=1e-4)
        assert a.histogram.counts == b.histogram.counts and a.n_active == b.n_active


def test_bad_inputs_fail_with_one_clear_line(model, sae, sequences):
    from sae_lens import StandardSAE, StandardSAEConfig

    def fails(match, *args, **kwargs):
        with pytest.raises(TellnormError, match=match) as err:
            collect_dashboard_data(*args, **kwargs)
        assert "\n" not in str(err.value)

    fails("no features chosen", model, sae, LAYER, [], sequences)
    fails("no features chosen", model, sae, LAYER, None, sequences)
    fails(f"d_sae={D_SAE}", model, sae, LAYER, [D_SAE], sequences)
    fails(f"d_sae={D_SAE}", model, sae, LAYER, [3, -1], sequences)
    fails("not an integer", model, sae, LAYER, [1.5], sequences)
    fails("no sequences", model, sae, LAYER, [3], [])
    fails("out of range", model, sae, 7, [3], sequences)
    wrong = StandardSAE(StandardSAEConfig(d_in=32, d_sae=16))
    fails("d_in=32.*d_model=64", model, wrong, LAYER, [3], sequences)
    assert active_hook_count(model) == 0
    with pytest.raises(TellnormError, match="nothing to render"):
        render_dashboard([], "unused.html")
    with pytest.raises(TellnormError, match="not valid JSON"):
        FeatureDashboardData.from_json("{not json")
    # feature_ids=None picks the top reasoning features from the scores
    assert top_feature_ids({3: {"reason_score": 0.2}, 9: {"reason_score": 0.9}, 4: {"reason_score": -1}}, k=2) == [9, 3]


def test_repeated_prefixes_are_shown_once_and_crowd_nothing_out(model, sae, sequences):
    copies = [sequences[0]] * 3  # one batch where every token appears three times
    (d,) = collect_dashboard_data(model, sae, LAYER, [FEATURES[1]], copies, n_examples=N_EXAMPLES, batch_size=3)
    acts, _ = sae_reference(model, sae, LAYER, copies[:1], FEATURES)
    a = acts[0][:, 1]
    expected = sorted((p for p in range(1, len(a)) if a[p] > 0), key=lambda p: -a[p])[:N_EXAMPLES]
    assert len(expected) == N_EXAMPLES
    assert [e.position for e in d.examples] == expected
    assert d.n_tokens == 3 * (len(copies[0]) - 1)  # statistics still count every token


def test_a_dead_feature_gets_an_empty_card(model, sae, sequences, tmp_path):
    dead = copy.deepcopy(sae)
    with torch.no_grad():
        dead.b_enc[7] = -1e3  # never fires
    (d,) = collect_dashboard_data(model, dead, LAYER, [7], sequences[:3], batch_size=2)
    assert d.examples == [] and d.n_active == 0 and d.histogram.counts == []
    assert d.histogram.n_zero == d.n_tokens == sum(len(s) - 1 for s in sequences[:3])
    assert d.norm_correlation.r is None and d.mean_activation_when_active is None
    assert FeatureDashboardData.from_json(d.to_json()) == d
    page = render_dashboard([d], tmp_path / "dead.html").read_text(encoding="utf-8")
    assert "Never active" in page


def test_json_round_trip(data, tmp_path):
    for d in data:
        back = FeatureDashboardData.from_json(d.to_json())
        assert back == d
        assert dataclasses.asdict(back) == dataclasses.asdict(d)
    d.to_json(tmp_path / "one.json")
    assert FeatureDashboardData.from_json(tmp_path / "one.json") == d
    save_dashboard_data(data, tmp_path / "all.json")
    assert load_dashboard_data(tmp_path / "all.json") == data


def _tricky(d: FeatureDashboardData) -> FeatureDashboardData:
    """A copy whose first context holds markup, a newline and a quote, to check escaping."""
    ex = dataclasses.replace(d.examples[0], tokens=list(d.examples[0].tokens))
    ex.tokens[0], ex.tokens[1] = "<script>alert(1)</script>", '\n"x&'
    return dataclasses.replace(d, examples=[ex] + d.examples[1:])


def _network_loads(page: str) -> list[str]:
    tags = re.findall(r"<(?:script|link|img|iframe|source|video|audio|embed|object)\b[^>]*>", page, flags=re.I)
    loads = [t for t in tags if re.search(r"\b(?:src|href|data)\s*=", t, flags=re.I)]
    loads += re.findall(r"@import|url\(\s*['\"]?(?:https?:)?//", page)
    return loads


def test_page_is_self_contained_and_escaped(data, tmp_path):
    page_path = render_dashboard([_tricky(data[0])] + data[1:], tmp_path / "dash.html", title="Layer 2 <features>")
    page = page_path.read_text(encoding="utf-8")
    assert _network_loads(page) == []
    assert page.count("plotly.js v") == 1  # embedded once
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "↵" in page and "Layer 2 &lt;features&gt;" in page
    assert page.count('class="tn-card"') == len(data)
    assert not list(tmp_path.glob(".*partial*"))  # atomic write left nothing behind
    fragment = dashboard_html(data)
    assert fragment.lstrip().startswith("<style>") and "<html" not in fragment and _network_loads(fragment) == []
    assert fragment.count('class="tn-card"') == len(data)


def _chromium(*args, tmp_path) -> subprocess.CompletedProcess:
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.iterdir()))}"
    profile.mkdir()
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


def _console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium: cannot render the dashboard headless")
def test_page_renders_in_headless_chromium(data, tmp_path):
    page = render_dashboard([_tricky(data[0])] + data[1:], tmp_path / "dash.html")
    url = page.resolve().as_uri()
    dom = _chromium("--dump-dom", url, tmp_path=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert _console_lines(dom.stderr) == []
    html = dom.stdout
    assert html.count('class="tn-card"') == len(data)
    assert html.count('class="tn-nav-item') == len(data)
    assert "tn-tok-max" in html and "background:rgba(" in html
    assert html.count('class="main-svg"') >= len(data)  # plotly drew every histogram
    assert 'class="tn-plot tn-plot-missing' not in html and "<script>alert(1)" not in html
    assert "ReasonScore" in html and "Differential" in html and "Promoted" in html and "r = " in html
    ARTIFACTS.mkdir(exist_ok=True)
    shot = tmp_path / "dashboard.png"
    run = _chromium(f"--screenshot={shot}", "--window-size=1280,2000", url, tmp_path=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert _console_lines(run.stderr) == []
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    shutil.copyfile(shot, ARTIFACTS / "dashboard.png")
