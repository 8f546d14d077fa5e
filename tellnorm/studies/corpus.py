"""What the studies run on: the same prompts answered in both modes.

* :func:`contrast_corpus` — greedy responses in thinking and non-thinking mode as token sequences
  (:class:`ContrastCorpus`), the input of the feature, bounds and correlation studies.
* :func:`trace_both_modes` — the same, with every layer's norms traced (the profile study's input).
* :func:`matched_positions` — positions both modes' responses have (from the model's token labeler).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tellnorm.errors import TellnormError

MODES = ("thinking", "non-thinking")


@dataclass
class ContrastCorpus:
    """The same questions answered in both modes: full sequences, prompt lengths, modes, step labels."""

    sequences: list
    n_prompt: list
    modes: list
    labels: list  # per token; None entries for models without a token labeler (only the organism has one)

    @property
    def thinking(self) -> list[int]:
        """Indices of the thinking-mode sequences."""
        return [i for i, m in enumerate(self.modes) if m == "thinking"]


def contrast_corpus(model, n_per_difficulty: int = 10, *, max_new_tokens: int = 240, progress: bool = True,
                    prompts: list[str] | None = None) -> ContrastCorpus:
    """Greedy responses in both modes to organism *validation* problems (never the accuracy test set)."""
    from tellnorm.generation import SamplingConfig, generate
    from tellnorm.organism import task
    from tellnorm.thinking import require_contrast

    require_contrast(model)  # a model without a thinking switch fails here, before any generation
    if prompts is None:
        prompts = [p.prompt_text() for p in task.validation_split(n_per_difficulty).problems]
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


def matched_positions(model, corpus: ContrastCorpus):
    """Per sequence, the positions both modes' responses have (the roles the model's token labeler finds: the
    organism's closing ``answer : X``); None for models without a token labeler."""
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


def trace_both_modes(model, rows: list[dict], *, point: str = "resid_post", max_new_tokens: int = 240,
                     batch_size: int = 40, layers=None, progress: bool = True, indices=None):
    """Generate every prompt in thinking and non-thinking mode and trace all layers; one NormTrace.

    ``indices[i]`` (optional) is row i's index in the full prompt list (a shard's rows keep their ids)."""
    import pandas as pd

    from tellnorm.generation import SamplingConfig
    from tellnorm.norms import NormTrace, trace_generation
    from tellnorm.thinking import require_contrast

    require_contrast(model)  # a model without a thinking switch fails here, before any generation
    frames, gens = [], []
    for mode in MODES:
        prompts = [model.encode(model.chat_prompt(r["prompt"], thinking=mode == "thinking")) for r in rows]
        ids = [f"{mode}/{i}" for i in (range(len(rows)) if indices is None else indices)]
        extra = {"mode": dict.fromkeys(ids, mode), "prompt_index": {rid: int(rid.split("/")[1]) for rid in ids}}
        if "difficulty" in rows[0]:
            extra["difficulty"] = {rid: r["difficulty"] for rid, r in zip(ids, rows)}
        trace = trace_generation(model, prompts, SamplingConfig(max_new_tokens=max_new_tokens), request_ids=ids,
                                 layers=layers, point=point, batch_size=batch_size, progress=progress,
                                 extra_columns=extra)
        frames.append(trace.frame)
        gens.extend(trace.generations)
    return NormTrace(pd.concat(frames, ignore_index=True), gens)


