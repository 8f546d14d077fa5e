"""Local lm-eval tasks and answer checkers.

``tellnorm_organism`` (``tellnorm/data/lm_eval/tellnorm_organism.yaml``) evaluates the organism's held-out test
problems offline: its data is a JSONL written by :func:`write_organism_jsonl` (the committed
``organism_test.jsonl`` holds :data:`COMMITTED_PER_DIFFICULTY` problems per difficulty, exactly
``tellnorm.organism.task.test_split(COMMITTED_PER_DIFFICULTY)``). Its checker is the organism's own answer parser
(:func:`organism_answer`), not math-verify: math-verify falls back to the last number of a response, and the
organism's thinking trace is full of numbers, so a response that never writes ``answer : X`` (wrong for the
organism) would often count as right.

``tellnorm_math`` reads any JSONL of ``{"prompt", "answer"}`` lines (``--metadata '{"jsonl": "FILE"}'``) and checks
answers with math-verify (:func:`math_answer_correct`), on the text after the last ``</think>`` when there is one.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tellnorm.errors import TellnormError
from tellnorm.tasks import final_section

if TYPE_CHECKING:
    import datasets

DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "lm_eval"
ORGANISM_JSONL = DATA_DIR / "organism_test.jsonl"
COMMITTED_PER_DIFFICULTY = 3  # 30 problems: enough to see difficulty trends, fast on a CPU


# ------------------------------------------------------------------------------------------------- organism

def organism_rows(per_difficulty: int = COMMITTED_PER_DIFFICULTY) -> list[dict]:
    """The organism's test split (``test_split(per_difficulty)``, thinking-mode prompts) as JSONL rows."""
    from tellnorm.organism import task

    if not isinstance(per_difficulty, int) or isinstance(per_difficulty, bool) or per_difficulty < 1:
        raise TellnormError(f"per_difficulty must be a whole number ≥ 1, got {per_difficulty!r}")
    return [{"id": f"test/{i}", "prompt": p.prompt_text(), "answer": str(p.answer), "difficulty": p.difficulty}
            for i, p in enumerate(task.test_split(per_difficulty).problems)]


def write_organism_jsonl(path: str | Path = ORGANISM_JSONL, per_difficulty: int = COMMITTED_PER_DIFFICULTY) -> Path:
    """Write the organism test problems for ``tellnorm_organism`` (regenerates the committed file by default)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in organism_rows(per_difficulty)), encoding="utf-8")
    return path


def _read_rows(path: Path, what: str) -> list[dict]:
    from tellnorm.studies.evaluation import read_jsonl

    if not path.is_file():
        raise TellnormError(f"{what}: {path} does not exist")
    return read_jsonl(path)


def organism_dataset(organism_jsonl: str | None = None, **_metadata: Any) -> datasets.DatasetDict:
    """lm-eval ``custom_dataset`` of ``tellnorm_organism``: the committed JSONL, or ``--metadata
    '{"organism_jsonl": "FILE"}'`` (lm-eval passes every model arg and metadata key here: the rest is ignored)."""
    import datasets

    path = Path(organism_jsonl) if organism_jsonl else ORGANISM_JSONL
    hint = ("write it with python -c 'from tellnorm.apps.harness.tasks import write_organism_jsonl; "
            "write_organism_jsonl()'") if path == ORGANISM_JSONL else "pass an existing organism_jsonl file"
    if not path.is_file():
        raise TellnormError(f"tellnorm_organism: {path} does not exist: {hint}")
    rows = _read_rows(path, "tellnorm_organism")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(
        [{"id": str(r.get("id", i)), "prompt": r["prompt"], "answer": str(r["answer"]),
          "difficulty": int(r.get("difficulty", 0))} for i, r in enumerate(rows)])})


@lru_cache(maxsize=1)
def _organism_tokenizer():
    from tellnorm.organism.tokenizer import build_tokenizer

    return build_tokenizer()


def organism_answer(text: str) -> int | None:
    """The organism's answer in a response text: ``tellnorm.organism.task.parse_answer`` on its tokens.

    The organism's tokenizer is word-level, so the text of decoded tokens re-tokenizes to the same token strings;
    the harness returns a response without its final end-of-turn token (lm-eval cuts at EOS), which is the one
    place the two can disagree: a response ending ``answer :`` + EOS is no answer for ``parse_answer`` on the
    generated tokens, while the text ends at ``answer :`` and the parser looks further back."""
    from tellnorm.organism.task import parse_answer

    return parse_answer(_organism_tokenizer().tokenize(text))


def organism_results(doc: dict, results: list[str]) -> dict:
    """lm-eval ``process_results`` of ``tellnorm_organism``: accuracy, and whether an answer was given at all."""
    predicted = organism_answer(results[0])
    return {"acc": float(predicted is not None and predicted == int(doc["answer"])),
            "answered": float(predicted is not None)}


# ----------------------------------------------------------------------------------------------------- math

def jsonl_dataset(jsonl: str | None = None, **_metadata: Any) -> datasets.DatasetDict:
    """lm-eval ``custom_dataset`` of ``tellnorm_math``: ``--metadata '{"jsonl": "FILE.jsonl"}'`` of
    ``{"prompt": ..., "answer": ...}`` lines."""
    import datasets

    if not jsonl:
        raise TellnormError('tellnorm_math reads a JSONL of {"prompt": ..., "answer": ...} lines: pass it with '
                            "--metadata '{\"jsonl\": \"FILE.jsonl\"}'")
    rows = _read_rows(Path(jsonl), "tellnorm_math")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(
        [{"id": str(r.get("id", i)), "prompt": r["prompt"], "answer": str(r["answer"])} for i, r in enumerate(rows)])})


def _parse_math(text: str, *, gold: bool = False) -> list:
    from math_verify import parse

    parsed = parse(text)
    if not parsed and gold:
        parsed = parse(f"${text}$")  # a bare LaTeX gold answer, e.g. \frac{1}{2}
    return parsed


def math_answer(text: str) -> list:
    """math-verify's parse of a response's final section ([] when it finds no answer)."""
    return _parse_math(final_section(text))


def math_answer_correct(response: str, gold: str) -> bool:
    """Whether math-verify finds the response's final-section answer equal to ``gold`` (False when either is
    unparsable)."""
    from math_verify import verify

    gold_parsed = _parse_math(str(gold), gold=True)
    predicted = math_answer(response)
    return bool(gold_parsed and predicted and verify(gold_parsed, predicted))


def math_results(doc: dict, results: list[str]) -> dict:
    """lm-eval ``process_results`` checking with math-verify (for tasks that bring no checker of their own)."""
    return {"acc": float(math_answer_correct(results[0], doc["answer"])),
            "answered": float(bool(math_answer(results[0])))}
