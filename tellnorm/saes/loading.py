"""Load sae_lens SAEs keyed by layer, from local folders or sae_lens's registry, and check them against a model.

``load_saes(spec, model=None, *, layers=None, device="cpu", dtype="float32") -> {layer: sae_lens.SAE}``

``spec`` is one of:

* a folder (``str``/``Path``) of sae_lens SAEs: one SAE saved with ``SAE.save_model(dir)`` (``cfg.json`` +
  ``sae_weights.safetensors``) or a folder of such subfolders (``layer_0/``, ``layer_1/``, ...). Each SAE's layer is
  read from its hook, ``cfg.metadata.hook_name`` = ``blocks.L.hook_...``.
* ``"FORMAT:PATH"`` or ``{"format": FORMAT, "path": PATH}``: local copies of published SAEs in their native files,
  FORMAT one of ``sae-lens``, ``qwen-scope``, ``llama-scope-r1``, ``qresearch``, ``gemma-scope`` (Gemma Scope,
  ``params.npz``), ``gemma-scope-2`` (Gemma Scope 2, ``params.safetensors``), ``goodfire`` (layouts in
  :mod:`tellnorm.saes.formats`). They go through sae_lens's own per-release converters, so they load exactly as
  ``SAE.from_pretrained`` loads them from the hub. The dict form also takes ``"release"`` (qwen-scope, gemma-scope,
  gemma-scope-2: which registry release the files are, when the path does not contain the hub repo's name) and
  ``"norm_scaling_factor"`` (llama-scope-r1: a float or ``{layer: float}``, when the files are not in the hub
  layout).
* ``"RELEASE:ID[,ID...]"`` or ``{"release": RELEASE, "sae_ids": [ID, ...]}`` (or ``"sae_id": ID``): SAEs from
  sae_lens's registry via ``SAE.from_pretrained``; works where the hub is reachable or the files are in the HF cache.

Every dict form may carry ``"layers"``, like the keyword. ``layers`` keeps only those layers and requires each to
be present. With ``model`` given, every SAE is checked by :func:`validate_sae` as it loads.
"""

from __future__ import annotations

import difflib
import operator
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tellnorm.backends.base import subjects
from tellnorm.errors import TellnormError
from tellnorm.saes.formats import (
    FORMAT_OF_CONVERSION,
    FORMATS,
    GEMMA_SCOPE,
    GEMMA_SCOPE_2,
    GEMMA_SCOPE_2_TRANSCODER_SITES,
    LLAMA_SCOPE_R1,
    QWEN_SCOPE,
    SAE_LENS,
    SaeSource,
    find_saes,
    layer_of_hook,
)

if TYPE_CHECKING:
    from sae_lens import SAE

    from tellnorm.backends.base import ModelAPI

FOLDER_KEYS = {"format", "path", "layers", "release", "norm_scaling_factor"}
REGISTRY_KEYS = {"release", "sae_ids", "sae_id", "layers"}
FORMAT_OPTIONS = {"release": (QWEN_SCOPE, GEMMA_SCOPE, GEMMA_SCOPE_2), "norm_scaling_factor": (LLAMA_SCOPE_R1,)}
DTYPES = ("float32", "float64", "float16", "bfloat16")


class SAEModelMismatchWarning(UserWarning):
    """An SAE whose metadata names another model than the one it is applied to."""


@dataclass(frozen=True)
class SaeSpec:
    """A parsed spec: SAEs in a local folder (``format`` + ``path``) or registry ``release`` + ``sae_ids``."""

    format: str | None = None
    path: Path | None = None
    release: str | None = None
    sae_ids: tuple[str, ...] = ()
    layers: tuple[int, ...] | None = None
    options: dict = field(default_factory=dict)

    @property
    def from_registry(self) -> bool:
        """Whether the SAEs come from sae_lens's registry (no local path)."""
        return self.path is None


def load_saes(spec: Any, model: Any = None, *, layers: int | Iterable[int] | None = None, device: str = "cpu",
              dtype: str = "float32") -> dict[int, SAE]:
    """Load the SAEs ``spec`` names as ``{layer: sae_lens.SAE}`` (spec forms in the module docstring).

    ``model`` (a ``LoadedModel`` or anything ``load_model`` takes) turns on :func:`validate_sae` for every SAE.
    """
    parsed = parse_sae_spec(spec, layers)
    if dtype not in DTYPES:
        raise TellnormError(f"unknown SAE dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if model is not None:
        from tellnorm.backends import load_model

        model = load_model(model)
    if parsed.from_registry:
        saes = _load_registry_saes(parsed, model, device, dtype)
    else:
        saes = _load_folder_saes(parsed, model, device, dtype)
    return dict(sorted(saes.items()))


def validate_sae(sae: SAE, model: ModelAPI, layer: int) -> None:
    """Check that ``sae`` can read ``model`` at ``layer``: TellnormError if not, a warning if made for another model."""
    d_in = sae.cfg.d_in
    if d_in != model.d_model:
        raise TellnormError(f"the layer-{layer} SAE reads vectors of size {d_in} but {model.name} has d_model "
                            f"{model.d_model}: it was trained for another model; use SAEs trained on {model.name}")
    hook = sae.cfg.metadata.hook_name
    if hook not in model.bridge.hook_dict:
        raise TellnormError(f"the layer-{layer} SAE hooks {hook!r}, which {model.name} does not have: its layers are "
                            f"0..{model.n_layers - 1} (hooks like {model.hook_name(model.n_layers - 1)})")
    if layer_of_hook(hook) != layer:
        raise TellnormError(f"the SAE given for layer {layer} hooks {hook!r}, another layer: key SAEs by their hook")
    trained_on = sae.cfg.metadata.model_name
    if trained_on and not _same_model(trained_on, model):
        warnings.warn(
            f"SAE/MODEL MISMATCH: an SAE trained on {trained_on!r} is being applied to {model.name!r}. Its features "
            f"are meaningless on another model unless it is a fine-tune that kept the residual stream (check "
            f"reconstruction quality); load SAEs trained on {model.name!r} to silence this.",
            SAEModelMismatchWarning,
            stacklevel=2,
        )


def parse_sae_spec(spec: Any, layers: int | Iterable[int] | None = None) -> SaeSpec:
    """Turn any accepted spec form into a :class:`SaeSpec`; ``layers`` is the keyword of :func:`load_saes`."""
    if isinstance(spec, SaeSpec):
        parsed = spec
    elif isinstance(spec, Path):
        parsed = SaeSpec(format=SAE_LENS, path=spec.expanduser())
    elif isinstance(spec, str):
        parsed = _parse_string(spec)
    elif isinstance(spec, dict):
        parsed = _parse_dict(spec)
    else:
        raise TellnormError(f"cannot load SAEs from a {type(spec).__name__}: pass a folder, 'FORMAT:PATH', "
                            "'RELEASE:ID' or a dict (see tellnorm.saes.loading)")
    return _with_layers(parsed, layers)


def _parse_string(spec: str) -> SaeSpec:
    if not spec.strip():
        raise TellnormError("empty SAE spec: pass a folder, 'FORMAT:PATH' or 'RELEASE:ID'")
    subject = subjects().get(spec)
    if subject is not None and subject.sae_dir is not None:  # a registered subject's own suite ("organism")
        if not (subject.sae_dir / "suite.json").is_file():
            raise TellnormError(f"the {subject.name}'s SAEs are missing from {subject.sae_dir}: rebuild them with "
                                f"{subject.sae_rebuild}")
        return SaeSpec(format=SAE_LENS, path=subject.sae_dir)
    path = Path(spec).expanduser()
    if path.exists():
        return SaeSpec(format=SAE_LENS, path=path)
    head, sep, tail = spec.partition(":")
    if sep and head in FORMATS:
        return SaeSpec(format=head, path=Path(tail).expanduser())
    if sep and head in _registry():
        return SaeSpec(release=head, sae_ids=tuple(i.strip() for i in tail.split(",") if i.strip()))
    raise TellnormError(f"SAE spec {spec!r} is neither an existing folder, 'FORMAT:PATH' (FORMAT one of "
                        f"{', '.join(FORMATS)}) nor 'RELEASE:ID' with RELEASE in sae_lens's registry")


def _parse_dict(spec: dict) -> SaeSpec:
    if "path" in spec or "format" in spec:
        _check_keys(spec, FOLDER_KEYS, "a folder spec")
        fmt = spec.get("format", SAE_LENS)
        if fmt not in FORMATS:
            raise TellnormError(f"unknown SAE format {fmt!r}: choose one of {', '.join(FORMATS)}")
        if not spec.get("path"):
            raise TellnormError(f"the {fmt} spec has no 'path': give the folder that holds the SAE files")
        options = {key: spec[key] for key in FORMAT_OPTIONS if spec.get(key) is not None}
        for key in options:
            if fmt not in FORMAT_OPTIONS[key]:
                raise TellnormError(f"'{key}' applies only to {', '.join(FORMAT_OPTIONS[key])} SAEs, not {fmt}")
        return SaeSpec(format=fmt, path=Path(spec["path"]).expanduser(), layers=spec.get("layers"), options=options)
    if "release" in spec:
        _check_keys(spec, REGISTRY_KEYS, "a registry spec")
        ids = spec.get("sae_ids") or ([spec["sae_id"]] if spec.get("sae_id") else [])
        if isinstance(ids, str):
            ids = [ids]
        return SaeSpec(release=spec["release"], sae_ids=tuple(ids), layers=spec.get("layers"))
    raise TellnormError("an SAE spec dict needs 'path' (with optional 'format') or 'release' (with 'sae_ids')")


def _check_keys(spec: dict, allowed: set, what: str) -> None:
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise TellnormError(f"unknown key(s) {', '.join(map(repr, unknown))} in {what}: "
                            f"allowed are {', '.join(sorted(allowed))}")


def _with_layers(parsed: SaeSpec, layers) -> SaeSpec:
    chosen = [_as_layers(x) for x in (parsed.layers, layers) if x is not None]
    if len(chosen) == 2 and chosen[0] != chosen[1]:
        raise TellnormError(f"the spec asks for layers {list(chosen[0])} but layers={list(chosen[1])}: give one")
    return SaeSpec(parsed.format, parsed.path, parsed.release, parsed.sae_ids,
                   chosen[0] if chosen else None, parsed.options)


def _as_layers(layers) -> tuple[int, ...]:
    items = [layers] if isinstance(layers, int) else layers
    try:
        values = [operator.index(x) for x in items if not isinstance(x, bool)]
        valid = len(values) == len(list(items)) and all(v >= 0 for v in values)
    except TypeError:
        valid = False
    if not valid:
        raise TellnormError(f"layers must be non-negative integers, got {layers!r}")
    return tuple(sorted(set(values)))


# ---------------------------------------------------------------- local folders


def _load_folder_saes(parsed: SaeSpec, model, device: str, dtype: str) -> dict:
    sources = _select_layers(find_saes(parsed.format, parsed.path, **parsed.options), parsed.layers, parsed.path)
    saes = {}
    for source in sources:
        sae = source.load(device, dtype)
        if model is not None:  # check each as it loads, so a bad one fails before the rest are read
            validate_sae(sae, model, source.layer)
        saes[source.layer] = sae
    return saes


def _select_layers(sources: list[SaeSource], layers, where) -> list[SaeSource]:
    by_layer: dict[int, SaeSource] = {}
    for source in sources:
        if source.layer in by_layer:
            raise TellnormError(f"{where} holds two SAEs for layer {source.layer} ({by_layer[source.layer].path} "
                                f"and {source.path}): pass the folder of the one you want")
        by_layer[source.layer] = source
    if layers is None:
        return list(by_layer.values())
    missing = [layer for layer in layers if layer not in by_layer]
    if missing:
        raise TellnormError(f"{where} has no SAE for layer(s) {', '.join(map(str, missing))}: "
                            f"it has layers {', '.join(map(str, sorted(by_layer)))}")
    return [by_layer[layer] for layer in layers]


# ---------------------------------------------------------------- sae_lens's registry


def _registry() -> dict:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory()


def _load_registry_saes(parsed: SaeSpec, model, device: str, dtype: str) -> dict:
    lookup = _registry_lookup(parsed.release, parsed.sae_ids)
    saes = {}
    for sae_id in parsed.sae_ids:
        sae = _from_pretrained(lookup, sae_id, device, dtype)
        layer = layer_of_hook(sae.cfg.metadata.hook_name)
        if layer is None:
            raise TellnormError(f"SAE {parsed.release}:{sae_id} hooks {sae.cfg.metadata.hook_name!r}, not a "
                                "per-layer hook (blocks.<layer>.hook_...), so it cannot be keyed by layer")
        if layer in saes:
            raise TellnormError(f"two of the requested SAEs of {parsed.release} are for layer {layer}: ask for one")
        if parsed.layers is not None and layer not in parsed.layers:
            continue
        if model is not None:
            validate_sae(sae, model, layer)
        saes[layer] = sae
    missing = sorted(set(parsed.layers or ()) - set(saes))
    if missing:
        raise TellnormError(f"none of the requested SAE ids of {parsed.release} is for layer(s) "
                            f"{', '.join(map(str, missing))}")
    return saes


def _registry_lookup(release: str, sae_ids: tuple[str, ...]):
    registry = _registry()
    if release not in registry:
        close = difflib.get_close_matches(release, list(registry), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise TellnormError(f"{release!r} is not a release in sae_lens's registry{hint}")
    lookup = registry[release]
    ids = list(lookup.saes_map)
    if not sae_ids:
        raise TellnormError(f"name the SAE ids to load from {release}, e.g. '{release}:{ids[0]}' "
                            f"({len(ids)} ids, {ids[0]} .. {ids[-1]})")
    for sae_id in sae_ids:
        if sae_id not in lookup.saes_map:
            close = difflib.get_close_matches(sae_id, ids, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"its ids run {ids[0]} .. {ids[-1]}"
            raise TellnormError(f"{release} has no SAE id {sae_id!r}: {hint}")
    return lookup


def _from_pretrained(lookup, sae_id: str, device: str, dtype: str):
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
    from sae_lens import SAE

    try:
        sae = SAE.from_pretrained(lookup.release, sae_id, device=device, dtype=dtype)
    except TellnormError:
        raise
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as err:
        raise TellnormError(_not_offline_message(lookup, sae_id, err)) from None
    except Exception as err:
        if type(err).__module__.split(".")[0] in ("httpx", "requests", "urllib3"):
            raise TellnormError(_not_offline_message(lookup, sae_id, err)) from None
        detail = (str(err).strip().splitlines() or [""])[0][:200]
        raise TellnormError(f"cannot load SAE {lookup.release}:{sae_id} ({type(err).__name__}: {detail})") from None
    # Some loaders hard-code another base model than the registry lists (Llama-Scope-R1 says Llama-3.1-8B);
    # the registry's model is what the release is for, and what the wrong-model check should compare.
    sae.cfg.metadata.model_name = lookup.model
    return sae


def _not_offline_message(lookup, sae_id: str, err: Exception) -> str:
    folder = lookup.saes_map[sae_id]
    func = lookup.conversion_func or "sae_lens"
    local_dir = lookup.repo_id.split("/")[-1]
    # Qwen-Scope, qresearch and Goodfire SAEs are single files in the repo; every other release keeps a folder per SAE.
    pattern = folder if func in ("qwen_scope", "deepseek_r1", "goodfire") else f"{folder}/*"
    download = f"hf download {lookup.repo_id} --include '{pattern}' --local-dir {local_dir}"
    fmt = SAE_LENS if func == "sae_lens" else FORMAT_OF_CONVERSION.get(func)
    if fmt == GEMMA_SCOPE_2 and GEMMA_SCOPE_2_TRANSCODER_SITES.match(folder):
        fmt = None  # transcoders share the repo but are not SAEs of one hook: gemma-scope-2 folders skip them
    if fmt == SAE_LENS:
        use = f"run {download}, copy {local_dir} here and pass {local_dir}/{folder} as the SAE folder"
    elif fmt:
        use = f"run {download}, copy {local_dir} here and pass '{fmt}:{local_dir}'"
    else:
        use = (f"load it once with SAE.from_pretrained (or {download.replace(' --local-dir ' + local_dir, '')}) "
               "and copy the HF cache (HF_HOME) here: tellnorm reads this release's layout only from that cache")
    return (f"SAE {lookup.release}:{sae_id} is not available offline ({type(err).__name__}: not in the HF cache and "
            f"the hub is unreachable): where there is network, {use}")


# ---------------------------------------------------------------- model identity


def _same_model(trained_on: str, model) -> bool:
    """Compare by the last path component, case-insensitively: 'Qwen/Qwen3-8B' matches a local '/models/qwen3-8b'."""
    names = {model.name, getattr(getattr(model.hf_model, "config", None), "_name_or_path", "") or ""}
    return _short_name(trained_on) in {_short_name(name) for name in names if name}


def _short_name(name: str) -> str:
    return str(name).rstrip("/").split("/")[-1].strip().lower()
