"""The responses a study reads: every task problem answered in both modes, generated once and reused.

Generation is the expensive part of the paper's study on a real model (4,096-token traces), and every analysis but
the interventions and the techniques reads the *same* responses: accuracy scores them, the norm profile, the
features, the bound and the correlation run teacher-forced passes over them. So they are generated once, on
whichever backend is fastest (vLLM for real models), and stored as token ids (:func:`generate_responses`);
:func:`response_corpus` turns them into the contrast corpus of the SAE stages, with the final-answer tokens both
modes write (located by the task's extractor) as the matched positions.

Modes: ``thinking`` / ``non-thinking`` through the model's thinking switch, or, for a model without one, the
``non-thinking`` responses come from a second model (``--contrast-model``); teacher-forced passes always run
on the first model, whose SAEs they read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tellnorm.errors import TellnormError

if TYPE_CHECKING:
    import pandas as pd

    from tellnorm.backends.base import ModelAPI
    from tellnorm.generation import SamplingConfig
    from tellnorm.studies.corpus import ContrastCorpus
    from tellnorm.tasks import Task

MODES = ("thinking", "non-thinking")
RESPONSE_COLUMNS = ("task", "item", "id", "group", "mode", "request_id", "prompt_ids", "generated_ids", "finish",
                    "n_generated", "answer", "correct")


def mode_models(model: ModelAPI, contrast_model: ModelAPI | None = None) -> dict[str, tuple[ModelAPI, bool]]:
    """``{mode: (model that answers, thinking switch value)}``: both modes from ``model``'s switch, or the
    non-thinking mode from ``contrast_model`` (its own template, switch off). A model that cannot give a mode and
    has no contrast model is one TellnormError line, before any generation."""
    from tellnorm.thinking import require_contrast, switch_for

    if contrast_model is None:
        require_contrast(model)
        return {"thinking": (model, True), "non-thinking": (model, False)}
    from tellnorm.thinking import contrast_models

    contrast_models(model, contrast_model)  # checks both modes and the shared vocabulary
    switch_for(model)
    return {"thinking": (model, True), "non-thinking": (contrast_model, False)}


def encode_prompts(models: Mapping[str, tuple[ModelAPI, bool]], tasks: Sequence[Task]) -> dict[str, list[list[int]]]:
    """Chat-prompt token ids of every problem of every task, per mode; a prompt over a model's context is one
    TellnormError line (checked before generation)."""
    prompts: dict[str, list[list[int]]] = {}
    for mode, (model, thinking) in models.items():
        encoded = []
        for task in tasks:
            for item in task.items:
                ids = model.encode(model.chat_prompt(item.prompt, thinking=thinking))
                if len(ids) >= model.max_positions:
                    raise TellnormError(f"problem {item.id} of {task.name} has {len(ids)} prompt tokens, over "
                                        f"{model.name}'s context of {model.max_positions}: drop or shorten it")
                encoded.append(ids)
        prompts[mode] = encoded
    return prompts


def generate_responses(models: Mapping[str, tuple[ModelAPI, bool]], tasks: Sequence[Task], sampling: SamplingConfig,
                       *, batch_size: int = 16, progress: bool = True) -> pd.DataFrame:
    """Every problem of every task answered in each mode (one request each, id ``MODE/TASK/ID``), scored by its
    task: one row per response with the columns of :data:`RESPONSE_COLUMNS`."""
    import pandas as pd

    from tellnorm.generation import generate

    prompts = encode_prompts(models, tasks)  # every prompt checked before the first token is generated
    rows = []
    for mode, (model, _) in models.items():
        keys = [(task, i, item) for task in tasks for i, item in enumerate(task.items)]
        request_ids = [f"{mode}/{task.name}/{item.id}" for task, _, item in keys]
        gens = generate(model, prompts[mode], sampling, request_ids=request_ids, batch_size=batch_size,
                        progress=progress, desc=f"responses ({mode})")
        for (task, i, item), rid, gen in zip(keys, request_ids, gens):
            text = model.tokenizer.decode(gen.generated_ids, skip_special_tokens=True)
            rows.append({"task": task.name, "item": i, "id": item.id, "group": item.group, "mode": mode,
                         "request_id": rid, "prompt_ids": list(gen.prompt_ids),
                         "generated_ids": list(gen.generated_ids),
                         "finish": gen.finish_reason, "n_generated": len(gen.generated_ids),
                         "answer": task.extract(text), "correct": task.is_correct(item, text)})
    return pd.DataFrame(rows, columns=list(RESPONSE_COLUMNS))


def accuracy_table(responses: pd.DataFrame, model_name: str, *, seed: int = 0) -> pd.DataFrame:
    """Accuracy per task, mode and group, and over the whole task (group "all"), with n and a bootstrap 95% CI over
    problems; plus ``answered`` (share with an answer the extractor finds) and the mean response length."""
    import pandas as pd

    from tellnorm.stats import bootstrap_ci

    rows = []
    for (task, mode), frame in responses.groupby(["task", "mode"], sort=False):
        groups = [("all", frame)] + ([(g, f) for g, f in frame.groupby("group", sort=False)]
                                     if frame.group.nunique() > 1 else [])
        for group, f in groups:
            correct = f.correct.to_numpy(dtype=float)
            lo, hi = bootstrap_ci(correct, seed=seed)
            rows.append({"model": model_name, "task": task, "mode": mode, "group": group, "n": len(f),
                         "accuracy": correct.mean(), "ci_low": lo, "ci_high": hi,
                         "answered": f.answer.notna().mean(), "mean_generated": f.n_generated.mean(),
                         "hit_budget": (f.finish == "length").mean()})
    return pd.DataFrame(rows)


def problem_index(responses: pd.DataFrame) -> dict[str, int]:
    """``{request_id: problem number}``: one number per (task, item), the same in both modes."""
    keys = {key: n for n, key in enumerate(dict.fromkeys(zip(responses.task, responses.item)))}
    return {rid: keys[(t, i)] for rid, t, i in zip(responses.request_id, responses.task, responses.item)}


def paired(responses: pd.DataFrame, limit: int | None = None) -> pd.DataFrame:
    """The responses of problems answered in both modes, thinking ones first then non-thinking ones, each in problem
    order (the j-th of each mode is one problem: the contrast corpus's convention); at most ``limit`` problems."""
    import pandas as pd

    index = problem_index(responses)
    frame = responses.assign(problem=responses.request_id.map(index))
    both = sorted(set.intersection(*(set(frame[frame["mode"] == m].problem) for m in MODES)))
    keep = set(both[:limit] if limit is not None else both)
    parts = [frame[(frame["mode"] == m) & frame.problem.isin(keep)].sort_values("problem") for m in MODES]
    return pd.concat(parts, ignore_index=True)


def response_corpus(model: ModelAPI, responses: pd.DataFrame, tasks: Sequence[Task], *,
                    limit: int | None = None) -> ContrastCorpus:
    """The contrast corpus of the stored responses (:func:`paired`; prompts rendered as each mode's model saw them),
    with the tokens that write each response's stated answer as its matched positions (empty when none was found;
    :func:`tellnorm.tasks.answer_positions`)."""
    from tellnorm.studies.corpus import ContrastCorpus
    from tellnorm.tasks import answer_positions

    by_name = {task.name: task for task in tasks}
    frame = paired(responses, limit)
    sequences, n_prompt, matched = [], [], []
    for row in frame.itertuples():
        prompt, generated = [int(t) for t in row.prompt_ids], [int(t) for t in row.generated_ids]
        sequences.append(prompt + generated)
        n_prompt.append(len(prompt))
        found = answer_positions(model.tokenizer, generated, by_name[row.task])
        matched.append([len(prompt) + p for p in found])
    return ContrastCorpus(sequences, n_prompt, list(frame["mode"]), [[None] * len(s) for s in sequences],
                          matched=matched)


def trace_responses(model: ModelAPI, responses: pd.DataFrame, tasks: Sequence[Task], *, point: str = "resid_post",
                    batch_size: int = 8, limit: int | None = None) -> Any:
    """Teacher-forced norm trace (:func:`tellnorm.norms.trace_forward`) of the paired responses on ``model``, with
    the columns the profile study reads: ``mode``, ``prompt_index`` (the problem), ``task``, ``group`` and
    ``matched_role`` = "answer" on the tokens that write the stated answer. Norms only: each hook reduces its
    ``[tokens, d_model]`` block to ``[tokens]`` as it runs."""
    from tellnorm.norms import NormTrace, trace_forward

    frame = paired(responses, limit)
    corpus = response_corpus(model, responses, tasks, limit=limit)
    ids = list(frame.request_id)
    trace = trace_forward(model, corpus.sequences, request_ids=ids, point=point, batch_size=batch_size,
                          n_prompt=corpus.n_prompt)
    table = trace.frame
    for column in ("mode", "task", "group"):
        table[column] = table.request_id.map(dict(zip(ids, frame[column])))
    table["prompt_index"] = table.request_id.map(dict(zip(ids, frame.problem)))
    answer = {(rid, p) for rid, positions in zip(ids, corpus.matched) for p in positions}
    roles = [("answer" if (rid, p) in answer else None) for rid, p in zip(table.request_id, table.position)]
    table["matched_role"] = roles
    return NormTrace(table, trace.generations)
