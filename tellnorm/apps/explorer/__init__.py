"""A browsable offline explorer of every feature of every layer and of the norm signal on the tokens.

    tellnorm explore --out explorer/          # the organism and its SAEs; open explorer/index.html

:mod:`.data` computes the JSON from a contrast corpus of validation problems (one teacher-forced pass for the
norms, then one pass per SAE layer, streamed: a layer is written before the next is computed) and from greedy
runs of ALRR, ERSS and high-norm suppression on the norm view's prompts (where each technique acted);
:mod:`.site` writes it next to the page code (:mod:`.page`) with a local plotly.js, no network needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tellnorm.apps.explorer.data import (
    DEFAULT_PER_DIFFICULTY,
    MAX_NEW_TOKENS,
    TECHNIQUES,
    build_explorer_data,
    check_feature,
    check_saes,
    check_techniques,
    iter_explorer_docs,
    technique_layers,
)
from tellnorm.apps.explorer.site import write_site


def explorer_corpus(model: Any, n_per_difficulty: int = DEFAULT_PER_DIFFICULTY, *,
                    max_new_tokens: int = MAX_NEW_TOKENS, progress: bool = False) -> tuple[Any, list[int]]:
    """The contrast corpus (both modes of the same validation problems) and each sequence's difficulty."""
    from tellnorm.organism import task
    from tellnorm.studies.corpus import contrast_corpus

    problems = task.validation_split(n_per_difficulty).problems
    corpus = contrast_corpus(model, prompts=[p.prompt_text() for p in problems], max_new_tokens=max_new_tokens,
                             progress=progress)
    return corpus, [p.difficulty for p in problems] * 2  # contrast_corpus: all thinking, then all non-thinking


def build_explorer(model: Any, saes: Mapping[int, Any], out: str | Path, *,
                   n_per_difficulty: int = DEFAULT_PER_DIFFICULTY, progress: bool = False,
                   techniques: Sequence[str] | str = TECHNIQUES, max_new_tokens: int = MAX_NEW_TOKENS,
                   **kwargs: Any) -> Path:
    """Generate the corpus, then compute and write the site into ``out`` one layer at a time (at most one layer's
    feature data in memory); returns ``out/index.html``. Every argument is checked before the corpus is made."""
    from tellnorm.errors import TellnormError
    from tellnorm.io import check_output_dir

    check_output_dir(out)
    check_saes(model, saes)
    technique_layers(model, check_techniques(techniques), alrr=kwargs.get("alrr"), erss=kwargs.get("erss"))
    if n_per_difficulty < 1:
        raise TellnormError(f"need ≥ 1 problem per difficulty, got {n_per_difficulty}")
    corpus, difficulties = explorer_corpus(model, n_per_difficulty, max_new_tokens=max_new_tokens, progress=progress)
    docs = iter_explorer_docs(model, saes, corpus, difficulties=difficulties, techniques=techniques,
                              max_new_tokens=max_new_tokens, progress=progress, **kwargs)
    return write_site(docs, out, title=f"tellnorm explorer: {model.name}")


__all__ = ["TECHNIQUES", "build_explorer", "build_explorer_data", "check_feature", "check_saes", "check_techniques",
           "explorer_corpus", "iter_explorer_docs", "write_site"]
