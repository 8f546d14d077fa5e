"""Thinking vs non-thinking prompts per model family, from a registry shipped as data.

``tellnorm/data/thinking_switches.yaml`` says, for each family, which switch gives its thinking and non-thinking
prompts: a chat-template kwarg (Qwen3 / Qwen3.5 ``enable_thinking``), a reasoning effort (gpt-oss), a system-prompt
flag (SmolLM3 ``/think`` / ``/no_think``), a pre-filled empty think block (DeepSeek-R1 distills, which always think),
or no switch at all (OLMo 3 Think vs Instruct, Qwen3 Thinking-2507 vs Instruct-2507): then a contrast needs two
models, :func:`contrast_models`. The model's own chat template always renders the prompt.

* :func:`switch_for` ``(model, family=None) -> ThinkingSwitch``: the switch of a model (detected, or named).
* :meth:`ThinkingSwitch.render` ``(tokenizer, user_text, thinking) -> str``: the chat prompt with the generation
  prompt, in one mode; a mode the model cannot give raises one :class:`TellnormError` line.
* :func:`contrast_models` ``(thinking_model, non_thinking_model) -> ContrastPair``: two models, one per mode.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from tellnorm.errors import TellnormError

REGISTRY_FILE = "data/thinking_switches.yaml"
KINDS = ("template_kwarg", "reasoning_effort", "system_flag", "prefill_empty_think", "none")
UNKNOWN = "unknown"  # the kind of a model no entry matches
_MODES = ("thinking", "non_thinking")


def _mode(thinking: bool) -> str:
    return "thinking" if thinking else "non_thinking"


@dataclass(frozen=True)
class ThinkingSwitch:
    """One family's switch (a registry entry), as resolved for one model (``model_name``, ``detected_by``)."""

    family: str | None  # None: no entry matched
    kind: str  # one of KINDS, or UNKNOWN
    thinking: Any = None  # the value / flag / prefill for thinking mode
    non_thinking: Any = None
    kwarg: str | None = None  # template_kwarg and reasoning_effort
    always: str | None = None  # kind none: "thinking" or "non_thinking"
    pair: str | None = None  # kind none: the family to contrast with
    display: str = ""
    documented_at: str = ""
    example: str = ""
    notes: str = ""
    match: dict = field(default_factory=dict, compare=False, repr=False)
    model_name: str = ""  # the model this was resolved for (messages only)
    detected_by: str = ""  # "family", "name", "template" or "" (unknown)

    @property
    def has_switch(self) -> bool:
        """True when one model gives both modes."""
        return self.kind not in ("none", UNKNOWN)

    def supports(self, thinking: bool) -> bool:
        """Whether this model can give a prompt in the asked mode."""
        if self.kind == UNKNOWN:
            return thinking  # the model's own default; nothing says how to switch thinking off
        if self.kind == "none":
            return self.always == _mode(thinking)
        return True

    def _who(self) -> str:
        return self.model_name or self.display or self.family or "this model"

    def _refuse(self, thinking: bool) -> TellnormError:
        who = self._who()
        if self.kind == "none":
            mode = "thinking" if thinking else "non-thinking"
            other = f" (family {self.pair})" if self.pair else ""
            return TellnormError(
                f"{who} is {self.display or self.family}, which has no thinking switch and gives no {mode} prompt: "
                f"a contrast needs a second model{other}; pair them with tellnorm.thinking.contrast_models("
                f"thinking_model, non_thinking_model)")
        return TellnormError(
            f"{who}: no known thinking switch (no family in tellnorm/{REGISTRY_FILE} matches), so it has no "
            f"non-thinking prompt to contrast; name its family (LoadedModel.thinking_family or family=: one of "
            f"{', '.join(families())}) or pair two models with tellnorm.thinking.contrast_models")

    def render(self, tokenizer: Any, user_text: str, thinking: bool = True) -> str:
        """The chat-formatted prompt of ``user_text`` with the generation prompt, in the asked mode."""
        if not user_text or not user_text.strip():
            raise TellnormError("empty prompt: give the model some text to respond to")
        template = template_text(tokenizer)
        if not template:
            if thinking:
                return user_text  # base models without a template see the raw text
            raise TellnormError(f"{self._who()} has no chat template (a base model?): it has no non-thinking "
                                "prompt to contrast; use a chat model, or pair two models with contrast_models")
        if not self.supports(thinking):
            raise self._refuse(thinking)
        messages = [{"role": "user", "content": user_text}]
        value = self.thinking if thinking else self.non_thinking
        if self.kind in ("template_kwarg", "reasoning_effort"):
            if self.kwarg not in template:
                raise TellnormError(
                    f"{self._who()}: its chat template never reads {self.kwarg!r}, the {self.display or self.family} "
                    f"switch, so both modes would give the same prompt; name the right family (family=) or pair "
                    "two models with contrast_models")
            return _apply(tokenizer, messages, self._who(), **{self.kwarg: value})
        if self.kind == "system_flag":
            return _apply(tokenizer, [{"role": "system", "content": value}] + messages, self._who())
        text = _apply(tokenizer, messages, self._who())
        if self.kind == "prefill_empty_think":
            return _prefill(text, value, opener=self.thinking)
        return text  # none (in its own mode) and unknown (thinking): the template as it is

    def render_messages(self, tokenizer: Any, messages: list[dict], thinking: bool = True, *,
                        add_generation_prompt: bool = True) -> str:
        """A whole chat history rendered in the asked mode (lm-eval's multi-turn and few-shot prompts): the switch's
        kwarg, a system flag merged into an existing system message, or the pre-filled think block.
        ``add_generation_prompt=False`` continues the final message instead."""
        if not self.supports(thinking):
            raise self._refuse(thinking)
        value = self.thinking if thinking else self.non_thinking
        messages = list(messages)
        kwargs = {}
        if self.kind in ("template_kwarg", "reasoning_effort"):
            kwargs[self.kwarg] = value
        elif self.kind == "system_flag":
            if messages and messages[0].get("role") == "system":
                messages[0] = {**messages[0], "content": f"{value}\n{messages[0]['content']}"}
            else:
                messages.insert(0, {"role": "system", "content": value})
        if not add_generation_prompt:
            kwargs["continue_final_message"] = True
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False, **kwargs)
        text = _apply(tokenizer, messages, self._who(), **kwargs)
        if self.kind == "prefill_empty_think":
            text = _prefill(text, value, opener=self.thinking)
        return text

    def contrast(self, tokenizer: Any, user_text: str) -> tuple[str, str]:
        """(thinking prompt, non-thinking prompt) of one model; they must differ."""
        on, off = self.render(tokenizer, user_text, True), self.render(tokenizer, user_text, False)
        if on == off:
            raise TellnormError(f"{self._who()}: thinking and non-thinking prompts are identical, so the "
                                f"{self.family} switch does nothing with this chat template")
        return on, off


def _apply(tokenizer, messages, who: str, **kwargs) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    except Exception as err:  # jinja's TemplateError, raise_exception(...) in the template, ...
        first = (str(err).splitlines() or [""])[0][:200]
        raise TellnormError(f"{who}: its chat template failed to render: {type(err).__name__}: {first}") from None


def _prefill(text: str, prefill: str, *, opener: str | None) -> str:
    """``text`` ending with ``prefill``: nothing added if it does, the rest if it ends with ``opener`` (a prefix)."""
    if text.endswith(prefill):
        return text
    if opener and prefill.startswith(opener) and text.endswith(opener):
        return text + prefill[len(opener):]
    return text + prefill


def template_text(tokenizer: Any) -> str:
    """The tokenizer's chat template as text ('' if none); named templates are joined (for marker search)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return "\n".join(str(t) for t in template.values())
    return template or ""


# --- the registry ------------------------------------------------------------------------------------------------


def _registry_source(path: str | Path | None) -> tuple[str, str]:
    if path is None:
        from importlib.resources import files

        return f"tellnorm/{REGISTRY_FILE}", files("tellnorm").joinpath(REGISTRY_FILE).read_text(encoding="utf-8")
    path = Path(path)
    try:
        return str(path), path.read_text(encoding="utf-8")
    except OSError as err:
        raise TellnormError(f"cannot read thinking-switch registry {path}: {err.strerror}") from None


def _entry(raw: Any, where: str, index: int) -> ThinkingSwitch:
    if not isinstance(raw, dict) or not isinstance(raw.get("family"), str) or not raw["family"]:
        raise TellnormError(f"{where}: entry {index + 1} has no 'family' name")
    name = raw["family"]
    switch = raw.get("switch")
    if not isinstance(switch, dict):
        raise TellnormError(f"{where}: family {name!r} has no 'switch' mapping")
    kind = switch.get("kind")
    if kind not in KINDS:
        raise TellnormError(f"{where}: family {name!r} has unknown switch kind {kind!r}; "
                            f"known kinds: {', '.join(KINDS)}")
    if not isinstance(raw.get("documented_at"), str) or not raw["documented_at"].strip():
        raise TellnormError(f"{where}: family {name!r} does not say where its format is documented (documented_at)")
    needs = {"template_kwarg": ("kwarg", "thinking", "non_thinking"),
             "reasoning_effort": ("kwarg", "thinking", "non_thinking"),
             "system_flag": ("thinking", "non_thinking"),
             "prefill_empty_think": ("thinking", "non_thinking"),
             "none": ("always",)}[kind]
    missing = [k for k in needs if switch.get(k) is None]
    if missing:
        raise TellnormError(f"{where}: family {name!r} ({kind}) lacks {', '.join(missing)}")
    if kind == "none" and switch["always"] not in _MODES:
        raise TellnormError(f"{where}: family {name!r}: 'always' must be thinking or non_thinking, "
                            f"not {switch['always']!r}")
    if kind != "none" and switch["thinking"] == switch["non_thinking"]:
        raise TellnormError(f"{where}: family {name!r} has the same value for thinking and non_thinking")
    if kind in ("system_flag", "prefill_empty_think") and not all(
            isinstance(switch[k], str) and switch[k] for k in ("thinking", "non_thinking")):
        raise TellnormError(f"{where}: family {name!r} ({kind}) needs non-empty strings for thinking and non_thinking")
    match = raw.get("match") or {}
    if not isinstance(match, dict):
        raise TellnormError(f"{where}: family {name!r}: 'match' must be a mapping")
    for key in ("names", "architectures", "template_markers"):
        value = match.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise TellnormError(f"{where}: family {name!r}: match.{key} must be a list of strings")
    for pattern in match.get("names", []):
        try:
            re.compile(pattern)
        except re.error as err:
            raise TellnormError(f"{where}: family {name!r}: bad name pattern {pattern!r} ({err})") from None
    return ThinkingSwitch(
        family=name, kind=kind, thinking=switch.get("thinking"), non_thinking=switch.get("non_thinking"),
        kwarg=switch.get("kwarg"), always=switch.get("always"), pair=switch.get("pair"),
        display=str(raw.get("display") or name), documented_at=raw["documented_at"].strip(),
        example=str(raw.get("example") or ""), notes=str(raw.get("notes") or "").strip(), match=match)


@lru_cache(maxsize=8)
def _load(path: str | None) -> tuple[ThinkingSwitch, ...]:
    import yaml

    where, text = _registry_source(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise TellnormError(f"{where} is not valid YAML{at}: {getattr(err, 'problem', None) or err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("families"), list) or not data["families"]:
        raise TellnormError(f"{where}: expected a mapping with a non-empty 'families' list")
    entries = tuple(_entry(raw, where, i) for i, raw in enumerate(data["families"]))
    names = [e.family for e in entries]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TellnormError(f"{where}: family {dupes[0]!r} appears more than once")
    for e in entries:
        if e.pair is not None and e.pair not in names:
            raise TellnormError(f"{where}: family {e.family!r} pairs with unknown family {e.pair!r}")
    return entries


def load_registry(path: str | Path | None = None) -> tuple[ThinkingSwitch, ...]:
    """All registry entries, in priority order (the shipped file, or ``path``); bad entries raise one line."""
    return _load(None if path is None else str(Path(path).resolve()))


def families(registry: str | Path | None = None) -> list[str]:
    """The registry's family names, in priority order."""
    return [e.family for e in load_registry(registry)]


def get_family(name: str, registry: str | Path | None = None) -> ThinkingSwitch:
    """The registry entry of family ``name``; an unknown name raises one TellnormError line."""
    for entry in load_registry(registry):
        if entry.family == name:
            return entry
    raise TellnormError(f"unknown thinking family {name!r}: choose one of {', '.join(families(registry))}")


# --- detection ---------------------------------------------------------------------------------------------------


def _name_candidates(names) -> list[str]:
    """What name patterns are searched in: hub ids as they are; for paths, the last component and HF cache repos."""
    out = []
    for name in names:
        if not name:
            continue
        name = str(name)
        parts = [p for p in re.split(r"[/\\]", name) if p]
        if not parts:
            continue
        looks_like_path = name.startswith((".", "/", "~")) or "\\" in name or len(parts) > 2
        out.append(parts[-1] if looks_like_path else name)
        for part in parts:
            cached = re.fullmatch(r"models--(.+?)--(.+)", part)
            if cached:
                out.append(f"{cached.group(1)}/{cached.group(2)}")
    return out


def _architectures(model) -> list[str]:
    for getter in (lambda: model.hf_model.config.architectures, lambda: model.config.architectures,
                   lambda: model.architectures):
        try:
            value = getter()
        except Exception:
            continue
        if isinstance(value, (list, tuple)) and value:
            return [str(v) for v in value]
    return []


def _tokenizer_of(model):
    return model if hasattr(model, "apply_chat_template") else getattr(model, "tokenizer", None)


def detect(names: Iterable[str | None], architectures: Iterable[str], template: str,
           registry: str | Path | None = None) -> tuple[ThinkingSwitch | None, str]:
    """The first entry whose name pattern matches (on a listed architecture, when known), else the first whose
    template markers all occur in ``template``: (entry, "name" | "template"), or (None, "")."""
    entries = load_registry(registry)
    candidates = _name_candidates(names)
    for entry in entries:
        archs = entry.match.get("architectures", [])
        if archs and architectures and not set(archs) & set(architectures):
            continue
        if any(re.search(p, c, flags=re.IGNORECASE) for p in entry.match.get("names", []) for c in candidates):
            return entry, "name"
    if template:
        for entry in entries:
            markers = entry.match.get("template_markers", [])
            if markers and all(m in template for m in markers):
                return entry, "template"
    return None, ""


def switch_for(model: Any, *, family: str | None = None, registry: str | Path | None = None) -> ThinkingSwitch:
    """The thinking switch of ``model`` (a LoadedModel, a tokenizer, or anything with ``.tokenizer``/``.name``).

    ``family`` (or the model's ``thinking_family``) names the registry entry and skips detection. A model no entry
    matches gets a switch of kind ``unknown``: its thinking prompt is its template as it is, and asking it for a
    non-thinking prompt raises one TellnormError line."""
    tokenizer = _tokenizer_of(model)
    names = [getattr(model, "name", None), getattr(tokenizer, "name_or_path", None)]
    model_name = next((str(n) for n in names if n), "")
    family = family or getattr(model, "thinking_family", None)
    if family:
        return replace(get_family(family, registry), model_name=model_name, detected_by="family")
    with suppress(Exception):
        names.append(model.hf_model.config._name_or_path)
    entry, how = detect(names, _architectures(model), template_text(tokenizer), registry)
    if entry is None:
        return ThinkingSwitch(family=None, kind=UNKNOWN, model_name=model_name)
    return replace(entry, model_name=model_name, detected_by=how)


def require_contrast(model: Any, *, family: str | None = None) -> ThinkingSwitch:
    """The switch of ``model`` if one model gives both modes; else one TellnormError line (before any work)."""
    switch = switch_for(model, family=family)
    if not switch.has_switch:
        raise switch._refuse(not switch.supports(True))
    return switch


# --- two models, one per mode ------------------------------------------------------------------------------------


@dataclass
class ContrastPair:
    """A thinking model and a non-thinking model; each renders its prompts with its own chat template."""

    thinking_model: Any
    non_thinking_model: Any
    thinking_switch: ThinkingSwitch
    non_thinking_switch: ThinkingSwitch
    same_vocabulary: bool
    vocabulary_note: str = ""

    def model_for(self, thinking: bool) -> Any:
        """The model of the asked mode."""
        return self.thinking_model if thinking else self.non_thinking_model

    def chat_prompt(self, user_text: str, thinking: bool = True) -> str:
        """``user_text`` as a chat prompt of the asked mode's model, with its own template."""
        switch = self.thinking_switch if thinking else self.non_thinking_switch
        return switch.render(_tokenizer_of(self.model_for(thinking)), user_text, thinking)

    def prompts(self, user_text: str) -> tuple[str, str]:
        """(thinking prompt, non-thinking prompt) of ``user_text``."""
        return self.chat_prompt(user_text, True), self.chat_prompt(user_text, False)


def _vocabulary_difference(a, b) -> str:
    va, vb = a.get_vocab(), b.get_vocab()
    if va == vb:
        return ""
    differ = sum(1 for tok in set(va) | set(vb) if va.get(tok) != vb.get(tok))
    return f"different vocabularies ({len(va)} vs {len(vb)} tokens, {differ} differ)"


def contrast_models(thinking_model: Any, non_thinking_model: Any, *, thinking_family: str | None = None,
                    non_thinking_family: str | None = None, allow_different_vocabulary: bool = False) -> ContrastPair:
    """Pair two models for a thinking contrast (families without a switch, e.g. OLMo 3 Think vs Instruct).

    Each model must give its mode; their tokenizers must share one vocabulary (token-level comparisons need it)
    unless ``allow_different_vocabulary``, which records the difference in ``vocabulary_note``."""
    on = switch_for(thinking_model, family=thinking_family)
    off = switch_for(non_thinking_model, family=non_thinking_family)
    if not on.supports(True):
        raise TellnormError(f"{on._who()} ({on.display or on.family}) never thinks: it cannot be the thinking model "
                            "of a contrast pair")
    if not off.supports(False):
        raise off._refuse(False) if off.kind == UNKNOWN else TellnormError(
            f"{off._who()} ({off.display or off.family}) always thinks: it cannot be the non-thinking model of a "
            "contrast pair")
    tok_on, tok_off = _tokenizer_of(thinking_model), _tokenizer_of(non_thinking_model)
    if tok_on is None or tok_off is None:
        raise TellnormError("contrast_models needs two models with tokenizers")
    note = _vocabulary_difference(tok_on, tok_off)
    if note and not allow_different_vocabulary:
        raise TellnormError(f"{on._who()} and {off._who()} have {note}: token-level comparisons need one tokenizer; "
                            "pass allow_different_vocabulary=True to pair them anyway")
    return ContrastPair(thinking_model, non_thinking_model, on, off, same_vocabulary=not note, vocabulary_note=note)
