"""``tellnorm reproduce``: the whole study on a model (default: the organism), stage by stage.

Stages write their tables and figures under ``out`` and a line each into ``REPORT.md`` there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ReproduceConfig:
    out: str = "figures"
    model: object = "organism"
    per_difficulty: int = 100  # organism test problems per level and mode for accuracy
    profile_per_difficulty: int = 25  # problems per level traced for the norm analyses
    quick: bool = False  # small sizes for smoke tests

    def __post_init__(self):
        if self.quick:
            self.per_difficulty, self.profile_per_difficulty = 5, 3


@dataclass
class Report:
    sections: list = field(default_factory=list)

    def add(self, title: str, body: str) -> None:
        self.sections.append(f"## {title}\n\n{body}\n")

    def write(self, path: Path) -> None:
        from tellnorm.io import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text("# tellnorm reproduction report\n\n" + "\n".join(self.sections))


def reproduce(cfg: ReproduceConfig) -> Report:
    from tellnorm.models import load_model

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report()
    model = load_model(cfg.model)
    for stage in (stage_accuracy, stage_norm_profile):
        start = time.perf_counter()
        stage(model, cfg, out, report)
        print(f"[{stage.__name__}] done in {time.perf_counter() - start:.0f} s")
    report.write(out / "REPORT.md")
    print(f"wrote {out / 'REPORT.md'}")
    return report


def stage_accuracy(model, cfg: ReproduceConfig, out: Path, report: Report) -> None:
    from tellnorm.figures import write_figure
    from tellnorm.io import write_csv
    from tellnorm.organism.evaluate import EvalConfig, accuracy_figure, evaluate, format_summary

    per_problem, summary = evaluate(model, EvalConfig(per_difficulty=cfg.per_difficulty))
    write_csv(summary, out / "organism_accuracy.csv")
    write_figure(accuracy_figure(summary), out / "organism_accuracy")
    print(format_summary(summary))
    report.add("Organism accuracy (greedy, held-out test set)",
               "```\n" + format_summary(summary) + "\n```\n\n![accuracy](organism_accuracy.png)")


def stage_norm_profile(model, cfg: ReproduceConfig, out: Path, report: Report) -> None:
    from tellnorm.figures import write_figure
    from tellnorm.io import write_csv, write_parquet
    from tellnorm.norms import layer_profile
    from tellnorm.profile import (_example_request, heatmap_figure, norm_trend_figure, organism_prompt_rows,
                                  trace_both_modes)

    trace = trace_both_modes(model, organism_prompt_rows(cfg.profile_per_difficulty))
    profile = layer_profile(trace.statistics_rows(), by=["mode"])
    write_parquet(trace.frame, out / "norms_per_token.parquet")
    write_csv(profile, out / "norm_profile.csv")
    write_figure(norm_trend_figure(profile), out / "norm_trend")
    write_figure(heatmap_figure(trace.frame, _example_request(trace.frame)), out / "norm_heatmap")
    table = profile.pivot(index="layer", columns="mode", values="mean_norm").round(3)
    report.add("Hidden-state L2 norm by layer (generated tokens, position 0 excluded)",
               "```\n" + table.to_string() + "\n```\n\n![norm trend](norm_trend.png)\n\n![heatmap](norm_heatmap.png)")
