"""tellnorm.thinking: each registry entry renders the documented thinking / non-thinking prompts, families are
detected from names and templates, no-switch families pair two models, and bad input fails in one line.

Every chat template here is a minimal one written for this test from the family's documented prompt format (the
registry's ``documented_at``), never a copy of the family's own file; every expected string is written out by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tellnorm.backends.hf import LoadedModel
from tellnorm.errors import TellnormError
from tellnorm.thinking import (
    KINDS,
    REGISTRY_FILE,
    UNKNOWN,
    ContrastPair,
    _prefill,
    contrast_models,
    families,
    get_family,
    load_registry,
    require_contrast,
    switch_for,
)

TEXT = "w1 w2 w3"
WORDS = ("system", "user", "assistant") + tuple(f"w{i}" for i in range(20))

# --- minimal templates in each family's documented format ------------------------------------------------------

CHATML_TURNS = (
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
)
# Qwen3 model card: enable_thinking=False -> the generation prompt ends in an empty think block.
QWEN3 = (CHATML_TURNS + "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
         "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
         "{%- endif %}{%- endif %}")
CHATML = CHATML_TURNS + "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
# Qwen3.5: thinking by default, and its template opens the think block itself (enable_thinking=false closes it).
QWEN3_5 = (CHATML_TURNS + "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
           "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
           "{%- else %}{{- '<think>\\n' }}{%- endif %}{%- endif %}")
# Qwen3 Thinking-2507: thinking only, the template opens the think block.
QWEN3_THINKING_2507 = (CHATML_TURNS
                       + "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}")
# OLMo 3 Think: chatml, the think token in the generation prompt; Instruct: plain chatml.
OLMO3_THINK = CHATML_TURNS + "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>' }}{%- endif %}"
# SmolLM3 card: "/think" or "/no_think" in the system prompt picks the reasoning mode (default: think).
SMOLLM3 = (
    "{%- set ns = namespace(mode='/think', rest='') %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if '/no_think' in messages[0]['content'] %}{%- set ns.mode = '/no_think' %}"
    "{%- elif '/think' in messages[0]['content'] %}{%- set ns.mode = '/think' %}{%- endif %}"
    "{%- set ns.rest = messages[0]['content'].replace('/no_think', '').replace('/think', '').strip() %}"
    "{%- endif %}"
    "{{- '<|im_start|>system\\nReasoning Mode: ' + ns.mode + '\\n' + ns.rest + '<|im_end|>\\n' }}"
    "{%- for m in messages if m['role'] != 'system' %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if ns.mode == '/no_think' %}{{- '<think>\\n\\n</think>\\n' }}{%- endif %}{%- endif %}"
)
# gpt-oss (harmony): the system message carries "Reasoning: low|medium|high", medium by default.
GPT_OSS = (
    "{%- if reasoning_effort is not defined %}{%- set reasoning_effort = 'medium' %}{%- endif %}"
    "{{- '<|start|>system<|message|>Reasoning: ' + reasoning_effort + '<|end|>' }}"
    "{%- for m in messages %}"
    "{{- '<|start|>' + m['role'] + '<|message|>' + m['content'] + '<|end|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start|>assistant' }}{%- endif %}"
)
# DeepSeek-R1 distills: BOS, <｜User｜>, <｜Assistant｜>; later templates also open the think block ("<think>\n").
DS_BOS = "<｜begin▁of▁sentence｜>"
DEEPSEEK_R1 = (
    "{{- bos_token }}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}{{- '<｜User｜>' + m['content'] }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<｜Assistant｜>' }}{%- endif %}"
)
DEEPSEEK_R1_THINK_OPENED = DEEPSEEK_R1.replace("'<｜Assistant｜>'", "'<｜Assistant｜><think>\\n'")


def tiny_tokenizer(template: str | None, extra: tuple[str, ...] = (), bos: str | None = None):
    """A word-level fast tokenizer over a small vocabulary with ``template`` as its chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ("<unk>", "<pad>") + ((bos,) if bos else ()) + tuple(extra)
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = {"bos_token": bos} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                   chat_template=template, **kwargs)


@dataclass
class Fake:
    """What switch_for reads from a model: a name, a tokenizer, HF architectures."""

    name: str
    tokenizer: object
    architectures: list = field(default_factory=list)
    thinking_family: str | None = None


def fake_loaded(tokenizer, name: str, *, thinking_family: str | None = None) -> LoadedModel:
    return LoadedModel(bridge=None, tokenizer=tokenizer, name=name, architecture="qwen3", n_layers=2, d_model=8,
                       max_positions=64, source="memory", thinking_family=thinking_family)


def one_line(err) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    return msg


# --- each entry: thinking / non-thinking prompts -----------------------------------------------------------------

IM = "<|im_start|>user\nw1 w2 w3<|im_end|>\n<|im_start|>assistant\n"
HARMONY = "<|start|>system<|message|>Reasoning: {}<|end|><|start|>user<|message|>w1 w2 w3<|end|><|start|>assistant"
DS = DS_BOS + "<｜User｜>w1 w2 w3<｜Assistant｜>"
SMOL = "<|im_start|>system\nReasoning Mode: {}\n<|im_end|>\n" + IM

# family -> (hub name, architecture, template, bos, expected thinking prompt, expected non-thinking prompt)
SWITCH_CASES = {
    "qwen3": ("Qwen/Qwen3-8B", "Qwen3ForCausalLM", QWEN3, None, IM, IM + "<think>\n\n</think>\n\n"),
    "smollm3": ("HuggingFaceTB/SmolLM3-3B", "SmolLM3ForCausalLM", SMOLLM3, None,
                SMOL.format("/think"), SMOL.format("/no_think") + "<think>\n\n</think>\n"),
    "gpt-oss": ("openai/gpt-oss-20b", "GptOssForCausalLM", GPT_OSS, None,
                HARMONY.format("high"), HARMONY.format("low")),
    "deepseek-r1-distill": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "Qwen2ForCausalLM", DEEPSEEK_R1, DS_BOS,
                            DS + "<think>\n", DS + "<think>\n\n</think>\n\n"),
}
# no-switch families: family -> (hub name, architecture, template, expected prompt in its only mode)
PAIR_CASES = {
    "olmo3-think": ("allenai/Olmo-3-7B-Think", "Olmo3ForCausalLM", OLMO3_THINK, IM + "<think>"),
    "olmo3-instruct": ("allenai/Olmo-3-7B-Instruct", "Olmo3ForCausalLM", CHATML, IM),
    "qwen3-2507-thinking": ("Qwen/Qwen3-4B-Thinking-2507", "Qwen3ForCausalLM", QWEN3_THINKING_2507, IM + "<think>\n"),
    "qwen3-2507-instruct": ("Qwen/Qwen3-4B-Instruct-2507", "Qwen3ForCausalLM", CHATML, IM),
}


def test_every_registry_family_is_exercised_here():
    assert set(SWITCH_CASES) | set(PAIR_CASES) == set(families())
    for entry in load_registry():
        assert entry.kind in KINDS
        assert entry.documented_at.startswith("https://"), entry.family
        assert entry.match.get("names"), entry.family


# the same family's switch on other members: name, architecture, template, thinking prompt, non-thinking prompt
MEMBER_CASES = [
    ("Qwen/Qwen3.5-9B", "Qwen3_5ForConditionalGeneration", QWEN3_5, IM + "<think>\n", IM + "<think>\n\n</think>\n\n"),
    ("Qwen/Qwen3.5-35B-A3B", "Qwen3_5MoeForConditionalGeneration", QWEN3_5, IM + "<think>\n",
     IM + "<think>\n\n</think>\n\n"),
    ("/models/qwen3.5-2b", "Qwen3_5ForCausalLM", QWEN3_5, IM + "<think>\n", IM + "<think>\n\n</think>\n\n"),
]


@pytest.mark.parametrize("name, arch, template, on, off", MEMBER_CASES)
def test_qwen3_5_takes_the_qwen3_switch(name, arch, template, on, off):
    model = Fake(name, tiny_tokenizer(template), [arch])
    switch = switch_for(model)
    assert (switch.family, switch.detected_by) == ("qwen3", "name")
    assert switch.contrast(model.tokenizer, TEXT) == (on, off)
    lm = fake_loaded(model.tokenizer, name)
    assert (lm.chat_prompt(TEXT), lm.chat_prompt(TEXT, thinking=False)) == (on, off)


@pytest.mark.parametrize("family", sorted(SWITCH_CASES))
def test_switch_renders_the_documented_prompts(family):
    name, arch, template, bos, on, off = SWITCH_CASES[family]
    model = Fake(name, tiny_tokenizer(template, bos=bos), [arch])
    switch = switch_for(model)
    assert (switch.family, switch.detected_by, switch.has_switch) == (family, "name", True)
    assert switch.render(model.tokenizer, TEXT, True) == on
    assert switch.render(model.tokenizer, TEXT, False) == off
    assert switch.contrast(model.tokenizer, TEXT) == (on, off)
    # the same through LoadedModel.chat_prompt
    lm = fake_loaded(model.tokenizer, name)
    assert (lm.chat_prompt(TEXT), lm.chat_prompt(TEXT, thinking=False)) == (on, off)


def test_deepseek_prefill_when_the_template_already_opens_the_think_block():
    tok = tiny_tokenizer(DEEPSEEK_R1_THINK_OPENED, bos=DS_BOS)
    switch = switch_for(Fake("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", tok, ["LlamaForCausalLM"]))
    assert switch.family == "deepseek-r1-distill"
    assert switch.render(tok, TEXT, True) == DS + "<think>\n"  # not doubled
    assert switch.render(tok, TEXT, False) == DS + "<think>\n\n</think>\n\n"


def test_prefill_appends_only_what_is_missing():
    full, opener = "<think>\n\n</think>\n\n", "<think>\n"
    assert _prefill("A", full, opener=opener) == "A" + full
    assert _prefill("A<think>\n", full, opener=opener) == "A" + full
    assert _prefill("A" + full, full, opener=opener) == "A" + full
    assert _prefill("A", opener, opener=opener) == "A<think>\n"


@pytest.mark.parametrize("family", sorted(PAIR_CASES))
def test_no_switch_family_renders_only_its_own_mode(family):
    name, arch, template, expected = PAIR_CASES[family]
    model = Fake(name, tiny_tokenizer(template), [arch])
    switch = switch_for(model)
    assert (switch.family, switch.kind, switch.has_switch) == (family, "none", False)
    own = switch.always == "thinking"
    assert switch.render(model.tokenizer, TEXT, own) == expected
    with pytest.raises(TellnormError, match="no thinking switch") as err:
        switch.render(model.tokenizer, TEXT, not own)
    assert switch.pair in one_line(err) and "contrast_models" in one_line(err)
    with pytest.raises(TellnormError, match="no thinking switch") as err:
        require_contrast(model)
    one_line(err)


@pytest.mark.parametrize("think, instruct", [("olmo3-think", "olmo3-instruct"),
                                             ("qwen3-2507-thinking", "qwen3-2507-instruct")])
def test_contrast_pair_of_two_models(think, instruct):
    t_name, t_arch, t_template, t_expected = PAIR_CASES[think]
    i_name, i_arch, i_template, i_expected = PAIR_CASES[instruct]
    extra = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")  # one vocabulary, two templates
    thinking_model = Fake(t_name, tiny_tokenizer(t_template, extra), [t_arch])
    instruct_model = Fake(i_name, tiny_tokenizer(i_template, extra), [i_arch])
    assert get_family(think).pair == instruct and get_family(instruct).pair == think
    pair = contrast_models(thinking_model, instruct_model)
    assert isinstance(pair, ContrastPair) and pair.same_vocabulary and pair.vocabulary_note == ""
    assert pair.model_for(True) is thinking_model and pair.model_for(False) is instruct_model
    assert pair.prompts(TEXT) == (t_expected, i_expected)
    assert pair.chat_prompt(TEXT, thinking=False) == i_expected
    # the wrong way round: one clear line each
    with pytest.raises(TellnormError, match="never thinks") as err:
        contrast_models(instruct_model, thinking_model)
    one_line(err)
    with pytest.raises(TellnormError, match="always thinks") as err:
        contrast_models(thinking_model, thinking_model)
    one_line(err)


def test_contrast_pair_checks_the_vocabulary():
    think = Fake("allenai/Olmo-3-7B-Think", tiny_tokenizer(OLMO3_THINK, ("<x>",)), ["Olmo3ForCausalLM"])
    instruct = Fake("allenai/Olmo-3-7B-Instruct", tiny_tokenizer(CHATML, ("<y>", "<z>")), ["Olmo3ForCausalLM"])
    with pytest.raises(TellnormError, match="different vocabularies") as err:
        contrast_models(think, instruct)
    assert "allow_different_vocabulary" in one_line(err)
    pair = contrast_models(think, instruct, allow_different_vocabulary=True)
    assert not pair.same_vocabulary and "different vocabularies" in pair.vocabulary_note
    assert pair.prompts(TEXT) == (IM + "<think>", IM)


def test_a_model_with_a_switch_can_pair_with_a_no_switch_model():
    qwen = Fake("Qwen/Qwen3-4B", tiny_tokenizer(QWEN3), ["Qwen3ForCausalLM"])
    instruct = Fake("Qwen/Qwen3-4B-Instruct-2507", tiny_tokenizer(CHATML), ["Qwen3ForCausalLM"])
    assert contrast_models(qwen, instruct).prompts(TEXT) == (IM, IM)  # thinking Qwen3 vs an Instruct-2507


# --- detection ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, archs, expected", [
    ("Qwen/Qwen3-0.6B", ["Qwen3ForCausalLM"], "qwen3"),
    ("Qwen/Qwen3-30B-A3B", ["Qwen3MoeForCausalLM"], "qwen3"),
    ("Qwen/Qwen3.5-27B", ["Qwen3_5ForConditionalGeneration"], "qwen3"),
    ("Qwen/Qwen3-30B-A3B-Thinking-2507", ["Qwen3MoeForCausalLM"], "qwen3-2507-thinking"),
    ("Qwen/Qwen3-235B-A22B-Instruct-2507", ["Qwen3MoeForCausalLM"], "qwen3-2507-instruct"),
    ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", ["LlamaForCausalLM"], "deepseek-r1-distill"),
    ("deepseek-ai/DeepSeek-R1-0528-Qwen3-8B", ["Qwen3ForCausalLM"], "deepseek-r1-distill"),
    ("HuggingFaceTB/SmolLM3-3B", [], "smollm3"),  # architecture unknown: the name decides
    ("openai/gpt-oss-120b", ["GptOssForCausalLM"], "gpt-oss"),
    ("allenai/Olmo-3-32B-Think", ["Olmo3ForCausalLM"], "olmo3-think"),
    ("allenai/Olmo-3.1-32B-Instruct", ["Olmo3ForCausalLM"], "olmo3-instruct"),
    ("/models/qwen3-8b", ["Qwen3ForCausalLM"], "qwen3"),  # a folder: its last component, any case
    ("/hf/hub/models--Qwen--Qwen3-8B/snapshots/0123abc", ["Qwen3ForCausalLM"], "qwen3"),  # an HF cache path
    ("/runs/Qwen3-experiments/llama-tiny", ["LlamaForCausalLM"], None),  # a parent folder does not count
    ("Qwen/Qwen3-8B", ["LlamaForCausalLM"], None),  # the name says Qwen3, the architecture does not
    ("Qwen/Qwen3-VL-8B-Thinking", ["Qwen3VLForConditionalGeneration"], None),
    ("meta-llama/Llama-3.1-8B-Instruct", ["LlamaForCausalLM"], None),
])
def test_family_from_name_and_architecture(name, archs, expected):
    switch = switch_for(Fake(name, tiny_tokenizer(CHATML), archs))
    assert switch.family == expected
    assert switch.detected_by == ("name" if expected else "")
    if expected is None:
        assert switch.kind == UNKNOWN


@pytest.mark.parametrize("template, expected", [(QWEN3, "qwen3"), (GPT_OSS, "gpt-oss"), (SMOLLM3, "smollm3"),
                                                (DEEPSEEK_R1, None), (OLMO3_THINK, None), (CHATML, None)])
def test_family_from_template_markers(template, expected):
    switch = switch_for(Fake("/data/my-model", tiny_tokenizer(template, bos=DS_BOS)))
    assert (switch.family, switch.detected_by) == (expected, "template" if expected else "")


def test_explicit_family_overrides_detection():
    tok = tiny_tokenizer(DEEPSEEK_R1, bos=DS_BOS)
    assert switch_for(Fake("/data/r1-7b", tok)).kind == UNKNOWN  # not detectable from this template
    switch = switch_for(Fake("/data/r1-7b", tok), family="deepseek-r1-distill")
    assert (switch.family, switch.detected_by) == ("deepseek-r1-distill", "family")
    lm = fake_loaded(tok, "/data/r1-7b", thinking_family="deepseek-r1-distill")
    assert lm.chat_prompt(TEXT, thinking=False) == DS + "<think>\n\n</think>\n\n"
    with pytest.raises(TellnormError, match="unknown thinking family 'qwen4'") as err:
        switch_for(Fake("Qwen/Qwen3-8B", tok), family="qwen4")
    assert "qwen3" in one_line(err)


# --- the organism and tellnorm's tiny test models keep their prompts ---------------------------------------------


def _reference(tok, thinking: bool) -> str:
    """What chat_prompt returned before the registry: Qwen3's enable_thinking passed to the template."""
    return tok.apply_chat_template([{"role": "user", "content": TEXT}], tokenize=False, add_generation_prompt=True,
                                   enable_thinking=thinking)


def test_the_organism_prompts_are_unchanged():
    from transformers import AutoTokenizer

    from tellnorm.organism.paths import DEFAULT_ORGANISM_DIR
    from tellnorm.organism.tokenizer import build_tokenizer

    toks = [build_tokenizer()]
    if (DEFAULT_ORGANISM_DIR / "tokenizer.json").is_file():
        toks.append(AutoTokenizer.from_pretrained(DEFAULT_ORGANISM_DIR, local_files_only=True))
    for tok in toks:
        lm = fake_loaded(tok, "organism")
        assert switch_for(lm).family == "qwen3"
        text = "a = 1 ; b = a + 2 ; what is b ?"
        for thinking in (True, False):
            expected = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=thinking)
            assert lm.chat_prompt(text, thinking=thinking) == expected
        assert lm.chat_prompt(text, False) == lm.chat_prompt(text, True) + "<think>\n\n</think>\n\n"


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_tiny_test_models_keep_their_prompts(arch, tmp_path):
    from conftest import build_tiny_tokenizer_for

    tok = build_tiny_tokenizer_for(arch)
    lm = fake_loaded(tok, str(tmp_path / f"tiny-{arch}-3l-s0"))
    assert switch_for(lm).family == "qwen3"  # by name (qwen3) or by the enable_thinking template (qwen2, llama)
    for thinking in (True, False):
        assert lm.chat_prompt(TEXT, thinking=thinking) == _reference(tok, thinking)


# --- bad input: one line each ------------------------------------------------------------------------------------


def test_unknown_family_has_no_contrast():
    tok = tiny_tokenizer(CHATML)
    lm = fake_loaded(tok, "meta-llama/Llama-3.1-8B-Instruct")
    assert lm.chat_prompt(TEXT) == IM  # its own default prompt
    with pytest.raises(TellnormError, match="no known thinking switch") as err:
        lm.chat_prompt(TEXT, thinking=False)
    msg = one_line(err)
    assert "Llama-3.1-8B-Instruct" in msg and "thinking_family" in msg and "contrast_models" in msg
    with pytest.raises(TellnormError, match="no known thinking switch") as err:
        require_contrast(lm)
    one_line(err)
    with pytest.raises(TellnormError, match="no known thinking switch") as err:  # nor as half of a pair
        contrast_models(Fake("allenai/Olmo-3-7B-Think", tok, ["Olmo3ForCausalLM"]), lm)
    one_line(err)


def test_a_switch_the_template_never_reads_is_refused():
    # named Qwen3 (so the enable_thinking switch), but its template ignores enable_thinking (e.g. Qwen3-Coder)
    model = Fake("Qwen/Qwen3-Coder-30B-A3B-Instruct", tiny_tokenizer(CHATML), ["Qwen3MoeForCausalLM"])
    for thinking in (True, False):
        with pytest.raises(TellnormError, match="never reads 'enable_thinking'") as err:
            switch_for(model).render(model.tokenizer, TEXT, thinking)
        one_line(err)
    # mentioned, but doing nothing: the contrast check sees identical prompts
    tok = tiny_tokenizer("{#- enable_thinking is not used -#}" + CHATML)
    with pytest.raises(TellnormError, match="identical") as err:
        switch_for(Fake("Qwen/Qwen3-8B", tok)).contrast(tok, TEXT)
    one_line(err)


def test_base_model_without_template():
    lm = fake_loaded(tiny_tokenizer(None), "Qwen/Qwen3-8B-Base")
    assert lm.chat_prompt(TEXT) == TEXT
    with pytest.raises(TellnormError, match="no chat template") as err:
        lm.chat_prompt(TEXT, thinking=False)
    one_line(err)


def test_template_that_raises_and_empty_text():
    tok = tiny_tokenizer("{{ raise_exception('only\\ntwo roles') }}" + QWEN3)
    with pytest.raises(TellnormError, match="failed to render") as err:
        switch_for(Fake("Qwen/Qwen3-8B", tok)).render(tok, TEXT, True)
    one_line(err)
    for text in ("", "  \n"):
        with pytest.raises(TellnormError, match="empty prompt") as err:
            switch_for(Fake("Qwen/Qwen3-8B", tok)).render(tok, text, True)
        one_line(err)


GOOD_ENTRY = """
  - family: fam
    match: {{names: [fam]}}
    switch: {switch}
    documented_at: https://example.org/fam
"""


@pytest.mark.parametrize("body, match", [
    (GOOD_ENTRY.format(switch="{kind: magic_word, thinking: a, non_thinking: b}"), "unknown switch kind 'magic_word'"),
    (GOOD_ENTRY.format(switch="{thinking: a, non_thinking: b}"), "unknown switch kind None"),
    (GOOD_ENTRY.format(switch="{kind: template_kwarg, thinking: true, non_thinking: false}"), "lacks kwarg"),
    (GOOD_ENTRY.format(switch="{kind: system_flag, thinking: /t, non_thinking: /t}"), "same value"),
    (GOOD_ENTRY.format(switch="{kind: none, always: sometimes}"), "'always' must be"),
    (GOOD_ENTRY.format(switch="{kind: none, always: thinking, pair: nobody}"), "unknown family 'nobody'"),
    (GOOD_ENTRY.format(switch="{kind: system_flag, thinking: /t, non_thinking: /n}").replace(
        "documented_at: https://example.org/fam", ""), "documented_at"),
    (GOOD_ENTRY.format(switch="{kind: system_flag, thinking: /t, non_thinking: /n}").replace("[fam]", "['(']"),
     "bad name pattern"),
    (GOOD_ENTRY.format(switch="{kind: system_flag, thinking: /t, non_thinking: /n}") * 2, "more than once"),
    ("\n  - family: [unclosed", "not valid YAML"),
    ("", "non-empty 'families'"),
])
def test_bad_registry_entries(tmp_path, body, match):
    path = tmp_path / "switches.yaml"
    path.write_text("schema: 1\nfamilies:" + body)
    with pytest.raises(TellnormError, match=match) as err:
        load_registry(path)
    assert str(path) in one_line(err)


def test_a_custom_registry_is_used_for_detection(tmp_path):
    path = tmp_path / "switches.yaml"
    path.write_text("schema: 1\nfamilies:" + GOOD_ENTRY.format(
        switch="{kind: system_flag, thinking: /t, non_thinking: /n}"))
    switch = switch_for(Fake("org/fam-1b", tiny_tokenizer(CHATML)), registry=path)
    assert (switch.family, switch.kind, switch.thinking, switch.non_thinking) == ("fam", "system_flag", "/t", "/n")


def test_registry_ships_with_the_package():
    from importlib.resources import files

    assert files("tellnorm").joinpath(REGISTRY_FILE).is_file()
