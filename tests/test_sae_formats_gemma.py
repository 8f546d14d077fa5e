"""tellnorm.saes: Gemma Scope (``params.npz``) and Gemma Scope 2 (``params.safetensors``) files in their hub layouts.

Like the other native formats (tests/test_sae_loading.py), each test writes small random files in the release's own
layout, loads them through sae_lens's own loaders (``gemma_2`` / ``gemma_3``) and checks the SAE against the
release's JumpReLU formula computed straight from those tensors in float64, not against sae_lens:
``a = pre * [pre > threshold]`` with ``pre = x @ W_enc + b_enc`` (no b_dec subtracted), ``x_hat = a @ W_dec + b_dec``.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from tellnorm.errors import TellnormError
from tellnorm.saes import SAEModelMismatchWarning, load_saes, parse_sae_spec

D_IN, D_SAE = 64, 256
TOL = dict(rtol=1e-5, atol=1e-5)
# pretrained_saes.yaml, gemma-scope-2b-pt-res-canonical: layer_1/width_16k/canonical is this folder.
CANONICAL_L1 = ("layer_1", "width_16k", "average_l0_102")
GEMMA_SCOPE_2_CONFIG_MODEL = "gemma-v3-270m-pt"  # Gemma Scope 2 configs name the model like this; the loader fixes it


def inputs(n: int = 8, d_in: int = D_IN, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed))


def random_jumprelu(seed: int, d_in: int = D_IN) -> dict[str, np.ndarray]:
    """Gemma Scope's tensors: W_enc [d_in, d_sae], W_dec [d_sae, d_in], positive per-feature thresholds."""
    rng = np.random.default_rng(seed)
    return {"W_enc": (rng.standard_normal((d_in, D_SAE)) * 0.125).astype(np.float32),
            "W_dec": rng.standard_normal((D_SAE, d_in)).astype(np.float32),
            "b_enc": (rng.standard_normal(D_SAE) * 0.1).astype(np.float32),
            "b_dec": rng.standard_normal(d_in).astype(np.float32),
            "threshold": rng.uniform(0.05, 0.6, D_SAE).astype(np.float32)}


def float64(tensors: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {key.replace("w_", "W_"): torch.from_numpy(value).double() for key, value in tensors.items()}


def jumprelu_encode(x, t):
    pre = x.double() @ t["W_enc"] + t["b_enc"]
    return pre * (pre > t["threshold"])


def jumprelu_decode(acts, t):
    return acts @ t["W_dec"] + t["b_dec"]


def check_against_formula(sae, t, d_in: int = D_IN) -> None:
    assert type(sae).__name__ == "JumpReLUSAE" and sae.dtype == torch.float32
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (d_in, D_SAE)
    x = inputs(d_in=d_in)
    expected = jumprelu_encode(x, t)
    pre = x.double() @ t["W_enc"] + t["b_enc"]
    assert ((pre > 0) & (expected == 0)).any() and (expected > 0).any()  # the threshold really cuts some
    torch.testing.assert_close(sae.encode(x).double(), expected, **TOL)
    torch.testing.assert_close(sae.decode(expected.float()).double(), jumprelu_decode(expected, t), **TOL)


def write_gemma_scope(repo, parts=("layer_1", "width_16k", "average_l0_71"), seed: int = 0, d_in: int = D_IN,
                      lowercase: bool = False) -> dict[str, torch.Tensor]:
    """google/gemma-scope-*: one params.npz per layer_<N>/width_<W>/average_l0_<K> folder."""
    folder = repo.joinpath(*parts)
    folder.mkdir(parents=True)
    tensors = random_jumprelu(seed, d_in)
    if lowercase:  # some npz files spell the weights w_enc/w_dec; the loader renames them
        tensors = {key.replace("W_", "w_"): value for key, value in tensors.items()}
    np.savez(folder / "params.npz", **tensors)
    return float64(tensors)


def write_gemma_scope_2(repo, site: str = "resid_post", layer: int = 5, name: str = "width_16k_l0_small",
                        seed: int = 0, config: bool = True) -> dict[str, torch.Tensor]:
    """google/gemma-scope-2-*: <site>/layer_<N>_<name>/ with params.safetensors (lowercase keys) and config.json."""
    folder = repo / site / f"layer_{layer}_{name}"
    folder.mkdir(parents=True)
    tensors = {key.lower(): value for key, value in random_jumprelu(seed).items()}
    save_file(tensors, str(folder / "params.safetensors"))
    if config:  # the real config's keys
        (folder / "config.json").write_text(json.dumps({
            "hf_hook_point_in": f"model.layers.{layer}.output", "hf_hook_point_out": f"model.layers.{layer}.output",
            "width": D_SAE, "model_name": GEMMA_SCOPE_2_CONFIG_MODEL, "architecture": "jump_relu", "l0": 20,
            "affine_connection": False, "type": "sae"}))
    return float64(tensors)


@pytest.fixture(scope="module")
def tiny_model(tiny_loaded_model):
    return tiny_loaded_model("qwen3", n_layers=2)  # d_model 64, layers 0..1


# ---------------------------------------------------------------- Gemma Scope (Gemma 2, params.npz)


def test_gemma_scope_npz_encodes_and_decodes_like_jumprelu(tmp_path):
    repo = tmp_path / "gemma-scope-2b-pt-res"  # hf download google/gemma-scope-2b-pt-res --local-dir ...
    tensors = {0: write_gemma_scope(repo, ("layer_0", "width_16k", "average_l0_105"), seed=1),
               1: write_gemma_scope(repo, CANONICAL_L1, seed=2)}

    saes = load_saes(f"gemma-scope:{repo}")

    assert list(saes) == [0, 1]
    for layer, sae in saes.items():
        check_against_formula(sae, tensors[layer])
        assert sae.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"
        assert sae.cfg.metadata.model_name == "gemma-2-2b"
        assert sae.cfg.normalize_activations == "none"
    # the registry's neuronpedia id, found through the -canonical release of the same repo
    assert saes[1].cfg.metadata.neuronpedia_id == "gemma-2-2b/1-gemmascope-res-16k"


def test_gemma_scope_hook_and_model_come_from_the_repo_name(tmp_path):
    repo = tmp_path / "gemma-scope-9b-pt-mlp"
    tensors = write_gemma_scope(repo, ("layer_3", "width_131k", "average_l0_9"), seed=3, lowercase=True)

    sae = load_saes(f"gemma-scope:{repo / 'layer_3' / 'width_131k' / 'average_l0_9'}")[3]  # one SAE's own folder

    assert sae.cfg.metadata.hook_name == "blocks.3.hook_mlp_out"
    assert sae.cfg.metadata.model_name == "gemma-2-9b"
    check_against_formula(sae, tensors)


def test_gemma_scope_release_comes_from_the_path_or_the_spec(tmp_path):
    write_gemma_scope(tmp_path / "my-copy", seed=0)
    with pytest.raises(TellnormError, match="cannot tell which gemma-scope release.*base model and hook"):
        load_saes(f"gemma-scope:{tmp_path / 'my-copy'}")

    sae = load_saes({"format": "gemma-scope", "path": tmp_path / "my-copy", "release": "gemma-scope-9b-it-res"})[1]
    # the loader's name; the registry's non-canonical entry for this repo says gemma-2-9b
    assert sae.cfg.metadata.model_name == "gemma-2-9b-it"

    cached = tmp_path / "models--google--gemma-scope-2b-pt-res" / "snapshots" / "0123abc"  # HF cache layout
    write_gemma_scope(cached, seed=0)
    assert load_saes(f"gemma-scope:{cached}")[1].cfg.metadata.model_name == "gemma-2-2b"

    with pytest.raises(TellnormError, match="not a gemma-scope release"):
        load_saes({"format": "gemma-scope", "path": tmp_path / "my-copy", "release": "qwen-scope-3-8b-base-w64k-l50"})


def test_gemma_scope_off_hub_layout_and_bad_files_are_named(tmp_path):
    repo = tmp_path / "gemma-scope-2b-pt-res"
    write_gemma_scope(repo, ("flat", "sae"), seed=0)
    with pytest.raises(TellnormError, match=r"cannot tell the layer of .*flat/sae/params\.npz: keep the hub layout"):
        load_saes(f"gemma-scope:{repo}")

    repo = tmp_path / "b" / "gemma-scope-2b-pt-res"
    write_gemma_scope(repo, seed=0)
    weights = repo / "layer_1" / "width_16k" / "average_l0_71" / "params.npz"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(TellnormError, match=r"average_l0_71/params\.npz.*corrupt, truncated"):
        load_saes(f"gemma-scope:{repo}")

    np.savez(weights, W_enc=np.zeros((D_IN, D_SAE), np.float32), W_dec=np.zeros((D_SAE, D_IN), np.float32))
    with pytest.raises(TellnormError, match=r"params\.npz is not a gemma-scope SAE file: it lacks b_enc, b_dec"):
        load_saes(f"gemma-scope:{repo}")


# ---------------------------------------------------------------- Gemma Scope 2 (Gemma 3, params.safetensors)


def test_gemma_scope_2_safetensors_encode_and_decode_like_jumprelu(tmp_path):
    repo = tmp_path / "gemma-scope-2-270m-pt"
    tensors = write_gemma_scope_2(repo, "resid_post", layer=12, name="width_16k_l0_medium", seed=4)
    write_gemma_scope_2(repo, "transcoder", layer=3, name="width_16k_l0_big_affine", seed=5)  # not an SAE: skipped

    saes = load_saes(f"gemma-scope-2:{repo}")

    assert list(saes) == [12]
    sae = saes[12]
    check_against_formula(sae, tensors)
    assert sae.cfg.metadata.hook_name == "blocks.12.hook_resid_post"
    assert sae.cfg.metadata.hf_hook_name == "model.layers.12.output"
    assert sae.cfg.metadata.model_name == "google/gemma-3-270m"
    assert sae.cfg.metadata.neuronpedia_id == "gemma-3-270m/12-gemmascope-2-res-16k"


def test_gemma_scope_2_without_config_json_reads_the_names(tmp_path):
    repo = tmp_path / "gemma-scope-2-270m-it"
    tensors = write_gemma_scope_2(repo, "mlp_out_all", layer=1, seed=6, config=False)

    sae = load_saes(f"gemma-scope-2:{repo / 'mlp_out_all'}")[1]

    assert sae.cfg.metadata.hook_name == "blocks.1.hook_mlp_out"
    assert sae.cfg.metadata.model_name == "google/gemma-3-270m-it"
    check_against_formula(sae, tensors)


def test_gemma_scope_2_transcoders_only_and_corrupt_files(tmp_path):
    repo = tmp_path / "gemma-scope-2-270m-pt"
    write_gemma_scope_2(repo, "transcoder_all", layer=0, seed=0)
    with pytest.raises(TellnormError, match="holds no SAEs.*transcoder and clt folders are not SAEs"):
        load_saes(f"gemma-scope-2:{repo}")

    write_gemma_scope_2(repo, "resid_post", layer=0, seed=0)
    weights = repo / "resid_post" / "layer_0_width_16k_l0_small" / "params.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(TellnormError, match=r"layer_0_width_16k_l0_small/params\.safetensors.*corrupt, truncated"):
        load_saes(f"gemma-scope-2:{repo}")

    weights.unlink()
    write_gemma_scope_2(repo, "resid_post", layer=1, seed=0)
    (repo / "resid_post" / "layer_1_width_16k_l0_small" / "config.json").write_text("{not json")
    with pytest.raises(TellnormError, match=r"layer_1_width_16k_l0_small/config\.json.*corrupt"):
        load_saes(f"gemma-scope-2:{repo}")


# ---------------------------------------------------------------- checks against a model


def test_gemma_sae_for_another_model_warns(tiny_model, tmp_path):
    repo = tmp_path / "gemma-scope-2b-pt-res"
    write_gemma_scope(repo, seed=0)
    with pytest.warns(SAEModelMismatchWarning, match=r"SAE/MODEL MISMATCH.*'gemma-2-2b'"):
        assert list(load_saes(f"gemma-scope:{repo}", tiny_model)) == [1]

    repo2 = tmp_path / "gemma-scope-2-270m-pt"
    write_gemma_scope_2(repo2, "resid_post", layer=0, seed=0)
    with pytest.warns(SAEModelMismatchWarning, match=r"'google/gemma-3-270m'"):
        load_saes(f"gemma-scope-2:{repo2}", tiny_model)


def test_gemma_sae_d_in_and_hook_mismatch_are_refused(tiny_model, tmp_path):
    write_gemma_scope(tmp_path / "a" / "gemma-scope-2b-pt-res", seed=0, d_in=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SAEModelMismatchWarning)
        with pytest.raises(TellnormError, match=r"layer-1 SAE reads vectors of size 32 but .* has d_model 64"):
            load_saes(f"gemma-scope:{tmp_path / 'a' / 'gemma-scope-2b-pt-res'}", tiny_model)

        write_gemma_scope(tmp_path / "b" / "gemma-scope-2b-pt-res", ("layer_5", "width_16k", "average_l0_9"))
        with pytest.raises(TellnormError, match=r"'blocks.5.hook_resid_post'.*layers are 0..1"):
            load_saes(f"gemma-scope:{tmp_path / 'b' / 'gemma-scope-2b-pt-res'}", tiny_model)


# ---------------------------------------------------------------- specs and hints


def test_gemma_specs_parse_and_native_files_get_a_hint(tmp_path):
    assert parse_sae_spec(f"gemma-scope:{tmp_path}").format == "gemma-scope"
    assert parse_sae_spec(f"gemma-scope-2:{tmp_path}").format == "gemma-scope-2"
    assert parse_sae_spec({"format": "gemma-scope-2", "path": tmp_path, "release": "x"}).options == {"release": "x"}

    write_gemma_scope(tmp_path / "gemma-scope-2b-pt-res", seed=0)
    with pytest.raises(TellnormError, match="looks like gemma-scope files: pass 'gemma-scope:"):
        load_saes(tmp_path / "gemma-scope-2b-pt-res")
    write_gemma_scope_2(tmp_path / "gemma-scope-2-270m-pt", seed=0)
    with pytest.raises(TellnormError, match="looks like gemma-scope-2 files: pass 'gemma-scope-2:"):
        load_saes(tmp_path / "gemma-scope-2-270m-pt")


def test_gemma_registry_release_offline_points_at_the_native_spec():
    with pytest.raises(TellnormError, match=r"not available offline.*hf download google/gemma-scope-2b-pt-res "
                                            r"--include 'layer_1/width_16k/average_l0_102/\*'.*'gemma-scope:"):
        load_saes("gemma-scope-2b-pt-res-canonical:layer_1/width_16k/canonical")


# ---------------------------------------------------------------- Goodfire (another registry format, one file each)


def test_goodfire_file_encodes_and_decodes_like_relu(tiny_model, tmp_path):
    """Goodfire's SparseAutoEncoder: relu(encoder_linear(x)), decoder_linear(a); nn.Linear weights [out, in]."""
    rng = np.random.default_rng(9)
    tensors = {"encoder_linear.weight": torch.from_numpy(rng.standard_normal((D_SAE, D_IN)) * 0.125).float(),
               "encoder_linear.bias": torch.from_numpy(rng.standard_normal(D_SAE)).float(),
               "decoder_linear.weight": torch.from_numpy(rng.standard_normal((D_IN, D_SAE))).float(),
               "decoder_linear.bias": torch.from_numpy(rng.standard_normal(D_IN)).float()}
    torch.save(tensors, tmp_path / "Llama-3.1-8B-Instruct-SAE-l19.pth")  # the name it is downloaded with
    t = {key: value.double() for key, value in tensors.items()}

    sae = load_saes(f"goodfire:{tmp_path}")[19]

    assert type(sae).__name__ == "StandardSAE" and sae.dtype == torch.float32
    assert sae.cfg.metadata.hook_name == "blocks.19.hook_resid_post"
    assert sae.cfg.metadata.model_name == "meta-llama/Llama-3.1-8B-Instruct"
    x = inputs()
    expected = (x.double() @ t["encoder_linear.weight"].T + t["encoder_linear.bias"]).relu()
    assert (expected == 0).any() and (expected > 0).any()
    torch.testing.assert_close(sae.encode(x).double(), expected, **TOL)
    torch.testing.assert_close(sae.decode(expected.float()).double(),
                               expected @ t["decoder_linear.weight"].T + t["decoder_linear.bias"], **TOL)

    with pytest.raises(TellnormError, match=r"'blocks.19.hook_resid_post'.*layers are 0..1"):
        load_saes(f"goodfire:{tmp_path}", tiny_model)

    (tmp_path / "Llama-3.1-8B-Instruct-SAE-l19.pth").rename(tmp_path / "renamed.pth")
    with pytest.raises(TellnormError, match=r"holds no SAEs: expected Goodfire files named as downloaded "
                                            r"\(.*Llama-3.1-8B-Instruct-SAE-l19.pth"):
        load_saes(f"goodfire:{tmp_path}")
