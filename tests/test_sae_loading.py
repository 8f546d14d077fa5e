"""tellnorm.saes: loading SAEs keyed by layer, native release layouts, and validation against a model.

Native-format tests write small random files in each release's own layout and check the loaded SAE against the
architecture's formula computed straight from those tensors (float64), not against sae_lens.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from tellnorm.errors import TellnormError
from tellnorm.saes import SAEModelMismatchWarning, load_saes, parse_sae_spec, validate_sae

D_IN, D_SAE = 64, 256
QWEN_SCOPE_REPO = "SAE-Res-Qwen3-1.7B-Base-W32K-L0_50"  # k = 50, as hf download --local-dir names it
LLAMA_SCOPE_VARIANT = "800M-Slimpajama-0-OpenR1-Math-220k"
# pretrained_saes.yaml, llama_scope_r1_distill / l1r_800m_slimpajama: raw activations are multiplied by this.
LLAMA_SCOPE_L1_NORM_FACTOR = 37.07457226753229
QRESEARCH_FILE = "DeepSeek-R1-Distill-Llama-8B-SAE-l19.pt"
TOL = dict(rtol=1e-5, atol=1e-5)


def inputs(n: int = 6, scale: float = 1.0, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * scale


def randn(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), **TOL)


def sae_lens_sae(layer: int = 0, model_name: str = "in-memory model", d_in: int = D_IN, seed: int = 0):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    cfg = StandardSAEConfig(d_in=d_in, d_sae=D_SAE, metadata=SAEMetadata(
        model_name=model_name, hook_name=f"blocks.{layer}.hook_resid_post"))
    sae = StandardSAE(cfg)
    with torch.no_grad():
        for i, param in enumerate(sae.parameters()):
            param.copy_(randn(*param.shape, seed=seed * 10 + i, scale=0.2))
    return sae


@pytest.fixture(scope="module")
def tiny_model(tiny_hf_pair):
    from tellnorm.backends import load_model

    return load_model(tiny_hf_pair("qwen3", n_layers=2))


# ---------------------------------------------------------------- sae_lens folders


def test_save_model_then_load_is_exact(tmp_path):
    sae = sae_lens_sae(layer=1)
    sae.save_model(tmp_path / "one")

    loaded = load_saes(tmp_path / "one")

    assert list(loaded) == [1]
    original, reloaded = sae.state_dict(), loaded[1].state_dict()
    assert original.keys() == reloaded.keys()
    for key in original:
        assert torch.equal(original[key], reloaded[key]), key
    assert loaded[1].cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert torch.equal(loaded[1].encode(inputs()), sae.encode(inputs()))


def test_folder_of_subfolders_is_keyed_by_hook_not_folder_name(tmp_path):
    sae_lens_sae(layer=1, seed=1).save_model(tmp_path / "a")
    sae_lens_sae(layer=0, seed=2).save_model(tmp_path / "b")
    (tmp_path / "notes").mkdir()  # not an SAE: skipped

    loaded = load_saes(str(tmp_path))
    assert list(loaded) == [0, 1]
    assert torch.equal(loaded[0].W_enc, sae_lens_sae(layer=0, seed=2).W_enc)

    assert list(load_saes(tmp_path, layers=[1])) == [1]
    with pytest.raises(TellnormError, match=r"no SAE for layer\(s\) 5: it has layers 0, 1"):
        load_saes(tmp_path, layers=5)


def test_two_saes_for_one_layer_is_an_error(tmp_path):
    sae_lens_sae(layer=0, seed=1).save_model(tmp_path / "a")
    sae_lens_sae(layer=0, seed=2).save_model(tmp_path / "b")
    with pytest.raises(TellnormError, match="two SAEs for layer 0"):
        load_saes(tmp_path)


# ---------------------------------------------------------------- native layouts vs the formulas


def write_qwen_scope(folder, layer: int, seed: int) -> dict:
    """Qwen-Scope's own layout: W_enc [d_sae, d_in], W_dec [d_in, d_sae] (both transposed vs sae_lens)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"W_enc": randn(D_SAE, D_IN, seed=seed, scale=0.125), "W_dec": randn(D_IN, D_SAE, seed=seed + 1),
               "b_enc": randn(D_SAE, seed=seed + 2, scale=0.1), "b_dec": randn(D_IN, seed=seed + 3)}
    torch.save(tensors, folder / f"layer{layer}.sae.pt")
    return {k: v.double() for k, v in tensors.items()}


def topk_reference(x, t, k):
    pre = x.double() @ t["W_enc"].T + t["b_enc"]
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())


def test_qwen_scope_files_encode_and_decode_like_topk(tmp_path):
    folder = tmp_path / QWEN_SCOPE_REPO
    tensors = {layer: write_qwen_scope(folder, layer, seed=10 * layer) for layer in (0, 1)}

    saes = load_saes(f"qwen-scope:{folder}")

    assert list(saes) == [0, 1]
    sae = saes[1]
    assert type(sae).__name__ == "TopKSAE" and sae.cfg.k == 50
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (D_IN, D_SAE)
    assert sae.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert sae.cfg.metadata.model_name == "Qwen/Qwen3-1.7B-Base"
    x = inputs()
    expected = topk_reference(x, tensors[1], k=50)
    close(sae.encode(x), expected)
    assert ((sae.encode(x) != 0).sum(-1) == 50).all()
    close(sae.decode(expected.float()), expected @ tensors[1]["W_dec"].T + tensors[1]["b_dec"])


def test_qwen_scope_release_comes_from_folder_name_or_spec(tmp_path):
    folder = tmp_path / "my-copy"
    write_qwen_scope(folder, 3, seed=0)
    with pytest.raises(TellnormError, match="cannot tell which qwen-scope release"):
        load_saes(f"qwen-scope:{folder}")

    saes = load_saes({"format": "qwen-scope", "path": str(folder), "release": "qwen-scope-3-8b-base-w64k-l100"})
    assert saes[3].cfg.k == 100
    assert saes[3].cfg.metadata.model_name == "Qwen/Qwen3-8B-Base"

    cached = tmp_path / "models--Qwen--SAE-Res-Qwen3-8B-Base-W64K-L0_50" / "snapshots" / "0123abc"  # HF cache layout
    write_qwen_scope(cached, 2, seed=0)
    assert load_saes(f"qwen-scope:{cached}")[2].cfg.k == 50


def write_llama_scope_r1(sae_dir, layer: int, seed: int) -> dict:
    """lm-saes's layout: nn.Linear-style encoder/decoder weights, log of the JumpReLU threshold, config.json."""
    sae_dir.mkdir(parents=True)
    threshold = torch.empty(D_SAE).uniform_(0.05, 0.6, generator=torch.Generator().manual_seed(seed))
    tensors = {"encoder.weight": randn(D_SAE, D_IN, seed=seed, scale=0.125),
               "encoder.bias": randn(D_SAE, seed=seed + 1, scale=0.1),
               "decoder.weight": randn(D_IN, D_SAE, seed=seed + 2),
               "decoder.bias": randn(D_IN, seed=seed + 3),
               "log_jumprelu_threshold": threshold.log()}
    save_file(tensors, sae_dir / "sae_weights.safetensors")
    config = {"d_model": D_IN, "expansion_factor": D_SAE // D_IN, "hook_point_in": f"blocks.{layer}.hook_resid_post"}
    (sae_dir / "config.json").write_text(json.dumps(config))
    return {k: v.double() for k, v in tensors.items()}


def jumprelu_reference(x, t, norm_factor):
    pre = (x.double() * norm_factor) @ t["encoder.weight"].T + t["encoder.bias"]
    return pre * (pre > t["log_jumprelu_threshold"].exp())


def jumprelu_decode_reference(acts, t, norm_factor):
    return (acts @ t["decoder.weight"].T + t["decoder.bias"]) / norm_factor


def test_llama_scope_r1_files_encode_and_decode_like_jumprelu_with_norm_factor(tmp_path):
    tensors = write_llama_scope_r1(tmp_path / LLAMA_SCOPE_VARIANT / "L1R", layer=1, seed=3)

    saes = load_saes(f"llama-scope-r1:{tmp_path}")

    sae = saes[1]
    assert type(sae).__name__ == "JumpReLUSAE"
    assert sae.cfg.normalize_activations == "none"  # the factor is folded into the weights
    assert sae.cfg.metadata.model_name == "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"
    x = inputs(scale=1 / LLAMA_SCOPE_L1_NORM_FACTOR)  # raw activations, scaled as the real ones are
    expected = jumprelu_reference(x, tensors, LLAMA_SCOPE_L1_NORM_FACTOR)
    pre = (x.double() * LLAMA_SCOPE_L1_NORM_FACTOR) @ tensors["encoder.weight"].T + tensors["encoder.bias"]
    assert ((pre > 0) & (expected == 0)).any() and (expected > 0).any()  # the threshold really cuts some
    close(sae.encode(x), expected)
    close(sae.decode(expected.float()), jumprelu_decode_reference(expected, tensors, LLAMA_SCOPE_L1_NORM_FACTOR))


def test_llama_scope_r1_off_hub_layout_needs_the_norm_factor(tmp_path):
    tensors = write_llama_scope_r1(tmp_path / "mine" / "L0R", layer=0, seed=5)
    with pytest.raises(TellnormError, match="norm_scaling_factor"):
        load_saes(f"llama-scope-r1:{tmp_path / 'mine'}")

    sae = load_saes({"format": "llama-scope-r1", "path": tmp_path / "mine", "norm_scaling_factor": {0: 2.5}})[0]
    x = inputs(scale=0.4)
    close(sae.encode(x), jumprelu_reference(x, tensors, 2.5))


def test_qresearch_file_encodes_and_decodes_like_relu(tmp_path):
    tensors = {"encoder.weight": randn(D_SAE, D_IN, seed=7, scale=0.125), "encoder.bias": randn(D_SAE, seed=8),
               "decoder.weight": randn(D_IN, D_SAE, seed=9), "decoder.bias": randn(D_IN, seed=10)}
    torch.save(tensors, tmp_path / QRESEARCH_FILE)
    t = {k: v.double() for k, v in tensors.items()}

    sae = load_saes(f"qresearch:{tmp_path}")[19]

    assert type(sae).__name__ == "StandardSAE" and sae.dtype == torch.float32
    x = inputs()
    expected = (x.double() @ t["encoder.weight"].T + t["encoder.bias"]).relu()
    close(sae.encode(x), expected)
    close(sae.decode(expected.float()), expected @ t["decoder.weight"].T + t["decoder.bias"])


# ---------------------------------------------------------------- validation against a model


def test_matching_sae_validates_silently(tiny_model, tmp_path):
    sae_lens_sae(layer=1, model_name=tiny_model.name).save_model(tmp_path / "ok")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SAEModelMismatchWarning)
        assert list(load_saes(tmp_path / "ok", tiny_model)) == [1]


def test_d_in_mismatch_names_both_sizes(tiny_model):
    with pytest.raises(TellnormError, match=r"size 32 but in-memory model has d_model 64"):
        validate_sae(sae_lens_sae(layer=0, d_in=32), tiny_model, 0)


def test_hook_beyond_the_model_names_the_valid_layers(tiny_model, tmp_path):
    sae_lens_sae(layer=5).save_model(tmp_path / "deep")
    with pytest.raises(TellnormError, match=r"'blocks.5.hook_resid_post'.*layers are 0..1"):
        load_saes(tmp_path / "deep", tiny_model)


def test_sae_of_another_model_warns_loudly(tiny_model):
    with pytest.warns(SAEModelMismatchWarning, match=r"SAE/MODEL MISMATCH.*'Qwen/Qwen3-8B'.*'in-memory model'"):
        validate_sae(sae_lens_sae(layer=0, model_name="Qwen/Qwen3-8B"), tiny_model, 0)


def test_model_names_match_by_last_path_component():
    from types import SimpleNamespace

    from tellnorm.saes.loading import _same_model

    model = SimpleNamespace(name="/models/qwen3-8b", hf_model=SimpleNamespace(config=SimpleNamespace()))
    assert _same_model("Qwen/Qwen3-8B", model)
    assert not _same_model("Qwen/Qwen3-8B-Base", model)


# ---------------------------------------------------------------- bad inputs


def test_truncated_safetensors_names_the_file(tmp_path):
    sae_lens_sae().save_model(tmp_path / "cut")
    weights = tmp_path / "cut" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(TellnormError, match=r"sae_weights\.safetensors.*corrupt, truncated"):
        load_saes(tmp_path / "cut")


def test_truncated_torch_file_names_the_file(tmp_path):
    folder = tmp_path / QWEN_SCOPE_REPO
    write_qwen_scope(folder, 0, seed=0)
    weights = folder / "layer0.sae.pt"
    weights.write_bytes(weights.read_bytes()[:300])
    with pytest.raises(TellnormError, match=r"layer0\.sae\.pt.*corrupt, truncated"):
        load_saes(f"qwen-scope:{folder}")


def test_empty_or_missing_folder_is_an_error(tmp_path):
    with pytest.raises(TellnormError, match="holds no SAEs"):
        load_saes(tmp_path)
    with pytest.raises(TellnormError, match="does not exist"):
        load_saes(f"qwen-scope:{tmp_path / 'nowhere'}")


def test_native_files_under_a_plain_path_get_a_hint(tmp_path):
    write_qwen_scope(tmp_path / QWEN_SCOPE_REPO, 0, seed=0)
    with pytest.raises(TellnormError, match="looks like qwen-scope files: pass 'qwen-scope:"):
        load_saes(tmp_path / QWEN_SCOPE_REPO)


def test_registry_release_offline_fails_fast_with_instructions():
    with pytest.raises(TellnormError, match=r"not available offline.*hf download Qwen/SAE-Res-Qwen3-1.7B-Base-W32K"
                                            r"-L0_50 --include 'layer0.sae.pt'.*'qwen-scope:"):
        load_saes("qwen-scope-3-1.7b-base-w32k-l50:layer0")


def test_registry_spec_errors_are_one_line():
    with pytest.raises(TellnormError, match="has no SAE id 'layer99'"):
        load_saes({"release": "qwen-scope-3-1.7b-base-w32k-l50", "sae_ids": ["layer99"]})
    with pytest.raises(TellnormError, match="not a release.*did you mean"):
        load_saes({"release": "qwen-scope-3-1.7b-base-w32k-l5", "sae_id": "layer0"})
    with pytest.raises(TellnormError, match="name the SAE ids"):
        load_saes({"release": "llama_scope_r1_distill"})


def test_spec_forms_parse_and_reject_typos(tmp_path):
    assert parse_sae_spec(f"llama-scope-r1:{tmp_path}").format == "llama-scope-r1"
    assert parse_sae_spec("llama_scope_r1_distill:l0r_800m_slimpajama,l1r_800m_slimpajama").sae_ids == (
        "l0r_800m_slimpajama", "l1r_800m_slimpajama")
    assert parse_sae_spec({"path": tmp_path, "layers": [2, 1]}).layers == (1, 2)
    with pytest.raises(TellnormError, match="unknown key.*'layer'"):
        parse_sae_spec({"path": tmp_path, "layer": 1})
    with pytest.raises(TellnormError, match="layers must be non-negative integers"):
        parse_sae_spec(tmp_path, layers=[1.5])
    with pytest.raises(TellnormError, match="asks for layers"):
        parse_sae_spec({"path": tmp_path, "layers": [1]}, layers=[2])
    with pytest.raises(TellnormError, match="applies only to qwen-scope"):
        parse_sae_spec({"format": "qresearch", "path": tmp_path, "release": "x"})
    with pytest.raises(TellnormError, match="neither an existing folder"):
        parse_sae_spec("no-such-thing")
