"""``tellnorm reproduce``: stage cache keys (fast), bad --force names (fast), and one end-to-end quick run on the
shipped organism and SAEs (slow): every artifact, the report against its tables, a fully cached rerun, --force."""

import csv
import math
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from tellnorm.apps.cli import main
from tellnorm.apps.reproduce import STAGE_NAMES, ReproduceConfig, forced_stages, model_fingerprint, stage_hashes
from tellnorm.errors import TellnormError

FEATURE_DEPENDENTS = {"features", "bounds", "correlation", "dashboards"}  # features and the stages reading its outputs


def _fake_model(folder):
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["Qwen3ForCausalLM"]}')
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    return folder


def _fake_saes(folder):
    (folder / "layer_0").mkdir(parents=True)
    (folder / "layer_0" / "cfg.json").write_text('{"d_in": 8}')
    (folder / "layer_0" / "sae_weights.safetensors").write_bytes(b"\0" * 64)
    return folder


@pytest.fixture
def inputs(tmp_path):
    return _fake_model(tmp_path / "model"), _fake_saes(tmp_path / "saes")


def _hashes(model, saes, **fields):
    return stage_hashes(ReproduceConfig(model=str(model), saes=str(saes), **fields))


def test_unchanged_inputs_give_the_same_hashes(inputs):
    model, saes = inputs
    first = _hashes(model, saes)
    (model / "config.json").touch()  # a new modification time, same contents
    assert _hashes(model, saes) == first and list(first) == list(STAGE_NAMES)
    assert len(set(first.values())) == len(first)  # every stage has its own key
    assert _hashes(model, saes, out="elsewhere") == first  # where the outputs go is no input


def test_a_config_field_changes_the_stages_that_read_it_and_their_dependents(inputs):
    model, saes = inputs
    base = _hashes(model, saes)
    changed = {name for name, h in _hashes(model, saes, top_k=10).items() if h != base[name]}
    assert changed == FEATURE_DEPENDENTS
    changed = {name for name, h in _hashes(model, saes, profile_per_difficulty=3).items() if h != base[name]}
    assert changed == {"norm_profile", "peaks"} | FEATURE_DEPENDENTS
    changed = {name for name, h in _hashes(model, saes, per_difficulty=7).items() if h != base[name]}
    assert changed == {"accuracy"}


def test_a_changed_model_file_changes_every_hash_and_a_changed_sae_file_the_sae_stages(inputs):
    model, saes = inputs
    base = _hashes(model, saes)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\1")
    after_model = _hashes(model, saes)
    assert all(after_model[name] != base[name] for name in STAGE_NAMES)
    (saes / "layer_0" / "sae_weights.safetensors").write_bytes(b"\1" * 64)
    changed = {name for name, h in _hashes(model, saes).items() if h != after_model[name]}
    assert changed == FEATURE_DEPENDENTS | {"interventions", "explorer"}


def test_the_model_spec_is_part_of_the_key(inputs, tmp_path):
    model, _ = inputs
    copy = _fake_model(tmp_path / "copy")  # same files, another name: figures and dashboards show the name
    assert model_fingerprint(str(model))["files"] == model_fingerprint(str(copy))["files"]
    assert model_fingerprint(str(model)) != model_fingerprint(str(copy))


def test_force_names():
    assert forced_stages([]) == set() and forced_stages(["all"]) == set(STAGE_NAMES)
    assert forced_stages(["peaks", "bounds"]) == {"peaks", "bounds"}
    with pytest.raises(TellnormError, match="unknown stage 'peak'.*accuracy, norm_profile"):
        forced_stages(["peaks", "peak"])


def test_an_unknown_force_name_is_one_line_and_writes_nothing(capsys, tmp_path):
    kept = tmp_path / "old"
    kept.mkdir()
    (kept / "REPORT.md").write_text("keep me")
    for out in (tmp_path / "new", kept):
        assert main(["reproduce", "--quick", "--out", str(out), "--force", "nosuchstage"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("tellnorm: error: unknown stage 'nosuchstage'") and "\n" not in err
        assert all(name in err for name in STAGE_NAMES)
    assert not (tmp_path / "new").exists() and [p.name for p in kept.iterdir()] == ["REPORT.md"]
    assert (kept / "REPORT.md").read_text() == "keep me"


# --- end to end ----------------------------------------------------------------------------------------------------

EXPECTED = ["organism_accuracy.csv", "organism_accuracy.html", "norm_profile.csv", "norm_trend.html",
            "norm_heatmap.html", "norms_per_token.parquet", "norm_peaks_vs_steps.csv", "sae_quality.csv",
            "feature_trend.csv", "feature_trend.html", "features_reasonscore_top100.csv",
            "features_token_injection.csv", "dashboard.html", "REPORT.md", "norm_profile_matched.csv",
            "feature_trend_matched.csv", "bounds.csv", "bounds_assumptions.csv", "bounds_pairs.csv",
            "correlation.csv", "suppression.csv", "suppression.html", "evaluation.csv", "evaluation.md",
            "evaluation_responses.csv", "evaluation.html", "report.html", "manifest.json", "stage_times.csv",
            "explorer/index.html",
            ".stages/contrast_corpus.json"] + [f".stages/{name}.json" for name in STAGE_NAMES]


def _reproduce(out, *extra) -> dict:
    assert main(["reproduce", "--quick", "--out", str(out), *extra]) == 0
    with open(out / "stage_times.csv") as f:
        return {row["stage"]: row["status"] for row in csv.DictReader(f)}


def _contents(out) -> dict:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*")
            if p.is_file() and p.name != "stage_times.csv"}  # wall times: the one file a rerun may change


def _block(report: str, title: str) -> list[str]:
    """The lines of the first code block of the report section whose title starts with ``title``."""
    section = report.split(f"\n## {title}", 1)[1].split("\n## ", 1)[0]
    return section.split("```\n", 2)[1].splitlines()


def _numbers(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+\.\d+|-?\d+", line)]


def _close(shown: float, table: float) -> bool:
    # the report shows 3 decimals, the CSV 5 significant digits (tellnorm.io.CSV_SIGNIFICANT_DIGITS)
    return math.isclose(shown, table, rel_tol=1e-4, abs_tol=5e-4 + 1e-9)


def _check_report_against_tables(out):
    report = (out / "REPORT.md").read_text()
    with open(out / "organism_accuracy.csv") as f:
        accuracy = list(csv.DictReader(f))
    lines = _block(report, "Organism accuracy")[1:]
    assert len(lines) == len(accuracy) > 0
    for line, row in zip(lines, accuracy):
        assert line.split()[0] == row["mode"]
        shown = _numbers(line.split(maxsplit=1)[1])
        table = [float(row[c]) for c in ("difficulty", "n", "accuracy", "ci_low", "ci_high", "majority_baseline")]
        assert all(_close(s, t) for s, t in zip(shown, table, strict=True)), (line, row)

    with open(out / "norm_profile.csv") as f:
        norms = {(row["mode"], int(row["layer"])): float(row["mean_norm"]) for row in csv.DictReader(f)}
    lines = _block(report, "Hidden-state L2 norm")
    assert lines[0].split()[:3] == ["mode", "non-thinking", "thinking"]
    rows = [_numbers(line) for line in lines[2:]]
    assert [int(r[0]) for r in rows] == sorted({layer for _, layer in norms}) and rows
    for layer, non_thinking, thinking, ratio in rows:
        assert _close(non_thinking, norms["non-thinking", int(layer)])
        assert _close(thinking, norms["thinking", int(layer)])
        assert math.isclose(ratio, norms["thinking", int(layer)] / norms["non-thinking", int(layer)], abs_tol=1e-3)


@pytest.fixture
def private_temp(monkeypatch):
    """A fresh temp dir for the run (other processes on the machine use the system one meanwhile). Short, under the
    system's: Chromium's socket path inside it must stay under 108 bytes (a pytest tmp_path is too long)."""
    # libraries that make temp folders when first imported, kept for the whole process (torch's compile cache;
    # wandb's media and artifact folders, imported by sae_lens): imported before the switch
    import sae_lens  # noqa: F401
    import torch._dynamo  # noqa: F401

    temp = Path(tempfile.mkdtemp(prefix="tn-"))
    monkeypatch.setenv("TMPDIR", str(temp))  # for the browser kaleido starts
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    yield temp
    shutil.rmtree(temp)


@pytest.mark.slow
def test_reproduce_quick_end_to_end(tmp_path, private_temp):
    out = tmp_path / "out"
    assert _reproduce(out) == {name: "ran" for name in STAGE_NAMES}
    empty = [name for name in EXPECTED if not (out / name).is_file() or (out / name).stat().st_size == 0]
    assert not empty
    assert not list(out.rglob(".*partial*"))  # no half-written file left behind
    report = (out / "REPORT.md").read_text()
    for section in ("Organism accuracy", "L2 norm by layer", "norm peaks", "SAEs and reasoning features",
                    "The theorem, checked", "Correlation", "Interventions", "Test-time techniques", "dashboards",
                    "Feature explorer", "The paper's claims, judged"):
        assert section in report
    html = (out / "report.html").read_text()
    assert "<h2>Test-time techniques" in html and html.count("<table>") >= report.count("\n|---") > 0
    _check_report_against_tables(out)
    manifest = (out / "manifest.json").read_text()
    assert "seconds" not in manifest and "BLOWUP_RATIO" in manifest

    first = _contents(out)
    assert _reproduce(out) == {name: "cached" for name in STAGE_NAMES}
    assert _contents(out) == first  # nothing rewritten, the report rebuilt from the records byte for byte

    assert _reproduce(out, "--force", "features") == {name: "ran" if name in FEATURE_DEPENDENTS else "cached"
                                                      for name in STAGE_NAMES}
    assert list(private_temp.iterdir()) == []
