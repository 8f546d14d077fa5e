"""The shipped organism: bit-reproducible training, and the properties the issue asks of it."""

import pytest
import torch

from tellnorm.organism.train import OrganismModelConfig, OrganismTrainConfig, train_organism

TINY = OrganismModelConfig(n_layers=2, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, d_mlp=64)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_training_is_bit_reproducible_under_a_seed_and_leaves_torch_as_found(tmp_path):
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    runs = [train_organism(OrganismTrainConfig(seed=s, steps=4, batch_size=4, model=TINY), tmp_path / name,
                           progress=False) for s, name in ((3, "a"), (3, "b"), (4, "c"))]
    a, b, c = (_weights(tmp_path / n) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert runs[0]["final_loss"] == runs[1]["final_loss"]
    assert torch.get_num_threads() == threads and torch.are_deterministic_algorithms_enabled() == deterministic


def test_shipped_organism_shape_and_chat_template():
    from tellnorm.backends import load_model

    model = load_model("organism")
    assert model.architecture == "qwen3" and model.n_layers >= 8 and model.source == "organism"
    off = model.chat_prompt("a = 1 ; b = a + 2 ; what is b ?", thinking=False)
    on = model.chat_prompt("a = 1 ; b = a + 2 ; what is b ?", thinking=True)
    assert off == on + "<think>\n\n</think>\n\n"


@pytest.mark.slow
def test_the_organism_answers_easy_problems_directly_and_needs_thinking_for_hard_ones():
    """The issues' bars for a useful organism (issue 2, issue 7), on the test set (n = 40 per level and mode):
    non-thinking answers one step directly and beats the majority guess at two; thinking solves what
    non-thinking cannot, and the hardest level leaves room above it."""
    from tellnorm.backends import load_model
    from tellnorm.organism.evaluate import EvalConfig, evaluate
    from tellnorm.organism.task import MAX_DIFFICULTY

    _, summary = evaluate(load_model("organism"), EvalConfig(per_difficulty=40, difficulties=(1, 2, MAX_DIFFICULTY)),
                          progress=False)
    acc = summary.set_index(["mode", "difficulty"])
    assert acc.loc[("non-thinking", 1), "ci_high"] >= 0.9
    assert acc.loc[("non-thinking", 2), "ci_low"] > acc.loc[("non-thinking", 2), "majority_baseline"]
    assert 0.4 <= acc.loc[("thinking", MAX_DIFFICULTY), "accuracy"] <= 0.9
    assert acc.loc[("thinking", MAX_DIFFICULTY), "ci_low"] > acc.loc[("non-thinking", MAX_DIFFICULTY), "ci_high"]


@pytest.mark.parametrize("overrides, match", [
    ({"steps": 0}, "steps must be a positive integer"),
    ({"lr": -1e-3}, "learning rate must be a positive number"),
    ({"lr": float("nan")}, "learning rate must be a positive number"),
    ({"thinking_fraction": 1.5}, "thinking_fraction"),
    ({"non_thinking_difficulty_weights": (1.0,)}, "one per difficulty"),
])
def test_nonsense_training_settings_are_refused(overrides, match):
    from tellnorm.errors import TellnormError

    with pytest.raises(TellnormError, match=match):
        OrganismTrainConfig(**overrides)


def test_training_refuses_an_output_folder_that_is_a_file_before_any_work(tmp_path, capsys):
    from tellnorm.apps.cli import main

    target = tmp_path / "weights.bin"
    target.write_text("not a folder")
    assert main(["organism", "train", "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and "Traceback" not in err
    assert main(["organism", "train", "--steps", "0", "--out", str(tmp_path / "new")]) == 2
    assert "steps must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
