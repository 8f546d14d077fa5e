"""Tasks: prompts with gold answers, and how a response's answer is found and scored.

A task is a list of :class:`TaskItem` (id, user prompt, gold answer, group) with an answer extractor. Two sources:

* a JSONL file of ``{"prompt", "answer"[, "id", "group"]}`` lines, spec ``FILE.jsonl`` or ``FILE.jsonl=EXTRACTOR``;
* an lm-eval task from the local cache, spec ``lm-eval:NAME``: its documents, prompts and targets, each response
  scored by lm-eval's own metric (the task's ``process_results``, the first metric of its ``metric_list``).

Extractors (:data:`EXTRACTORS`): ``last-number``, ``boxed`` (the last ``\\boxed{...}``), ``choice-letter`` (the
last standalone A-J), ``math`` (math-verify equivalence on the text after the last ``</think>``) and
``regex:PATTERN`` (one capture group). Every extractor also gives the character span of the answer it found, which
is how studies locate the final-answer tokens both modes write (the matched positions of PAPER §2).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tellnorm.errors import TellnormError

EXTRACTORS = ("last-number", "boxed", "choice-letter", "math")
LM_EVAL_PREFIX = "lm-eval:"
THINK_END = "</think>"

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_CHOICE = re.compile(r"(?<![A-Za-z])\(?([A-J])\)?(?![A-Za-z])")


@dataclass(frozen=True)
class TaskItem:
    """One problem: a unique id, the user message (the model's chat template renders it), the gold answer, a group
    (a table row: a difficulty, a subject; "all" when the file gives none) and the source document (lm-eval)."""

    id: str
    prompt: str
    answer: str
    group: str = "all"
    doc: dict | None = field(default=None, compare=False, repr=False)


def check_extractor(spec: str) -> None:
    """Raise one TellnormError line unless ``spec`` names an extractor of :data:`EXTRACTORS` or is
    ``regex:PATTERN`` with exactly one capture group."""
    if spec in EXTRACTORS:
        if spec == "math":
            try:
                import math_verify  # noqa: F401
            except ImportError:
                raise TellnormError("the math extractor needs math-verify: pip install 'tellnorm[harness]'") from None
        return
    if spec.startswith("regex:"):
        try:
            pattern = re.compile(spec[len("regex:"):])
        except re.error as exc:
            raise TellnormError(f"extractor {spec!r} is not a valid regular expression ({exc})") from None
        if pattern.groups != 1:
            raise TellnormError(f"extractor {spec!r} needs exactly one capture group (the answer)")
        return
    raise TellnormError(f"unknown answer extractor {spec!r}: choose {', '.join(EXTRACTORS)} or regex:PATTERN")


def final_section(text: str) -> str:
    """The part of a response after the last ``</think>`` (the whole text when there is none)."""
    return text.rsplit(THINK_END, 1)[-1]


def _last_match(pattern: re.Pattern, text: str, start: int = 0) -> tuple[str, tuple[int, int]] | None:
    found = None
    for match in pattern.finditer(text, start):
        found = match
    if found is None:
        return None
    group = 1 if pattern.groups else 0
    return found.group(group).strip(), (found.start(group), found.end(group))


def find_answer(text: str, spec: str) -> tuple[str, tuple[int, int]] | None:
    """The answer a response states by extractor ``spec`` and its character span ``(start, end)`` in ``text``;
    None when there is none. Answers are searched after the last ``</think>`` when the response closes its thinking
    (the final answer, not a number of the reasoning)."""
    check_extractor(spec)
    start = text.rfind(THINK_END)
    start = 0 if start < 0 else start + len(THINK_END)
    if spec == "math":
        return _math_answer(text, start)
    pattern = {"last-number": _NUMBER, "boxed": _BOXED, "choice-letter": _CHOICE}.get(spec)
    if pattern is None:
        pattern = re.compile(spec[len("regex:"):])
    found = _last_match(pattern, text, start)
    if found is not None and spec == "last-number":
        found = (found[0].replace(",", ""), found[1])
    return found


def _math_answer(text: str, start: int) -> tuple[str, tuple[int, int]] | None:
    from math_verify import parse

    parsed = parse(text[start:])
    if not parsed:
        return None
    shown = str(parsed[-1])
    # where the answer is written: the last \boxed{}, else the last number, else the whole final section
    for pattern in (_BOXED, _NUMBER):
        found = _last_match(pattern, text, start)
        if found is not None:
            return shown, found[1]
    return shown, (start, len(text))


def answers_match(predicted: str | None, gold: str, spec: str = "last-number") -> bool:
    """Whether an extracted answer equals the gold one: math-verify equivalence for ``math``; letters compared
    case-blind for ``choice-letter``; else equal as numbers when both parse as numbers, else as stripped strings."""
    if predicted is None:
        return False
    if spec == "math":
        from math_verify import parse, verify

        gold_parsed = parse(str(gold)) or parse(f"${gold}$")
        return bool(gold_parsed and verify(gold_parsed, parse(f"${predicted}$") or parse(predicted)))
    if spec == "choice-letter":
        return predicted.strip().strip("()").upper() == str(gold).strip().strip("()").upper()
    try:
        return math.isclose(float(predicted.replace(",", "")), float(str(gold).replace(",", "")), rel_tol=0,
                            abs_tol=1e-9)
    except ValueError:
        return predicted.strip() == str(gold).strip()


@dataclass
class Task:
    """A named list of :class:`TaskItem` and the way its responses are scored.

    ``scorer`` (lm-eval tasks): ``(item, response text) -> bool``, the benchmark's own metric; None: the extracted
    answer against the gold one (:func:`answers_match`)."""

    name: str
    items: list[TaskItem]
    extractor: str = "last-number"
    source: str = ""
    scorer: Callable[[TaskItem, str], bool] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_extractor(self.extractor)
        if not self.items:
            raise TellnormError(f"task {self.name} has no problems")
        if len({item.id for item in self.items}) != len(self.items):
            raise TellnormError(f'task {self.name} repeats an "id": give every problem a unique id (or none)')

    def extract(self, text: str) -> str | None:
        """The answer a response ``text`` states (None: no answer found)."""
        found = find_answer(text, self.extractor)
        return None if found is None else found[0]

    def answer_span(self, text: str) -> tuple[int, int] | None:
        """Character span of the stated answer in ``text`` (None: no answer found)."""
        found = find_answer(text, self.extractor)
        return None if found is None else found[1]

    def is_correct(self, item: TaskItem, text: str) -> bool:
        """Whether response ``text`` answers ``item`` correctly (lm-eval's metric for lm-eval tasks)."""
        if self.scorer is not None:
            return bool(self.scorer(item, text))
        return answers_match(self.extract(text), item.answer, self.extractor)

    def head(self, n: int | None) -> Task:
        """The first ``n`` problems (all when None): stages that need fewer problems take a prefix."""
        if n is None or n >= len(self.items):
            return self
        return Task(self.name, self.items[:n], self.extractor, self.source, self.scorer)

    @property
    def groups(self) -> list[str]:
        """The groups in first-seen order."""
        return list(dict.fromkeys(item.group for item in self.items))


def read_task_rows(path: str | Path, *, need_answers: bool = True) -> list[dict[str, Any]]:
    """The rows of a JSONL task file (blank lines skipped); each needs a non-empty ``prompt`` string and, when
    ``need_answers``, an ``answer``. A missing file or a bad line is one TellnormError line naming it."""
    path = Path(path)
    if not path.is_file():
        raise TellnormError(f"task file {path} does not exist: give a JSONL file of "
                            '{"prompt": "...", "answer": "..."} lines')
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TellnormError(f"{path} line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise TellnormError(f'{path} line {number} has no "prompt" string: every line needs '
                                '{"prompt": "...", "answer": "..."}')
        if need_answers and row.get("answer") is None:
            raise TellnormError(f'{path} line {number} has no "answer": scoring needs the gold answer of every '
                                "prompt")
        rows.append(row)
    if not rows:
        raise TellnormError(f"{path} has no prompts")
    return rows


def jsonl_task(path: str | Path, extractor: str = "last-number") -> Task:
    """A task from a JSONL file of ``{"prompt", "answer"[, "id", "group"]}`` lines (ids: the line's index when
    absent; groups: "all")."""
    check_extractor(extractor)
    rows = read_task_rows(path)
    items = [TaskItem(str(row.get("id", i)), row["prompt"], str(row["answer"]), str(row.get("group", "all")))
             for i, row in enumerate(rows)]
    return Task(Path(path).stem, items, extractor, str(path))


def lm_eval_task(name: str, extractor: str = "last-number", *, include_path: str | None = None) -> Task:
    """An lm-eval ``generate_until`` task from the local dataset cache: its test (else validation) documents, the
    task's own prompt and target, and its first metric as the scorer. Not cached, unknown or not a generation task:
    one TellnormError line. ``include_path``: a folder of task YAMLs besides lm-eval's own (default: the
    ``TELLNORM_LM_EVAL_INCLUDE`` environment variable).

    A response is scored as lm-eval scores it: through the task's first filter pipeline (e.g. a regex taking the
    final number), then its ``process_results``."""
    include_path = include_path or os.environ.get("TELLNORM_LM_EVAL_INCLUDE") or None
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise TellnormError("lm-eval tasks need lm-eval: pip install 'tellnorm[harness]'") from None
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    if name not in manager.all_tasks:
        raise TellnormError(f"lm-eval has no task {name!r}: list them with `lm_eval ls tasks`"
                            + (f" (searched also {include_path})" if include_path else ""))
    try:
        task = manager.load_task_or_group([name])[name]
    except Exception as exc:  # datasets raises many kinds when the data is not in the offline cache
        raise TellnormError(f"lm-eval task {name!r} could not load its dataset offline ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}): put it in the local HF datasets cache "
                            "or point the task at a local file") from None
    if getattr(task, "OUTPUT_TYPE", None) != "generate_until":
        raise TellnormError(f"lm-eval task {name!r} is {task.OUTPUT_TYPE}, not generate_until: tellnorm scores "
                            "generated responses")
    docs = list(task.eval_docs)
    metric = task._metric_fn_list and next(iter(task._metric_fn_list))
    items = [TaskItem(str(i), str(task.doc_to_text(doc)), str(task.doc_to_target(doc)), "all", dict(doc))
             for i, doc in enumerate(docs)]

    pipeline = task._filters[0].filters if getattr(task, "_filters", None) else []

    def scorer(item: TaskItem, text: str) -> bool:
        responses: Any = [[text]]
        for step in pipeline:
            responses = list(step().apply(responses, [item.doc]))  # lm-eval keeps filter factories
        filtered = responses[0]
        results = task.process_results(item.doc, [filtered] if isinstance(filtered, str) else list(filtered))
        value = results.get(metric) if metric else next(iter(results.values()))
        return bool(value)

    return Task(name, items, extractor, f"{LM_EVAL_PREFIX}{name}", scorer)


def parse_task_spec(spec: str, default_extractor: str = "last-number") -> tuple[str, str]:
    """``FILE.jsonl[=EXTRACTOR]`` or ``lm-eval:NAME[=EXTRACTOR]`` -> (source, extractor), checked."""
    source, _, extractor = spec.partition("=")
    extractor = extractor or default_extractor
    check_extractor(extractor)
    if not source.startswith(LM_EVAL_PREFIX) and not source.endswith((".jsonl", ".json")):
        raise TellnormError(f"--task {spec!r}: give FILE.jsonl[=EXTRACTOR] or lm-eval:NAME")
    return source, extractor


def load_task(spec: str, default_extractor: str = "last-number", *, include_path: str | None = None) -> Task:
    """The task a spec names (see :func:`parse_task_spec`); every problem checked before any generation."""
    source, extractor = parse_task_spec(spec, default_extractor)
    if source.startswith(LM_EVAL_PREFIX):
        return lm_eval_task(source[len(LM_EVAL_PREFIX):], extractor, include_path=include_path)
    return jsonl_task(source, extractor)


def answer_positions(tokenizer: Any, generated_ids: Sequence[int], task: Task) -> list[int]:
    """Indices into ``generated_ids`` of the tokens that write the stated answer (empty: no answer found).

    Token ``i`` covers the characters between the decoded lengths of ``ids[:i]`` and ``ids[:i+1]``; both boundaries
    are found by bisection over prefix decodes (monotone in the prefix), so a 4,096-token response costs ~24 decodes,
    not one per token."""
    ids = list(generated_ids)
    span = task.answer_span(tokenizer.decode(ids))
    if span is None:
        return []
    start, end = span
    lengths: dict[int, int] = {}

    def prefix_length(i: int) -> int:
        if i not in lengths:
            lengths[i] = len(tokenizer.decode(ids[:i]))
        return lengths[i]

    def first_prefix_longer_than(chars: int) -> int:  # smallest i with len(decode(ids[:i])) > chars
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if prefix_length(mid) > chars:
                hi = mid
            else:
                lo = mid + 1
        return lo

    first = first_prefix_longer_than(start) - 1  # the token whose text passes the span's first character
    last = first_prefix_longer_than(end - 1) - 1
    return list(range(max(first, 0), min(last, len(ids) - 1) + 1))
