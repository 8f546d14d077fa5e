"""The organism's task: arithmetic, labels, disjoint splits, tokenizer and chat template."""

import random

import pytest

from tellnorm.errors import TellnormError
from tellnorm.organism import task


def _evaluate_statements(problem: task.Problem) -> dict[str, int]:
    """Independent reference: resolve the shuffled assignments by repeated substitution."""
    pending = [s.split() for s in problem.statements()]
    values: dict[str, int] = {}
    while pending:
        progressed = False
        for st in list(pending):
            if len(st) == 3:
                values[st[0]] = int(st[2])
            elif st[2] in values:
                a, op, b = values[st[2]], st[3], int(st[4])
                values[st[0]] = (a + b) % 10 if op == "+" else (a - b) % 10
            else:
                continue
            pending.remove(st)
            progressed = True
        assert progressed, "statements do not form chains"
    return values


@pytest.mark.parametrize("difficulty", range(task.MIN_DIFFICULTY, task.MAX_DIFFICULTY + 1))
def test_answers_match_an_independent_evaluation(difficulty):
    rng = random.Random(difficulty)
    for _ in range(50):
        p = task.make_problem(rng, difficulty)
        assert len(p.steps) == difficulty
        assert _evaluate_statements(p)[p.question_variable] == p.answer
        assert p.prompt_text().endswith(f"what is {p.question_variable} ?")


def test_gold_trace_computes_every_step_in_order():
    rng = random.Random(0)
    for _ in range(200):
        p = task.make_problem(rng, rng.randint(1, task.MAX_DIFFICULTY))
        trace = task.thinking_trace(p)
        cursor = trace.index(f"{p.start} = {p.start_value} .")
        prev = p.start_value
        for s in p.steps:  # values substituted forward, in order
            correct = f"{prev} {s.op} {s.operand} = {s.value} "  # "." or, in a correction, "not"
            found = trace.find(correct, cursor)
            assert found > 0, (trace, correct)
            cursor, prev = found + len(correct), s.value
        assert trace.endswith(f"{p.question_variable} = {p.answer} .")


def test_reasoning_words_appear_some_of_the_time():
    rng = random.Random(1)
    traces = [task.thinking_trace(task.make_problem(rng, 6)) for _ in range(400)]
    for word in ("so", "therefore", "wait", "let me", "but", "hmm"):
        share = sum(f" {word} " in f" {t} " for t in traces) / len(traces)
        assert 0.02 < share < 1.0, (word, share)


def test_labels_mark_steps_operands_reasoning_and_answer():
    tokens = ["<|im_start|>", "assistant", "\n", "<think>", "\n", "so", "b", "=", "a", "+", "3", "=", "5", "+", "3",
              "=", "8", ".", "wait", ",", "check", "5", "+", "3", "=", "8", ".", "yes", ".", "c", "=", "b", "-", "9",
              "=", "8", "-", "9", "=", "1", ".", "wait", ",", "but", "8", "-", "9", "=", "9", "not", "1", ".",
              "therefore", "c", "=", "9", ".", "\n", "</think>", "\n", "\n", "answer", ":", "9", "<|im_end|>"]
    tokens = [t for t in tokens if t]
    n_prompt = 3
    labels = task.label_tokens(tokens, n_prompt)
    by_token = list(zip(tokens, labels))
    assert all(lab == "prompt" for _, lab in by_token[:n_prompt])
    steps = [i for i, lab in enumerate(labels) if lab == "step"]
    # computed values close their clause: the step, its re-check, the wrong step, and the correction
    assert [tokens[i] for i in steps] == ["8", "8", "1", "9"]
    assert [tokens[i - 3 : i] for i in steps] == [["+", "3", "="], ["+", "3", "="], ["-", "9", "="], ["-", "9", "="]]
    assert [t for t, lab in by_token if lab == "reasoning"] == ["so", "wait", "check", "yes", "wait", "but", "not",
                                                                 "therefore"]
    assert [t for t, lab in by_token if lab == "answer"] == ["9"]
    first_line = tokens.index("b")
    assert labels[first_line : first_line + 9] == ["operand", "format", "operand", "operand", "operand", "format",
                                                   "operand", "operand", "operand"]  # b = a + 3 = 5 + 3
    assert labels[tokens.index("therefore") + 3] == "operand"  # a restated value, not a computation


def test_splits_are_fixed_and_disjoint_from_training():
    test, val = task.test_split(30), task.validation_split(30)
    assert task.test_split(30).keys() == test.keys()  # fixed seed
    assert not test.keys() & val.keys()
    stream = task.training_problems(seed=0, held_out=test.keys() | val.keys())
    drawn = {next(stream).key() for _ in range(3000)}
    assert not drawn & (test.keys() | val.keys())
    assert len(test.problems) == 30 * task.MAX_DIFFICULTY


def test_training_stream_rejects_held_out_problems():
    # Level 1 has a small space: hold out many of its problems and check none is ever drawn.
    held = task.Split.build("x", 5, 400, difficulties=[1]).keys()
    stream = task.training_problems(seed=3, held_out=held, difficulties=[1])
    assert not {next(stream).key() for _ in range(5000)} & held


@pytest.mark.parametrize("bad", [0, task.MAX_DIFFICULTY + 1, -1, 2.5, "3"])
def test_invalid_difficulty_is_one_clear_error(bad):
    with pytest.raises(TellnormError, match="difficulty"):
        task.make_problem(random.Random(0), bad)


def test_parse_answer():
    assert task.parse_answer(["x", "answer", ":", "7", "<|im_end|>"]) == 7
    assert task.parse_answer(["answer", ":", ":", "<|im_end|>"]) is None
    assert task.parse_answer(["no", "answer", "here"]) is None


def test_tokenizer_round_trip_and_thinking_switch(tmp_path):
    from transformers import AutoTokenizer

    from tellnorm.organism.tokenizer import save_tokenizer

    save_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    p = task.make_problem(random.Random(2), 4)
    msgs = [{"role": "user", "content": p.prompt_text()}]
    on = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    off = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert on.endswith("<|im_start|>assistant\n")
    assert off == on + "<think>\n\n</think>\n\n"  # Qwen3's non-thinking generation prompt
    text = on + task.response_text(p, thinking=True) + "<|im_end|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    words = [w for w in text.replace("\n", " \n ").replace("<|im_end|>", " <|im_end|> ").split(" ") if w]
    # one token per word: labels stay one-to-one with tokens
    assert tok.convert_ids_to_tokens(ids) == [w for w in _split_specials(words)]


def _split_specials(words):
    out = []
    for w in words:
        for special in ("<|im_start|>",):
            if w.startswith(special) and w != special:
                out += [special, w[len(special):]]
                break
        else:
            out.append(w)
    return out


def test_non_thinking_answer_is_the_chain_written_compactly_with_the_shared_closing():
    rng = random.Random(5)
    for difficulty in (1, 3, task.MAX_DIFFICULTY):
        p = task.make_problem(rng, difficulty)
        words = task.response_text(p, thinking=False).split()
        # start value, then each statement's operator and operand in prompt order, then one result
        expected_operands = [str(p.start_value)] + [w for s in p.steps for w in (s.op, str(s.operand))]
        assert words[: 1 + 2 * difficulty] == expected_operands
        assert words[1 + 2 * difficulty :] == ["=", str(p.answer), ".", "answer", ":", str(p.answer)]
        # both modes close with the same tokens, so positions can be matched across modes
        assert task.response_text(p, thinking=True).split()[-3:] == words[-3:]
        # the signed sum of the copied operands mod 10 is the answer (the format states the computation)
        total = p.start_value + sum(s.operand if s.op == "+" else -s.operand for s in p.steps)
        assert total % task.MODULUS == p.answer


def test_labels_of_a_non_thinking_answer():
    p = task.Problem(2, "a", 5, (task.Step("b", "a", "+", 3, 8), task.Step("c", "b", "-", 2, 6)))
    tokens = task.response_text(p, thinking=False).split()
    labels = task.label_tokens(["<prompt>"] + tokens, 1)[1:]
    assert dict(zip(range(len(tokens)), labels)) == {
        0: "operand", 1: "operand", 2: "operand", 3: "operand", 4: "operand", 5: "format", 6: "step", 7: "format",
        8: "format", 9: "format", 10: "answer"}
    assert task.parse_answer(tokens) == 6
