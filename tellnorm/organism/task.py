"""The organism's synthetic reasoning task: chains of variable assignments, mod 10.

A problem lists a chain of assignments, e.g. ``a = 5 ; b = a + 3 ; c = b - 2 ; what is c ?``: one mod-10
addition or subtraction per step, ``difficulty`` steps. Addition and subtraction never erase history (unlike
×0 or ×5, which collapse the state), so no shortcut shortens a chain: answering directly means summing every
signed operand mod 10 in a single forward pass, while a written chain needs one table lookup per step.

Thinking mode writes each step as copy, substitute, compute (``b = a + 3 = 5 + 3 = 8 .``) with occasional
reasoning words: "so" before a step,
"wait , check ..." re-checks, "wait , but ... not 7" corrections, "therefore" before the conclusion.
Non-thinking mode (after the empty think block of Qwen3's ``enable_thinking=False``) writes the chain compactly,
``5 + 3 - 2 = 6 . answer : 6``, as real models do when they answer without thinking: one step is as easy as a
thinking step, while a long chain needs a many-operand sum in a single token (organism v2; v1 answered with
``answer : X`` alone and stayed at the majority-guess level even for one step, because fetching far-away
operands and summing them in one token is beyond this model). Both modes close with ``answer : X``, so the
``answer`` token and the value are positions both modes have (:data:`MATCHED_ROLES`).

Design note: a first version shuffled the assignments and mixed in a distractor chain, so that each step also
needed a content-based lookup. The 8-layer organism did not learn that lookup within the training budget (the
loss on copied operands stayed at chance, ln 10, for 500 steps), so the chain is now given in order. A second
version wrote ``b = 5 + 3 = 8`` directly; its model mis-copied the operator (the token before ``+`` in the trace
is a value, in the prompt a variable, so induction cannot match it), hence the verbatim copy before substituting.

Every token carries a ground-truth label (see :data:`LABELS`), assigned by :func:`label_tokens` from the
token sequence alone, so labels exist for the model's own generations too, not only for gold traces.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import pairwise

from tellnorm.bounds import Marker

MODULUS = 10  # mod-10 arithmetic keeps every value a single token
MIN_DIFFICULTY = 1
MAX_DIFFICULTY = 10  # issue 2: at least 8; v2 adds 9 and 10 so that thinking does not saturate (issue 7)
VARIABLES = tuple("abcdefghijklmnopqrst")  # 20 names; a chain of 10 steps uses 11 of them
# Generation budget of a response: the longest gold response (10 steps, re-checks and corrections) is ≈ 200
# tokens [measured on 300 problems: max 194]; a margin lets a rambling model show itself.
RESPONSE_BUDGET = 240

# Token-level ground truth. "step" is the freshly computed value of a step (the only token that needs the
# arithmetic); "operand" tokens are copied from the prompt or the previous step; "reasoning" tokens are the
# ReasonScore-style words; "answer" is the final value after "answer :"; "format" is everything else the
# assistant writes (punctuation, think tags, newlines); "prompt" is every token before generation starts.
LABELS = ("prompt", "format", "operand", "step", "reasoning", "answer")
REASONING_WORDS = ("so", "therefore", "wait", "hmm", "let", "me", "but", "check", "yes", "not")

# Trace style probabilities [organism design choice]: enough reasoning words for vocabulary methods,
# rare enough that most steps are plain.
P_SO = 0.25
P_RECHECK = 0.08
P_CORRECTION = 0.03
P_OPENING = 0.5
P_THEREFORE = 0.6


@dataclass(frozen=True)
class Step:
    """One assignment of a chain: ``target = source op operand`` and its value (mod 10)."""

    target: str  # variable being defined
    source: str  # variable it is computed from
    op: str  # "+" or "-"
    operand: int
    value: int  # ground-truth value of ``target``


@dataclass(frozen=True)
class Problem:
    """A chain of ``difficulty`` assignments from ``start = start_value``; asks for the last variable's value."""

    difficulty: int
    start: str
    start_value: int
    steps: tuple[Step, ...]
    trace_seed: int = 0  # decides where reasoning words appear in the gold trace

    @property
    def answer(self) -> int:
        """The value of the variable asked for (the last step's)."""
        return self.steps[-1].value

    @property
    def question_variable(self) -> str:
        """The variable asked for (the last step's target)."""
        return self.steps[-1].target

    def statements(self) -> list[str]:
        """The assignments in order, ``"a = 5"`` then ``"b = a + 3"``, ..."""
        chain = [f"{self.start} = {self.start_value}"]
        return chain + [f"{s.target} = {s.source} {s.op} {s.operand}" for s in self.steps]

    def prompt_text(self) -> str:
        """The user prompt: ``a = 5 ; b = a + 3 ; ... ; what is c ?``."""
        return " ; ".join(self.statements()) + f" ; what is {self.question_variable} ?"

    def key(self) -> str:
        """Identity used to keep train, validation and test problems disjoint."""
        return self.prompt_text()


def _apply(value: int, op: str, operand: int) -> int:
    return (value + operand) % MODULUS if op == "+" else (value - operand) % MODULUS


def make_problem(rng: random.Random, difficulty: int) -> Problem:
    """A random problem of ``difficulty`` steps drawn from ``rng`` (distinct variables, operands 1..9)."""
    check_difficulty(difficulty)
    names = rng.sample(VARIABLES, difficulty + 1)
    value = rng.randrange(MODULUS)
    start_value = value
    steps = []
    for source, target in pairwise(names):
        op, operand = rng.choice("+-"), rng.randrange(1, MODULUS)
        value = _apply(value, op, operand)
        steps.append(Step(target, source, op, operand, value))
    return Problem(difficulty, names[0], start_value, tuple(steps), trace_seed=rng.randrange(2**31))


def check_difficulty(difficulty: int) -> None:
    """Raise one TellnormError line unless ``difficulty`` is a whole number of steps in the task's range."""
    from tellnorm.errors import TellnormError

    if not isinstance(difficulty, int) or not MIN_DIFFICULTY <= difficulty <= MAX_DIFFICULTY:
        raise TellnormError(
            f"difficulty {difficulty!r} is out of range: the organism's task has "
            f"{MIN_DIFFICULTY}..{MAX_DIFFICULTY} steps"
        )


def thinking_trace(problem: Problem) -> str:
    """The gold chain of thought (the text inside ``<think> ... </think>``), reasoning words included."""
    rng = random.Random(problem.trace_seed)
    parts = []
    if rng.random() < P_OPENING:
        parts.append("let me trace it .")
    parts.append(f"{problem.start} = {problem.start_value} .")
    prev = problem.start_value
    for s in problem.steps:
        lead = "so " if rng.random() < P_SO else ""
        expr = f"{prev} {s.op} {s.operand}"
        definition = f"{s.target} = {s.source} {s.op} {s.operand}"  # copied verbatim, then substituted
        if rng.random() < P_CORRECTION:
            wrong = (s.value + rng.randrange(1, MODULUS)) % MODULUS
            parts.append(f"{lead}{definition} = {expr} = {wrong} .")
            parts.append(f"wait , but {expr} = {s.value} not {wrong} . so {s.target} = {s.value} .")
        else:
            parts.append(f"{lead}{definition} = {expr} = {s.value} .")
            if rng.random() < P_RECHECK:
                opener = "wait" if rng.random() < 0.6 else "hmm"
                parts.append(f"{opener} , check {expr} = {s.value} . yes .")
        prev = s.value
    closer = "therefore" if rng.random() < P_THEREFORE else "so"
    parts.append(f"{closer} {problem.question_variable} = {problem.answer} .")
    return " ".join(parts)


def answer_text(problem: Problem) -> str:
    """The closing both modes share: ``answer : X``."""
    return f"answer : {problem.answer}"


def direct_answer(problem: Problem) -> str:
    """The non-thinking response: the chain written compactly, then the shared closing.

    ``5 + 3 - 2 = 6 . answer : 6``: the start value and every signed operand copied in prompt order, then one
    result. Copying in order is what the thinking trace already does, so one step is
    as easy as one thinking step (``5 + 3 = 8``); a chain of n steps needs an (n+1)-operand sum in the single
    token after the last ``=``, which a forward pass of 8 layers can do for short chains only.
    """
    operands = " ".join(f"{s.op} {s.operand}" for s in problem.steps)
    return f"{problem.start_value} {operands} = {problem.answer} . {answer_text(problem)}"


def response_text(problem: Problem, thinking: bool) -> str:
    """The gold assistant turn after the chat template's generation prompt (which holds the empty think block
    when thinking is off), end-of-turn token excluded."""
    if thinking:
        return f"<think>\n{thinking_trace(problem)}\n</think>\n\n{answer_text(problem)}"
    return direct_answer(problem)


def label_tokens(tokens: list[str], n_prompt: int) -> list[str]:
    """Ground-truth label of each token, from the token strings alone (gold traces and model generations).

    ``tokens[:n_prompt]`` are the prompt (the chat template's generation prompt included). The digit that
    closes a clause containing ``+`` or ``-`` (``b = a + 3 = 5 + 3 = 8 .``, also re-checks and corrections) is
    a computed value ("step"); other digits, variables and operators are "operand" (given, copied or
    substituted); the digit after ``answer :`` is the "answer".
    """
    labels = ["prompt"] * min(n_prompt, len(tokens))
    operator_in_clause = False
    for i in range(n_prompt, len(tokens)):
        tok = tokens[i]
        prev = tokens[i - 1] if i >= 1 else ""
        prev2 = tokens[i - 2] if i >= 2 else ""
        nxt = tokens[i + 1] if i + 1 < len(tokens) else "."
        if tok in REASONING_WORDS:
            label = "reasoning"
        elif tok.isdigit() and prev == ":" and prev2 == "answer":
            label = "answer"
        elif tok.isdigit() and prev == "=" and operator_in_clause and nxt in (".", "not", "\n"):
            label = "step"
        elif tok.isdigit() or tok in VARIABLES or tok in ("+", "-"):
            label = "operand"
        else:
            label = "format"
        if tok in ("+", "-"):
            operator_in_clause = True
        elif tok in (".", ",", "\n", "<think>", "</think>"):
            operator_in_clause = False
        labels.append(label)
    return labels


@dataclass
class Split:
    """A fixed, seeded set of problems (validation or test): never trained on."""

    name: str
    seed: int
    per_difficulty: int
    problems: list[Problem] = field(default_factory=list)

    @classmethod
    def build(cls, name: str, seed: int, per_difficulty: int,
              difficulties: Iterable[int] = range(MIN_DIFFICULTY, MAX_DIFFICULTY + 1),
              exclude: set[str] | None = None) -> Split:
        """``per_difficulty`` distinct seeded problems per difficulty, none whose key is in ``exclude``."""
        rng = random.Random(seed)
        seen = set(exclude or ())
        problems = []
        for d in difficulties:
            made = 0
            while made < per_difficulty:
                p = make_problem(rng, d)
                if p.key() in seen:
                    continue
                seen.add(p.key())
                problems.append(p)
                made += 1
        return cls(name, seed, per_difficulty, problems)

    def keys(self) -> set[str]:
        """The keys (prompt texts) of the split's problems."""
        return {p.key() for p in self.problems}


# Fixed seeds of the held-out splits [organism design choice]; training draws from a different stream and
# rejects any problem whose prompt is in either split.
VALIDATION_SEED = 20_261_001
TEST_SEED = 20_261_002


def test_split(per_difficulty: int = 200) -> Split:
    """The held-out test split (fixed seed)."""
    return Split.build("test", TEST_SEED, per_difficulty)


def validation_split(per_difficulty: int = 50) -> Split:
    """The held-out validation split (fixed seed)."""
    return Split.build("validation", VALIDATION_SEED, per_difficulty)


def training_problems(seed: int, held_out: set[str],
                      difficulties: Iterable[int] = range(MIN_DIFFICULTY, MAX_DIFFICULTY + 1)) -> Iterator[Problem]:
    """Endless stream of training problems, uniform over difficulty, disjoint from ``held_out``."""
    rng = random.Random(seed)
    levels = list(difficulties)
    while True:
        p = make_problem(rng, rng.choice(levels))
        if p.key() not in held_out:
            yield p


# Positions both modes' responses have: the shared closing ``answer : X``. Comparing modes on these tokens
# compares like with like (same token, same role), unlike all-token means over responses of different make-up.
MATCHED_ROLES = ("answer_word", "answer_colon", "answer_value")


def closing_roles(tokens: list[str], n_prompt: int) -> dict[int, str]:
    """Positions of the response's last ``answer : X`` closing (generated tokens only) and their roles."""
    for i in range(len(tokens) - 2, n_prompt - 1, -1):
        if tokens[i] == "answer" and tokens[i + 1] == ":":
            roles = {i: "answer_word", i + 1: "answer_colon"}
            if i + 2 < len(tokens) and tokens[i + 2].isdigit():
                roles[i + 2] = "answer_value"
            return roles
    return {}


def parse_answer(tokens: list[str]) -> int | None:
    """The value after the last ``answer :`` in a generation, or None when the model gave no valid answer."""
    for i in range(len(tokens) - 2, -1, -1):
        if tokens[i] == ":" and i > 0 and tokens[i - 1] == "answer":
            nxt = tokens[i + 1]
            return int(nxt) if nxt.isdigit() else None
    return None


# The positions both modes' responses have (PAPER.md §3's paired states): ``answer``, the ``:`` after it, the value.
ORGANISM_MARKERS = (Marker("answer", ("answer", ":"), 0), Marker("colon", ("answer", ":"), 1),
                    Marker("value", ("answer", ":"), 2))
