"""Qwen-Scope SAEs for Qwen3.5 (sae_lens releases ``qwen-scope-3.5-*``): Qwen-Scope's own file layout with random
tensors, read from a ``qwen-scope:PATH`` folder and by ``RELEASE:ID`` from the HF cache, encode/decode against the
float64 TopK formula; the release's model, k and hook come from the registry."""

from __future__ import annotations

import pytest
from test_sae_loading import D_IN, D_SAE, close, inputs, topk_reference, write_qwen_scope

from tellnorm.saes import load_saes

# (release, repo id, base model, k): two of the registry's Qwen3.5 releases
RELEASES = [("qwen-scope-3.5-2b-base-w32k-l50", "Qwen/SAE-Res-Qwen3.5-2B-Base-W32K-L0_50", "Qwen/Qwen3.5-2B-Base", 50),
            ("qwen-scope-3.5-9b-base-w64k-l100", "Qwen/SAE-Res-Qwen3.5-9B-Base-W64K-L0_100", "Qwen/Qwen3.5-9B-Base",
             100)]


def check(sae, tensors, layer: int, model: str, k: int) -> None:
    assert type(sae).__name__ == "TopKSAE" and sae.cfg.k == k
    assert sae.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"
    assert sae.cfg.metadata.model_name == model
    x = inputs()
    expected = topk_reference(x, tensors, k=k)
    close(sae.encode(x), expected)
    close(sae.decode(expected.float()), expected @ tensors["W_dec"].T + tensors["b_dec"])


@pytest.mark.parametrize("release, repo, model, k", RELEASES)
def test_native_files_in_a_folder_named_like_the_repo(release, repo, model, k, tmp_path):
    folder = tmp_path / repo.split("/")[1]  # as hf download --local-dir names it
    tensors = {layer: write_qwen_scope(folder, layer, seed=7 * layer) for layer in (0, 5)}
    saes = load_saes(f"qwen-scope:{folder}")
    assert list(saes) == [0, 5]
    for layer, sae in saes.items():
        check(sae, tensors[layer], layer, model, k)
    # a folder with any name, the release named in the spec
    other = tmp_path / "my-copy"
    write_qwen_scope(other, 3, seed=1)
    assert load_saes({"format": "qwen-scope", "path": str(other), "release": release})[3].cfg.k == k


@pytest.mark.parametrize("release, repo, model, k", RELEASES)
def test_a_release_by_name_from_the_hf_cache(release, repo, model, k, tmp_path, monkeypatch):
    from huggingface_hub import constants

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / f"models--{repo.replace('/', '--')}"
    tensors = write_qwen_scope(repo_dir / "snapshots" / revision, 2, seed=3)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    # sae_lens's loader takes d_in and d_sae from tables (2048 × 32768 for the 2B): shrink those two numbers so the
    # random files stay small; the registry lookup, the cached file, the transposes and k are the real path
    import sae_lens.loading.pretrained_sae_loaders as loaders

    parse = loaders._parse_qwen_scope_repo_id
    monkeypatch.setattr(loaders, "_parse_qwen_scope_repo_id", lambda repo_id: (*parse(repo_id)[:1], D_SAE,
                                                                               parse(repo_id)[2]))
    key = parse(repo)[0]
    monkeypatch.setitem(loaders.QWEN_SCOPE_MODEL_INFO, key, (loaders.QWEN_SCOPE_MODEL_INFO[key][0], D_IN))
    saes = load_saes(f"{release}:layer2")
    assert list(saes) == [2]
    check(saes[2], tensors, 2, model, k)
