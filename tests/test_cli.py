"""The command line: lazy imports, and bad input as one clear line, exit code 2, no half-written files."""

import json
import shutil
import subprocess
import sys

import pytest

from tellnorm.apps.cli import main
from tellnorm.errors import TellnormError


def test_help_does_not_import_the_slow_libraries():
    code = ("import sys; from tellnorm.apps.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformer_lens', 'sae_lens', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_help_lists_the_subcommands():
    out = subprocess.run([sys.executable, "-m", "tellnorm.apps.cli", "--help"], capture_output=True, text=True,
                         check=True)
    for command in ("reproduce", "organism", "profile", "sae", "features", "dashboard", "bench"):
        assert command in out.stdout


def _run_bad(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tellnorm: error:") and "\n" not in err and "Traceback" not in err
    assert match in err, err
    return err


@pytest.mark.parametrize("argv, match", [
    (["organism", "eval", "--difficulty", "0"], "difficulty 0 is out of range"),
    (["organism", "eval", "--mode", "pondering"], "unknown mode 'pondering'"),
    (["organism", "eval", "--model", "/nonexistent/model", "--n", "1", "--difficulty", "1"],
     "neither an existing folder"),
    (["organism", "eval", "--model", "nobody/no-such-model", "--n", "1", "--difficulty", "1"], "not available offline"),
])
def test_bad_arguments(capsys, argv, match):
    _run_bad(capsys, argv, match)


def test_folder_without_config_and_unsupported_architecture(capsys, tmp_path):
    _run_bad(capsys, ["organism", "eval", "--model", str(tmp_path), "--n", "1"], "no config.json")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    _run_bad(capsys, ["organism", "eval", "--model", str(tmp_path), "--n", "1"], "not supported")


def test_bad_prompt_files_leave_no_output(capsys, tmp_path):
    out = tmp_path / "out"
    _run_bad(capsys, ["profile", "--prompts", str(tmp_path / "missing.jsonl"), "--out", str(out)], "does not exist")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a = 1 ; b = a + 1 ; what is b ?"}\n{not json\n')
    _run_bad(capsys, ["profile", "--prompts", str(bad), "--out", str(out)], "bad.jsonl:2 is not valid JSON")
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"prompt": "   "}\n')
    _run_bad(capsys, ["profile", "--prompts", str(empty), "--out", str(out)], "no non-empty 'prompt'")
    assert not out.exists() or not any(out.iterdir())


def test_missing_or_corrupt_organism_says_how_to_rebuild(monkeypatch, tmp_path):
    import dataclasses

    from tellnorm.backends import base, load_model

    organism = base.subjects()["organism"]

    def move_organism_to(folder):
        monkeypatch.setitem(base.subjects(), "organism", dataclasses.replace(organism, model_dir=folder))

    move_organism_to(tmp_path / "gone")
    with pytest.raises(TellnormError, match="tellnorm organism train"):
        load_model("organism")
    broken = tmp_path / "broken"
    shutil.copytree(organism.model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    move_organism_to(broken)
    with pytest.raises(TellnormError, match="tellnorm organism train"):
        load_model("organism")


def test_bad_feature_list_and_sae_spec(capsys, tmp_path):
    from tellnorm.studies.features import parse_feature_list

    assert parse_feature_list("6:12,40 5:3") == {6: [12, 40], 5: [3]}
    for text in ("6", "six:1", "", "6:x"):
        with pytest.raises(TellnormError, match="LAYER:F1,F2|empty"):
            parse_feature_list(text)
    _run_bad(capsys, ["features", "--saes", str(tmp_path / "nope")], "SAE spec")


@pytest.mark.parametrize("features, match", [
    ("6:99999", "does not exist at layer 6: its SAE has d_sae=512 features (ids 0..511)"),
    ("12:1", "no SAE for layer 12")])
def test_dashboard_checks_its_features_before_generating(capsys, tmp_path, monkeypatch, features, match):
    import tellnorm.studies.corpus as studies

    def no_generation(*args, **kwargs):
        raise AssertionError("the contrast corpus was generated before the features were checked")

    monkeypatch.setattr(studies, "contrast_corpus", no_generation)
    _run_bad(capsys, ["dashboard", "--features", features, "--out", str(tmp_path / "d.html")], match)
    assert not (tmp_path / "d.html").exists()


def test_non_positive_threshold_k():
    from tellnorm.thresholds import ThresholdConfig

    with pytest.raises(TellnormError, match="k"):
        ThresholdConfig(k=0)


@pytest.mark.parametrize("command", [["profile"], ["features"], ["bounds"], ["correlate"], ["intervene"],
                                     ["reproduce"], ["sae", "train"], ["organism", "train"], ["bench", "norms"],
                                     ["evaluate"], ["bench", "techniques"]])
def test_an_output_folder_that_is_a_file_is_refused_before_any_work(capsys, tmp_path, command):
    target = tmp_path / "results.csv"
    target.write_text("keep me")
    _run_bad(capsys, command + ["--out", str(target)], "is a file")
    assert target.read_text() == "keep me" and [p.name for p in tmp_path.iterdir()] == ["results.csv"]
