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
    from tellnorm.models import load_model

    model = load_model("organism")
    assert model.architecture == "qwen3" and model.n_layers >= 8 and model.source == "organism"
    off = model.chat_prompt("a = 1 ; b = a + 2 ; what is b ?", thinking=False)
    on = model.chat_prompt("a = 1 ; b = a + 2 ; what is b ?", thinking=True)
    assert off == on + "<think>\n\n</think>\n\n"


@pytest.mark.slow
def test_thinking_beats_non_thinking_at_high_difficulty():
    """The issue's bar for a useful organism, on a fresh sample of the test set (n = 40 per mode)."""
    from tellnorm.models import load_model
    from tellnorm.organism.evaluate import EvalConfig, evaluate

    _, summary = evaluate(load_model("organism"), EvalConfig(per_difficulty=40, difficulties=(8,)), progress=False)
    acc = summary.set_index("mode")
    assert 0.4 <= acc.loc["thinking", "accuracy"] <= 0.9
    assert acc.loc["thinking", "ci_low"] > acc.loc["non-thinking", "ci_high"]
