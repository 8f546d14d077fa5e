"""Sharded studies: runners (tellnorm.studies.runners), the Ray pool (tellnorm.apps.distributed), a local 2-worker
cluster on the organism. Every study takes ``runner=``; the pool is passed where the single-process run passes none.

Sharded results are compared with the single-process ones: every count, token, generation, label and firing
counter exactly; norms and feature sums to float tolerance (a prompt's float32 activations depend slightly on the
padding of the batch it shares, measured ≤ 2e-6 relative; at batch size 1 they are bit-identical and the float64
sums differ only by the order of additions). A worker killed mid-shard is replaced and its shard run again, counted
once; a shard that fails for good leaves no output file; an unreachable address, workers that cannot start and a
shard that never finishes each fail in one line, within their time-outs.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tellnorm.apps.distributed import ShardPool, check_reachable
from tellnorm.errors import TellnormError
from tellnorm.features import RELATIVE_EPS
from tellnorm.studies.bounds import bounds_sums
from tellnorm.studies.corpus import contrast_corpus, trace_both_modes
from tellnorm.studies.features import feature_sums, feature_sums_shard
from tellnorm.studies.profile import profile_study
from tellnorm.studies.runners import (
    InProcess,
    Replica,
    Runner,
    Shard,
    concat_frames,
    generate_sharded,
    make_shards,
    merge_accumulators,
    merge_in_order,
    with_strategy,
)

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
NORM_RTOL = 1e-5  # measured max relative difference 1.6e-6 (batch padding), see module docstring
MAX_NEW = 48  # short responses keep the module well under two minutes
HAS_RAY = True
try:
    import ray  # noqa: F401
except ImportError:
    HAS_RAY = False
needs_ray = pytest.mark.skipif(not HAS_RAY and os.environ.get("TELLNORM_REQUIRE_RAY") != "1",
                               reason="Ray is not installed (pip install -e '.[ray]')")


# ------------------------------------------------------------------------------------------- without Ray

def test_shards_cover_every_index_once_in_a_fixed_order():
    for n, k in [(1, 1), (5, 2), (7, 3), (3, 8), (10, 10)]:
        for strategy in ("contiguous", "round-robin"):
            shards = make_shards(n, k, strategy)
            assert len(shards) == min(n, k) and all(s.indices for s in shards)
            assert sorted(i for s in shards for i in s.indices) == list(range(n))
            assert shards == make_shards(n, k, strategy)  # deterministic
            sizes = [len(s.indices) for s in shards]
            assert max(sizes) - min(sizes) <= 1
    assert [s.indices for s in make_shards(5, 2)] == [(0, 1, 2), (3, 4)]
    assert [s.indices for s in make_shards(5, 2, "round-robin")] == [(0, 2, 4), (1, 3)]
    with pytest.raises(TellnormError, match="unknown shard strategy"):
        make_shards(3, 2, "random")
    with pytest.raises(TellnormError, match="empty"):
        make_shards(0, 2)


def test_merges_restore_original_order_and_merge_accumulators_once():
    from tellnorm.features import FeatureSums

    shards = make_shards(5, 2, "round-robin")
    assert merge_in_order([["a0", "a2", "a4"], ["a1", "a3"]], shards) == ["a0", "a1", "a2", "a3", "a4"]
    import torch

    parts = [FeatureSums(), FeatureSums()]
    parts[0].add(1, "b", torch.ones(2, 3))
    parts[1].add(1, "b", torch.full((3, 3), 2.0))
    merged = merge_accumulators(parts, shards)
    assert merged.counts[(1, "b")] == 5 and merged.sums[(1, "b")].tolist() == [8.0, 8.0, 8.0]
    import pandas as pd

    frame = concat_frames([pd.DataFrame({"i": [2, 0]}), pd.DataFrame({"i": [1]})], sort_by=["i"])
    assert frame.i.tolist() == [0, 1, 2]


def test_bad_pool_options_fail_in_one_line():
    with pytest.raises(TellnormError, match="needs Ray: add --ray local"):
        ShardPool(None, workers=2)
    with pytest.raises(TellnormError, match="whole number"):
        ShardPool(None, workers=0)
    with pytest.raises(TellnormError, match="prompt list is empty"):
        ShardPool(None).map(lambda r, s, items: items, [])
    with pytest.raises(TellnormError, match="HOST:PORT"):
        check_reachable("not-an-address")


def test_in_process_runner_is_one_shard_and_pools_are_runners():
    seen = []

    def double(replica, shard, items, *, factor):
        seen.append(shard)
        return [x * factor for x in items]

    runner = InProcess(None)
    assert runner.in_process and isinstance(runner, Runner) and isinstance(ShardPool(None), Runner)
    assert runner.map(double, [3, 1, 2], factor=2) == [6, 2, 4] and seen == [Shard(0, (0, 1, 2))]
    assert with_strategy(runner, "round-robin").map(double, [5], factor=3) == [15]  # one shard, any strategy
    assert runner.map(lambda r, s, items: "whole", [1, 2], merge=lambda results, shards: results[0]) == "whole"
    with pytest.raises(TellnormError, match="unknown shard strategy"):
        with_strategy(runner, "random")
    with pytest.raises(TellnormError, match="finite number of seconds"):
        ShardPool(None, shard_timeout_s=0)
    with pytest.raises(TellnormError, match="finite number of seconds"):
        ShardPool(None, start_timeout_s=float("inf"))


def test_missing_ray_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(TellnormError, match=r"Ray is not installed.*pip install") as err:
        ShardPool(None, ray_address="local", workers=2)
    assert "\n" not in str(err.value)


def test_no_ray_imported_without_ray_requested():
    """``import tellnorm.apps.distributed`` and an in-process sharded study on the organism never import Ray."""
    code = textwrap.dedent("""
        import sys
        import tellnorm.apps.distributed as d
        assert "ray" not in sys.modules
        from tellnorm.studies.corpus import organism_prompt_rows, trace_both_modes
        with d.ShardPool("organism") as pool:
            trace = trace_both_modes(None, organism_prompt_rows(1)[:2], max_new_tokens=4, runner=pool)
        assert len(trace.generations) == 4, trace.generations
        print("ray" in sys.modules, sorted(m for m in sys.modules if m.split(".")[0] == "ray")[:3])
    """)
    done = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=240, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[0] == "False", done.stdout


@needs_ray
def test_unreachable_address_fails_in_one_line_within_the_timeout():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    start = time.perf_counter()
    with pytest.raises(TellnormError, match="cannot reach the Ray cluster") as err:
        check_reachable(f"127.0.0.1:{closed}", timeout_s=5)
    assert time.perf_counter() - start < 5 and "\n" not in str(err.value)

    with socket.socket() as silent:  # accepts TCP, never speaks Ray: ray.init alone would retry for minutes
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        start = time.perf_counter()
        with pytest.raises(TellnormError, match="did not accept a connection within 4 s") as err:
            check_reachable(f"127.0.0.1:{silent.getsockname()[1]}", timeout_s=4)
        assert time.perf_counter() - start < 15 and "\n" not in str(err.value)

    # the whole path, through the CLI-facing pool, in a fresh process (this one may already be in a cluster)
    code = ("from tellnorm.apps.distributed import ShardPool\n"
            f"ShardPool('organism', ray_address='127.0.0.1:{closed}', workers=2, connect_timeout_s=5)")
    done = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode != 0 and "TellnormError: cannot reach the Ray cluster" in done.stderr.splitlines()[-1]


# ------------------------------------------------------------------------------------------- a local cluster

@pytest.fixture(scope="module")
def cluster():
    import ray  # needs_ray skipped the tests already when Ray is missing (unless TELLNORM_REQUIRE_RAY=1)

    from tellnorm.apps.distributed import RAYLET_START_WAIT_S

    temp = tempfile.mkdtemp(prefix="tellnorm-ray-")  # not /tmp/ray: nothing of the run stays behind
    os.environ.setdefault("RAY_raylet_start_wait_time_s", str(RAYLET_START_WAIT_S))
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
        # tests/ is not importable on the workers: ship this module's helpers (CrashOnce) by value
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def pool(cluster):
    with ShardPool("organism", ray_address="local", workers=2, saes="organism") as p:  # joins the 2-CPU cluster
        yield p


@pytest.fixture(scope="module")
def organism():
    from tellnorm.backends import load_model

    return load_model("organism")


@pytest.fixture(scope="module")
def rows():
    from tellnorm.studies.corpus import organism_prompt_rows

    return organism_prompt_rows(1)[:5]  # difficulties 1..5: different lengths, uneven shards (3 + 2)


@pytest.fixture(scope="module")
def corpora(pool, organism, rows):
    prompts = [r["prompt"] for r in rows]
    single = contrast_corpus(organism, prompts=prompts, max_new_tokens=MAX_NEW, progress=False)
    sharded = contrast_corpus(None, prompts=prompts, max_new_tokens=MAX_NEW, runner=with_strategy(pool, "round-robin"))
    return single, sharded


@pytest.fixture(scope="module")
def feature_inputs(organism, corpora):
    from tellnorm import features as F
    from tellnorm.saes import load_saes

    corpus = corpora[0]
    masks = F.contrast_masks(corpus.sequences, corpus.n_prompt, corpus.modes)
    for i, labels in enumerate(corpus.labels):  # ground-truth label buckets too: many small counts
        masks[i].update({f"label:{lab}": [x == lab for x in labels] for lab in set(labels) if lab})
    saes = load_saes("organism", organism)
    single = F.collect_feature_sums(organism, saes, corpus.sequences, masks, fold_decoder_norm=True, batch_size=1)
    return corpus, masks, single


def values(series) -> list:
    return series.astype(object).where(series.notna(), None).tolist()


def same_frame(a, b) -> bool:
    return list(a.columns) == list(b.columns) and all(values(a[c]) == values(b[c]) for c in a.columns)


# Float sums of float32 activations: a worker's matmuls may run with another thread count than the driver's, which
# moves single values by ~1e-7 relative (measured up to 3e-10 on the sums); counts are compared exactly. Batch
# padding moves an activation by up to ~1e-6 of its layer's scale, so each bucket's sums are held to ``rtol`` of that
# bucket's largest sum (a feature summed over a few tokens near its threshold is ~1e-2 and moves by ~1e-6 absolute).
def assert_sums_equal(a, b, rtol=1e-6):
    assert a.counts == b.counts  # exactly: every token in the same buckets, counted once
    assert a.sums.keys() == b.sums.keys()
    for key in a.sums:
        expected = b.sums[key].numpy()
        scale = float(np.abs(expected).max()) if expected.size else 0.0
        np.testing.assert_allclose(a.sums[key].numpy(), expected, rtol=rtol, atol=max(1e-9, rtol * scale),
                                   err_msg=str(key))


@needs_ray
def test_sharded_norm_profile_equals_single_process(pool, organism, rows):
    single = trace_both_modes(organism, rows, max_new_tokens=MAX_NEW, progress=False)
    for strategy in ("contiguous", "round-robin"):
        sharded = trace_both_modes(None, rows, max_new_tokens=MAX_NEW, runner=with_strategy(pool, strategy))
        assert [(g.request_id, g.ids, g.finish_reason) for g in sharded.generations] == \
               [(g.request_id, g.ids, g.finish_reason) for g in single.generations]
        a, b = sharded.frame, single.frame
        assert list(a.columns) == list(b.columns) and len(a) == len(b)
        for column in a.columns.drop("norm"):  # values; the str/object dtype follows pandas' inference
            assert values(a[column]) == values(b[column]), column
        np.testing.assert_allclose(a.norm, b.norm, rtol=NORM_RTOL)
    from tellnorm.norms import layer_profile

    means = [layer_profile(t.statistics_rows(), by=["mode"]) for t in (sharded, single)]
    assert means[0].n_requests.tolist() == means[1].n_requests.tolist()
    np.testing.assert_allclose(means[0].mean_norm, means[1].mean_norm, rtol=NORM_RTOL)


@needs_ray
def test_sampled_generations_are_identical_under_the_same_seeds(pool, organism, rows):
    from tellnorm.generation import SamplingConfig, generate

    prompts = [organism.encode(organism.chat_prompt(r["prompt"])) for r in rows] * 2  # a prompt twice: 2 samples
    ids = [f"p{i}" for i in range(len(prompts))]
    sampling = SamplingConfig.paper(max_new_tokens=MAX_NEW, seed=7)
    single = generate(organism, prompts, sampling, request_ids=ids, progress=False)
    sharded = generate_sharded(with_strategy(pool, "round-robin"), prompts, sampling, request_ids=ids)
    assert [(g.request_id, g.ids, g.finish_reason) for g in sharded] == \
           [(g.request_id, g.ids, g.finish_reason) for g in single]
    assert any(single[i].ids != single[i + len(rows)].ids for i in range(len(rows)))  # really sampled


@needs_ray
def test_sharded_contrast_corpus_and_feature_sums_equal_single_process(pool, corpora, feature_inputs):
    single_corpus, sharded_corpus = corpora
    assert sharded_corpus == single_corpus  # sequences (same greedy tokens), prompt lengths, modes, labels
    corpus, masks, single = feature_inputs
    sharded = feature_sums(pool, "organism", corpus.sequences, masks, fold_decoder_norm=True, batch_size=1)
    assert_sums_equal(sharded, single)  # batch size 1: only the order of float64 additions differs
    batched = feature_sums(with_strategy(pool, "round-robin"), "organism", corpus.sequences, masks,
                           fold_decoder_norm=True)
    assert_sums_equal(batched, single, rtol=NORM_RTOL)


@needs_ray
def test_feature_study_with_the_sharded_collector_equals_single_process(pool, organism, corpora, tmp_path):
    from tellnorm.saes import load_saes
    from tellnorm.studies.features import feature_study

    corpus = corpora[0]
    saes = load_saes("organism", organism)
    single = feature_study(organism, saes, corpus, tmp_path / "single", top_k=5)
    sharded = feature_study(organism, saes, corpus, tmp_path / "sharded", top_k=5, runner=pool)
    for key in ("contrast", "reason", "trend", "injection"):
        a, b = (r[key].sort_values([c for c in ("layer", "feature") if c in r[key]]).reset_index(drop=True)
                for r in (sharded, single))
        assert a.shape == b.shape and a.columns.equals(b.columns), key
        # relative_delta = Δ / (mean_non_thinking + 1e-6) turns a ~1e-9 padding difference of a near-silent
        # feature's mean into ~1e-3 relative: its inputs are compared, and it is their formula in both runs
        numeric = a.select_dtypes("number").columns.drop(["rank", "feature", "layer", "relative_delta"],
                                                         errors="ignore")
        np.testing.assert_allclose(a[numeric].to_numpy(float), b[numeric].to_numpy(float), rtol=1e-4, atol=1e-7,
                                   err_msg=key)
        if "relative_delta" in a:
            for frame in (a, b):
                recomputed = frame.delta / (frame.mean_non_thinking + RELATIVE_EPS)
                np.testing.assert_allclose(frame.relative_delta, recomputed, rtol=1e-5)
    assert sharded["top_reason"] == single["top_reason"]


@needs_ray
def test_sharded_evaluation_decoding_equals_single_process(pool, organism, tmp_path):
    from dataclasses import replace

    from tellnorm.studies.evaluation import EvaluateConfig, control_edits, decode, run_evaluate, setup

    cfg = EvaluateConfig(difficulties=(1, 2, 3), per_difficulty=1, calibration_per_difficulty=1, n_samples=2,
                         sample_sizes=(2,), max_new_tokens=MAX_NEW, batch_size=8)
    st = setup(organism, cfg, progress=False)
    sharded_st = replace(st, runner=with_strategy(pool, "round-robin"))

    def remote(st, name, **options):
        return decode(replace(st, runner=sharded_st.runner), name, **options)

    runs = {}
    for name, options in [("greedy", {}), ("alrr", {"techniques": ("alrr",)}), ("erss", {"techniques": ("erss",)}),
                          ("sampled", {"n_samples": 2, "trace": True})]:
        single = decode(st, name, progress=False, **options)
        sharded = remote(st, name, **options)
        runs[name] = single
        assert same_frame(sharded.responses, single.responses), name  # answers, lengths, firing counters
        assert sharded.token_stats.keys() == single.token_stats.keys()
        for rid, stats in single.token_stats.items():
            for stat, values in stats.items():
                np.testing.assert_allclose(sharded.token_stats[rid][stat], values, rtol=1e-5, atol=1e-5)
        if single.norms is not None:
            key = ["request_id", "layer", "position"]
            a, b = (r.norms.sort_values(key).reset_index(drop=True) for r in (sharded, single))
            assert a[key].equals(b[key])
            np.testing.assert_allclose(a.norm, b.norm, rtol=NORM_RTOL)
    assert runs["alrr"].responses.alrr_extra_passes.sum() > 0  # the technique did act
    build = control_edits(st, runs["alrr"], "random-tokens")  # rebuilt on the workers from its recipe
    single = decode(st, "control", edits=build, progress=False)
    assert same_frame(remote(st, "control", edits=build).responses, single.responses)
    exact = replace(cfg, threshold_mode="exact")  # τ tracked over the run's tokens: depends on the shard
    with pytest.raises(TellnormError, match="tracks τ over the run's own tokens"):
        run_evaluate(organism, exact, tmp_path / "refused", runner=pool)  # up front, before any work
    with pytest.raises(TellnormError, match="tracks τ over the run's own tokens"):
        remote(replace(st, cfg=exact), "x", techniques=("alrr",))


class CrashOnce:
    """Shard hook: in the first attempt of shard ``shard_id``, do the shard's work, then kill the worker process
    before it can report (a marker file tells later attempts apart); ``always`` kills it on every attempt."""

    def __init__(self, fn, marker: str, shard_id: int = 1, always: bool = False):
        self.fn, self.marker, self.shard_id, self.always = fn, marker, shard_id, always

    def __call__(self, replica, shard, items, **kwargs):
        result = self.fn(replica, shard, items, **kwargs) if self.fn is not None else items
        if shard.shard_id == self.shard_id and (self.always or not os.path.exists(self.marker)):
            Path(self.marker).write_text("crashed once\n")
            os._exit(1)
        return result


@needs_ray
def test_worker_killed_mid_shard_is_retried_without_double_counting(pool, feature_inputs, tmp_path):
    corpus, masks, single = feature_inputs
    items = [(i, list(seq), masks[i]) for i, seq in enumerate(corpus.sequences)]
    marker = tmp_path / "crashed"
    with pytest.warns(UserWarning, match="died.*running the shard again"):
        merged = pool.map(CrashOnce(feature_sums_shard, str(marker)), items, merge=merge_accumulators,
                          saes="organism", fold_decoder_norm=True, batch_size=1)
    assert marker.exists() and pool.retried[-1] == (1, 2)
    assert_sums_equal(merged, single)  # shard 1 merged once: counts equal the single-process counts


@needs_ray
def test_failed_shard_leaves_no_output(pool, rows, tmp_path, cluster):
    out = tmp_path / "profile"
    bad = rows[:2] + [{"prompt": "   "}]  # shard 1 fails on its worker (empty prompt); shard 0 succeeds
    with pytest.raises(TellnormError, match="shard 1: empty prompt") as err:
        profile_study(None, bad, out, max_new_tokens=8, runner=pool)
    assert "\n" not in str(err.value)
    assert not out.exists() or not any(out.iterdir())

    # a shard whose worker dies on every attempt: retried, then one line; nothing merged or written
    with ShardPool(None, ray_address="local", workers=2, num_cpus_per_worker=0, max_retries=1) as light:
        crash = CrashOnce(None, str(tmp_path / "marker"), shard_id=0, always=True)
        with pytest.warns(UserWarning, match="died"), \
                pytest.raises(TellnormError, match="shard 0 failed: its worker died on all 2 attempts"):
            light.map(crash, list(range(4)))
        with pytest.warns(UserWarning, match="only 1 prompt for 2 workers: using 1 worker "):
            assert light.map(lambda r, s, items: [x * 10 for x in items], [7]) == [70]


def never_finishes(replica, shard, items):
    time.sleep(3600)


@needs_ray
def test_a_shard_that_never_finishes_ends_in_one_line_within_its_timeout(cluster):
    with ShardPool(None, ray_address="local", workers=1, num_cpus_per_worker=0, shard_timeout_s=2) as stuck:
        assert stuck.map(lambda r, s, items: items, [1]) == [1]  # the worker is up: what follows times the shard
        start = time.perf_counter()
        with pytest.raises(TellnormError, match=r"shard 0 did not finish within 2 s \(shard_timeout_s") as err:
            stuck.map(never_finishes, [1, 2])
        elapsed = time.perf_counter() - start
    assert "\n" not in str(err.value) and "nothing was written" in str(err.value)
    assert 2 <= elapsed < 10, elapsed


@needs_ray
def test_workers_that_cannot_start_end_in_one_line_within_the_timeout(cluster):
    # what two Ray jobs sharing a machine look like: the cluster has no room for the worker
    with ShardPool(None, ray_address="local", workers=1, num_cpus_per_worker=64, start_timeout_s=1) as crowded:
        start = time.perf_counter()
        with pytest.raises(TellnormError, match=r"did not start within 1 s \(start_timeout_s\)") as err:
            crowded.map(lambda r, s, items: items, [1])
        elapsed = time.perf_counter() - start
    assert "\n" not in str(err.value) and elapsed < 10, elapsed


def test_replica_refuses_missing_saes_layers(organism):
    replica = Replica(None)
    replica._model = organism
    with pytest.raises(TellnormError, match="no SAE for layers"):
        replica.saes("organism", [99])
    assert Shard(0, (1, 2)).indices == (1, 2)


def assert_bounds_sums_equal(a, b, rtol=1e-6):
    """Every count exactly (tokens, pairs, violations, histogram bins, fire counts, sampled points), float64 sums to
    ``rtol`` (order of additions), the paired states bit for bit."""
    assert sorted(a.bounds) == sorted(b.bounds) and sorted(a.assumptions) == sorted(b.assumptions)
    for layer, x in a.bounds.items():
        y = b.bounds[layer]
        for name in ("n_tokens", "n_checked", "n_active", "violations", "sum_tokens", "sum_violations",
                     "line_violations"):
            assert getattr(x, name) == getattr(y, name), (layer, name)
        for name in ("tightness", "sum_tightness", "line_tightness"):
            hx, hy = getattr(x, name), getattr(y, name)
            assert np.array_equal(hx.counts, hy.counts) and hx.max == hy.max, (layer, name)
        assert x.sample.columns.keys() == y.sample.columns.keys()
        for column, values in x.sample.columns.items():
            assert np.array_equal(values, y.sample.columns[column]), (layer, column)
    for layer, x in a.assumptions.items():
        y = b.assumptions[layer]
        for name in ("a1_tokens", "energy_tokens", "a3_tokens", "a3_with_reasoning", "mode_tokens"):
            assert getattr(x, name) == getattr(y, name), (layer, name)
        assert np.array_equal(x.a1_max_cos.counts, y.a1_max_cos.counts)
        assert x.fire_counts.keys() == y.fire_counts.keys()
        assert all(np.array_equal(x.fire_counts[m], y.fire_counts[m]) for m in x.fire_counts)
        assert x.quality.n_tokens == y.quality.n_tokens and bool((x.quality.fired == y.quality.fired).all())
        for name in ("rel_error_sum", "a1_mean_cos_sum", "energy_sum", "a3_cos_sum", "a3_abs_cos_sum"):
            np.testing.assert_allclose(getattr(x, name), getattr(y, name), rtol=rtol, err_msg=f"{layer} {name}")
        for name in ("sum_sq_error", "sum_sq", "sum_l0"):
            np.testing.assert_allclose(getattr(x.quality, name), getattr(y.quality, name), rtol=rtol)
    assert a.states.keys() == b.states.keys()
    for key, x in a.states.items():
        y = b.states[key]
        assert (x.norm_sq, x.reasoning_sum) == (y.norm_sq, y.reasoning_sum), key
        assert all(np.array_equal(getattr(x, f), getattr(y, f)) for f in ("reasoning_active", "sae_input",
                                                                           "reasoning_recon")), key


@needs_ray
def test_sharded_bounds_study_equals_single_process(pool, organism, corpora, tmp_path):
    from tellnorm import features as F
    from tellnorm.bounds import collect_bounds
    from tellnorm.saes import load_saes
    from tellnorm.studies.bounds import bounds_study

    corpus = corpora[0]
    saes = load_saes("organism", organism)
    options = dict(top_k=5, figures=False, batch_size=1)  # batch size 1: every sequence's activations bit-identical
    single = bounds_study(organism, saes, corpus, tmp_path / "single", **options)
    sharded = bounds_study(organism, saes, corpus, tmp_path / "sharded", **options,
                           runner=with_strategy(pool, "round-robin"))
    assert sharded["reasoning"] == single["reasoning"]
    assert_bounds_sums_equal(sharded["sums"], single["sums"])
    assert len(single["pair_points"]) > 0 and single["bounds"].n_active.min() > 0  # pairs found, features fired
    for key in ("bounds", "assumptions", "pairs", "pair_points"):
        a, b = sharded[key], single[key]
        assert a.shape == b.shape and a.columns.equals(b.columns), key
        numeric = a.select_dtypes("number").columns
        exact = [c for c in numeric if a[c].dtype.kind in "iu"] + ["median_tightness", "p99_tightness",
                                                                   "max_tightness"] * (key == "bounds")
        assert a[exact].equals(b[exact]), key  # counts, violations and histogram quantiles exactly
        np.testing.assert_allclose(a[numeric].to_numpy(float), b[numeric].to_numpy(float), rtol=1e-6, err_msg=key)
        assert same_frame(a.select_dtypes(exclude="number"), b.select_dtypes(exclude="number")), key

    # default batch size: activations differ by float32 batch padding only, so counts agree to a few in 10⁵
    masks = F.contrast_masks(corpus.sequences, corpus.n_prompt, corpus.modes)
    reasoning = single["reasoning"]
    batched = bounds_sums(pool, "organism", corpus.sequences, masks, reasoning, batch_size=16)
    alone = collect_bounds(organism, saes, corpus.sequences, masks, reasoning, batch_size=16)
    for layer, x in batched.bounds.items():
        y = alone.bounds[layer]
        assert (x.n_tokens, x.n_checked, x.violations, x.sum_violations) == \
               (y.n_tokens, y.n_checked, y.violations, y.sum_violations)
        assert abs(x.n_active - y.n_active) <= 1e-4 * y.n_active


@needs_ray
def test_sharded_correlation_study_equals_single_process(pool, organism, corpora, tmp_path):
    from tellnorm.saes import load_saes
    from tellnorm.studies.correlation import correlation_study

    corpus = corpora[0]
    saes = load_saes("organism", organism)
    single = correlation_study(organism, saes, corpus, tmp_path / "single", top_k=5, figures=False, batch_size=1)
    sharded = correlation_study(organism, saes, corpus, tmp_path / "sharded", top_k=5, figures=False, batch_size=1,
                                runner=with_strategy(pool, "round-robin"))
    a, b = sharded["sums"], single["sums"]
    assert list(a.problems) == list(b.problems)  # problem order restored: the bootstrap resamples by position
    for rid, entry in b.problems.items():
        assert a.problems[rid]["count"] == entry["count"]
        for key, value in entry.items():
            np.testing.assert_allclose(a.problems[rid][key], value, rtol=1e-6, err_msg=f"{rid} {key}")
    for key in ("correlation", "layers"):
        x, y = sharded[key], single[key]
        numeric = x.select_dtypes("number").columns
        np.testing.assert_allclose(x[numeric].to_numpy(float), y[numeric].to_numpy(float), rtol=1e-6, err_msg=key)


@pytest.fixture(scope="module")
def intervention_cfg():
    from tellnorm.studies.suppression import InterventionConfig

    # two problems, every kind of condition (probes, scale, clamp, random controls, depth, steering, features)
    return InterventionConfig(per_difficulty=1, difficulties=(1, 5), calibration_per_difficulty=1, factors=(0.1,),
                              amplify=(), random_seeds=(0,), steering_scales=(1.0,), feature_seeds=(0,),
                              feature_top_k=5, max_new_tokens=64, batch_size=16)


@needs_ray
def test_sharded_suppression_study_equals_single_process(pool, organism, intervention_cfg, tmp_path):
    from dataclasses import replace

    from tellnorm.studies.suppression import run_intervene

    cfg = intervention_cfg
    single = run_intervene(organism, cfg, tmp_path / "single", progress=False)
    sharded = run_intervene(organism, cfg, tmp_path / "sharded", progress=False,
                            runner=with_strategy(pool, "round-robin"))
    a, b = sharded["per_request"], single["per_request"]
    exact = ["condition", "problem", "difficulty", "answer", "predicted", "correct", "no_answer", "n_generated",
             "n_edited", "n_token_layers"]
    assert same_frame(a[exact], b[exact])  # answers, lengths and every edit decision
    assert b.correct.nunique() == 2 and b.n_edited.sum() > 0  # some edits flipped answers
    np.testing.assert_allclose(a[["logp", "logp_trace"]], b[["logp", "logp_trace"]], rtol=1e-4, atol=1e-5)
    for key in ("suppression", "steering", "features"):
        x, y = sharded[key], single[key]
        assert x.columns.equals(y.columns)
        assert same_frame(x.drop(columns=[c for c in x if "logp" in c]), y.drop(columns=[c for c in y if "logp" in c]))
    assert same_frame(sharded["hits"], single["hits"]) and same_frame(sharded["top_tokens"], single["top_tokens"])
    assert sharded["meta"]["thresholds"] == single["meta"]["thresholds"]
    with pytest.raises(TellnormError, match="pools τ over the requests"):  # up front, before any work
        run_intervene(organism, replace(cfg, threshold_mode="pooled-p2"), tmp_path / "refused", runner=pool)


@pytest.mark.parametrize("argv, message", [
    (["profile", "--workers", "2"], "--workers needs --ray ADDRESS"),
    (["evaluate", "--quick", "--ray", "local", "--workers", "0"], "--workers must be ≥ 1"),
    (["bounds", "--workers", "2"], "--workers needs --ray ADDRESS"),
    (["correlate", "--workers", "2"], "--workers needs --ray ADDRESS"),
    (["intervene", "--workers", "2"], "--workers needs --ray ADDRESS"),
    (["intervene", "--threshold-mode", "pooled-p2", "--warmup", "5", "--ray", "local"], "pools τ over the requests"),
])
def test_cli_sharding_flags_are_checked_before_any_work(argv, message, tmp_path, capsys):
    from tellnorm.apps.cli import main

    assert main(argv + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
