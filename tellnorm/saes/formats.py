"""Finding SAEs in local folders, in sae_lens's own layout or in the native layouts of published SAE releases.

Every finder returns :class:`SaeSource` records (layer, file, how to load it) after reading only names, JSON
configs and tensor shapes, so a caller can pick layers before any weights are read.

Native layouts (what ``hf download`` of the release's hub repo gives):

* ``qwen-scope``: ``layer<N>.sae.pt`` files (TopK; ``W_enc`` [d_sae, d_in], ``W_dec`` [d_in, d_sae]). k and the base
  model come from the release name, so the folder must be named after the hub repo
  (``SAE-Res-Qwen3-8B-Base-W64K-L0_50``, as ``--local-dir`` or the HF cache name it) or the spec must name the
  ``release``.
* ``llama-scope-r1``: ``<variant>/L<N>R/{config.json, sae_weights.safetensors}`` (JumpReLU, stored threshold as
  ``log_jumprelu_threshold``, trained on activations rescaled to norm sqrt(d_model)). The path may be the repo root,
  a variant folder or one ``L<N>R`` folder.
* ``qresearch``: ``*-l<N>.pt`` files holding ``encoder.weight/bias`` and ``decoder.weight/bias`` (ReLU).
* ``gemma-scope`` (Gemma Scope, Gemma 2): ``layer_<N>/width_<W>/average_l0_<K>/params.npz`` (JumpReLU; ``W_enc``
  [d_in, d_sae], ``W_dec`` [d_sae, d_in], ``b_enc``, ``b_dec``, ``threshold``). The base model and the hook (res, mlp,
  att) come from the hub repo's name (``gemma-scope-2b-pt-res``), so the path must contain it (``--local-dir`` or the
  HF cache name it) or the spec must name a ``release``. The path may be the repo root or any folder below it.
* ``gemma-scope-2`` (Gemma Scope 2, Gemma 3): ``<site>/layer_<N>_width_<W>_l0_<size>/{config.json,
  params.safetensors}`` with site ``resid_post``, ``mlp_out``, ``attn_out`` or their ``*_all`` variants (JumpReLU,
  ``w_enc`` [d_in, d_sae]); repo named like ``gemma-scope-2-1b-pt``. Transcoder and CLT folders are skipped: they
  are not SAEs of one hook.
* ``goodfire``: ``Llama-3.1-8B-Instruct-SAE-l19.pth`` / ``Llama-3.3-70B-Instruct-SAE-l50.pt`` holding
  ``encoder_linear.weight/bias`` and ``decoder_linear.weight/bias`` (ReLU). The loader knows each SAE by its file
  name (model, layer), so the files must keep the names they are downloaded with.

Conversion is never re-implemented here: sae_lens's per-release hub loaders (``NAMED_PRETRAINED_SAE_LOADERS``) are the
only code that knows each layout, so tellnorm runs them unchanged with their file downloads served from the local
folder. A local copy therefore loads exactly as ``SAE.from_pretrained`` would load it from the hub.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

from tellnorm.errors import TellnormError

if TYPE_CHECKING:
    from sae_lens import SAE

SAE_LENS = "sae-lens"
QWEN_SCOPE = "qwen-scope"
LLAMA_SCOPE_R1 = "llama-scope-r1"
QRESEARCH = "qresearch"
GEMMA_SCOPE = "gemma-scope"
GEMMA_SCOPE_2 = "gemma-scope-2"
GOODFIRE = "goodfire"
FORMATS = (SAE_LENS, QWEN_SCOPE, LLAMA_SCOPE_R1, QRESEARCH, GEMMA_SCOPE, GEMMA_SCOPE_2, GOODFIRE)

# Which sae_lens loader (the registry's ``conversion_func``) reads each native layout.
CONVERSION_FUNCS = {QWEN_SCOPE: "qwen_scope", LLAMA_SCOPE_R1: "llama_scope_r1_distill", QRESEARCH: "deepseek_r1",
                    GEMMA_SCOPE: "gemma_2", GEMMA_SCOPE_2: "gemma_3", GOODFIRE: "goodfire"}
FORMAT_OF_CONVERSION = {func: fmt for fmt, func in CONVERSION_FUNCS.items()}

QWEN_SCOPE_FILE = re.compile(r"^layer(\d+)\.sae\.pt$")
LAYER_HOOK = re.compile(r"^blocks\.(\d+)\.")
LLAMA_SCOPE_WEIGHTS = "sae_weights.safetensors"
QWEN_SCOPE_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec")
QRESEARCH_KEYS = ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias")
GEMMA_SCOPE_WEIGHTS = "params.npz"
GEMMA_SCOPE_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")  # as the loader renames them (w_enc -> W_enc)
GEMMA_SCOPE_DIR = re.compile(r"^(layer_\d+|embedding)/width_[^/]+/[^/]+$")
GEMMA_SCOPE_2_WEIGHTS = "params.safetensors"
GEMMA_SCOPE_2_SITES = re.compile(r"^(resid_post|mlp_out|attn_out)(_all)?$")
GEMMA_SCOPE_2_TRANSCODER_SITES = re.compile(r"^(transcoder|clt)")
GOODFIRE_KEYS = ("encoder_linear.weight", "encoder_linear.bias", "decoder_linear.weight", "decoder_linear.bias")


@dataclass(frozen=True)
class SaeSource:
    """One SAE on disk, located without reading its weights; ``load(device, dtype)`` reads it."""

    layer: int
    path: Path  # the file (or folder) that error messages name
    format: str
    _load: Callable[[str, str], Any] = field(repr=False, compare=False)

    def load(self, device: str = "cpu", dtype: str = "float32") -> SAE:
        """Read the SAE's weights: a sae_lens ``SAE`` on ``device`` in ``dtype``."""
        return self._load(device, dtype)


def layer_of_hook(hook_name: str | None) -> int | None:
    """The layer of a per-layer TransformerLens hook (``blocks.L.*``), else None."""
    match = LAYER_HOOK.match(hook_name or "")
    return int(match.group(1)) if match else None


def find_saes(fmt: str, folder: Path, **options: Any) -> list[SaeSource]:
    """The SAEs in ``folder`` stored in layout ``fmt`` (one of :data:`FORMATS`); options as the finders take them."""
    finders = {SAE_LENS: find_sae_lens_saes, QWEN_SCOPE: find_qwen_scope_saes,
               LLAMA_SCOPE_R1: find_llama_scope_r1_saes, QRESEARCH: find_qresearch_saes,
               GEMMA_SCOPE: find_gemma_scope_saes, GEMMA_SCOPE_2: find_gemma_scope_2_saes,
               GOODFIRE: find_goodfire_saes}
    if fmt not in finders:
        raise TellnormError(f"unknown SAE format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if not folder.exists():
        raise TellnormError(f"SAE folder {folder} does not exist: pass the folder that holds the SAE files")
    if not folder.is_dir():
        raise TellnormError(f"{folder} is a file: pass the folder that holds it")
    sources = finders[fmt](folder, **options)
    if not sources:
        raise TellnormError(_nothing_found_message(fmt, folder))
    return sources


# ---------------------------------------------------------------- sae_lens's own layout


def find_sae_lens_saes(folder: Path) -> list[SaeSource]:
    """``folder`` itself if it is a saved SAE (cfg.json), else each immediate subfolder that is one."""
    from sae_lens.constants import SAE_CFG_FILENAME

    if (folder / SAE_CFG_FILENAME).is_file():
        sae_dirs = [folder]
    else:
        sae_dirs = sorted(sub for sub in folder.iterdir() if (sub / SAE_CFG_FILENAME).is_file())
    return [_sae_lens_source(sae_dir) for sae_dir in sae_dirs]


def _sae_lens_source(sae_dir: Path) -> SaeSource:
    from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
    from sae_lens.loading.pretrained_sae_loaders import get_sae_lens_config_from_disk, handle_config_defaulting

    weights = sae_dir / SAE_WEIGHTS_FILENAME
    if not weights.is_file():
        raise TellnormError(f"{sae_dir} has {SAE_CFG_FILENAME} but no {SAE_WEIGHTS_FILENAME}: copy the weights too")
    cfg_file = sae_dir / SAE_CFG_FILENAME
    # sae_lens's own reader also upgrades pre-6.0 configs, whose hook sits at top level as hook_point.
    cfg = _read_or_explain(cfg_file, lambda: handle_config_defaulting(get_sae_lens_config_from_disk(sae_dir)))
    hook = (cfg.get("metadata") or {}).get("hook_name")
    return SaeSource(_layer_or_explain(hook, cfg_file), weights, SAE_LENS, partial(_load_sae_lens_folder, sae_dir))


def _load_sae_lens_folder(sae_dir: Path, device: str, dtype: str):
    from sae_lens import SAE
    from sae_lens.constants import SAE_WEIGHTS_FILENAME

    return _read_or_explain(sae_dir / SAE_WEIGHTS_FILENAME,
                            lambda: SAE.load_from_disk(sae_dir, device=device, dtype=dtype))


# ---------------------------------------------------------------- native layouts, read by sae_lens's hub loaders


@dataclass(frozen=True)
class _NativeSae:
    """Everything a sae_lens hub loader needs to read one SAE from a local folder instead of the hub."""

    format: str
    path: Path  # file or folder, for messages
    root: Path  # stands in for the hub repo's root
    folder_name: str  # the loader's path inside the repo
    repo_id: str
    cfg_overrides: dict
    norm_scaling_factor: float | None = None


def find_qwen_scope_saes(folder: Path, *, release: str | None = None) -> list[SaeSource]:
    """Qwen-Scope ``layer<N>.sae.pt`` files in ``folder``; ``release`` names the registry release if the folder
    name does not."""
    files = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := QWEN_SCOPE_FILE.match(p.name)))
    if not files:
        return []
    lookup = _release_lookup(QWEN_SCOPE, folder, release)
    sources = []
    for layer, path in files:
        shapes = _tensor_shapes(path, QWEN_SCOPE_KEYS, QWEN_SCOPE)
        d_sae, d_in = shapes["W_enc"]
        # The loader takes d_in/d_sae from a table keyed by the release name; the file's shapes are the truth.
        overrides = {**_registry_overrides(lookup, path.name), "d_in": d_in, "d_sae": d_sae}
        native = _NativeSae(QWEN_SCOPE, path, folder, path.name, lookup.repo_id, overrides)
        sources.append(SaeSource(layer, path, QWEN_SCOPE, partial(_load_native, native)))
    return sources


def find_qresearch_saes(folder: Path) -> list[SaeSource]:
    """qresearch ``*-l<N>.pt`` files in ``folder`` (layer read by sae_lens from each file name)."""
    from sae_lens.loading.pretrained_sae_loaders import get_deepseek_r1_config_from_hf

    lookup = _release_lookup(QRESEARCH, folder, None)
    sources = []
    for path in sorted(folder.glob("*.pt")):
        try:  # sae_lens reads the layer from the file name; ask it rather than guess
            hook = get_deepseek_r1_config_from_hf(lookup.repo_id, path.name, "cpu")["hook_name"]
        except ValueError:
            raise TellnormError(f"cannot tell the layer of {path}: qresearch files are named like "
                                f"{next(iter(lookup.saes_map.values()))} (l<N> = layer N)") from None
        shapes = _tensor_shapes(path, QRESEARCH_KEYS, QRESEARCH)
        d_sae, d_in = shapes["encoder.weight"]
        overrides = {**_registry_overrides(lookup, path.name), "d_in": d_in, "d_sae": d_sae}
        native = _NativeSae(QRESEARCH, path, folder, path.name, lookup.repo_id, overrides)
        sources.append(SaeSource(layer_of_hook(hook), path, QRESEARCH, partial(_load_native, native)))
    return sources


def find_llama_scope_r1_saes(folder: Path, *, norm_scaling_factor: float | dict | None = None) -> list[SaeSource]:
    """Llama-Scope-R1 SAE folders at ``folder`` or up to two levels below (repo root -> variant -> L<N>R)."""
    lookup = _release_lookup(LLAMA_SCOPE_R1, folder, None)
    sources = []
    for sae_dir in _llama_scope_dirs(folder):
        config_file = sae_dir / "config.json"
        config = _read_or_explain(config_file, lambda f=config_file: json.loads(f.read_text()))
        if not isinstance(config, dict) or "hook_point_in" not in config:
            continue  # some other JSON file, not an SAE config
        weights = sae_dir / LLAMA_SCOPE_WEIGHTS
        if not weights.is_file():
            raise TellnormError(f"{sae_dir} has config.json but no {LLAMA_SCOPE_WEIGHTS}: copy the weights too")
        layer = _layer_or_explain(config["hook_point_in"], config_file)
        # The registry names SAEs by their hub path <variant>/L<N>R; match on the same two trailing parts.
        hub_path = "/".join(sae_dir.resolve().parts[-2:])
        factor = _llama_scope_norm_factor(norm_scaling_factor, layer, lookup, hub_path, config, config_file)
        native = _NativeSae(LLAMA_SCOPE_R1, weights, sae_dir.parent, sae_dir.name, lookup.repo_id,
                            _registry_overrides(lookup, hub_path), factor)
        sources.append(SaeSource(layer, weights, LLAMA_SCOPE_R1, partial(_load_native, native)))
    return sources


def _llama_scope_dirs(folder: Path) -> list[Path]:
    if (folder / "config.json").is_file():
        return [folder]
    return sorted({cfg.parent for pattern in ("*/config.json", "*/*/config.json") for cfg in folder.glob(pattern)})


def _llama_scope_norm_factor(explicit, layer, lookup, hub_path, config, config_file) -> float:
    """The factor that rescales raw activations to what the SAE was trained on (average norm sqrt(d_model))."""
    if isinstance(explicit, dict):
        explicit = explicit.get(layer, explicit.get(str(layer)))
    if explicit is not None:
        return float(explicit)
    sae_id = _registry_id(lookup, hub_path)
    if sae_id in lookup.norm_scaling_factor:
        return float(lookup.norm_scaling_factor[sae_id])
    average_norm = (config.get("dataset_average_activation_norm") or {}).get("in")
    if average_norm:  # lm-saes records the dataset average norm itself; same formula sae_lens uses for Llama Scope
        return float(config["d_model"]) ** 0.5 / float(average_norm)
    # Without it every encoding is off by this factor and JumpReLU thresholds cut the wrong features: refuse.
    raise TellnormError(
        f"cannot find the activation-norm scaling factor of {config_file.parent}: keep the hub layout "
        f"(<variant>/L<N>R, e.g. {next(iter(lookup.saes_map.values()))}) or pass "
        f"{{'format': '{LLAMA_SCOPE_R1}', 'path': ..., 'norm_scaling_factor': {{layer: factor}}}}"
    )


def find_gemma_scope_saes(folder: Path, *, release: str | None = None) -> list[SaeSource]:
    """Gemma Scope (Gemma 2) SAE folders at ``folder`` or up to three levels below (repo -> layer -> width -> l0)."""
    from sae_lens.loading.pretrained_sae_loaders import get_gemma_2_config_from_hf

    files = _files_below(folder, GEMMA_SCOPE_WEIGHTS, depth=3)
    if not files:
        return []
    lookup = _release_lookup(GEMMA_SCOPE, folder, release)
    sources = []
    for weights in files:
        sae_dir = weights.parent.resolve()
        hub_path = "/".join(sae_dir.parts[-3:])
        if not GEMMA_SCOPE_DIR.match(hub_path):
            raise TellnormError(f"cannot tell the layer of {weights}: keep the hub layout "
                                f"layer_<N>/width_<W>/average_l0_<K>/{GEMMA_SCOPE_WEIGHTS} (e.g. "
                                f"{next(iter(lookup.saes_map.values()))})")
        # The loader reads layer, hook and model from the repo and folder names (no download); ask it, don't guess.
        hook = get_gemma_2_config_from_hf(lookup.repo_id, hub_path, "cpu")["hook_name"]
        layer = _layer_or_explain(hook, weights)
        shapes = _npz_shapes(weights, GEMMA_SCOPE_KEYS, GEMMA_SCOPE)
        d_in, d_sae = shapes["W_enc"]
        # As for Qwen-Scope, the loader's d_in/d_sae come from name tables; the file's shapes are the truth.
        overrides = {**_repo_overrides(lookup, hub_path), "d_in": d_in, "d_sae": d_sae}
        native = _NativeSae(GEMMA_SCOPE, weights, sae_dir.parents[2], hub_path, lookup.repo_id, overrides)
        sources.append(SaeSource(layer, weights, GEMMA_SCOPE, partial(_load_native, native)))
    return sources


def find_gemma_scope_2_saes(folder: Path, *, release: str | None = None) -> list[SaeSource]:
    """Gemma Scope 2 (Gemma 3) SAE folders at ``folder`` or up to two levels below (repo -> site -> SAE)."""
    from sae_lens.loading.pretrained_sae_loaders import get_gemma_3_config_from_hf

    files = [path for path in _files_below(folder, GEMMA_SCOPE_2_WEIGHTS, depth=2)
             if not GEMMA_SCOPE_2_TRANSCODER_SITES.match(path.parent.resolve().parent.name)]
    if not files:
        return []
    lookup = _release_lookup(GEMMA_SCOPE_2, folder, release)
    sources = []
    for weights in files:
        sae_dir = weights.parent.resolve()
        hub_path = "/".join(sae_dir.parts[-2:])
        if not (GEMMA_SCOPE_2_SITES.match(sae_dir.parent.name) and sae_dir.name.startswith("layer_")):
            raise TellnormError(f"cannot tell the layer and hook of {weights}: keep the hub layout "
                                f"<site>/layer_<N>_width_<W>_l0_<size>/{GEMMA_SCOPE_2_WEIGHTS} with site resid_post, "
                                f"mlp_out or attn_out (e.g. {next(iter(lookup.saes_map.values()))})")
        config_file = sae_dir / "config.json"
        # sae_lens's own config reader: config.json (or the names, where it is absent) and the tensor shapes.
        with _hub_downloads_from(sae_dir.parent.parent):
            cfg = _read_or_explain(config_file if config_file.is_file() else weights,
                                   lambda path=hub_path: get_gemma_3_config_from_hf(lookup.repo_id, path, "cpu"))
        layer = _layer_or_explain(cfg["hook_name"], weights)
        native = _NativeSae(GEMMA_SCOPE_2, weights, sae_dir.parent.parent, hub_path, lookup.repo_id,
                            _repo_overrides(lookup, hub_path))
        sources.append(SaeSource(layer, weights, GEMMA_SCOPE_2, partial(_load_native, native)))
    return sources


def find_goodfire_saes(folder: Path) -> list[SaeSource]:
    """Goodfire SAE files in ``folder``, known by the names the registry gives them (one file per hub repo)."""
    from sae_lens.loading.pretrained_sae_loaders import get_goodfire_config_from_hf

    sources = []
    for lookup, file_name in _goodfire_files():
        path = folder / file_name
        if not path.is_file():
            continue
        # The loader hard-codes model, layer and sizes per file; ask it for the hook rather than parse the name.
        hook = get_goodfire_config_from_hf(lookup.repo_id, file_name, "cpu")["hook_name"]
        shapes = _tensor_shapes(path, GOODFIRE_KEYS, GOODFIRE)
        d_sae, d_in = shapes["encoder_linear.weight"]
        overrides = {**_registry_overrides(lookup, file_name), "d_in": d_in, "d_sae": d_sae}
        native = _NativeSae(GOODFIRE, path, folder, file_name, lookup.repo_id, overrides)
        sources.append(SaeSource(_layer_or_explain(hook, path), path, GOODFIRE, partial(_load_native, native)))
    return sources


def _goodfire_files() -> list[tuple[Any, str]]:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return [(lookup, file_name) for lookup in get_pretrained_saes_directory().values()
            if lookup.conversion_func == CONVERSION_FUNCS[GOODFIRE] for file_name in lookup.saes_map.values()]


def _files_below(folder: Path, name: str, depth: int) -> list[Path]:
    """Files called ``name`` in ``folder`` or up to ``depth`` folder levels below it."""
    return sorted({path for level in range(depth + 1)
                   for path in folder.glob("/".join(["*"] * level + [name])) if path.is_file()})


def _load_native(native: _NativeSae, device: str, dtype: str):
    from sae_lens import SAE
    from sae_lens.loading.pretrained_sae_loaders import NAMED_PRETRAINED_SAE_LOADERS

    hub_loader = NAMED_PRETRAINED_SAE_LOADERS[CONVERSION_FUNCS[native.format]]

    def converter(path, device, cfg_overrides=None):
        overrides = {**native.cfg_overrides, **(cfg_overrides or {}), "device": device}
        with _hub_downloads_from(native.root):
            cfg_dict, state_dict, _log_sparsity = hub_loader(
                repo_id=native.repo_id, folder_name=native.folder_name, device=device,
                force_download=False, cfg_overrides=overrides,
            )
        return cfg_dict, state_dict

    sae = _read_or_explain(native.path,
                           lambda: SAE.load_from_disk(native.path, device=device, dtype=dtype, converter=converter))
    if sae.cfg.normalize_activations == "expected_average_only_in":
        # sae_lens treats this setting as a no-op at run time; from_pretrained folds the factor in, so do the same.
        if native.norm_scaling_factor is None:
            raise TellnormError(f"{native.path} expects activations rescaled by a dataset norm factor that is unknown")
        sae.fold_activation_norm_scaling_factor(native.norm_scaling_factor)
    return sae


_HUB_REDIRECT_LOCK = threading.Lock()


@contextmanager
def _hub_downloads_from(root: Path):
    """Serve sae_lens's ``hf_hub_download`` calls from ``root`` (laid out like the hub repo) while loading.

    The per-release loaders fetch each file through this one module-level function; replacing it for the duration
    is the seam sae_lens's own test-suite uses for the same purpose. The lock keeps concurrent loads from seeing
    each other's folder.
    """
    from sae_lens.loading import pretrained_sae_loaders

    def local_file(repo_id=None, filename=None, subfolder=None, **_ignored):
        path = root / subfolder / filename if subfolder else root / filename
        if not path.is_file():
            missing = _missing_local_file_type()
            raise missing(f"{path} is missing: copy the whole SAE folder as downloaded from {repo_id}")
        return str(path)

    def local_shapes(repo_id, filename):  # the hub version fetches the safetensors header over HTTP
        return _safetensors_shapes(local_file(repo_id, filename))

    with (_HUB_REDIRECT_LOCK, mock.patch.object(pretrained_sae_loaders, "hf_hub_download", local_file),
          mock.patch.object(pretrained_sae_loaders, "get_safetensors_tensor_shapes", local_shapes)):
        yield


@cache
def _missing_local_file_type() -> type:
    """A TellnormError that is also huggingface_hub's EntryNotFoundError, raised for a file the local copy lacks.

    Loaders that treat a file as optional (Gemma Scope 2's config.json) catch EntryNotFoundError and fall back
    exactly as they do when the hub lacks it; everywhere else it reads as a TellnormError.
    """
    from huggingface_hub.utils import EntryNotFoundError

    return type("MissingLocalFile", (TellnormError, EntryNotFoundError), {})


# ---------------------------------------------------------------- registry look-ups


def _release_lookup(fmt: str, folder: Path, release: str | None):
    """The registry entry of the release in ``folder``: as named, the only one of ``fmt``, or found in the path.

    The HF cache (``models--Owner--Repo``) and ``hf download --local-dir Repo`` both keep the repo name, so any
    component of the resolved path may carry it.
    """
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    func = CONVERSION_FUNCS[fmt]
    candidates = {name: lookup for name, lookup in get_pretrained_saes_directory().items()
                  if lookup.conversion_func == func}
    names = sorted(candidates)
    choices = ", ".join(names) if len(names) <= 16 else f"{', '.join(names[:16])}, ... ({len(names)} in all)"
    if release is not None:
        if release not in candidates:
            raise TellnormError(f"{release!r} is not a {fmt} release in sae_lens's registry: choose one of {choices}")
        return candidates[release]
    if len(candidates) == 1:
        return next(iter(candidates.values()))
    parts = set(folder.resolve().parts)
    for lookup in candidates.values():
        repo_names = {lookup.repo_id.split("/")[-1], "models--" + lookup.repo_id.replace("/", "--")}
        if parts & repo_names:
            return lookup
    example = next(iter(candidates.values())).repo_id.split("/")[-1]
    reads = {QWEN_SCOPE: "k and the base model come", GEMMA_SCOPE: "the base model and hook come",
             GEMMA_SCOPE_2: "the base model comes"}.get(fmt, "sae_lens reads the SAE's settings")
    raise TellnormError(
        f"cannot tell which {fmt} release {folder} holds ({reads} from its name): name the folder "
        f"after its hub repo (e.g. {example}) or pass {{'format': '{fmt}', 'path': ..., 'release': NAME}} with NAME "
        f"one of {choices}"
    )


def _registry_id(lookup, hub_path: str) -> str | None:
    return next((sae_id for sae_id, path in lookup.saes_map.items() if path == hub_path), None)


def _repo_overrides(lookup, hub_path: str) -> dict:
    """The registry's config overrides (neuronpedia id) for the SAE at ``hub_path``, from any release of its repo.

    Gemma Scope repos back several releases (all SAEs, canonical ones) and not every one carries the neuronpedia id.
    The model name stays the loader's, read from the repo name: the registry lists gemma-scope-9b-it-res as
    gemma-2-9b, though its SAEs are for gemma-2-9b-it (the loader and the -canonical release say so).
    """
    from sae_lens.loading.pretrained_saes_directory import get_config_overrides, get_pretrained_saes_directory

    found: dict = {}
    for release in get_pretrained_saes_directory().values():
        sae_id = _registry_id(release, hub_path) if release.repo_id == lookup.repo_id else None
        if sae_id is not None:
            overrides = get_config_overrides(release.release, sae_id)
            if overrides.get("neuronpedia_id"):
                return overrides
            found = found or overrides
    return found


def _registry_overrides(lookup, hub_path: str) -> dict:
    """What SAE.from_pretrained would add: the registry's config overrides (neuronpedia id) and model name.

    The registry's model is used because some loaders hard-code another (Llama-Scope-R1 claims Llama-3.1-8B though
    the release is for DeepSeek-R1-Distill-Llama-8B), which would trip the wrong-model warning.
    """
    from sae_lens.loading.pretrained_saes_directory import get_config_overrides

    sae_id = _registry_id(lookup, hub_path)
    overrides = get_config_overrides(lookup.release, sae_id) if sae_id is not None else {}
    return {**overrides, "model_name": lookup.model}


# ---------------------------------------------------------------- reading files with one-line errors


def _tensor_shapes(path: Path, required: tuple[str, ...], fmt: str) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors in a torch file, memory-mapped so multi-GB files cost nothing to inspect."""
    import torch

    def read():
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) torch format

    state = _read_or_explain(path, read)
    missing = [key for key in required if not (isinstance(state, dict) and key in state)]
    if missing:
        found = ", ".join(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise TellnormError(f"{path} is not a {fmt} SAE file: it lacks {', '.join(missing)} (found: {found})")
    return {key: tuple(state[key].shape) for key in required}


def _npz_shapes(path: Path, required: tuple[str, ...], fmt: str) -> dict[str, tuple[int, ...]]:
    """Shapes of the arrays in an ``.npz`` file from their headers only, with Gemma Scope's key renaming."""
    import zipfile

    import numpy as np

    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}

    def read():
        shapes = {}
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                key = member.removesuffix(".npy")
                key = "W_" + key[2:] if key.startswith("w_") else key
                with archive.open(member) as stream:
                    version = np.lib.format.read_magic(stream)
                    if version in readers:
                        shapes[key] = tuple(readers[version](stream)[0])
                    else:  # a newer header version: read the array itself
                        shapes[key] = np.load(stream).shape
        return shapes

    shapes = _read_or_explain(path, read)
    missing = [key for key in required if key not in shapes]
    if missing:
        raise TellnormError(f"{path} is not a {fmt} SAE file: it lacks {', '.join(missing)} "
                            f"(found: {', '.join(shapes)})")
    return shapes


def _safetensors_shapes(path: str | Path) -> dict[str, list[int]]:
    """Tensor shapes from a local safetensors header (what sae_lens reads from the hub with a range request)."""
    from safetensors import safe_open

    def read():
        with safe_open(str(path), framework="pt") as handle:
            return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118

    return _read_or_explain(Path(path), read)


def _read_or_explain(path: Path, read: Callable[[], Any]) -> Any:
    """Run ``read``; any failure but a TellnormError becomes one line naming ``path``."""
    try:
        return read()
    except TellnormError:
        raise
    except Exception as err:  # corrupt or truncated files surface as many exception types
        detail = (str(err).strip().splitlines() or [""])[0][:200]
        raise TellnormError(f"cannot read {path} ({type(err).__name__}: {detail}): the file is corrupt, truncated "
                            "or not an SAE; download it again") from None


def _layer_or_explain(hook_name: str | None, where: Path) -> int:
    layer = layer_of_hook(hook_name)
    if layer is None:
        raise TellnormError(f"{where}: SAE hook {hook_name!r} is not a per-layer hook (blocks.<layer>.hook_...), "
                            "so it cannot be keyed by layer")
    return layer


def guess_native_format(folder: Path) -> str | None:
    """The native layout ``folder`` looks like, for pointing users at the right spec."""
    if not folder.is_dir():
        return None
    if any(QWEN_SCOPE_FILE.match(p.name) for p in folder.iterdir()):
        return QWEN_SCOPE
    if _files_below(folder, GEMMA_SCOPE_WEIGHTS, depth=3):
        return GEMMA_SCOPE
    if _files_below(folder, GEMMA_SCOPE_2_WEIGHTS, depth=2):  # before Llama-Scope: these folders hold config.json too
        return GEMMA_SCOPE_2
    if _llama_scope_dirs(folder):
        return LLAMA_SCOPE_R1
    if any((folder / file_name).is_file() for _lookup, file_name in _goodfire_files()):
        return GOODFIRE
    if any(folder.glob("*.pt")):
        return QRESEARCH
    return None


def _nothing_found_message(fmt: str, folder: Path) -> str:
    expected = {
        SAE_LENS: "an SAE saved with SAE.save_model (cfg.json + sae_weights.safetensors) or subfolders of them",
        QWEN_SCOPE: "Qwen-Scope files layer<N>.sae.pt",
        LLAMA_SCOPE_R1: f"Llama-Scope-R1 folders L<N>R with config.json and {LLAMA_SCOPE_WEIGHTS}",
        QRESEARCH: "qresearch files *-l<N>.pt",
        GEMMA_SCOPE: f"Gemma Scope folders layer_<N>/width_<W>/average_l0_<K> with {GEMMA_SCOPE_WEIGHTS}",
        GEMMA_SCOPE_2: f"Gemma Scope 2 folders <site>/layer_<N>_width_<W>_l0_<size> with {GEMMA_SCOPE_2_WEIGHTS}, site "
                       "resid_post, mlp_out or attn_out (transcoder and clt folders are not SAEs of one hook)",
        GOODFIRE: "Goodfire files named as downloaded (" + ", ".join(name for _l, name in _goodfire_files()) + ")",
    }[fmt]
    guess = guess_native_format(folder) if fmt == SAE_LENS else None
    hint = f"; it looks like {guess} files: pass '{guess}:{folder}'" if guess else ""
    return f"{folder} holds no SAEs: expected {expected}{hint}"
