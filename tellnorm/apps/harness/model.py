"""``--model tellnorm``: an lm-eval model that generates through tellnorm, with its techniques and norm statistics.

Model args (``--model_args key=value,...``):

* ``pretrained`` — ``organism`` (default), a local HF folder, or a hub name in the local cache (tellnorm.backends.hf).
* ``backend`` — ``hf`` (default) or ``vllm``; other unknown args go to the vLLM engine (``backend=vllm`` only).
* ``technique`` — ``none`` (default), ``alrr``, ``erss`` or ``alrr+erss``: decode-time edits, as ``tellnorm evaluate``.
* ``select`` + ``n`` — pick one of ``n`` sampled responses per request: ``lrs`` (the paper's rule, statistic D over
  the late layers) or a compute-matched baseline of :mod:`tellnorm.techniques.confidence` (``majority``,
  ``self-certainty``, ``deepconf-lowest-filter10``, ``random``, ...). Responses are sampled with the task's sampling
  when it samples, else with the paper's (temperature 0.7, top-p 0.8, top-k 20, repetition penalty 1.05).
  ``answer`` says how votes read an answer: ``organism``, ``math`` (math-verify, equal answers vote together),
  ``last-number``, ``boxed`` or ``regex:PATTERN``.
* ``thresholds`` — the per-layer τ of the techniques, LRS and the "fraction above τ" statistic: default
  ``calibrate`` for the organism (Q3 + k·IQR of its greedy responses to ``calibration_per_difficulty`` validation
  problems per difficulty, as ``tellnorm evaluate``), none otherwise; ``FILE.json`` (``{"layers": {"6": 12.3}}``);
  ``PROMPTS.jsonl`` (calibrate on the model's greedy responses to these prompts, formatted like the task's);
  ``off``. ``k`` (1.5), ``calibration_max_tokens``.
* ``chat`` (true) — wrap each context in the model's chat template (thinking mode per ``thinking``, default true)
  unless lm-eval's ``--apply_chat_template`` already did; ``chat=false`` feeds contexts raw.
* ``think_end_token`` — return only the text after it (lm-eval's convention), e.g. ``</think>``.
* ``skip_special_tokens`` (false) — decoding; the end-of-turn token is cut like every stop string.
* ``stats`` — a JSONL file for the per-response records (``python -m tellnorm.apps.harness`` writes them beside
  lm-eval's results without it); ``seed``, ``dtype``, ``batch_size`` (lm-eval's ``--batch_size``), ``device``.

Per response the records hold: the request (task, doc_id), n_prompt, n_generated, finish_reason, the late-layer
norm statistics of its generated tokens (mean, max, fraction above τ, LRS statistic D), the techniques' firing
counters (tellnorm.techniques.firing_report), and under selection the sample index, its answer and which one was
picked. A summary goes into lm-eval's results JSON (``config.tellnorm``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from lm_eval.api.model import LM

from tellnorm.errors import TellnormError

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance

log = logging.getLogger("tellnorm.apps.harness")

SELECT_LRS = "lrs"
ANSWERS = ("organism", "math", "last-number", "boxed")
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default when a task names no limit
DEFAULT_CALIBRATION_MAX_TOKENS = 2048  # calibration responses of a non-organism model (thresholds=PROMPTS.jsonl)
AUTO_BATCH_SIZE = 64
THRESHOLDS_OFF = "off"
THRESHOLDS_CALIBRATE = "calibrate"
ENGINE_ONLY_HINT = "tellnorm's model args are pretrained, backend, technique, select, n, answer, thresholds, k, " \
                   "calibration_per_difficulty, calibration_max_tokens, chat, thinking, think_end_token, " \
                   "skip_special_tokens, stats, seed, dtype, batch_size, device"

LIVE: list = []  # every TellnormLM made in this process (the CLI writes their records beside lm-eval's results)


def _bool(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise TellnormError(f"model arg {name}={value!r}: give true or false")


def _int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TellnormError(f"model arg {name}={value!r}: give a whole number ≥ {minimum}")
    try:
        number = int(value)
    except ValueError:
        raise TellnormError(f"model arg {name}={value!r}: give a whole number ≥ {minimum}") from None
    if number < minimum:
        raise TellnormError(f"model arg {name}={value!r}: give a whole number ≥ {minimum}")
    return number


def parse_technique(value: str | None) -> tuple[str, ...]:
    """``none``/None/"" → (); else tellnorm.techniques.parse_techniques (one line for an unknown name)."""
    from tellnorm.techniques import parse_techniques

    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return ()
    if not isinstance(value, str):
        raise TellnormError(f"model arg technique={value!r}: give none, alrr, erss or alrr+erss")
    return parse_techniques(value)


def select_methods() -> tuple[str, ...]:
    """What ``select=`` accepts: ``lrs`` and the confidence baselines of :mod:`tellnorm.techniques.confidence`."""
    from tellnorm.techniques.confidence import method_names

    return (SELECT_LRS,) + method_names()


def check_answer_spec(spec: str) -> str:
    """``spec`` if ``answer=`` accepts it (organism, math, last-number, boxed, regex:PATTERN); else one line."""
    from tellnorm.studies.evaluation import check_extractor

    if spec in ("organism", "math"):
        return spec
    try:
        check_extractor(spec)
    except TellnormError:
        raise TellnormError(f"model arg answer={spec!r}: choose {', '.join(ANSWERS)} or regex:PATTERN") from None
    return spec


class TellnormLM(LM):
    """lm-eval's LM over a tellnorm model (see the module docstring for the model args)."""

    def __init__(self, pretrained: Any = "organism", backend: str = "hf", technique: Any = None,
                 select: Any = None, n: Any = 8, answer: Any = None, thresholds: Any = None, k: Any = 1.5,
                 calibration_per_difficulty: Any = 10, calibration_max_tokens: Any = None, chat: Any = True,
                 thinking: Any = True, think_end_token: Any = None, skip_special_tokens: Any = False,
                 stats: Any = None, seed: Any = 0, dtype: str = "float32", batch_size: Any = 16,
                 max_batch_size: Any = None, device: Any = None, trust_remote_code: Any = None,
                 **engine_options: Any):
        super().__init__()
        from tellnorm.backends import BACKENDS
        from tellnorm.thresholds import ThresholdConfig

        # Every check that needs no model comes first: a bad arg costs no model load.
        if backend not in BACKENDS:
            raise TellnormError(f"model arg backend={backend!r}: choose one of {', '.join(BACKENDS)}")
        if engine_options and backend != "vllm":
            raise TellnormError(f"unknown model arg(s) {', '.join(sorted(engine_options))}: {ENGINE_ONLY_HINT} "
                                "(other args go to the vLLM engine with backend=vllm)")
        self.techniques = parse_technique(technique)
        self.select = None if select is None or str(select).lower() in ("", "none") else str(select)
        if self.select is not None and self.select not in select_methods():
            raise TellnormError(f"model arg select={select!r}: choose one of {', '.join(select_methods())}")
        self.n = _int(n, "n", 2) if self.select else 1
        self.seed = _int(seed, "seed", 0)
        self.chat = _bool(chat, "chat")
        self.thinking = _bool(thinking, "thinking")
        self.skip_special_tokens = _bool(skip_special_tokens, "skip_special_tokens")
        self.think_end_token = think_end_token or None
        self.threshold_cfg = ThresholdConfig(k=float(k))
        self.calibration_per_difficulty = _int(calibration_per_difficulty, "calibration_per_difficulty", 1)
        self.calibration_max_tokens = (None if calibration_max_tokens is None
                                       else _int(calibration_max_tokens, "calibration_max_tokens", 1))
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            batch_size = AUTO_BATCH_SIZE
        self.batch_size = _int(batch_size, "batch_size", 1)
        if max_batch_size is not None:
            self.batch_size = min(self.batch_size, _int(max_batch_size, "max_batch_size", 1))
        self.stats_path = Path(stats) if stats else None
        self.answer_spec = None if answer is None else check_answer_spec(str(answer))
        needs_tau = bool(self.techniques) or self.select == SELECT_LRS
        if backend == "vllm" and self.select not in (None, SELECT_LRS, "majority", "random"):
            raise TellnormError(f"select={self.select} scores responses by their next-token distributions, which the "
                                "vLLM backend does not record: use backend=hf, or select=lrs, majority or random")

        from tellnorm.backends import load_model

        options = dict(engine_options)
        if backend == "hf":
            options["device"] = _device(device)
        self.model = load_model(pretrained, backend=backend, dtype=dtype, **options)
        self.backend = self.model.backend  # a loaded model passed as pretrained keeps its own
        self._device = options.get("device", "vllm")
        self.is_organism = getattr(self.model, "source", None) == "organism" or self.model.name == "organism"
        if self.answer_spec is None:
            self.answer_spec = "organism" if self.is_organism else "math"
        self.late = self.model.late_layers()
        self._templated = False  # lm-eval applied our chat template (--apply_chat_template)
        self.records: list[dict] = []
        self.wall_s = 0.0
        self.thresholds = None
        self.thresholds_source = None
        self._resolve_thresholds(thresholds, needs_tau)
        LIVE.append(self)

    # ------------------------------------------------------------------------------------------- thresholds

    def _resolve_thresholds(self, spec, needs_tau: bool) -> None:
        from tellnorm.techniques import check_thresholds
        from tellnorm.thresholds import FixedThresholds

        spec = None if spec is None else str(spec)
        if spec is None:
            spec = THRESHOLDS_CALIBRATE if self.is_organism else THRESHOLDS_OFF
        what = " and ".join(filter(None, ["technique " + "+".join(self.techniques) if self.techniques else "",
                                          "select=lrs" if self.select == SELECT_LRS else ""]))
        if spec == THRESHOLDS_OFF:
            if needs_tau:
                raise TellnormError(f"{what} needs per-layer thresholds τ: pass thresholds=FILE.json "
                                    '({"layers": {"L": τ}}) or thresholds=PROMPTS.jsonl (calibrated on the model\'s '
                                    "greedy responses to them)" + (" or thresholds=calibrate" if self.is_organism
                                                                   else ""))
            return
        if spec == THRESHOLDS_CALIBRATE:
            if not self.is_organism:
                raise TellnormError(f"thresholds=calibrate uses the organism's validation problems; for "
                                    f"{self.model.name} pass thresholds=FILE.json or thresholds=PROMPTS.jsonl")
            from tellnorm.organism import task as organism_task

            problems = organism_task.validation_split(self.calibration_per_difficulty).problems
            prompts = [self._encode(p.prompt_text(), templated=False) for p in problems]
            self._calibrate(prompts, self.calibration_max_tokens or organism_task.RESPONSE_BUDGET,
                            f"calibrated on {len(prompts)} organism validation problems")
        elif spec.endswith(".json"):
            self.thresholds = FixedThresholds.from_json(spec)
            self.thresholds_source = spec
        elif spec.endswith(".jsonl"):
            from tellnorm.studies.evaluation import read_jsonl

            if not Path(spec).is_file():
                raise TellnormError(f"thresholds={spec}: the calibration prompt file does not exist")
            rows = read_jsonl(spec, need_answers=False)
            prompts = [self._encode(row["prompt"], templated=False) for row in rows]
            self._calibrate(prompts, self.calibration_max_tokens or DEFAULT_CALIBRATION_MAX_TOKENS,
                            f"calibrated on {len(prompts)} prompts of {spec}")
        else:
            raise TellnormError(f"model arg thresholds={spec!r}: give FILE.json, PROMPTS.jsonl, off"
                                + (" or calibrate" if self.is_organism else ""))
        check_thresholds(self.thresholds.values, self.late)

    def _calibrate(self, prompts, max_new_tokens: int, source: str) -> None:
        """τ exactly as ``tellnorm evaluate``: every layer's norms of the model's greedy responses, Q3 + k·IQR."""
        from tellnorm.techniques import calibrated_thresholds, calibration_norms

        norms = calibration_norms(self.model, prompts, list(range(self.model.n_layers)),
                                  max_new_tokens=max_new_tokens, batch_size=self.batch_size)
        self.thresholds = calibrated_thresholds(norms, self.threshold_cfg, source=source)
        self.thresholds_source = source

    # --------------------------------------------------------------------------------------------- prompts

    @property
    def tokenizer_name(self) -> str:
        """The model's name as lm-eval's cache keys use it (``/`` replaced by ``__``)."""
        return str(self.model.name).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The model's chat template text (None without one); lm-eval's ``chat_template`` argument is ignored."""
        from tellnorm.thinking import template_text

        return template_text(self.model.tokenizer) or None

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """lm-eval's ``--apply_chat_template``: the model's template with tellnorm's thinking switch."""
        from tellnorm.thinking import switch_for

        self._templated = True
        roles = [m.get("role") for m in chat_history]
        if roles == ["user"] and add_generation_prompt:
            return self.model.chat_prompt(chat_history[0]["content"], thinking=self.thinking)
        return switch_for(self.model).render_messages(self.model.tokenizer, chat_history, self.thinking,
                                                      add_generation_prompt=add_generation_prompt)

    def _encode(self, context: str, *, templated: bool) -> list[int]:
        if self.chat and not templated:
            context = self.model.chat_prompt(context, thinking=self.thinking)
        return self.model.encode(context)

    # ------------------------------------------------------------------------------------------ generation

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Not supported: raises one TellnormError line (decode-time techniques act on generated tokens)."""
        raise TellnormError(_NO_LOGLIKELIHOOD)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Not supported: raises one TellnormError line (decode-time techniques act on generated tokens)."""
        raise TellnormError(_NO_LOGLIKELIHOOD)

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """One response text per request (the selected one under ``select``), with the model args' technique;
        records per-response norm statistics."""
        if not requests:
            return []
        start = time.perf_counter()
        seen: Counter = Counter()
        keys = []
        for req in requests:  # a stable id per request (its sampling seed derives from it); repeats get their own
            base = f"{req.task_name}/{req.doc_id}/{req.idx}"
            keys.append(f"{base}/{seen[base]}")
            seen[base] += 1
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        for indices in groups.values():
            texts = self._generate_group([requests[i] for i in indices], [keys[i] for i in indices],
                                         progress=not disable_tqdm)
            for i, text in zip(indices, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        self.wall_s += time.perf_counter() - start
        if self.stats_path is not None:
            self.write_records(self.stats_path)
        return out

    def _sampling(self, gen_kwargs: dict):
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        from tellnorm.generation import SamplingConfig

        kwargs = dict(normalize_gen_kwargs(dict(gen_kwargs), DEFAULT_MAX_GEN_TOKS))
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self._eos_text())
        max_new = int(kwargs.pop("max_gen_toks"))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        temperature = temperature if do_sample else 0.0
        top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
        top_k = int(kwargs.pop("top_k", 0) or 0)
        repetition_penalty = float(kwargs.pop("repetition_penalty", 1.0) or 1.0)
        kwargs.pop("seed", None)
        if kwargs:
            log.warning("tellnorm ignores generation kwargs %s", ", ".join(sorted(kwargs)))
        sampling = SamplingConfig(max_new_tokens=max_new, temperature=temperature, top_p=top_p, top_k=top_k,
                                  repetition_penalty=repetition_penalty, seed=self.seed)
        if self.select and sampling.greedy:  # N greedy responses would be N copies: the paper's sampling
            sampling = SamplingConfig.paper(max_new_tokens=max_new, seed=self.seed)
        return sampling, until

    def _eos_text(self) -> str | None:
        eos = self.model.tokenizer.eos_token_id
        return None if eos is None else self.model.tokenizer.decode([eos], skip_special_tokens=False)

    def _generate_group(self, requests, keys, *, progress: bool) -> list[str]:
        from tellnorm.generation import generate
        from tellnorm.norms import NormTracer, generated_rows
        from tellnorm.techniques import build_edits, firing_report

        sampling, until = self._sampling(requests[0].args[1])
        prompts = [self._encode(req.args[0], templated=self._templated) for req in requests]
        n = self.n
        request_ids = [key if n == 1 else f"{key}#{s}" for key in keys for s in range(n)]
        repeated = [p for p in prompts for _ in range(n)]
        edits = (build_edits(self.techniques, self.model, fixed=self.thresholds, threshold_cfg=self.threshold_cfg)
                 if self.techniques else [])
        tracer = NormTracer(self.model, self.late)
        token_stats = self.select not in (None, SELECT_LRS, "majority", "random")
        gens = generate(self.model, repeated, sampling, request_ids=request_ids, batch_size=self.batch_size,
                        observers=list(edits) + [tracer], progress=progress, desc="tellnorm generate_until",
                        token_stats=token_stats)
        texts = [self._text(g, until) for g in gens]
        norms = generated_rows(tracer.frame(), gens)
        stats = self._norm_stats(norms, request_ids)
        firing = firing_report(edits, request_ids).set_index("request_id") if edits else None
        answers = self._answers(texts) if n > 1 else None
        chosen = list(range(len(gens))) if n == 1 else self._select(gens, answers, norms, n, keys)
        picked = set(chosen)
        for j, (gen, req) in enumerate(zip(gens, [r for r in requests for _ in range(n)])):
            record = {"task": req.task_name, "doc_id": req.doc_id, "request_id": gen.request_id,
                      "technique": "+".join(self.techniques) or "none", "n_prompt": len(gen.prompt_ids),
                      "n_generated": len(gen.generated_ids), "finish_reason": gen.finish_reason,
                      **stats.get(gen.request_id, {})}
            if firing is not None:
                record.update({c: int(v) for c, v in firing.loc[gen.request_id].items()})
            if n > 1:
                record.update({"select": self.select, "sample": j % n, "selected": j in picked,
                               "answer": None if answers[j] is None else str(answers[j])})
            self.records.append(record)
        return [texts[j] for j in chosen]

    def _text(self, gen, until: list[str]) -> str:
        from lm_eval.models.utils import postprocess_generated_text

        ids = list(gen.generated_ids)
        think_end = self.think_end_token
        if think_end:  # a single-token marker is cut on tokens (it may be a special token the decode drops)
            tok = self.model.tokenizer.convert_tokens_to_ids(think_end)
            if isinstance(tok, int) and tok != self.model.tokenizer.unk_token_id and tok in ids:
                ids = ids[len(ids) - ids[::-1].index(tok):]
                think_end = None
        text = self.model.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
        if self.think_end_token and think_end is None:
            text = text.lstrip()
        return postprocess_generated_text(generation=text, stop=until, think_end_token=think_end)

    # ---------------------------------------------------------------------------------------- statistics

    def _norm_stats(self, norms, request_ids) -> dict:
        """Per response: mean and max late-layer norm over its generated tokens, the fraction above τ, LRS's D."""
        from tellnorm.techniques import lrs as L

        out = {rid: {"late_layers": ",".join(map(str, self.late))} for rid in request_ids}
        if norms.empty:
            return out
        grouped = norms.groupby("request_id", sort=False).norm
        for rid, mean, peak in zip(grouped.mean().index, grouped.mean().to_numpy(), grouped.max().to_numpy()):
            out[rid].update({"late_norm_mean": float(mean), "late_norm_max": float(peak)})
        if self.thresholds is not None:
            taus = self.thresholds.values
            above = norms.norm.to_numpy() > norms.layer.map(taus).to_numpy(dtype=np.float64)
            frac = norms.assign(above=above).groupby("request_id", sort=False).above.mean()
            table = L.statistics_table(norms, {layer: taus[layer] for layer in self.late})
            lrs = L.scores(table, L.LRSConfig(), self.late)
            for rid in out:
                if rid in frac.index:
                    out[rid]["frac_above_tau"] = float(frac[rid])
                    out[rid]["lrs_D"] = float(lrs[rid])
        return out

    def _answers(self, texts: list[str]) -> list:
        """One answer per response, hashable and equal for equal answers (math: math-verify equivalence)."""
        spec = self.answer_spec
        if spec == "organism":
            from tellnorm.apps.harness.tasks import organism_answer

            return [organism_answer(t) for t in texts]
        if spec == "math":
            from math_verify import verify

            from tellnorm.apps.harness.tasks import math_answer

            answers, reps = [], []  # reps: (label, parsed) of each distinct answer so far
            for text in texts:
                parsed = math_answer(text)
                if not parsed:
                    answers.append(None)
                    continue
                label = next((lab for lab, rep in reps if verify(rep, parsed)), None)
                if label is None:
                    label = str(parsed[-1])
                    reps.append((label, parsed))
                answers.append(label)
            return answers
        from tellnorm.studies.evaluation import text_extractor

        extract = text_extractor(spec)
        return [extract(t) for t in texts]

    def _select(self, gens, answers, norms, n: int, keys) -> list[int]:
        """Index (into ``gens``) of the response picked for each request."""
        from tellnorm.techniques import confidence as C
        from tellnorm.techniques import lrs as L

        chosen = []
        if self.select == SELECT_LRS:
            taus = self.thresholds.values
            table = L.statistics_table(norms, {layer: taus[layer] for layer in self.late})
            score = L.scores(table, L.LRSConfig(), self.late)
            for g in range(0, len(gens), n):
                ids = [gens[g + s].request_id for s in range(n)]
                chosen.append(g + L.pick(score.reindex(ids).fillna(-np.inf).to_numpy()))
            return chosen
        conf_cfg = C.ConfidenceConfig.scaled(float(np.median([len(x.generated_ids) for x in gens])))
        vocab = getattr(getattr(getattr(self.model, "hf_model", None), "config", None), "vocab_size", None)
        for q, g in enumerate(range(0, len(gens), n)):
            group = gens[g:g + n]
            per_token = [x.meta for x in group] if group[0].meta else None
            _, index = C.select(answers[g:g + n], per_token, self.select, conf_cfg, vocab_size=vocab, seed=self.seed,
                                key=keys[q])
            chosen.append(g + index)
        return chosen

    # ------------------------------------------------------------------------------------------- outputs

    def summary(self) -> dict:
        """What ``get_model_info`` puts into lm-eval's results (``config.tellnorm``)."""
        info = {"backend": self.backend, "model": str(self.model.name), "technique": "+".join(self.techniques)
                or "none", "select": self.select, "n": self.n, "late_layers": self.late,
                "thresholds_source": self.thresholds_source,
                "thresholds": None if self.thresholds is None else
                {str(k): round(float(v), 6) for k, v in sorted(self.thresholds.values.items())},
                "threshold_k": self.threshold_cfg.k, "responses": len(self.records), "wall_s": round(self.wall_s, 3),
                "stats_file": None if self.stats_path is None else str(self.stats_path)}
        if self.records:
            import pandas as pd

            frame = pd.DataFrame(self.records)
            for column in frame.columns:
                if column in ("n_generated", "late_norm_mean", "late_norm_max", "frac_above_tau") or \
                        column.startswith(("alrr_", "erss_")):
                    info[f"{column}_mean"] = float(frame[column].mean())
                    if column.startswith(("alrr_", "erss_")):
                        info[f"{column}_fired"] = float((frame[column] > 0).mean())
        return info

    def get_model_info(self) -> dict:
        """``{"tellnorm": summary()}``, which lm-eval stores in its results' config."""
        return {"tellnorm": self.summary()}

    def write_records(self, path: str | Path) -> Path:
        """The per-response records as JSONL (rewritten whole)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(_plain(r)) + "\n" for r in self.records), encoding="utf-8")
        return path


_NO_LOGLIKELIHOOD = ("--model tellnorm implements generate_until only: loglikelihood and multiple-choice tasks are "
                     "not supported (decode-time techniques act on generated tokens); use a generate_until task, or "
                     "--model hf for loglikelihood tasks")


def _device(device) -> str:
    import torch

    device = str(device) if device else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        log.warning("no CUDA device: tellnorm runs on cpu (lm-eval's --device defaults to cuda:0)")
        return "cpu"
    return device


def _plain(record: dict) -> dict:
    out = {}
    for key, value in record.items():
        if isinstance(value, (np.integer,)):
            value = int(value)
        elif isinstance(value, (np.floating,)):
            value = float(value)
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    return out
