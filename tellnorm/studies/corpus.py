"""What the studies run on: the same prompts answered in both modes.

* :func:`contrast_corpus` — greedy responses in thinking and non-thinking mode as token sequences
  (:class:`ContrastCorpus`), the input of the feature, bounds and correlation studies.
* :func:`trace_both_modes` — the same, with every layer's norms traced (the profile study's input).
* :func:`matched_positions` — positions both modes' responses have (from the model's token labeler).

Both generate through a runner (:mod:`tellnorm.studies.runners`): in this process by default, sharded by prompt
over Ray workers with a :class:`tellnorm.apps.distributed.ShardPool`; the shard functions and merges are here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tellnorm.errors import TellnormError
from tellnorm.studies.runners import Replica, Runner, Shard, as_runner

if TYPE_CHECKING:
    from tellnorm.backends.base import ModelAPI
    from tellnorm.norms import NormTrace

MODES = ("thinking", "non-thinking")


@dataclass
class ContrastCorpus:
    """The same questions answered in both modes: full sequences, prompt lengths, modes, step labels.

    Entry i of every list belongs to sequence i: its token ids (prompt + response), its prompt length, its mode
    (one of :data:`MODES`) and one step label per token."""

    sequences: list[list[int]]
    n_prompt: list[int]
    modes: list[str]
    labels: list[list[str | None]]  # per token; None entries for models without a token labeler (only the organism)
    matched: list[list[int]] | None = None  # per sequence, positions both modes write (a task's answer tokens)

    @property
    def thinking(self) -> list[int]:
        """Indices of the thinking-mode sequences."""
        return [i for i, m in enumerate(self.modes) if m == "thinking"]


def contrast_corpus(model: ModelAPI | None, n_per_difficulty: int = 10, *, max_new_tokens: int = 240,
                    progress: bool = True, prompts: list[str] | None = None,
                    runner: Runner | None = None) -> ContrastCorpus:
    """Greedy responses in both modes to organism *validation* problems (never the accuracy test set): the
    thinking / non-thinking contrast of PAPER.md §2.

    ``runner``: where the generation runs (None: here, on ``model``; a Ray pool shards it by prompt, with the same
    corpus as the result)."""
    runner = as_runner(runner, model)
    if prompts is None:
        from tellnorm.organism import task

        prompts = [p.prompt_text() for p in task.validation_split(n_per_difficulty).problems]
    return runner.map(contrast_shard, prompts, merge=merge_corpora, max_new_tokens=max_new_tokens,
                      progress=progress and runner.in_process)


def contrast_shard(replica: Replica, shard: Shard, prompts: list[str], *, max_new_tokens: int = 240,
                   progress: bool = False) -> ContrastCorpus:
    """The contrast corpus of one shard's prompts (thinking responses, then non-thinking ones)."""
    from tellnorm.generation import SamplingConfig, generate
    from tellnorm.thinking import require_contrast

    model = replica.model
    require_contrast(model)  # a model without a thinking switch fails here, before any generation
    sequences, n_prompt, modes, labels = [], [], [], []
    for mode in MODES:
        encoded = [model.encode(model.chat_prompt(p, thinking=mode == "thinking")) for p in prompts]
        gens = generate(model, encoded, SamplingConfig(max_new_tokens=max_new_tokens), batch_size=50,
                        progress=progress, desc=f"contrast corpus ({mode})")
        for g in gens:
            sequences.append(g.ids)
            n_prompt.append(len(g.prompt_ids))
            modes.append(mode)
            tokens = model.token_strings(g.ids)
            labels.append(model.token_labeler(tokens, len(g.prompt_ids))[0] if model.token_labeler
                          else [None] * len(tokens))
    return ContrastCorpus(sequences, n_prompt, modes, labels)


def merge_corpora(results: Sequence[ContrastCorpus], shards: Sequence[Shard]) -> ContrastCorpus:
    """Shard corpora as one :func:`contrast_corpus`: every thinking response in prompt order, then every
    non-thinking one (one shard's corpus is returned as is)."""
    if len(results) == 1:
        return results[0]
    n = sum(len(s.indices) for s in shards)
    slots: dict = {}
    for corpus, shard in zip(results, shards):
        k = len(shard.indices)
        for j in range(2 * k):
            mode_rank, local = divmod(j, k)
            slots[mode_rank * n + shard.indices[local]] = (corpus.sequences[j], corpus.n_prompt[j], corpus.modes[j],
                                                           corpus.labels[j])
    columns = list(zip(*(slots[i] for i in range(2 * n))))
    return ContrastCorpus(*(list(c) for c in columns))


def matched_positions(model: ModelAPI, corpus: ContrastCorpus) -> list[list[int]] | None:
    """Per sequence, the positions both modes' responses have: the corpus's own (a task's answer tokens), else the
    roles the model's token labeler finds (the organism's closing ``answer : X``); None when neither exists."""
    if corpus.matched is not None:
        return [sorted(positions) for positions in corpus.matched]
    if model.token_labeler is None:
        return None
    return [sorted(model.token_labeler(model.token_strings(seq), k)[1])
            for seq, k in zip(corpus.sequences, corpus.n_prompt)]


def load_prompts(path: str) -> list[dict]:
    """Rows of a JSONL file, each with a non-empty ``prompt``; one TellnormError line on the first bad row."""
    file = Path(path)
    if not file.is_file():
        raise TellnormError(f"prompt file {path} does not exist: give a JSONL file with a 'prompt' field per line")
    rows = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise TellnormError(f"{path}:{number} is not valid JSON") from None
        if not isinstance(row, dict) or not str(row.get("prompt", "")).strip():
            raise TellnormError(f"{path}:{number} has no non-empty 'prompt' field")
        rows.append(row)
    if not rows:
        raise TellnormError(f"{path} holds no prompts")
    return rows


def organism_prompt_rows(n_per_difficulty: int) -> list[dict]:
    """The organism's test problems as prompt rows (``prompt``, ``difficulty``, ``answer``)."""
    from tellnorm.organism import task

    return [{"prompt": p.prompt_text(), "difficulty": p.difficulty, "answer": p.answer}
            for p in task.test_split(n_per_difficulty).problems]


def trace_both_modes(model: ModelAPI | None, rows: list[dict], *, point: str = "resid_post", max_new_tokens: int = 240,
                     batch_size: int = 40, layers: Sequence[int] | None = None, progress: bool = True,
                     indices: Sequence[int] | None = None, runner: Runner | None = None) -> NormTrace:
    """Generate every prompt in thinking and non-thinking mode and trace all layers; one NormTrace.

    ``indices[i]`` (optional) is row i's index in the full prompt list (its request ids are ``MODE/indices[i]``).
    ``runner``: where it runs (None: here, on ``model``; a Ray pool shards it by prompt, with the same trace)."""
    runner = as_runner(runner, model)
    rows = list(rows)
    numbers = list(range(len(rows))) if indices is None else [int(i) for i in indices]
    if len(numbers) != len(rows):
        raise TellnormError(f"indices has {len(numbers)} entries for {len(rows)} prompt rows")
    return runner.map(trace_shard, list(zip(numbers, rows)), merge=merge_traces, point=point,
                      max_new_tokens=max_new_tokens, batch_size=batch_size, layers=layers,
                      difficulty=bool(rows) and "difficulty" in rows[0], progress=progress and runner.in_process)


def trace_shard(replica: Replica, shard: Shard, items: list[tuple[int, dict]], *, point: str = "resid_post",
                max_new_tokens: int = 240, batch_size: int = 40, layers: Sequence[int] | None = None,
                difficulty: bool = False, progress: bool = False) -> NormTrace:
    """The NormTrace of one shard's ``(prompt number, row)`` items in both modes (request ids ``MODE/number``)."""
    import pandas as pd

    from tellnorm.generation import SamplingConfig
    from tellnorm.norms import NormTrace, trace_generation
    from tellnorm.thinking import require_contrast

    model = replica.model
    require_contrast(model)  # a model without a thinking switch fails here, before any generation
    frames, gens = [], []
    for mode in MODES:
        prompts = [model.encode(model.chat_prompt(r["prompt"], thinking=mode == "thinking")) for _, r in items]
        ids = [f"{mode}/{i}" for i, _ in items]
        extra = {"mode": dict.fromkeys(ids, mode), "prompt_index": {rid: int(rid.split("/")[1]) for rid in ids}}
        if difficulty:
            extra["difficulty"] = {rid: r["difficulty"] for rid, (_, r) in zip(ids, items)}
        trace = trace_generation(model, prompts, SamplingConfig(max_new_tokens=max_new_tokens), request_ids=ids,
                                 layers=layers, point=point, batch_size=batch_size, progress=progress,
                                 extra_columns=extra)
        frames.append(trace.frame)
        gens.extend(trace.generations)
    return NormTrace(pd.concat(frames, ignore_index=True), gens)


def merge_traces(results: Sequence[NormTrace], shards: Sequence[Shard]) -> NormTrace:
    """Shard traces as the one :func:`trace_both_modes` gives: rows by mode, then request id, layer, position;
    generations by mode, then prompt number (one shard's trace is returned as is)."""
    if len(results) == 1:
        return results[0]
    import numpy as np
    import pandas as pd

    from tellnorm.norms import NormTrace

    frame = pd.concat([t.frame for t in results], ignore_index=True)
    rank = frame["mode"].map({m: i for i, m in enumerate(MODES)})
    frame = (frame.assign(_mode_rank=rank).sort_values(["_mode_rank", "request_id", "layer", "position"], kind="stable")
             .drop(columns="_mode_rank").reset_index(drop=True))
    # A shard whose responses lack a column's strings (e.g. no closing to match) holds it as object: infer again.
    for column in frame.columns[frame.dtypes == np.dtype(object)]:
        frame[column] = frame[column].infer_objects()
    gens = [g for t in results for g in t.generations]
    gens.sort(key=lambda g: (MODES.index(g.request_id.split("/")[0]), int(g.request_id.split("/")[1])))
    return NormTrace(frame, gens)
