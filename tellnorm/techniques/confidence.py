"""Compute-matched answer-selection baselines for ℓ2-norm response selection (LRS).

Given N sampled responses to one problem, each with a parsed answer (hashable, or None when none could be parsed)
and per-token log-probability records, these pick one answer. Every baseline sees the same N responses as LRS, so
the comparison is compute-matched.

Per generated token i of a response, generation records (1-D float arrays, one value per token):

* ``topk_mean_logprob[i]`` = (1/k) Σ_{j ≤ k} log P_i(j), the mean of the k largest log-probabilities (k = 20);
* ``mean_logprob[i]``      = (1/V) Σ_{v ≤ V} log p_i(v), the mean over the whole vocabulary of size V;
* ``token_logprob[i]``     = log p_i(sampled token) (recorded; no baseline here uses it).

Baselines (names in ``METHODS``):

* ``majority``: plain majority vote (self-consistency, Wang et al. 2023).
* DeepConf (Fu et al. 2025, "Deep Think with Confidence"), with token confidence C_i = −topk_mean_logprob[i] and
  three response scores: mean, tail and lowest-group confidence. For each score: ``deepconf-<score>`` is the
  confidence-weighted vote over all N, ``deepconf-<score>-best`` is best-of-N, ``deepconf-<score>-filter<P>`` keeps
  the top P% by score and then votes weighted by score (DeepConf-low: P = 10, DeepConf-high: P = 90).
* ``self-certainty``: best-of-N by self-certainty, the mean over tokens of KL(U ‖ p_i) (Kang et al. 2025,
  "Scalable Best-of-N Selection via Self-Certainty").
* ``random``: one response uniformly at random, reproducible from (seed, key); its expected accuracy is pass@1.

Higher is more confident for every score here.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tellnorm.errors import TellnormError

if TYPE_CHECKING:
    import numpy.typing as npt

CONFIDENCES = ("mean", "tail", "lowest")  # DEEPCONF (Fu et al. 2025): average, tail and lowest-group confidence
_KEEP_EPS = 1e-9  # guards ceil(keep_fraction * N) against float noise, e.g. 0.07 * 100 = 7.000000000000001
_KL_TOLERANCE = 1e-3  # nats: float32 recording noise allowed below KL(U‖p) = 0 before the input is called wrong


def _fraction_label(f: float) -> str:
    return f"{100 * f:g}"  # 0.1 -> "10", 0.9 -> "90", 0.125 -> "12.5"


def _check_keep_fraction(f, *, where: str) -> None:
    if isinstance(f, bool) or not isinstance(f, (int, float, np.integer, np.floating)) or not 0 < f <= 1:
        raise TellnormError(f"{where} must be in (0, 1] (e.g. 0.1 keeps the top 10%), got {f!r}.")


@dataclass(frozen=True)
class ConfidenceConfig:
    """DeepConf's settings: top-k of the token confidence, lowest-group window, tail size and the filter fractions.
    Checked when built."""

    top_k: int = 20  # DEEPCONF (Fu et al. 2025): vLLM logprobs=20; the k behind topk_mean_logprob (recorded, not used)
    window: int = 2048  # DEEPCONF (Fu et al. 2025): group size of the lowest-group confidence
    tail: int = 2048  # DEEPCONF (Fu et al. 2025): tail size of the tail confidence
    keep_fractions: tuple = (0.1, 0.9)  # DEEPCONF (Fu et al. 2025): DeepConf-low keeps top 10%, DeepConf-high 90%

    def __post_init__(self):
        for name in ("top_k", "window", "tail"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise TellnormError(f"ConfidenceConfig.{name} must be an integer >= 1, got {value!r}.")
        fractions = tuple(self.keep_fractions)
        if not fractions:
            raise TellnormError("ConfidenceConfig.keep_fractions is empty; give at least one fraction in (0, 1].")
        for f in fractions:
            _check_keep_fraction(f, where="ConfidenceConfig.keep_fractions")
        if len({_fraction_label(f) for f in fractions}) != len(fractions):
            raise TellnormError(f"ConfidenceConfig.keep_fractions has duplicates {fractions!r}; list each once.")
        object.__setattr__(self, "keep_fractions", fractions)

    @classmethod
    def scaled(cls, typical_length: float, **overrides: Any) -> ConfidenceConfig:
        """DeepConf's window and tail scaled to short responses: window = tail = max(4, round(L · 2048 / 16384)).

        DeepConf's 2048-token group and tail were chosen for traces of ~10k+ tokens (2048 is 1/8 of a 16k trace). On
        responses of ~100 tokens a 2048 window is the whole response, so the lowest-group and tail confidences
        would both collapse into the mean confidence; keeping the same 1/8 ratio keeps them local. The floor of 4
        tokens keeps a window from being a single noisy token.
        """
        if not (isinstance(typical_length, (int, float, np.integer, np.floating)) and typical_length > 0
                and math.isfinite(typical_length)):
            raise TellnormError(f"typical_length must be a positive number of tokens, got {typical_length!r}.")
        size = max(4, round(float(typical_length) * 2048 / 16384))
        return cls(**{"window": size, "tail": size, **overrides})


def method_names(cfg: ConfidenceConfig | None = None) -> tuple[str, ...]:
    """The method names ``select`` accepts under ``cfg``; the filter names follow ``cfg.keep_fractions``."""
    cfg = cfg or ConfidenceConfig()
    names = ["majority"]
    for conf in CONFIDENCES:
        names += [f"deepconf-{conf}", f"deepconf-{conf}-best"]
        names += [f"deepconf-{conf}-filter{_fraction_label(f)}" for f in cfg.keep_fractions]
    return tuple(names + ["self-certainty", "random"])


METHODS = method_names()


# ---------------------------------------------------------------------------------------------- per-response scores


def token_confidence(topk_mean_logprob: npt.ArrayLike) -> np.ndarray:
    """DeepConf token confidence C_i = −(1/k) Σ_{j ≤ k} log P_i(j) = −topk_mean_logprob[i]; higher = more confident."""
    return -_as_tokens(topk_mean_logprob, "topk_mean_logprob")


def mean_confidence(conf: npt.ArrayLike) -> float:
    """Average trace confidence: (1/n) Σ_i C_i over all n tokens."""
    return float(_as_tokens(conf, "conf").mean())


def tail_confidence(conf: npt.ArrayLike, tail: int) -> float:
    """Tail confidence: the mean of C_i over the last ``tail`` tokens (over all of them when the response is
    shorter)."""
    conf = _as_tokens(conf, "conf")
    _check_size(tail, "tail")
    return float(conf[-tail:].mean())


def lowest_group_confidence(conf: npt.ArrayLike, window: int) -> float:
    """Lowest group confidence: min over t of (1/w) Σ_{i=t}^{t+w−1} C_i, the worst mean over every window of w
    consecutive tokens (sliding by one); the mean of all tokens when the response is shorter than w.

    Window sums come from one cumulative sum: S[t + w] − S[t] with S[0] = 0, S[t] = Σ_{i<t} C_i.
    """
    conf = _as_tokens(conf, "conf")
    _check_size(window, "window")
    if conf.size <= window:
        return float(conf.mean())
    cumulative = np.concatenate(([0.0], np.cumsum(conf)))
    return float(((cumulative[window:] - cumulative[:-window]) / window).min())


def self_certainty(mean_logprob: npt.ArrayLike, vocab_size: int) -> float:
    """Self-certainty (Kang et al. 2025): (1/n) Σ_i KL(U ‖ p_i), where per token

        KL(U ‖ p_i) = Σ_v (1/V) log((1/V) / p_i(v)) = −log V − (1/V) Σ_v log p_i(v) = −log V − mean_logprob[i].

    Higher = further from uniform = more certain. ``vocab_size`` must be the V that ``mean_logprob`` averaged over.
    """
    mean_logprob = _as_tokens(mean_logprob, "mean_logprob")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise TellnormError(f"vocab_size must be a positive integer (the V mean_logprob averaged over), "
                            f"got {vocab_size!r}.")
    kl = -math.log(vocab_size) - mean_logprob
    if kl.min() < -_KL_TOLERANCE:
        raise TellnormError(f"mean_logprob reaches {mean_logprob.max():.4g} > -log V = {-math.log(vocab_size):.4g}, "
                            f"impossible for a mean of log p over V = {vocab_size} entries; pass the mean over the "
                            f"whole vocabulary (not the top-k mean) and the V it was taken over.")
    return float(kl.mean())


def confidence_scores(per_token: Sequence[Mapping], kind: str, cfg: ConfidenceConfig | None = None,
                      vocab_size: int | None = None) -> np.ndarray:
    """One score per response: ``kind`` is "mean", "tail" or "lowest" (DeepConf) or "self-certainty"."""
    cfg = cfg or ConfidenceConfig()
    if kind == "self-certainty":
        if vocab_size is None:
            raise TellnormError("self-certainty needs vocab_size (the V mean_logprob averaged over); pass it.")
        return np.array([self_certainty(_field(r, "mean_logprob", i), vocab_size) for i, r in enumerate(per_token)])
    score = {"mean": mean_confidence,
             "tail": lambda c: tail_confidence(c, cfg.tail),
             "lowest": lambda c: lowest_group_confidence(c, cfg.window)}.get(kind)
    if score is None:
        raise TellnormError(f"unknown score kind {kind!r}; use one of {CONFIDENCES + ('self-certainty',)}.")
    return np.array([score(token_confidence(_field(r, "topk_mean_logprob", i))) for i, r in enumerate(per_token)])


# --------------------------------------------------------------------------------------------------------- voting


def majority_vote(answers: Sequence[Hashable | None], weights: npt.ArrayLike | None = None) -> Hashable | None:
    """The answer with the largest total weight Σ_{i: answer_i = a} w_i (w_i = 1 without weights).

    None answers (nothing parseable) cast no vote; returns None when no response has an answer. Ties go to the tied
    answer whose first occurrence comes earliest in ``answers``.
    """
    _check_answers(answers)
    weights = np.ones(len(answers)) if weights is None else _as_scores(weights, len(answers), "weights")
    if (weights < 0).any():
        raise TellnormError("majority_vote weights must be >= 0; shift or clip negative scores first.")
    totals: dict = {}  # insertion order = order of first occurrence
    for answer, w in zip(answers, weights):
        if answer is not None:
            totals[answer] = totals.get(answer, 0.0) + float(w)
    best, best_total = None, -math.inf
    for answer, total in totals.items():
        if total > best_total:  # strict: an earlier first occurrence keeps a tie
            best, best_total = answer, total
    return best


def kept_indices(scores: npt.ArrayLike, keep_fraction: float) -> np.ndarray:
    """Indices of the ceil(keep_fraction · N) highest scores, highest first; equal scores keep index order."""
    _check_keep_fraction(keep_fraction, where="keep_fraction")
    scores = _as_scores(scores, None, "scores")
    n_keep = max(1, math.ceil(keep_fraction * scores.size - _KEEP_EPS))
    return np.argsort(-scores, kind="stable")[:n_keep]


def filtered_vote(answers: Sequence[Hashable | None], scores: npt.ArrayLike, keep_fraction: float) -> Hashable | None:
    """DeepConf's filtered weighted vote: keep the ceil(keep_fraction · N) highest-scoring responses, then
    ``majority_vote`` among them weighted by their scores.

    Weights must be positive to mean "more confident counts more"; if any kept score is <= 0 (not the case for
    DeepConf's token confidence, which is >= 0), the kept responses vote unweighted instead. keep_fraction = 1.0 is
    the confidence-weighted vote over all N.
    """
    _check_answers(answers)
    scores = _as_scores(scores, len(answers), "scores")
    keep = kept_indices(scores, keep_fraction)
    kept_answers = [answers[i] for i in keep]
    kept_scores = scores[keep]
    return majority_vote(kept_answers, None if (kept_scores <= 0).any() else kept_scores)


def best_of(answers: Sequence[Hashable | None], scores: npt.ArrayLike) -> Hashable | None:
    """Best-of-N: the answer of the highest-scoring response (the first on ties), which may be None."""
    _check_answers(answers)
    return answers[int(np.argmax(_as_scores(scores, len(answers), "scores")))]


def random_index(n: int, seed: int, key: object) -> int:
    """A uniform index in [0, n) that depends only on (seed, key, n): numpy's default_rng seeded with the SHA-256 of
    f"{seed}|{key}" (python's hash() of a str changes between processes)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise TellnormError(f"random pick needs at least one response, got n = {n!r}.")
    digest = hashlib.sha256(f"{seed}|{key}".encode()).digest()
    return int(np.random.default_rng(int.from_bytes(digest[:8], "little")).integers(n))


def random_pick(answers: Sequence[Hashable | None], seed: int, key: object) -> Hashable | None:
    """The answer of a uniformly random response (may be None), reproducible from (seed, key); pass the problem id as
    ``key`` so problems get independent picks."""
    _check_answers(answers)
    return answers[random_index(len(answers), seed, key)]


# ------------------------------------------------------------------------------------------------------ dispatcher


def select(answers: Sequence[Hashable | None], per_token: Sequence[Mapping] | None, method: str,
           cfg: ConfidenceConfig | None = None, vocab_size: int | None = None, seed: int = 0,
           key: object = None) -> tuple[Hashable | None, int]:
    """Run baseline ``method`` (one of ``method_names(cfg)``) on one problem's N responses.

    ``per_token[i]`` is a dict holding response i's ``topk_mean_logprob`` (DeepConf methods) and ``mean_logprob``
    (self-certainty; needs ``vocab_size``); "majority" and "random" need none and accept ``per_token=None``.

    Returns ``(answer, index)`` with ``answers[index]`` being the answer: for best-of and random the chosen response;
    for votes the highest-scoring response with the winning answer (the first one for "majority"); when no response
    has an answer, the vote returns None with the top-scoring (first, for "majority") response.
    """
    cfg = cfg or ConfidenceConfig()
    answers = [None if _missing(a) else a for a in answers]  # a pandas column of answers holds NaN, not None
    _check_answers(answers)
    valid = method_names(cfg)
    if method not in valid:
        raise TellnormError(f"unknown selection method {method!r}; valid methods: {', '.join(valid)}.")
    if per_token is not None and len(per_token) != len(answers):
        raise TellnormError(f"per_token has {len(per_token)} entries but there are {len(answers)} answers; give "
                            f"one dict of per-token arrays per response.")
    if method == "majority":
        answer = majority_vote(answers)
        return answer, _representative(answers, answer, None)
    if method == "random":
        index = random_index(len(answers), seed, key)
        return answers[index], index
    if per_token is None:
        raise TellnormError(f"method {method!r} scores responses from per-token records; pass per_token.")
    if method == "self-certainty":
        scores = confidence_scores(per_token, "self-certainty", vocab_size=vocab_size)
        index = int(np.argmax(scores))
        return answers[index], index
    _, kind, *rest = method.split("-")
    scores = confidence_scores(per_token, kind, cfg)
    if rest == ["best"]:
        index = int(np.argmax(scores))
        return answers[index], index
    keep_fraction = 1.0 if not rest else _fraction_from_label(rest[0], cfg)
    answer = filtered_vote(answers, scores, keep_fraction)
    return answer, _representative(answers, answer, scores)


# --------------------------------------------------------------------------------------------------------- helpers


def _missing(answer) -> bool:
    """No answer: None, or the NaN pandas turns None into in a column of numbers."""
    return answer is None or (isinstance(answer, float) and answer != answer)


def _representative(answers, answer, scores) -> int:
    """The highest-scoring response (first on ties; the first one without scores) whose answer is ``answer``."""
    same = [i for i, a in enumerate(answers) if (a is None if answer is None else (a is not None and a == answer))]
    if scores is None:
        return same[0]
    return max(same, key=lambda i: (scores[i], -i))


def _fraction_from_label(label: str, cfg: ConfidenceConfig) -> float:
    return next(f for f in cfg.keep_fractions if f"filter{_fraction_label(f)}" == label)


def _check_size(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise TellnormError(f"{name} must be an integer >= 1 (a number of tokens), got {value!r}.")


def _check_answers(answers) -> None:
    if len(answers) == 0:
        raise TellnormError("no responses to select from; pass at least one answer (None for an unparseable one).")
    for a in answers:
        try:
            hash(a)
        except TypeError:
            raise TellnormError(f"answer {a!r} is not hashable; normalize answers to strings or numbers "
                                "first.") from None


def _as_tokens(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise TellnormError(f"{name} must be a non-empty 1-D array with one value per generated token, "
                            f"got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise TellnormError(f"{name} contains NaN or inf; record finite log-probabilities (e.g. clamp -inf).")
    return array


def _as_scores(values, n: int | None, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise TellnormError(f"{name} must be a non-empty 1-D array with one value per response, "
                            f"got shape {array.shape}.")
    if n is not None and array.size != n:
        raise TellnormError(f"{name} has {array.size} values but there are {n} answers; give one per response.")
    if not np.isfinite(array).all():
        raise TellnormError(f"{name} contains NaN or inf; every response needs a finite score.")
    return array


def _field(record: Mapping, name: str, i: int) -> np.ndarray:
    try:
        return record[name]
    except (KeyError, TypeError, IndexError):
        raise TellnormError(f"per_token[{i}] has no {name!r}; record it during generation.") from None
