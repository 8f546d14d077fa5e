"""Tasks (tellnorm.tasks): JSONL and lm-eval sources, the answer extractors and where an answer's tokens are.

References are independent: answers written into hand-made texts, token positions found by decoding every prefix
one by one (the slow, obvious way), lm-eval's own ``process_results`` called directly.
"""

from __future__ import annotations

import json

import pytest

from tellnorm.errors import TellnormError
from tellnorm.tasks import (
    Task,
    TaskItem,
    answer_positions,
    answers_match,
    find_answer,
    jsonl_task,
    lm_eval_task,
    load_task,
    parse_task_spec,
)


@pytest.mark.parametrize("spec, text, answer", [
    ("last-number", "first 3, then 12 so 1,234", "1234"),
    ("last-number", "<think>maybe 7</think> it is -4", "-4"),
    ("last-number", "<think>maybe 7</think> no idea", None),  # a number inside the thinking is not the answer
    ("boxed", r"x \boxed{7} or \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    ("choice-letter", "Options considered. The answer is (C).", "C"),
    ("choice-letter", "I think B, final: D", "D"),
    ("regex:answer is (\\w+)", "the answer is B, not the answer is C", "C"),
    ("math", r"so \boxed{\frac{2}{4}}", None),  # math-verify's parse: compared below, not as text
])
def test_extractors_find_the_stated_answer_and_its_span(spec, text, answer):
    found = find_answer(text, spec)
    if answer is None and spec != "math":
        assert found is None
        return
    value, (start, end) = found
    if spec != "math":
        assert value == answer
        assert text[start:end].replace(",", "").strip() == answer
    else:
        assert answers_match(value, "1/2", "math") and not answers_match(value, "1/3", "math")


def test_answers_match_by_extractor():
    assert answers_match("6.0", "6") and answers_match("1,000", "1000") and not answers_match(None, "1")
    assert answers_match("(b)", "B", "choice-letter") and not answers_match("A", "B", "choice-letter")
    assert answers_match(r"\frac{1}{2}", "0.5", "math")


@pytest.mark.parametrize("spec, message", [
    ("task.txt", "FILE.jsonl"), ("task.jsonl=nope", "unknown answer extractor"),
    ("task.jsonl=regex:(a)(b)", "exactly one capture group"), ("task.jsonl=regex:(", "not a valid regular"),
])
def test_bad_task_specs_fail_in_one_line(spec, message):
    with pytest.raises(TellnormError, match=message) as err:
        parse_task_spec(spec)
    assert "\n" not in str(err.value)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_task_reads_ids_groups_and_refuses_bad_files(tmp_path):
    task = jsonl_task(_write(tmp_path / "t.jsonl", [{"prompt": "p1", "answer": 3, "group": "easy"},
                                                    {"prompt": "p2", "answer": "4", "id": "x"}]))
    assert [(i.id, i.answer, i.group) for i in task.items] == [("0", "3", "easy"), ("x", "4", "all")]
    assert task.name == "t" and task.groups == ["easy", "all"] and len(task.head(1).items) == 1
    assert task.is_correct(task.items[0], "so the answer is 3") and not task.is_correct(task.items[1], "3")
    cases = {"no_answer.jsonl": ([{"prompt": "p"}], 'has no "answer"'),
             "no_prompt.jsonl": ([{"answer": 1}], 'has no "prompt"'),
             "dup.jsonl": ([{"prompt": "a", "answer": 1, "id": 1}, {"prompt": "b", "answer": 2, "id": 1}],
                           'repeats an "id"')}
    for name, (rows, message) in cases.items():
        with pytest.raises(TellnormError, match=message):
            load_task(str(_write(tmp_path / name, rows)))
    with pytest.raises(TellnormError, match="does not exist"):
        load_task(str(tmp_path / "missing.jsonl"))


def test_answer_positions_equal_a_prefix_by_prefix_decode():
    from tellnorm.organism.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()  # the stand-ins' tokenizer
    task = Task("t", [TaskItem("0", "p", "7")], "last-number")
    words = ["a", "=", "3", "+", "4", ";", "answer", ":", "7", ";", "a"]
    assert all(w in tokenizer.get_vocab() for w in words)
    ids = tokenizer.convert_tokens_to_ids(words)
    text = tokenizer.decode(ids)
    start, end = task.answer_span(text)
    # the reference: a token belongs to the answer when the characters it adds overlap the answer's span
    expected = []
    for i in range(len(ids)):
        before, after = len(tokenizer.decode(ids[:i])), len(tokenizer.decode(ids[:i + 1]))
        if before < end and after > start:
            expected.append(i)
    assert expected and answer_positions(tokenizer, ids, task) == expected
    assert expected == [words.index("7")]
    assert answer_positions(tokenizer, tokenizer.convert_tokens_to_ids(["a", ";"]), task) == []


def test_an_lm_eval_task_from_a_local_file_is_scored_by_lm_eval(tmp_path):
    pytest.importorskip("lm_eval")
    data = _write(tmp_path / "data.jsonl", [{"question": "2+2?", "target": "4"},
                                            {"question": "3+3?", "target": "6"}])
    (tmp_path / "local_sum.yaml").write_text(
        "task: local_sum\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: []\nmetric_list:\n  - metric: exact_match\n    aggregation: mean\n"
        "    higher_is_better: true\n")
    task = lm_eval_task("local_sum", include_path=str(tmp_path))
    assert [(i.prompt, i.answer) for i in task.items] == [("2+2?", "4"), ("3+3?", "6")]
    from lm_eval.tasks import TaskManager

    reference = TaskManager(include_path=str(tmp_path)).load_task_or_group(["local_sum"])["local_sum"]
    for item, text in zip(task.items, ["4", "7"]):
        expected = bool(reference.process_results(item.doc, [text])["exact_match"])
        assert task.is_correct(item, text) == expected
    assert task.is_correct(task.items[0], "4") and not task.is_correct(task.items[1], "7")
    with pytest.raises(TellnormError, match="no task 'not_a_task'"):
        lm_eval_task("not_a_task", include_path=str(tmp_path))
