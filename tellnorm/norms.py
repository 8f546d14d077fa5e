"""Per-token, per-layer ℓ2 norms of the residual stream, reduced inside the hook (PAPER.md §1).

The quantity is ``‖blocks.L.hook_resid_post‖₂`` (HF: the output of decoder layer L), accumulated in float32.
The hook keeps one scalar per token, never a ``[tokens, d_model]`` tensor, so tracing costs about what a plain
forward pass costs. Results are a tidy DataFrame, one row per (request, position, layer), with masks:
prompt / generated, inside the think block, position 0 (massive activations: excluded from statistics by
default), and the per-token labels of the model's ``token_labeler`` when it has one (the organism's ground truth).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tellnorm.errors import TellnormError
from tellnorm.generation import Generation, LayerHooks, SamplingConfig, StepInfo, generate, run_forward

if TYPE_CHECKING:
    from pathlib import Path

    import pandas as pd
    import torch

    from tellnorm.backends.base import ModelAPI


def l2_norm(x: torch.Tensor, *, keepdim: bool = False) -> torch.Tensor:
    """‖x‖₂ over the last axis (PAPER.md §1), accumulated in float32 (float64 for float64 models), detached:
    ``x`` ``[..., d_model]`` -> ``[...]`` (``[..., 1]`` with ``keepdim``)."""
    import torch

    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(x.detach(), dim=-1, dtype=dtype, keepdim=keepdim)


# Records (one per layer and pass) kept as tensors before they are folded into one table chunk. On a CPU, thousands
# of tiny long-lived tensors pin the KV cache's freed per-step buffers on the heap: tracing 2,048 tokens of a 2-layer
# Qwen3-0.6B shape peaked at 2,914 MB resident against 58 MB untraced; folded every 1,024 records 158 MB, every 256
# records 51 MB (bench lengths, this machine, 2026-12-05; docs/benchmarks.md).
COMPACT_AFTER = 256


class NormTracer(LayerHooks):
    """Observer that records ‖h‖₂ at ``point`` of every layer in ``layers`` for every real token.

    Use with :func:`tellnorm.generation.generate` / :func:`run_forward` (which say what each row is), or as a
    context manager around any forward pass of ``model.bridge`` (rows are then requests 0..B-1).
    """

    edits_stream = False  # records only (vLLM under tensor parallelism runs it on one rank)

    def __init__(self, model: ModelAPI, layers: Sequence[int] | None = None, point: str = "resid_post"):
        super().__init__(model, range(model.n_layers) if layers is None else layers, point)
        self._records: list = []  # (layer, request_ids, positions [b,s], valid [b,s], norms [b,s]), the latest
        self._chunks: list[pd.DataFrame] = []  # earlier records, folded (see COMPACT_AFTER)
        self._context = None

    def hook_for(self, layer: int) -> Callable[[torch.Tensor, Any], torch.Tensor]:
        """A hook that records ‖activation‖₂ ``[batch, seq]`` at ``layer`` for the pass's new tokens."""
        import torch

        def record(activation: torch.Tensor, hook: Any) -> torch.Tensor:
            norms = l2_norm(activation)
            info = self.info or _default_info(norms.shape)
            if not torch.isfinite(norms).all():
                row, col = (~torch.isfinite(norms)).nonzero()[0].tolist()
                raise TellnormError(
                    f"non-finite activation at layer {layer} ({self.point}), request {info.request_ids[row]!r}, "
                    f"position {int(info.positions[row, col])}: check the model's dtype and weights"
                )
            self._records.append((layer, info.request_ids, info.positions.cpu(), info.new_tokens.cpu(), norms.cpu()))
            if len(self._records) >= COMPACT_AFTER:
                self._chunks.append(_records_frame(self._records))
                self._records = []
            return activation

        return record

    def __enter__(self):
        self._context = self.model.bridge.hooks(fwd_hooks=self.hooks())
        self._context.__enter__()
        return self

    def __exit__(self, *exc):
        context, self._context, self.info = self._context, None, None
        return context.__exit__(*exc)

    def take_records(self, request_ids: Collection[Hashable] | None = None) -> pd.DataFrame | None:
        """Remove and return every record so far as one table (a tracer never reads its records back, so it hands
        over all of them, not only ``request_ids``'; record order is kept across parts); None when there are none."""
        taken = self.frame() if self._records or self._chunks else None
        self._records, self._chunks = [], []
        return taken

    def add_records(self, part: pd.DataFrame | None) -> None:
        """Append a table from :meth:`take_records` (of a copy of this tracer in another process)."""
        if part is not None and len(part):
            if self._records:
                self._chunks.append(_records_frame(self._records))
                self._records = []
            self._chunks.append(part)

    def frame(self) -> pd.DataFrame:
        """Recorded norms as a DataFrame: request_id, position, layer, norm."""
        import pandas as pd

        parts = [*self._chunks, *([_records_frame(self._records)] if self._records else [])]
        if len(parts) <= 1:
            return parts[0] if parts else _records_frame([])
        return pd.concat(parts, ignore_index=True)


def _records_frame(records: list) -> pd.DataFrame:
    """A tracer's records as a table: one row per real token and layer, in record order (built once from arrays:
    a DataFrame per record costs more than the forward pass of a small model's decode step)."""
    import numpy as np
    import pandas as pd

    columns: dict[str, list] = {"request_id": [], "position": [], "layer": [], "norm": []}
    for layer, request_ids, positions, valid, norms in records:
        rows, cols = valid.nonzero(as_tuple=True)
        ids = np.empty(len(request_ids), dtype=object)
        for i, request_id in enumerate(request_ids):  # element by element: tuple ids ((id, k) children) stay whole
            ids[i] = request_id
        columns["request_id"].append(ids[rows.numpy()])
        columns["position"].append(positions[rows, cols].numpy().astype(np.int64))
        columns["layer"].append(np.full(len(rows), layer, dtype=np.int16))
        columns["norm"].append(norms[rows, cols].numpy())
    if not records:
        return pd.DataFrame(columns=list(columns))
    return pd.DataFrame({name: np.concatenate(parts) for name, parts in columns.items()})


def generated_rows(frame: pd.DataFrame, generations: Sequence[Generation]) -> pd.DataFrame:
    """The rows of a :class:`NormTracer` frame that are generated tokens (at or after their request's prompt)."""
    if frame.empty:
        return frame
    n_prompt = frame.request_id.map({g.request_id: len(g.prompt_ids) for g in generations})
    return frame[frame.position >= n_prompt].reset_index(drop=True)


def _default_info(shape) -> StepInfo:
    import torch

    batch, seq = shape
    positions = torch.arange(seq).expand(batch, seq)
    return StepInfo(list(range(batch)), positions, torch.ones(batch, seq, dtype=torch.bool), "forward", 0)


@dataclass
class NormTrace:
    """Generations (or forward inputs) and their per-token norms with token-level masks."""

    frame: pd.DataFrame  # one row per (request, position, layer)
    generations: list[Generation]

    def to_parquet(self, path: str | Path) -> None:
        """Write the frame to a parquet file (no index)."""
        self.frame.to_parquet(path, index=False)

    def statistics_rows(self, *, include_position_zero: bool = False, generated_only: bool = True) -> pd.DataFrame:
        """Rows that enter statistics by default: generated tokens, position 0 excluded (massive activations)."""
        f = self.frame
        keep = f["is_generated"] if generated_only else f["norm"].notna()
        if not include_position_zero:
            keep = keep & ~f["is_position_zero"]
        return f[keep]


def trace_generation(model: ModelAPI, prompts: Sequence[Sequence[int]], sampling: SamplingConfig | None = None, *,
                     request_ids: Sequence | None = None, layers: Sequence[int] | None = None,
                     point: str = "resid_post", batch_size: int = 16, progress: bool = False,
                     extra_columns: dict | None = None) -> NormTrace:
    """Generate and trace: norms of the prompt and every generated token that went through the model."""
    tracer = NormTracer(model, layers, point)
    gens = generate(model, prompts, sampling, request_ids=request_ids, batch_size=batch_size,
                    observers=[tracer], progress=progress, desc="tracing norms")
    return NormTrace(annotate(model, tracer.frame(), gens, extra_columns), gens)


def trace_forward(model: ModelAPI, sequences: Sequence[Sequence[int]], *, request_ids: Sequence | None = None,
                  layers: Sequence[int] | None = None, point: str = "resid_post", batch_size: int = 16,
                  n_prompt: Sequence[int] | None = None) -> NormTrace:
    """Trace full sequences in teacher-forced forward passes; ``n_prompt[i]`` tokens of each count as prompt."""
    tracer = NormTracer(model, layers, point)
    ids = list(request_ids) if request_ids is not None else list(range(len(sequences)))
    run_forward(model, sequences, request_ids=ids, batch_size=batch_size, observers=[tracer])
    split = n_prompt if n_prompt is not None else [len(s) for s in sequences]
    gens = [Generation(rid, list(seq[:k]), list(seq[k:]), "forward") for rid, seq, k in zip(ids, sequences, split)]
    return NormTrace(annotate(model, tracer.frame(), gens), gens)


def token_table(model: ModelAPI, generations: Sequence[Generation], extra_columns: dict | None = None,
                ) -> pd.DataFrame:
    """One row per token of every request: its string and masks (prompt, think block, position 0, label)."""
    import pandas as pd

    labeler = getattr(model, "token_labeler", None)  # the subject's ground truth (the organism's step labels)
    think_open, think_close = model.think_markers
    rows = []
    for g in generations:
        tokens = model.token_strings(g.ids)
        n_prompt = len(g.prompt_ids)
        labels, roles = labeler(tokens, n_prompt) if labeler else ([None] * len(tokens), {})
        inside = False
        for pos, tok in enumerate(tokens):
            if tok == think_close:
                inside = False
            rows.append({"request_id": g.request_id, "position": pos, "token": tok, "is_prompt": pos < n_prompt,
                         "in_think": inside and tok != think_open, "label": labels[pos],
                         "matched_role": roles.get(pos),
                         "next_label": labels[pos + 1] if pos + 1 < len(tokens) else None})
            if tok == think_open:
                inside = True
    table = pd.DataFrame(rows)
    table["is_generated"] = ~table["is_prompt"]
    table["is_position_zero"] = table["position"] == 0
    for name, per_request in (extra_columns or {}).items():
        table[name] = table["request_id"].map(per_request)
    return table


def annotate(model: ModelAPI, norms: pd.DataFrame, generations: Sequence[Generation],
             extra_columns: dict | None = None) -> pd.DataFrame:
    """Join recorded norms with the token table (the final generated token, never fed back, has no norm)."""
    tokens = token_table(model, generations, extra_columns)
    merged = norms.merge(tokens, on=["request_id", "position"], how="left", validate="many_to_one")
    return merged.sort_values(["request_id", "layer", "position"], kind="stable").reset_index(drop=True)


def layer_profile(frame: pd.DataFrame, by: Sequence[str] = (), *, seed: int = 0) -> pd.DataFrame:
    """Mean norm per layer (and per ``by`` groups) with n and a bootstrap 95% CI over requests.

    The CI resamples requests, not tokens: tokens of one response are not independent.
    """
    import pandas as pd

    from tellnorm.stats import bootstrap_ci

    per_request = frame.groupby(list(by) + ["layer", "request_id"], observed=True)["norm"].mean().reset_index()
    rows = []
    for key, g in per_request.groupby(list(by) + ["layer"], observed=True):
        key = key if isinstance(key, tuple) else (key,)
        lo, hi = bootstrap_ci(g["norm"].to_numpy(), seed=seed)
        rows.append({**dict(zip(list(by) + ["layer"], key)), "n_requests": len(g), "mean_norm": g["norm"].mean(),
                     "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows)
