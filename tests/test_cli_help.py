"""Every command of ``tellnorm`` explains itself: a description, an example, and help for every option."""

from __future__ import annotations

import argparse

import pytest

from tellnorm.apps.cli import build_parser, main


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, its parser) for every command and nested action, depth first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, path + (name,))


ALL = [path for path, _ in commands(build_parser())]


def test_every_command_is_walked():
    assert {("evaluate",), ("intervene",), ("bench", "techniques"), ("organism", "train"), ("sae", "train")} <= set(ALL)
    assert len(ALL) >= 20


@pytest.mark.parametrize("path", ALL, ids=lambda p: " ".join(p) or "tellnorm")
def test_help_has_a_description_an_example_and_every_option_explained(path, capsys):
    parser = dict(commands(build_parser()))[path]
    assert parser.description, f"`tellnorm {' '.join(path)}` has no description"
    assert parser.epilog and "example:" in parser.epilog and "tellnorm " in parser.epilog, path
    undocumented = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert undocumented == [], f"options without help in `tellnorm {' '.join(path)}`: {undocumented}"
    with pytest.raises(SystemExit) as exit_:
        main([*path, "--help"]) if path[:1] != ("harness",) else parser.parse_args(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "example:" in text


def test_defaults_are_shown_and_the_model_option_says_what_it_accepts(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "LRS" in text
    assert "(default: organism)" in text and "'organism' (the shipped model organism), a local HF model folder" in text
    assert "--batch-size BATCH_SIZE requests generated together (default: 100)" in text


def test_the_checker_flags_an_option_without_help():
    parser = argparse.ArgumentParser(prog="x", description="d", epilog="example:\n  tellnorm x")
    parser.add_argument("--bare")
    assert [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help] == ["--bare"]
