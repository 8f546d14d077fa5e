"""A browsable offline explorer of every feature of every layer and of the norm signal on the tokens.

    tellnorm explore --out explorer/          # the organism and its SAEs; open explorer/index.html

:mod:`.data` computes the JSON from one teacher-forced pass over a contrast corpus of validation problems;
:mod:`.site` writes it next to the page code (:mod:`.page`) with a local plotly.js, no network needed.
"""

from __future__ import annotations

from pathlib import Path

from tellnorm.explorer.data import DEFAULT_PER_DIFFICULTY, build_explorer_data, check_feature, check_saes
from tellnorm.explorer.site import write_site


def explorer_corpus(model, n_per_difficulty: int = DEFAULT_PER_DIFFICULTY, *, max_new_tokens: int = 240,
                    progress: bool = False):
    """The contrast corpus (both modes of the same validation problems) and each sequence's difficulty."""
    from tellnorm.organism import task
    from tellnorm.studies import contrast_corpus

    problems = task.validation_split(n_per_difficulty).problems
    corpus = contrast_corpus(model, prompts=[p.prompt_text() for p in problems], max_new_tokens=max_new_tokens,
                             progress=progress)
    return corpus, [p.difficulty for p in problems] * 2  # contrast_corpus: all thinking, then all non-thinking


def build_explorer(model, saes, out, *, n_per_difficulty: int = DEFAULT_PER_DIFFICULTY, progress: bool = False,
                   **kwargs) -> Path:
    """Generate the corpus, compute the data and write the site into ``out``; returns ``out/index.html``."""
    from tellnorm.errors import TellnormError
    from tellnorm.io import check_output_dir

    check_output_dir(out)
    check_saes(model, saes)
    if n_per_difficulty < 1:
        raise TellnormError(f"need ≥ 1 problem per difficulty, got {n_per_difficulty}")
    corpus, difficulties = explorer_corpus(model, n_per_difficulty, progress=progress)
    docs = build_explorer_data(model, saes, corpus, difficulties=difficulties, **kwargs)
    return write_site(docs, out, title=f"tellnorm explorer: {model.name}")


__all__ = ["build_explorer", "build_explorer_data", "check_feature", "check_saes", "explorer_corpus", "write_site"]
