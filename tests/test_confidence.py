"""Answer-selection baselines: every score and vote against an independent plain-python/numpy reference on random
inputs, plus the edge cases (short responses, no answers, ties, bad inputs)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from tellnorm.errors import TellnormError
from tellnorm.techniques.confidence import (
    METHODS,
    ConfidenceConfig,
    best_of,
    confidence_scores,
    filtered_vote,
    kept_indices,
    lowest_group_confidence,
    majority_vote,
    mean_confidence,
    method_names,
    random_index,
    random_pick,
    select,
    self_certainty,
    tail_confidence,
    token_confidence,
)

SEEDS = range(5)


def log_softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def random_records(rng, n_responses, vocab=50, k=5, lengths=(3, 40)):
    """Per-token records from random full distributions, as generation would write them."""
    records = []
    for _ in range(n_responses):
        logp = log_softmax(rng.normal(scale=rng.uniform(0.5, 4), size=(int(rng.integers(*lengths)), vocab)))
        records.append({"topk_mean_logprob": np.sort(logp, axis=1)[:, -k:].mean(axis=1),
                        "mean_logprob": logp.mean(axis=1), "token_logprob": logp[:, 0], "_logp": logp})
    return records


# ------------------------------------------------------------------------------------------------ reference code


def ref_lowest(conf, window):
    conf = list(conf)
    if len(conf) <= window:
        return sum(conf) / len(conf)
    return min(sum(conf[t:t + window]) / window for t in range(len(conf) - window + 1))


def ref_vote(answers, weights=None):
    totals, first = {}, {}
    for i, a in enumerate(answers):
        if a is None:
            continue
        totals[a] = totals.get(a, 0.0) + (1.0 if weights is None else weights[i])
        first.setdefault(a, i)
    if not totals:
        return None
    top = max(totals.values())
    return min((a for a in totals if totals[a] == top), key=first.get)


def ref_filtered(answers, scores, fraction):
    n_keep = round(fraction * len(answers) * 1000) / 1000  # exact ceil for the fractions used below
    n_keep = max(1, math.ceil(n_keep))
    order = sorted(range(len(answers)), key=lambda i: (-scores[i], i))[:n_keep]
    kept_w = [scores[i] for i in order]
    return ref_vote([answers[i] for i in order], None if min(kept_w) <= 0 else kept_w)


# ------------------------------------------------------------------------------------------------------- scores


@pytest.mark.parametrize("seed", SEEDS)
def test_confidences_match_plain_loops(seed):
    rng = np.random.default_rng(seed)
    for rec in random_records(rng, 6):
        logp = rec["_logp"]
        conf = token_confidence(rec["topk_mean_logprob"])
        expected = [-sum(sorted(row)[-5:]) / 5 for row in logp.tolist()]
        np.testing.assert_allclose(conf, expected, rtol=1e-12)
        assert (conf > 0).all()
        assert mean_confidence(conf) == pytest.approx(sum(expected) / len(expected), rel=1e-12)
        for size in (1, 2, 5, 17, 39, 40, 100):
            tail = expected[-size:] if size < len(expected) else expected
            assert tail_confidence(conf, size) == pytest.approx(sum(tail) / len(tail), rel=1e-12)
            assert lowest_group_confidence(conf, size) == pytest.approx(ref_lowest(expected, size), rel=1e-10)


def test_short_response_uses_every_token():
    conf = np.array([1.0, 5.0, 3.0])
    assert tail_confidence(conf, 10) == lowest_group_confidence(conf, 10) == mean_confidence(conf) == 3.0
    assert lowest_group_confidence(conf, 2) == 3.0  # windows (1+5)/2 = 3 and (5+3)/2 = 4
    assert lowest_group_confidence(conf, 1) == 1.0


def test_lowest_group_finds_a_dip_the_mean_hides():
    conf = np.full(1000, 10.0)
    conf[500:510] = 0.0
    assert lowest_group_confidence(conf, 10) == 0.0
    assert lowest_group_confidence(conf, 20) == 5.0
    assert mean_confidence(conf) == pytest.approx(9.9)


@pytest.mark.parametrize("seed", SEEDS)
def test_self_certainty_is_mean_kl_from_uniform(seed):
    rng = np.random.default_rng(seed)
    vocab = 37
    logits = rng.normal(scale=3, size=(25, vocab))
    p = np.exp(log_softmax(logits))
    kl = (np.full(vocab, 1 / vocab) * np.log((1 / vocab) / p)).sum(axis=1)  # KL(U‖p) by its definition
    mean_logprob = np.log(p).mean(axis=1)
    assert self_certainty(mean_logprob, vocab) == pytest.approx(kl.mean(), rel=1e-10)
    uniform = np.log(np.full((4, vocab), 1 / vocab)).mean(axis=1)
    assert self_certainty(uniform, vocab) == pytest.approx(0.0, abs=1e-12)


def test_self_certainty_rejects_a_top_k_mean():
    rec = random_records(np.random.default_rng(0), 1)[0]
    with pytest.raises(TellnormError, match="whole vocabulary"):
        self_certainty(rec["topk_mean_logprob"], 50)
    with pytest.raises(TellnormError, match="vocab_size"):
        self_certainty(rec["mean_logprob"], 0)


@pytest.mark.parametrize("bad, match", [([], "non-empty"), ([[1.0, 2.0]], "1-D"), ([1.0, float("nan")], "NaN")])
def test_bad_token_arrays_raise(bad, match):
    with pytest.raises(TellnormError, match=match):
        mean_confidence(bad)
    with pytest.raises(TellnormError, match=match):
        token_confidence(bad)


def test_bad_sizes_raise():
    with pytest.raises(TellnormError, match="window must be an integer >= 1"):
        lowest_group_confidence([1.0, 2.0], 0)
    with pytest.raises(TellnormError, match="tail must be an integer >= 1"):
        tail_confidence([1.0, 2.0], 1.5)


# ------------------------------------------------------------------------------------------------------- config


def test_config_defaults_and_validation():
    cfg = ConfidenceConfig()
    assert (cfg.top_k, cfg.window, cfg.tail, cfg.keep_fractions) == (20, 2048, 2048, (0.1, 0.9))
    for kwargs, match in [({"window": 0}, "window"), ({"tail": -1}, "tail"), ({"top_k": True}, "top_k"),
                          ({"keep_fractions": ()}, "empty"), ({"keep_fractions": (0.0,)}, r"\(0, 1\]"),
                          ({"keep_fractions": (1.5,)}, r"\(0, 1\]"), ({"keep_fractions": (0.1, 0.1)}, "duplicates")]:
        with pytest.raises(TellnormError, match=match):
            ConfidenceConfig(**kwargs)


def test_scaled_config():
    assert ConfidenceConfig.scaled(16384).window == 2048
    assert (ConfidenceConfig.scaled(100).window, ConfidenceConfig.scaled(100).tail) == (12, 12)
    assert ConfidenceConfig.scaled(10).window == 4
    assert ConfidenceConfig.scaled(800, keep_fractions=(0.5,)).keep_fractions == (0.5,)
    with pytest.raises(TellnormError, match="typical_length"):
        ConfidenceConfig.scaled(0)


def test_method_names():
    assert METHODS == method_names() == (
        "majority",
        "deepconf-mean", "deepconf-mean-best", "deepconf-mean-filter10", "deepconf-mean-filter90",
        "deepconf-tail", "deepconf-tail-best", "deepconf-tail-filter10", "deepconf-tail-filter90",
        "deepconf-lowest", "deepconf-lowest-best", "deepconf-lowest-filter10", "deepconf-lowest-filter90",
        "self-certainty", "random")
    assert "deepconf-tail-filter12.5" in method_names(ConfidenceConfig(keep_fractions=(0.125,)))


# ------------------------------------------------------------------------------------------------------- voting


def random_answers(rng, n, n_distinct=4, p_none=0.2):
    return [None if rng.random() < p_none else f"a{rng.integers(n_distinct)}" for _ in range(n)]


@pytest.mark.parametrize("seed", SEEDS)
def test_votes_match_reference(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        n = int(rng.integers(1, 30))
        answers = random_answers(rng, n)
        scores = rng.integers(1, 6, size=n).astype(float) if rng.random() < 0.5 else rng.uniform(0.1, 3, size=n)
        assert majority_vote(answers) == ref_vote(answers)
        assert majority_vote(answers, scores) == ref_vote(answers, list(scores))
        for fraction in (0.1, 0.25, 0.5, 0.7, 0.9, 1.0):
            assert filtered_vote(answers, scores, fraction) == ref_filtered(answers, list(scores), fraction)
        assert best_of(answers, scores) == answers[max(range(n), key=lambda i: (scores[i], -i))]


def test_majority_ties_go_to_earliest_first_occurrence():
    assert majority_vote(["b", "a", "a", "b"]) == "b"
    assert majority_vote([None, "c", "b", "b", "c"]) == "c"
    assert majority_vote(["x", "y"], [1.0, 1.0]) == "x"
    assert majority_vote(["x", "y", "y"], [2.0, 1.0, 1.0]) == "x"
    assert majority_vote(["x", "y", "y"], [2.0, 1.0, 1.5]) == "y"


def test_no_answer_gives_none():
    assert majority_vote([None, None]) is None
    assert filtered_vote([None, None, "a"], [3.0, 2.0, 1.0], 0.5) is None  # "a" is filtered out
    assert filtered_vote([None, None, "a"], [3.0, 2.0, 1.0], 1.0) == "a"
    assert best_of([None, "a"], [2.0, 1.0]) is None


def test_filtered_vote_keeps_the_top_fraction_stably():
    assert list(kept_indices([1.0, 3.0, 3.0, 2.0], 0.5)) == [1, 2]
    assert list(kept_indices([1.0, 3.0, 3.0, 2.0], 0.3)) == [1, 2]  # ceil(1.2) = 2
    assert 0.07 * 100 > 7 and list(kept_indices([5.0] * 100, 0.07)) == list(range(7))  # ceil of float noise is 8
    assert list(kept_indices([1.0, 2.0], 0.01)) == [1]
    answers = ["a", "b", "b", "b"]
    assert filtered_vote(answers, [9.0, 1.0, 1.0, 1.0], 1.0) == "a"  # weighted: 9 > 3
    assert filtered_vote(answers, [9.0, 1.0, 1.0, 1.0], 0.25) == "a"
    assert filtered_vote(answers, [1.0, 2.0, 2.0, 2.0], 0.25) == "b"


@pytest.mark.parametrize("seed", SEEDS)
def test_keep_fraction_one_is_the_weighted_vote_over_all(seed):
    rng = np.random.default_rng(seed)
    answers = random_answers(rng, 20, n_distinct=3)
    scores = rng.uniform(0.1, 5, size=20)
    assert filtered_vote(answers, scores, 1.0) == majority_vote(answers, scores)


def test_non_positive_kept_scores_vote_unweighted():
    answers = ["a", "b", "b"]
    assert filtered_vote(answers, [10.0, 0.5, 0.5], 1.0) == "a"
    assert filtered_vote(answers, [10.0, 0.5, 0.0], 1.0) == "b"  # a kept score <= 0: unweighted, 2 > 1
    assert filtered_vote(answers, [10.0, 0.5, -1.0], 0.6) == "a"  # the negative one is filtered out: weighted


@pytest.mark.parametrize("call, match", [
    (lambda: majority_vote([]), "no responses"),
    (lambda: majority_vote(["a"], [1.0, 2.0]), "one per response"),
    (lambda: majority_vote(["a", "b"], [1.0, -2.0]), ">= 0"),
    (lambda: majority_vote([["a"]]), "not hashable"),
    (lambda: filtered_vote(["a", "b"], [1.0, 2.0], 0.0), r"\(0, 1\]"),
    (lambda: filtered_vote(["a", "b"], [1.0, 2.0], 1.01), r"\(0, 1\]"),
    (lambda: filtered_vote(["a", "b"], [1.0, float("nan")], 0.5), "finite"),
    (lambda: best_of(["a", "b"], [1.0]), "one per response"),
    (lambda: random_pick([], 0, "k"), "no responses"),
])
def test_bad_vote_inputs_raise(call, match):
    with pytest.raises(TellnormError, match=match):
        call()


# ------------------------------------------------------------------------------------------------------- random


def test_random_pick_is_reproducible_and_depends_only_on_seed_and_key():
    answers = [f"a{i}" for i in range(7)]
    picks = [random_index(7, 3, f"problem-{k}") for k in range(50)]
    assert picks == [random_index(7, 3, f"problem-{k}") for k in range(50)]
    assert [random_pick(answers, 3, f"problem-{k}") for k in range(50)] == [answers[i] for i in picks]
    assert [random_pick(list("abcdefg"), 3, f"problem-{k}") for k in range(50)] == ["abcdefg"[i] for i in picks]
    assert picks != [random_index(7, 4, f"problem-{k}") for k in range(50)]
    assert len(set(picks)) > 1


def test_random_pick_is_roughly_uniform():
    n, keys = 5, 5000
    counts = Counter(random_index(n, 0, k) for k in range(keys))
    assert set(counts) == set(range(n))
    expected = keys / n
    chi2 = sum((counts[i] - expected) ** 2 / expected for i in range(n))
    assert chi2 < 23.5  # chi-square, 4 degrees of freedom, p = 1e-4


# ----------------------------------------------------------------------------------------------------- dispatcher


@pytest.mark.parametrize("seed", SEEDS)
def test_select_matches_the_building_blocks(seed):
    rng = np.random.default_rng(seed)
    n = 12
    records = random_records(rng, n, lengths=(5, 60))
    answers = random_answers(rng, n, n_distinct=3)
    cfg = ConfidenceConfig(window=8, tail=10)
    conf = [token_confidence(r["topk_mean_logprob"]).tolist() for r in records]
    ref_scores = {"mean": [sum(c) / len(c) for c in conf],
                  "tail": [sum(c[-10:]) / len(c[-10:]) for c in conf],
                  "lowest": [ref_lowest(c, 8) for c in conf]}
    for method in METHODS:
        answer, index = select(answers, records, method, cfg, vocab_size=50, seed=1, key="p")
        assert answers[index] == answer
        if method == "majority":
            assert answer == ref_vote(answers)
            assert index == answers.index(answer)
        elif method == "random":
            assert index == random_index(n, 1, "p")
        elif method == "self-certainty":
            sc = [(-math.log(50) - r["_logp"].mean(axis=1)).mean() for r in records]
            assert index == int(np.argmax(sc))
        else:
            kind = method.split("-")[1]
            s = ref_scores[kind]
            if method.endswith("-best"):
                assert index == max(range(n), key=lambda i: (s[i], -i))
                continue
            fraction = {"filter10": 0.1, "filter90": 0.9}.get(method.split("-")[-1], 1.0)
            assert answer == ref_filtered(answers, s, fraction)
            same = [i for i in range(n) if answers[i] == answer]
            assert index == max(same, key=lambda i: (s[i], -i))
        np.testing.assert_allclose(confidence_scores(records, "lowest", cfg), ref_scores["lowest"], rtol=1e-10)


def test_select_errors():
    answers = ["a", "b"]
    records = random_records(np.random.default_rng(0), 2)
    with pytest.raises(TellnormError, match="valid methods: majority, deepconf-mean"):
        select(answers, records, "deepconf")
    with pytest.raises(TellnormError, match="per_token has 1 entries"):
        select(answers, records[:1], "majority")
    with pytest.raises(TellnormError, match="pass per_token"):
        select(answers, None, "deepconf-mean")
    with pytest.raises(TellnormError, match="needs vocab_size"):
        select(answers, records, "self-certainty")
    with pytest.raises(TellnormError, match=r"per_token\[1\] has no 'topk_mean_logprob'"):
        select(answers, [records[0], {}], "deepconf-tail-best")
    assert select(answers, None, "majority") == ("a", 0)
    assert select([None, None], None, "majority") == (None, 0)


def test_select_vote_without_answers_returns_the_top_scoring_response():
    records = [{"topk_mean_logprob": np.full(4, -c)} for c in (1.0, 3.0, 2.0)]  # confidences 1, 3, 2
    assert select([None, None, "a"], records, "deepconf-mean-filter10") == (None, 1)  # keeps only response 1
    assert select([None, None, "a"], records, "deepconf-mean") == ("a", 2)
    assert select(["a", "b", "b"], records, "deepconf-mean-filter90") == ("b", 1)  # keeps 1, 2: b weighs 5


def test_select_reads_nan_answers_as_no_answer():
    """Answers from a pandas column: a response without an answer is NaN there, and must count as None."""
    records = [{"topk_mean_logprob": np.full(4, -c)} for c in (1.0, 3.0, 2.0)]
    nan = float("nan")
    assert select([nan, nan, 7.0], None, "majority") == (7.0, 2)  # a missing answer casts no vote
    assert select([nan, nan, 7.0], records, "deepconf-mean") == (7.0, 2)
    assert select([nan, nan, 7.0], records, "deepconf-mean-filter10") == (None, 1)


def test_select_representative_is_the_first_of_the_top_scoring_winners():
    records = [{"topk_mean_logprob": np.full(3, -c)} for c in (1.0, 2.0, 5.0, 2.0, 5.0)]
    assert select(["b", "a", "a", "b", "a"], records, "deepconf-mean") == ("a", 2)
    assert select(["b", "a", "a", "b", "a"], records, "deepconf-mean-best") == ("a", 2)
    assert select(["b", "a", "a", "b", "a"], None, "majority") == ("a", 1)
