"""Every row of ``tellnorm.backends.base.SUPPORTED_ARCHITECTURES`` on a tiny random model built from transformers'
config classes (hidden 64, 3–4 layers, vocabulary 100, 4 experts where MoE, sliding window 4 where the
architecture has one).

Each is checked against an independent HF copy (same seed, the same attention kernel as the backend runs — sdpa,
or eager where the table says so — plain torch forward hooks on its decoder
layers — HF's ``hidden_states[-1]`` is after the final norm, so the last layer comes from its hook):

* ``blocks.L.hook_resid_post`` equals HF decoder layer L's output for every L, logits equal HF's (1e-5), also in a
  left-padded batch; every advertised hook point exists;
* greedy generation with the KV cache gives the same tokens for a request alone and in a left-padded batch, and every
  token is HF's own argmax over the finished sequence (sliding windows, softcapping, sinks, MoE routing included);
* ALRR's extra block pass equals a hooked forward of the truncated sequence and never writes the cache, or is refused
  in one line where the architecture's layers cannot re-run against the bridge's cache (MLA).

Refused architectures (hybrid linear-attention models such as Qwen3.5 and Qwen3-Next, ones the bridge gets wrong,
ones it does not know) fail in one TellnormError line that says why. Qwen2/Qwen3/Llama are covered by test_models.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import (
    BOS,
    LLAMA_CHAT_TEMPLATE,
    PAD,
    QWEN_CHAT_TEMPLATE,
    SPECIAL,
    TINY_INIT_RANGE,
    WORDS,
    build_tiny_tokenizer,
)
from helpers import ExtraPassProbe, active_hook_count

from tellnorm.backends import fastpath, load_model
from tellnorm.backends.base import HOOK_POINTS, REFUSED_ARCHITECTURES, SUPPORTED_ARCHITECTURES
from tellnorm.backends.hf import state_layers
from tellnorm.errors import TellnormError
from tellnorm.generation import SamplingConfig, generate

TOL = 1e-5
VOCAB = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
DIMS = dict(vocab_size=len(VOCAB), hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, max_position_embeddings=256, initializer_range=TINY_INIT_RANGE,
            pad_token_id=VOCAB[PAD], eos_token_id=VOCAB["<|im_end|>"], bos_token_id=VOCAB[BOS], num_hidden_layers=3)
WINDOW = 4  # shorter than the prompts, so a sliding layer really attends differently from a full one
SLIDING_FULL_SLIDING = ["sliding_attention", "full_attention", "sliding_attention"]
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
MLA = dict(num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
           moe_intermediate_size=32, first_k_dense_replace=1, n_group=2, topk_group=1, kv_lora_rank=16,
           q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12)  # v ≠ qk head dim, as in V3
LINEAR_ATTN = dict(num_hidden_layers=4, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                   linear_value_head_dim=16)  # 3 Gated DeltaNet layers + 1 full-attention layer

TINY = {  # architecture -> (transformers config class, overrides of DIMS)
    "Qwen2MoeForCausalLM": ("Qwen2MoeConfig", dict(MOE, shared_expert_intermediate_size=32)),
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", MOE),
    "MistralForCausalLM": ("MistralConfig", dict(sliding_window=WINDOW)),
    "Ministral3ForCausalLM": ("Ministral3Config", {}),
    "MixtralForCausalLM": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW)),
    "GemmaForCausalLM": ("GemmaConfig", {}),
    "Gemma2ForCausalLM": ("Gemma2Config", dict(sliding_window=WINDOW, query_pre_attn_scalar=16)),
    "Gemma3ForCausalLM": ("Gemma3TextConfig", dict(sliding_window=WINDOW, query_pre_attn_scalar=16,
                                                   layer_types=SLIDING_FULL_SLIDING)),
    "GptOssForCausalLM": ("GptOssConfig", dict(
        num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW, layer_types=SLIDING_FULL_SLIDING,
        rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=4.0, original_max_position_embeddings=64,
                             beta_fast=32.0, beta_slow=1.0, truncate=False))),
    "Phi3ForCausalLM": ("Phi3Config", dict(sliding_window=WINDOW)),  # Phi-3-mini has a 2047-token window
    "Olmo2ForCausalLM": ("Olmo2Config", {}),
    "Olmo3ForCausalLM": ("Olmo3Config", dict(sliding_window=WINDOW, layer_types=SLIDING_FULL_SLIDING)),
    "OlmoeForCausalLM": ("OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2)),
    "FlexOlmoForCausalLM": ("FlexOlmoConfig", dict(num_experts=4, num_experts_per_tok=2)),
    "SmolLM3ForCausalLM": ("SmolLM3Config", dict(no_rope_layer_interval=2)),  # layer 1 without RoPE
    "GraniteForCausalLM": ("GraniteConfig", dict(residual_multiplier=0.5, embedding_multiplier=2.0,
                                                 attention_multiplier=0.2, logits_scaling=2.0)),
    "GraniteMoeForCausalLM": ("GraniteMoeConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "Glm4ForCausalLM": ("Glm4Config", {}),
    "Glm4MoeForCausalLM": ("Glm4MoeConfig", dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                 first_k_dense_replace=1, n_group=1, topk_group=1)),
    "Exaone4ForCausalLM": ("Exaone4Config", dict(num_hidden_layers=4, sliding_window=WINDOW, sliding_window_pattern=4)),
    "SeedOssForCausalLM": ("SeedOssConfig", {}),
    "Ernie4_5ForCausalLM": ("Ernie4_5Config", {}),
    "ApertusForCausalLM": ("ApertusConfig", {}),
    "ArceeForCausalLM": ("ArceeConfig", {}),
    "StableLmForCausalLM": ("StableLmConfig", {}),
    "NemotronForCausalLM": ("NemotronConfig", {}),
    "Qwen3_5ForCausalLM": ("Qwen3_5TextConfig", LINEAR_ATTN),
    "Qwen3_5MoeForCausalLM": ("Qwen3_5MoeTextConfig", dict(LINEAR_ATTN, **MOE, shared_expert_intermediate_size=32)),
    "Qwen3NextForCausalLM": ("Qwen3NextConfig", dict(LINEAR_ATTN, **MOE, shared_expert_intermediate_size=32)),
    "OlmoHybridForCausalLM": ("OlmoHybridConfig", LINEAR_ATTN),
    "DeepseekV2ForCausalLM": ("DeepseekV2Config", MLA),
    "DeepseekV3ForCausalLM": ("DeepseekV3Config", MLA),
}
# The list: generation and ALRR run for these on every test run; for the others they are marked slow.
MAIN = ("Qwen3_5ForCausalLM", "Qwen3MoeForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "GptOssForCausalLM",
        "MistralForCausalLM", "Phi3ForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM", "SmolLM3ForCausalLM",
        "DeepseekV3ForCausalLM")
COVERED_BY_TEST_MODELS = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM")

PROMPT = "w1 w2 w3 w4 w5 w6 w7 w8 w9"
SHORT_PROMPT = "w10 w11 w12"
GEN_PROMPTS = (PROMPT, SHORT_PROMPT, "w13 w14 w15 w16 w17 w18")  # three lengths: left padding in a batch


def build(arch: str, table=TINY, seed: int = 0):
    """A tiny random ``arch`` in float32 eval mode; the same (arch, seed) gives the same weights."""
    import transformers

    name, overrides = table[arch]
    config_class = getattr(transformers, name)
    accepted = inspect.signature(config_class.__init__).parameters
    kwargs = {k: v for k, v in DIMS.items() if k in accepted}
    config = config_class(**{**kwargs, **overrides})
    config.architectures = [arch]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    assert type(model).__name__ == arch
    return model


def tokenizer_for(arch: str):
    """A BOS tokenizer whose template writes BOS for families that use BOS; a Qwen-style one otherwise."""
    if SUPPORTED_ARCHITECTURES[arch].bos:
        return build_tiny_tokenizer(bos=True, chat_template=LLAMA_CHAT_TEMPLATE)
    return build_tiny_tokenizer(bos=False, chat_template=QWEN_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def tiny():
    """``arch -> (LoadedModel, independent HF reference on the same attention kernel)``, built once per module."""
    made: dict = {}

    def make(arch: str):
        if arch not in made:
            lm = load_model((build(arch), tokenizer_for(arch)))
            ref = build(arch)
            ref.set_attn_implementation(lm.info["attention"])
            made[arch] = (lm, ref)
        return made[arch]

    return make


def hf_layer_outputs(hf, input_ids, **kwargs):
    """(output of every HF decoder layer from plain forward hooks, the HF model output)."""
    outs: dict[int, torch.Tensor] = {}
    handles = [layer.register_forward_hook(lambda mod, args, out, i=i: outs.__setitem__(
        i, (out[0] if isinstance(out, tuple) else out).detach().clone())) for i, layer in enumerate(hf.model.layers)]
    try:
        with torch.no_grad():
            result = hf(input_ids=input_ids, output_hidden_states=True, use_cache=False, **kwargs)
    finally:
        for h in handles:
            h.remove()
    assert sorted(outs) == list(range(len(hf.model.layers)))
    return [outs[i] for i in range(len(outs))], result


def max_diff(a, b) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item()


def assert_one_line(err: pytest.ExceptionInfo):
    message = str(err.value).strip()
    assert message and "\n" not in message, f"error message is not one line: {message!r}"


def slow_unless_main(archs):
    return [a if a in MAIN else pytest.param(a, marks=pytest.mark.slow) for a in archs]


# --------------------------------------------------------------------------------------------- 0. the table itself


def test_the_table_is_covered_and_consistent():
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES as bridged

    assert set(SUPPORTED_ARCHITECTURES) == set(TINY) | set(COVERED_BY_TEST_MODELS)  # every row has a tiny model
    assert set(SUPPORTED_ARCHITECTURES) <= set(bridged)
    assert not set(SUPPORTED_ARCHITECTURES) & set(REFUSED_ARCHITECTURES)
    assert len({f.family for f in SUPPORTED_ARCHITECTURES.values()}) == len(SUPPORTED_ARCHITECTURES)
    for reason in REFUSED_ARCHITECTURES.values():
        assert reason and "\n" not in reason


# ----------------------------------------------------------------------------------- 1. parity with HF decoder layers


@pytest.mark.parametrize("arch", list(TINY))
def test_resid_post_and_logits_equal_hf(arch, tiny):
    lm, ref = tiny(arch)
    family = SUPPORTED_ARCHITECTURES[arch]
    assert lm.architecture == family.family and lm.info["hf_architecture"] == arch
    assert lm.n_layers == ref.config.num_hidden_layers and lm.hf_model is not ref
    assert lm.info["prepend_bos"] == bool(family.bos)  # the tiny tokenizers add no BOS themselves
    hook_points = set(lm.bridge.hook_dict)
    for L in range(lm.n_layers):
        for point in HOOK_POINTS:
            assert lm.hook_name(L, point) in hook_points
    ids = torch.tensor([lm.encode(PROMPT)])

    with torch.no_grad():
        logits, cache = lm.bridge.run_with_cache(
            ids, names_filter=lambda name: name.endswith(("hook_resid_pre", "hook_resid_post")))
    layer_out, out = hf_layer_outputs(ref, ids)
    for L in range(lm.n_layers):  # every layer, the last one included
        assert max_diff(cache[lm.hook_name(L)], layer_out[L]) <= TOL, f"{arch} resid_post {L}"
        assert max_diff(layer_out[L], cache[lm.hook_name(L, "resid_pre")]) > 1e-2  # the check is not vacuous
    for L in range(lm.n_layers - 1):
        assert max_diff(out.hidden_states[L + 1], layer_out[L]) <= TOL  # HF agrees with its own hooks
    assert max_diff(logits, out.logits) <= TOL, f"{arch} logits"

    # a left-padded batch, positions counted over real tokens (as generate drives it)
    rows = [lm.encode(PROMPT), lm.encode(SHORT_PROMPT)]
    width = max(map(len, rows))
    ids = torch.tensor([[lm.tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits, cache = lm.bridge.run_with_cache(ids, attention_mask=mask, position_ids=positions,
                                                 names_filter=lambda name: name.endswith("hook_resid_post"))
    layer_out, out = hf_layer_outputs(ref, ids, attention_mask=mask, position_ids=positions)
    real = mask.bool()
    for L in range(lm.n_layers):
        assert max_diff(cache[lm.hook_name(L)][real], layer_out[L][real]) <= TOL, f"{arch} padded resid_post {L}"
    assert max_diff(logits[real], out.logits[real]) <= TOL, f"{arch} padded logits"


# ------------------------------------------------------------------------------------ 1b. the attention kernel


class _CountKernel(torch.overrides.TorchFunctionMode):
    """Counts calls of torch's fused attention kernel (what HF's sdpa integration runs)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _kernel_calls(lm, ids, **kwargs) -> tuple[int, torch.Tensor]:
    with _CountKernel() as counter, torch.no_grad():
        logits = lm.bridge(ids, **kwargs)
    return counter.calls, logits


@pytest.mark.parametrize("arch", list(TINY))
def test_the_backend_runs_the_fastest_kernel_the_architecture_allows(arch, tiny):
    """sdpa on every layer unless the table asks for eager; a hook on the attention pattern switches the hooked layer
    to the bridge's eager re-implementation for that call only, says so, and changes no output."""
    lm, ref = tiny(arch)
    ids = torch.tensor([lm.encode(PROMPT)])
    calls, logits = _kernel_calls(lm, ids)
    if SUPPORTED_ARCHITECTURES[arch].attn_implementation == "eager":
        assert lm.info["attention"] == "eager" and calls == 0
        return
    assert lm.info["attention"] == ref.config._attn_implementation == "sdpa"
    attention_layers = [L for L in range(lm.n_layers) if L not in state_layers(ref.config)]  # hybrids: fewer
    assert calls == len(attention_layers), f"{arch}: {calls} fused-attention calls for {attention_layers}"
    patterns = []
    fastpath._WARNED.discard("hook_pattern")  # said once per process and hook kind
    first = attention_layers[0]
    if not isinstance(lm.bridge.blocks[first].attn, fastpath.ModelKernelMixin):
        # OLMo Hybrid: TransformerLens gives it a plain AttentionBridge, which only wraps HF's module and never fires
        # its internal hooks; tellnorm's hook points (resid/attn_out/mlp_out) do not need them
        with lm.bridge.hooks(fwd_hooks=[(f"blocks.{first}.attn.hook_pattern", lambda p, hook: patterns.append(p))]):
            assert _kernel_calls(lm, ids)[0] == len(attention_layers) and patterns == []
        return
    with pytest.warns(UserWarning, match="hook_pattern needs the bridge's eager attention"), lm.bridge.hooks(
            fwd_hooks=[(f"blocks.{first}.attn.hook_pattern", lambda pattern, hook: patterns.append(pattern.detach()))]):
        hooked_calls, hooked_logits = _kernel_calls(lm, ids)
    assert hooked_calls == len(attention_layers) - 1  # that layer ran eager, the others kept sdpa
    assert len(patterns) == 1 and torch.allclose(patterns[0].sum(-1), torch.ones(()), atol=1e-5)
    assert max_diff(hooked_logits, logits) <= TOL
    assert _kernel_calls(lm, ids)[0] == len(attention_layers)  # for that call only


# --------------------------------------------------------------------------------------------- 2. batched generation


@pytest.mark.parametrize("arch", slow_unless_main(TINY))
def test_a_request_generates_the_same_alone_and_in_a_left_padded_batch(arch, tiny):
    lm, ref = tiny(arch)
    prompts = [lm.encode(p) for p in GEN_PROMPTS]
    sampling = SamplingConfig(max_new_tokens=8, ignore_eos=True)
    alone = [generate(lm, [p], sampling)[0].generated_ids for p in prompts]
    batched = [g.generated_ids for g in generate(lm, prompts, sampling, batch_size=len(prompts))]
    assert batched == alone
    for prompt, tokens in zip(prompts, alone):  # independent: HF's own greedy choice over the finished sequence
        with torch.no_grad():
            logits = ref(input_ids=torch.tensor([prompt + tokens]), use_cache=False).logits[0]
        assert logits[len(prompt) - 1:-1].argmax(-1).tolist() == tokens


# ------------------------------------------------------------------------------------------- 3. ALRR's extra pass


def truncated_forward(model, layer: int, ids, position: int, y):
    """Reference: decoder layer ``layer``'s output at ``position`` when ``ids[:position + 1]`` runs alone (no padding,
    no cache) with its layer input at ``position`` replaced by ``y``."""
    out = {}

    def replace(x, hook):
        x = x.clone()
        x[0, position] = y
        return x

    def grab(x, hook):
        out["x"] = x[0, position].detach().clone()
        return x

    hooks = [(model.hook_name(layer, "resid_pre"), replace), (model.hook_name(layer), grab)]
    with model.bridge.hooks(fwd_hooks=hooks), torch.no_grad():
        model.hf_model(input_ids=torch.tensor([list(ids[:position + 1])]), use_cache=False)
    return out["x"]


def alrr_layers(model) -> list[int]:
    """Layers 0 and 1 (0 is sliding where the tiny config has sliding layers) and the first full-attention layer."""
    types = getattr(model.hf_model.config, "layer_types", None) or []
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    return sorted({0, 1, *full[:1]})


ALRR_OK = [a for a in TINY if SUPPORTED_ARCHITECTURES[a].alrr is None]
ALRR_REFUSED = [a for a in TINY if SUPPORTED_ARCHITECTURES[a].alrr is not None]


@pytest.mark.parametrize("arch", slow_unless_main(ALRR_OK))
def test_alrr_extra_pass_equals_a_hooked_forward_of_the_truncated_sequence(arch, tiny):
    lm, _ = tiny(arch)
    prompts = [lm.encode(p) for p in GEN_PROMPTS]
    probe = ExtraPassProbe(lm, alrr_layers(lm), steps=(0, 5))  # prefill (many tokens a row) and a late decode step
    gens = generate(lm, prompts, SamplingConfig(max_new_tokens=6, ignore_eos=True), observers=[probe])
    assert len(probe.calls) >= 2 * len(probe.layers) * len(prompts)
    for layer, rid, position, y, out, normal, post in probe.calls:
        ref = truncated_forward(lm, layer, gens[rid].ids, position, y)
        assert (out - ref).norm() <= TOL * ref.norm(), (arch, layer, rid, position)
        assert (normal - post).norm() <= TOL * post.norm()  # its own input: the extra pass is the normal pass
        assert (out - post).norm() > 1e-3 * post.norm()  # y really changed the output
    for before, after in probe.cache_checks:  # the cache is never written
        assert len(before) == len(after)
        for (k0, v0), (k1, v1) in zip(before, after):
            assert torch.equal(k0, k1) and torch.equal(v0, v1)


@pytest.mark.parametrize("arch", slow_unless_main(ALRR_REFUSED))
def test_alrr_is_refused_in_one_line_where_the_layer_cannot_rerun(arch, tiny):
    lm, _ = tiny(arch)
    probe = ExtraPassProbe(lm, [1], steps=(1,))
    with pytest.raises(TellnormError, match=f"ALRR's extra pass is not supported for {arch} because") as err:
        generate(lm, [lm.encode(PROMPT)], SamplingConfig(max_new_tokens=3, ignore_eos=True), observers=[probe])
    assert_one_line(err)
    assert active_hook_count(lm) == 0
    # building ALRR for it fails the same way, before any generation
    from tellnorm.techniques import ALRR, ALRRConfig, threshold_for

    with pytest.raises(TellnormError, match=f"ALRR's extra pass is not supported for {arch} because"):
        ALRR(lm, threshold_for("fixed", fixed={1: 1.0}), ALRRConfig(layers=(1,)))
    # tracing and generation still work on it
    assert len(generate(lm, [lm.encode(PROMPT)], SamplingConfig(max_new_tokens=2))[0].generated_ids) >= 1


@pytest.mark.parametrize("arch", list(TINY))
def test_the_logit_lens_at_the_last_layer_is_the_models_output(arch, tiny):
    """tellnorm.studies.correlation's logit lens applies the family's own post-unembedding steps (soft caps,
    scaling)."""
    from tellnorm.signals import lens_logits

    lm, ref = tiny(arch)
    ids = torch.tensor([lm.encode(PROMPT)])
    last = lm.hook_name(lm.n_layers - 1)
    with torch.no_grad():
        _, cache = lm.bridge.run_with_cache(ids, names_filter=lambda name: name == last)
        assert max_diff(lens_logits(lm, cache[last]), ref(input_ids=ids).logits) <= TOL, arch


# ---------------------------------------------------------------------------------- 4. BOS rules, loading a folder


def test_bos_follows_the_family():
    from tokenizers import processors

    gemma = load_model((build("Gemma2ForCausalLM"), tokenizer_for("Gemma2ForCausalLM")))
    bos = gemma.tokenizer.bos_token_id
    raw = gemma.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert gemma.encode(PROMPT) == [bos] + raw == gemma.encode(gemma.tokenizer.bos_token + " " + PROMPT)
    chat = gemma.encode(gemma.chat_prompt(PROMPT))
    assert chat[0] == bos and chat.count(bos) == 1  # the template writes it: not doubled
    # gpt-oss (harmony) never gets one, even from a tokenizer that has a BOS token
    oss = load_model((build("GptOssForCausalLM"), build_tiny_tokenizer(bos=True)))
    assert not oss.info["prepend_bos"] and oss.encode(PROMPT) == raw
    # bos=None families (Phi-3/4, OLMo, SmolLM3, ...) do what their tokenizer does
    adds = build_tiny_tokenizer(bos=True)
    adds._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                                   special_tokens=[("<s>", adds.bos_token_id)])
    assert load_model((build("Phi3ForCausalLM"), adds)).encode(PROMPT) == [bos] + raw
    assert load_model((build("Phi3ForCausalLM"), build_tiny_tokenizer(bos=True))).encode(PROMPT) == raw


@pytest.mark.parametrize("arch", ["Gemma2ForCausalLM", "DeepseekV3ForCausalLM"])
def test_a_saved_folder_loads_with_the_familys_attention(arch, tmp_path):
    """From a folder HF picks sdpa; these families need eager (Gemma 2's softcap, the bridge's MLA mask)."""
    build(arch).save_pretrained(tmp_path)
    tokenizer_for(arch).save_pretrained(tmp_path)
    lm = load_model(tmp_path)
    assert lm.source == "folder" and lm.hf_model.config._attn_implementation == "eager"
    ref = build(arch)
    ref.set_attn_implementation("eager")
    ids = torch.tensor([lm.encode(PROMPT)])
    with torch.no_grad():
        logits, cache = lm.bridge.run_with_cache(ids, names_filter=lambda name: name.endswith("hook_resid_post"))
    layer_out, out = hf_layer_outputs(ref, ids)
    assert max_diff(cache[lm.hook_name(lm.n_layers - 1)], layer_out[-1]) <= TOL
    assert max_diff(logits, out.logits) <= TOL


# ------------------------------------------------------------------------------------- 5. refusals: one line, why


@pytest.mark.parametrize("arch, message", [
    ("CohereForCausalLM", "not supported because TransformerLens's bridge does not reproduce"),
    ("Gemma3ForConditionalGeneration", "not supported because it is the multimodal Gemma 3 wrapper"),
    ("FalconH1ForCausalLM", "not supported because its state-space/recurrent layers keep a recurrent state"),
    ("Lfm2ForCausalLM", "not supported because its short-convolution layers keep a recurrent state"),
    ("Llama4ForCausalLM", "not supported: TransformerLens's bridge knows it, but tellnorm has not checked"),
    ("NoSuchModelForCausalLM", "not supported: TransformerLens's bridge does not know it"),
])
def test_unsupported_folders_fail_in_one_line_before_loading(arch, message, tmp_path, tiny_model_dir):
    folder = Path(shutil.copytree(tiny_model_dir("qwen3"), tmp_path / "model"))
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = [arch]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(TellnormError, match=f"{arch}.*{message}") as err:
        load_model(folder)
    assert_one_line(err)
