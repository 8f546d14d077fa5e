"""tellnorm.backends.hf: the bridge must reproduce HF's own decoder-layer outputs, and bad input must fail in one line.

Every activation is checked against an independently loaded HF copy of the same folder (sdpa, the kernel tellnorm runs,
forward hooks on ``model.model.layers[L]``), never against numbers produced by tellnorm itself.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_ARCHS

from tellnorm.backends import load_model
from tellnorm.backends.base import HOOK_POINTS
from tellnorm.backends.hf import LoadedModel
from tellnorm.errors import TellnormError

TOL = 1e-5
PROMPT = "w1 w2 w3 w4 w5 w6 w7"
SHORT_PROMPT = "w8 w9 w10"


def hf_layer_outputs(hf, input_ids, **kwargs):
    """(outputs of every HF decoder layer, HF model output with hidden states), from forward hooks on the layers."""
    outs: dict[int, torch.Tensor] = {}

    def grab(i):
        def hook(module, args, output):
            outs[i] = (output[0] if isinstance(output, tuple) else output).detach().clone()

        return hook

    handles = [layer.register_forward_hook(grab(i)) for i, layer in enumerate(hf.model.layers)]
    try:
        with torch.no_grad():
            result = hf(input_ids=input_ids, output_hidden_states=True, **kwargs)
    finally:
        for h in handles:
            h.remove()
    assert sorted(outs) == list(range(len(hf.model.layers)))
    return [outs[i] for i in range(len(outs))], result


def resid_cache(lm, input_ids, **kwargs):
    with torch.no_grad():
        logits, cache = lm.bridge.run_with_cache(
            input_ids, names_filter=lambda name: name.endswith(("hook_resid_pre", "hook_resid_post")), **kwargs
        )
    return logits, cache


def assert_close(actual, expected, what, tol=TOL):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.float() - expected.float()).abs().max().item()
    assert diff <= tol, f"{what}: max abs diff {diff:.3g} > {tol}"


def assert_one_line(err: pytest.ExceptionInfo):
    message = str(err.value)
    assert message.strip(), "empty error message"
    assert "\n" not in message.strip(), f"error message is not one line: {message!r}"


# --- 1. parity with HF decoder layers ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_resid_post_matches_hf_decoder_layers(arch, tiny_loaded_model, hf_reference):
    lm, hf = tiny_loaded_model(arch), hf_reference(arch)
    assert lm.n_layers == hf.config.num_hidden_layers == 3
    assert lm.architecture == arch and lm.source == "folder"
    assert lm.hf_model is not hf  # the reference is an independent copy
    ids = torch.tensor([lm.encode(PROMPT)])

    logits, cache = resid_cache(lm, ids)
    layer_out, ref = hf_layer_outputs(hf, ids)

    for L in range(lm.n_layers):  # every layer, the last one included
        assert_close(cache[lm.hook_name(L, "resid_post")], layer_out[L], f"{arch} resid_post layer {L}")
        # the check is not vacuous: each layer changes the residual by far more than the tolerance
        assert (layer_out[L] - cache[lm.hook_name(L, "resid_pre")]).abs().max() > 1e-2
    assert_close(logits, ref.logits, f"{arch} logits")

    # embeddings in, and layer L's output is layer L+1's input
    assert_close(cache[lm.hook_name(0, "resid_pre")], hf.model.embed_tokens(ids).detach(), f"{arch} resid_pre 0")
    assert_close(cache[lm.hook_name(0, "resid_pre")], ref.hidden_states[0], f"{arch} resid_pre 0 vs hidden_states[0]")
    for L in range(lm.n_layers - 1):
        assert_close(cache[lm.hook_name(L + 1, "resid_pre")], cache[lm.hook_name(L, "resid_post")],
                     f"{arch} pre {L + 1}")
        assert_close(ref.hidden_states[L + 1], layer_out[L], f"{arch} HF hidden_states[{L + 1}]")

    # The trap: HF's last hidden state has the final norm applied, so it is NOT the last layer's output.
    last = layer_out[-1]
    assert (ref.hidden_states[-1] - last).abs().max() > 1e-2
    assert_close(ref.hidden_states[-1], hf.model.norm(last).detach(), f"{arch} hidden_states[-1] is norm(last)")


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_left_padded_batch_matches_hf(arch, tiny_loaded_model, hf_reference):
    lm, hf = tiny_loaded_model(arch), hf_reference(arch)
    rows = [lm.encode(PROMPT), lm.encode(SHORT_PROMPT)]
    width = max(map(len, rows))
    pad = lm.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    assert mask[1, 0] == 0  # the second prompt really is left-padded

    logits, cache = resid_cache(lm, ids, attention_mask=mask)
    # HF reference as generate() drives it: mask plus positions counted over real tokens only
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    layer_out, ref = hf_layer_outputs(hf, ids, attention_mask=mask, position_ids=positions)

    real = mask.bool()
    for L in range(lm.n_layers):
        got = cache[lm.hook_name(L, "resid_post")]
        assert_close(got[real], layer_out[L][real], f"{arch} padded resid_post layer {L}")
    assert_close(logits[real], ref.logits[real], f"{arch} padded logits")

    # and each prompt's real positions equal that prompt run alone, unpadded, through HF. Equal in exact arithmetic
    # only (other matmul shapes, masked softmax terms), so float32 rounding gets a little more room here.
    for b, row in enumerate(rows):
        alone_out, alone = hf_layer_outputs(hf, torch.tensor([row]))
        for L in range(lm.n_layers):
            got = cache[lm.hook_name(L, "resid_post")][b][real[b]]
            assert_close(got, alone_out[L][0], f"{arch} prompt {b} padded vs alone, layer {L}", tol=1e-4)
        assert_close(logits[b][real[b]], alone.logits[0], f"{arch} prompt {b} padded vs alone, logits", tol=1e-4)


def test_bridge_hooks_fire_when_hf_model_is_called(tiny_loaded_model, hf_reference):
    """Generation drives the HF module directly; TL hooks must still observe the real layer outputs."""
    lm, hf = tiny_loaded_model("qwen3"), hf_reference("qwen3")
    ids = torch.tensor([lm.encode(PROMPT)])
    seen: dict[int, torch.Tensor] = {}

    def grab(L):
        def hook(tensor, hook):
            seen[L] = tensor.detach().clone()

        return hook

    hooks = [(lm.hook_name(L), grab(L)) for L in range(lm.n_layers)]
    with torch.no_grad(), lm.bridge.hooks(fwd_hooks=hooks):
        lm.hf_model(input_ids=ids)
    layer_out, _ = hf_layer_outputs(hf, ids)
    assert sorted(seen) == list(range(lm.n_layers))
    for L in range(lm.n_layers):
        assert_close(seen[L], layer_out[L], f"hook via HF call, layer {L}")


# --- 2. in-memory (model, tokenizer) pair -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_in_memory_pair_matches_hf(arch, tiny_hf_pair, hf_reference):
    model, tok = tiny_hf_pair(arch)
    lm = load_model((model, tok))
    hf = hf_reference(arch)  # saved from the same seed: same weights, loaded independently from disk
    assert lm.source == "memory" and lm.architecture == arch and lm.n_layers == 3
    ids = torch.tensor([lm.encode(PROMPT)])
    raw = tok(PROMPT, add_special_tokens=False)["input_ids"]
    assert ids[0].tolist()[-len(raw):] == raw

    logits, cache = resid_cache(lm, ids)
    layer_out, ref = hf_layer_outputs(hf, ids)
    for L in range(lm.n_layers):
        assert_close(cache[lm.hook_name(L)], layer_out[L], f"{arch} in-memory resid_post layer {L}")
    assert_close(logits, ref.logits, f"{arch} in-memory logits")


# --- 3. bad input: one TellnormError, one line ------------------------------------------------------------------


def test_folder_without_config(tmp_path):
    with pytest.raises(TellnormError, match="config.json") as err:
        load_model(tmp_path)
    assert_one_line(err)


def test_unsupported_architecture(tmp_path, tiny_model_dir):
    folder = Path(shutil.copytree(tiny_model_dir("qwen3"), tmp_path / "gpt2"))
    config = json.loads((folder / "config.json").read_text())
    config["architectures"], config["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(TellnormError, match="GPT2LMHeadModel.*not supported") as err:
        load_model(folder)
    assert_one_line(err)


def test_invalid_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(TellnormError, match="not valid JSON") as err:
        load_model(tmp_path)
    assert_one_line(err)


def test_config_without_weights(tmp_path, tiny_model_dir):
    folder = Path(shutil.copytree(tiny_model_dir("qwen3"), tmp_path / "noweights"))
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(TellnormError, match="no weights") as err:
        load_model(folder)
    assert_one_line(err)


def test_truncated_safetensors(tmp_path, tiny_model_dir):
    folder = Path(shutil.copytree(tiny_model_dir("qwen3"), tmp_path / "corrupt"))
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(TellnormError, match="cannot load") as err:
        load_model(folder)
    assert_one_line(err)


def test_unknown_hub_name_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(TellnormError, match="offline") as err:
        load_model("nobody/does-not-exist")
    assert time.monotonic() - start < 10
    assert_one_line(err)
    assert "nobody/does-not-exist" in str(err.value)


@pytest.mark.parametrize("spec", ["./no/such/folder", "no/such/folder", "nothing-here"])
def test_missing_path_that_is_not_a_hub_name(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TellnormError) as err:
        load_model(spec)
    assert_one_line(err)


def test_path_that_is_a_file(tiny_model_dir):
    with pytest.raises(TellnormError, match="is a file") as err:
        load_model(tiny_model_dir("qwen3") / "config.json")
    assert_one_line(err)


def test_spec_of_wrong_type():
    with pytest.raises(TellnormError) as err:
        load_model(42)
    assert_one_line(err)


def test_hook_name_rejects_bad_point_and_layer(tiny_loaded_model):
    lm = tiny_loaded_model("qwen3")
    hook_points = set(lm.bridge.hook_dict)
    for L in range(lm.n_layers):  # every advertised point is a real bridge hook
        for point in HOOK_POINTS:
            assert lm.hook_name(L, point) in hook_points
    for point in ("resid", "hook_resid_post", "attn_pattern", ""):
        with pytest.raises(TellnormError, match="unknown hook point") as err:
            lm.hook_name(0, point)
        assert_one_line(err)
    for layer in (-1, lm.n_layers, 99, "1", 1.0):
        with pytest.raises(TellnormError, match="out of range") as err:
            lm.hook_name(layer)
        assert_one_line(err)


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_chat_prompt_rejects_empty(text, tiny_loaded_model):
    lm = tiny_loaded_model("qwen3")
    with pytest.raises(TellnormError, match="empty") as err:
        lm.chat_prompt(text)
    assert_one_line(err)


# --- 4. late layers ---------------------------------------------------------------------------------------------


def _fake_loaded(n_layers: int) -> LoadedModel:
    return LoadedModel(bridge=None, tokenizer=None, name="fake", architecture="qwen3", n_layers=n_layers,
                       d_model=64, max_positions=128, source="memory")


@pytest.mark.parametrize("n_layers, expected", [(28, list(range(21, 27))), (36, list(range(27, 35))), (8, [6])])
def test_late_layers_follow_the_paper(n_layers, expected):
    assert _fake_loaded(n_layers).late_layers() == expected


def test_late_layers_on_a_real_tiny_model(tiny_loaded_model):
    lm = tiny_loaded_model("qwen2", n_layers=8)
    assert lm.n_layers == 8
    assert lm.late_layers() == [6]


# --- 5. BOS handling --------------------------------------------------------------------------------------------


def test_llama_encode_adds_bos_exactly_once(tiny_loaded_model):
    lm = tiny_loaded_model("llama")
    tok = lm.tokenizer
    bos = tok.bos_token_id
    assert bos is not None
    raw = tok(PROMPT, add_special_tokens=False)["input_ids"]
    assert bos not in raw
    assert lm.encode(PROMPT) == [bos] + raw
    assert lm.encode(tok.bos_token + " " + PROMPT) == [bos] + raw  # already there: not doubled
    # the chat template writes BOS itself (as Llama 3's does): still exactly one
    chat_ids = lm.encode(lm.chat_prompt(PROMPT))
    assert chat_ids[0] == bos and chat_ids.count(bos) == 1


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_encode_adds_no_bos(arch, tiny_loaded_model):
    lm = tiny_loaded_model(arch)
    tok = lm.tokenizer
    assert lm.encode(PROMPT) == tok(PROMPT, add_special_tokens=False)["input_ids"]
    chat = lm.chat_prompt(PROMPT)
    assert lm.encode(chat) == tok(chat, add_special_tokens=False)["input_ids"]


def test_qwen_adds_no_bos_even_if_tokenizer_has_one(tiny_hf_pair):
    from conftest import build_tiny_tokenizer

    model, _ = tiny_hf_pair("qwen3")
    tok = build_tiny_tokenizer(bos=True)
    lm = load_model((model, tok))
    assert lm.tokenizer.bos_token_id is not None
    assert lm.encode(PROMPT) == tok(PROMPT, add_special_tokens=False)["input_ids"]
