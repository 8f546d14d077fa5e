"""SAE suite training through sae_lens and its quality metrics, against independent computations."""

import pytest
import torch
from helpers import organism_prompts, tiny_organism_like

from tellnorm.errors import TellnormError
from tellnorm.saes import load_saes
from tellnorm.saes.quality import sae_quality
from tellnorm.saes.training import SAETrainConfig, excluded_token_ids, train_saes


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model = tiny_organism_like(n_layers=2)
    seqs = organism_prompts(model, 24, seed=11)
    out = tmp_path_factory.mktemp("saes")
    cfg = SAETrainConfig(expansion=2, epochs=2, batch_size_tokens=256, seed=0)
    saes = train_saes(model, seqs, cfg, out)
    return model, seqs, saes, out


def test_suite_saves_one_sae_per_layer_and_loads_back_validated(trained):
    model, _, saes, out = trained
    loaded = load_saes(out, model)
    assert sorted(loaded) == [0, 1]
    for layer, sae in loaded.items():
        assert sae.cfg.metadata.hook_name == model.hook_name(layer)
        assert sae.cfg.d_in == model.d_model and sae.cfg.d_sae == 2 * model.d_model
        x = torch.randn(5, model.d_model)
        torch.testing.assert_close(sae.encode(x), saes[layer].encode(x))


def test_training_changed_the_weights_and_reduced_error(trained, tmp_path):
    """The suite must have learned something: its FVU beats an untrained SAE of the same shape."""
    model, seqs, saes, _ = trained
    untrained = train_saes(model, seqs[:4], SAETrainConfig(expansion=2, epochs=0.01, batch_size_tokens=256), None)
    q_trained = sae_quality(model, saes, seqs[:6])
    q_untrained = sae_quality(model, untrained, seqs[:6])
    assert (q_trained.fvu < q_untrained.fvu).all()


def _reference_quality(model, sae, layer, seqs):
    xs = []
    for s in seqs:
        _, cache = model.bridge.run_with_cache(torch.tensor([s]), names_filter=[model.hook_name(layer)])
        xs.append(cache[model.hook_name(layer)][0, 1:].double())  # position 0 excluded
    x = torch.cat(xs)
    acts = sae.encode(x.float()).double()
    recon = sae.decode(acts.float()).double()
    fvu = ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    return float(fvu), float((acts > 0).sum(1).double().mean()), int(((acts > 0).sum(0) == 0).sum())


def _reference_spliced_loss(model, sae, layer, seqs):
    """Loss with the reconstruction spliced in through a plain HF forward hook on the decoder layer."""
    def replace(module, inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        new = sae.decode(sae.encode(h.float())).to(h.dtype)
        new[:, 0] = h[:, 0]
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    total, n = 0.0, 0
    handle = model.hf_model.model.layers[layer].register_forward_hook(replace)
    try:
        for s in seqs:
            with torch.no_grad():
                logits = model.hf_model(torch.tensor([s])).logits[0].double()
            lp = torch.log_softmax(logits[:-1], -1)
            total += float(-lp.gather(1, torch.tensor(s[1:])[:, None]).sum())
            n += len(s) - 1
    finally:
        handle.remove()
    return total / n


def test_quality_metrics_match_independent_computation(trained):
    model, seqs, saes, _ = trained
    q = sae_quality(model, saes, seqs[:6]).set_index("layer")
    for layer in (0, 1):
        fvu, l0, dead = _reference_quality(model, saes[layer], layer, seqs[:6])
        assert q.loc[layer, "fvu"] == pytest.approx(fvu, rel=1e-4)
        assert q.loc[layer, "L0"] == pytest.approx(l0, rel=1e-6)
        assert q.loc[layer, "dead_features"] == dead
        assert q.loc[layer, "loss_spliced"] == pytest.approx(
            _reference_spliced_loss(model, saes[layer], layer, seqs[:6]), rel=1e-4)


def test_padding_and_chat_opener_are_not_training_data():
    model = tiny_organism_like(n_layers=1)
    excluded = excluded_token_ids(model)
    assert model.tokenizer.pad_token_id in excluded
    assert model.tokenizer.convert_tokens_to_ids("<|im_start|>") in excluded


def test_bad_sae_training_input():
    with pytest.raises(TellnormError, match="architecture"):
        SAETrainConfig(architecture="gated-ish")
    model = tiny_organism_like(n_layers=1)
    with pytest.raises(TellnormError, match="empty"):
        train_saes(model, [], SAETrainConfig())
    with pytest.raises(TellnormError, match="out of range"):
        train_saes(model, [[1, 2, 3]], SAETrainConfig(layers=(4,)))


@pytest.mark.parametrize("architecture", ["topk", "jumprelu"])
def test_other_architectures_train_and_round_trip(architecture, tmp_path):
    model = tiny_organism_like(n_layers=1)
    seqs = organism_prompts(model, 8, seed=12)
    cfg = SAETrainConfig(architecture=architecture, expansion=2, epochs=1, batch_size_tokens=128, topk_k=4)
    saes = train_saes(model, seqs, cfg, tmp_path)
    loaded = load_saes(tmp_path, model)
    x = torch.randn(6, model.d_model)
    torch.testing.assert_close(loaded[0].encode(x), saes[0].encode(x))
    if architecture == "topk":
        assert int((loaded[0].encode(x) > 0).sum(-1).max()) <= 4
