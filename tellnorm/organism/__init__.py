"""The model organism: a tiny Qwen3-architecture model that tellnorm trains on a synthetic multi-step reasoning task
(:mod:`.task`, :mod:`.tokenizer`, :mod:`.train`), its evaluation (:mod:`.evaluate`), and tiny random stand-ins of
real architectures with SAEs in the registries' layouts (:mod:`.standins`).

It is a study subject, not a dependency of the core: it registers itself as the subject ``"organism"`` through the
``tellnorm.subjects`` entry point (pyproject.toml), so ``load_model("organism")`` and ``load_saes("organism")`` find
its folders, and its step labels reach traces through the loaded model's ``token_labeler``.
"""

from __future__ import annotations

from collections.abc import Sequence

from tellnorm.backends.base import Subject
from tellnorm.organism.paths import DEFAULT_ORGANISM_DIR, DEFAULT_SAE_DIR
from tellnorm.organism.task import closing_roles, label_tokens


def organism_token_labels(tokens: Sequence[str], n_prompt: int) -> tuple[list[str], dict[int, str]]:
    """The organism's ground truth for one request: a step label per token and the roles of its closing answer."""
    return label_tokens(list(tokens), n_prompt), closing_roles(list(tokens), n_prompt)


SUBJECT = Subject(
    name="organism",
    model_dir=DEFAULT_ORGANISM_DIR,
    sae_dir=DEFAULT_SAE_DIR,
    marker="organism.json",  # written by tellnorm organism train next to the weights
    token_labeler=organism_token_labels,
    rebuild="tellnorm organism train",
    sae_rebuild="tellnorm sae train",
)
