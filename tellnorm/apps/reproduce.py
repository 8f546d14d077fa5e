"""``tellnorm reproduce``: the whole study on the organism, stage by stage, into one folder with a report.

Stages (:data:`STAGES`): organism accuracy → norm profile (thinking vs non-thinking) → do norm peaks mark the steps
(ground truth) → SAE quality and reasoning features (contrast, ReasonScore, controls) with the trend figure → the
bound → correlation → interventions → the test-time techniques against compute-matched baselines → dashboards.
Each stage writes its tables and figures and a section of ``REPORT.md`` with the numbers it measured.

Stages are cached: a stage is skipped when the hash of its inputs (model and SAE files, the config fields it reads,
tellnorm's source, library versions, upstream stages' hashes) matches the record it left in ``OUT/.stages/`` and
every file it wrote still exists; its report section comes back from that record. ``force`` reruns stages; a stage
that reran makes every stage reading its outputs rerun. ``OUT/manifest.json`` records versions, config, seeds,
paper constants, git revision and the stage hashes (deterministic, so it can live in git); wall times go to the
git-ignored ``OUT/stage_times.csv``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
import warnings
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tellnorm.errors import TellnormError

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Iterator
    from typing import TypeAlias

    import pandas as pd
    import torch
    from sae_lens import SAE

    from tellnorm.backends.base import ModelAPI
    from tellnorm.organism.evaluate import EvalConfig
    from tellnorm.saes.loading import SaeSpec
    from tellnorm.studies.corpus import ContrastCorpus
    from tellnorm.studies.evaluation import EvaluateConfig
    from tellnorm.studies.suppression import InterventionConfig

    # what load_model takes: "organism", a local folder, a cached hub name, a loaded model, or (model, tokenizer)
    ModelSpec: TypeAlias = str | Path | ModelAPI | tuple[torch.nn.Module, Any]
    # what load_saes takes: "organism", a folder, "FORMAT:PATH", "RELEASE:ID[,ID...]", a dict or a parsed SaeSpec
    SaeSpecLike: TypeAlias = str | Path | dict[str, Any] | SaeSpec


@dataclass
class ReproduceConfig:
    """What ``tellnorm reproduce`` runs on (model, SAEs, tasks, output folder) and the sample size of each stage.

    ``tasks`` empty: the organism's own study (its task, difficulties and step labels). With tasks: the study on
    any model (:mod:`tellnorm.apps.reproduce_model`), at the paper code's generation budgets and sampling."""

    out: str = "figures"
    model: ModelSpec = "organism"
    saes: SaeSpecLike = "organism"
    tasks: tuple[str, ...] = ()  # FILE.jsonl[=EXTRACTOR] or lm-eval:NAME[=EXTRACTOR] (tellnorm.tasks)
    extractor: str = "last-number"  # TELLNORM: the answer extractor of a task spec that names none
    contrast_model: ModelSpec | None = None  # the non-thinking model of a model without a thinking switch
    backend: str = "hf"  # where generation-heavy stages run: hf or vllm (SAE stages: HF, teacher-forced)
    device: str = "cpu"
    dtype: str = "float32"
    problems: int | None = None  # TELLNORM: problems per task (None: every problem of the file)
    max_new_tokens: int = 4096  # PAPER code: the accuracy / profile / feature responses' budget
    suppression_max_new_tokens: int = 2048  # PAPER code: the suppression study's budget
    evaluation_max_new_tokens: int = 1024  # PAPER code: the LRS budget (the techniques' evaluation)
    sampling: str = "paper"  # PAPER §7: temperature 0.7, top-p 0.8, top-k 20, repetition 1.05; or "greedy"
    n_samples: int = 8  # PAPER §6: N for LRS and the selection baselines [inferred: 4–8]
    only: tuple[str, ...] = ()  # run only these stages and the stages they read (empty: every stage)
    per_difficulty: int = 100  # organism test problems per level and mode for accuracy
    profile_per_difficulty: int = 25  # test problems per level traced for the norm analyses
    features_per_difficulty: int = 15  # validation problems per level for the feature contrast
    intervention_per_difficulty: int = 10  # test problems per level for the suppression study (≈ 3.5 min)
    evaluation_per_difficulty: int = 20  # test problems per level for ALRR/ERSS/LRS vs baselines
    explorer_per_difficulty: int = 5  # validation problems per level and mode in the feature explorer
    top_k: int = 20  # PAPER §2: K below 40 [inferred K ≈ 10–20]
    quick: bool = False  # small sizes for smoke tests (every stage runs; under 3 min on 2 cores)

    def __post_init__(self) -> None:
        self.tasks, self.only = tuple(self.tasks), tuple(self.only)
        if self.quick:
            self.per_difficulty, self.profile_per_difficulty, self.features_per_difficulty = 4, 2, 2
            self.intervention_per_difficulty = self.evaluation_per_difficulty = self.explorer_per_difficulty = 1
            if self.task_mode:
                self.problems = min(self.problems or 4, 4)
                self.max_new_tokens, self.suppression_max_new_tokens, self.evaluation_max_new_tokens = 48, 32, 32
                self.n_samples = 2
        if not self.task_mode and (self.contrast_model is not None or self.backend != "hf"):
            raise TellnormError("--contrast-model and --backend apply to runs with --task: the organism's study runs "
                                "on its own task and backend")
        if self.backend not in ("hf", "vllm"):
            raise TellnormError(f"unknown backend {self.backend!r}: choose hf or vllm")
        if self.sampling not in ("paper", "greedy"):
            raise TellnormError(f"unknown sampling {self.sampling!r}: choose paper or greedy")
        for name in ("max_new_tokens", "suppression_max_new_tokens", "evaluation_max_new_tokens", "n_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise TellnormError(f"{name.replace('_', '-')} must be a whole number ≥ 1, got {value!r}")
        if self.problems is not None and self.problems < 1:
            raise TellnormError(f"--problems must be ≥ 1, got {self.problems}")

    @property
    def task_mode(self) -> bool:
        """Whether this run is the study on tasks (any model) rather than the organism's own study."""
        return bool(self.tasks)


@dataclass(frozen=True)
class Stage:
    """One step of the study and what its cache key is made of (every stage also reads the model and the code)."""

    name: str
    run: Callable[[Context], None]
    config: tuple[str, ...] = ()  # the ReproduceConfig fields it reads
    upstream: tuple[str, ...] = ()  # stages whose outputs it reads: it reruns whenever they rerun
    saes: bool = False  # it reads the SAE files


@dataclass
class Report:
    """The report's markdown sections (``## title`` + body each), in stage order."""

    sections: list[str] = field(default_factory=list)

    def add(self, title: str, body: str) -> None:
        """Append a section ``## title`` with the markdown ``body``."""
        self.sections.append(f"## {title}\n\n{body}\n")

    def markdown(self) -> str:
        """The whole report as one markdown document: the heading, then every section."""
        return "# tellnorm reproduction report (generated by `tellnorm reproduce`)\n\n" + "\n".join(self.sections)

    def write(self, path: str | Path) -> None:
        """``path`` (markdown) and the same report as a standalone HTML page beside it (``report.html``)."""
        from tellnorm.io import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(self.markdown())
        with atomic_path(Path(path).with_name("report.html")) as tmp:
            tmp.write_text(report_html(self.markdown()))


REPORT_CSS = ("body{font-family:Inter,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
              "line-height:1.45;color:#222}table{border-collapse:collapse;margin:1em 0;font-size:90%}"
              "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f4f4f4}"
              "img{max-width:100%}pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:85%}")


def report_html(markdown_text: str) -> str:
    """The report as one offline HTML page (CommonMark with tables; figures by relative path)."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown_text)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>tellnorm report</title>"
            f"<style>{REPORT_CSS}</style></head>\n<body>\n{body}</body></html>\n")


STAGE_DIR = ".stages"  # cache records (git-ignored): OUT/.stages/<stage>.json
CORPUS_FILE = f"{STAGE_DIR}/contrast_corpus.json"  # the features stage's corpus, read by bounds/correlation/dashboards
TIMES_FILE = "stage_times.csv"  # wall times: machine-dependent, so git-ignored and kept out of the manifest


@dataclass
class Context:
    """What stages share. The model, SAEs and corpus load on first use: a fully cached run loads nothing."""

    cfg: ReproduceConfig
    out: Path
    report: Report = field(default_factory=Report)
    state: dict[str, Any] = field(default_factory=dict)  # small JSON values stages pass on (kept in their records)
    _model: ModelAPI | None = None
    _saes: dict[int, SAE] | None = None
    _corpus: ContrastCorpus | None = None
    _loaded: dict[str, Any] = field(default_factory=dict)  # tasks, the generation backend's models

    @property
    def model(self) -> ModelAPI:
        """The loaded model of ``cfg.model`` on the HF backend (loaded on first use): SAE stages and teacher-forced
        passes run on it."""
        if self._model is None:
            from tellnorm.backends import load_model

            self._model = load_model(self.cfg.model, device=self.cfg.device, dtype=self.cfg.dtype)
        return self._model

    def _load(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._loaded:
            self._loaded[key] = make()
        return self._loaded[key]

    @property
    def tasks(self) -> list:
        """The :class:`tellnorm.tasks.Task` of each ``cfg.tasks`` spec, cut to ``cfg.problems`` problems."""
        from tellnorm.tasks import load_task

        return self._load("tasks", lambda: [load_task(spec, self.cfg.extractor).head(self.cfg.problems)
                                            for spec in self.cfg.tasks])

    @property
    def generator(self) -> ModelAPI:
        """The model generation-heavy stages run on: ``cfg.model`` on ``cfg.backend`` (the HF model itself for hf)."""
        from tellnorm.backends import load_model

        if self.cfg.backend == "hf":
            return self.model
        return self._load("generator", lambda: load_model(self.cfg.model, backend=self.cfg.backend,
                                                          dtype=self.cfg.dtype))

    @property
    def contrast(self) -> ModelAPI | None:
        """The non-thinking model (``cfg.contrast_model``) on the generation backend, or None."""
        from tellnorm.backends import load_model

        if self.cfg.contrast_model is None:
            return None
        options = {"device": self.cfg.device} if self.cfg.backend == "hf" else {}
        return self._load("contrast", lambda: load_model(self.cfg.contrast_model, backend=self.cfg.backend,
                                                         dtype=self.cfg.dtype, **options))

    @property
    def saes(self) -> dict[int, SAE]:
        """``{layer: SAE}`` of ``cfg.saes``, checked against the model (loaded on first use)."""
        if self._saes is None:
            from tellnorm.saes import load_saes

            self._saes = load_saes(self.cfg.saes, self.model)
        return self._saes

    @property
    def corpus(self) -> ContrastCorpus:
        """The features stage's contrast corpus, read back from ``OUT/.stages/contrast_corpus.json`` on first use."""
        if self._corpus is None:
            from tellnorm.studies.corpus import ContrastCorpus

            self._corpus = ContrastCorpus(**json.loads((self.out / CORPUS_FILE).read_text()))
        return self._corpus

    def keep(self, key: str, value: Any) -> None:
        """Pass ``value`` to later stages through JSON, as a cached run gets it, so both runs see the same thing."""
        self.state[key] = json.loads(json.dumps(value, default=_json_default))


@dataclass
class StageRun:
    """How one stage went in a run: its cache key, whether it ran or came from the cache, and its wall time."""

    hash: str
    status: str  # "ran" or "cached"
    seconds: float


@dataclass
class ReproduceResult:
    """What :func:`reproduce` returns: the report it wrote and each stage's :class:`StageRun`, in stage order."""

    report: Report
    stages: dict[str, StageRun]  # name -> StageRun


def reproduce(cfg: ReproduceConfig, force: Collection[str] = ()) -> ReproduceResult:
    """Run every stage whose inputs changed (or in ``force``; ``"all"`` for every one) and write the report."""
    from tellnorm.figures import png_session
    from tellnorm.io import check_output_dir

    forced = forced_stages(force)  # a bad name fails before any work
    if not cfg.task_mode and str(cfg.model) != "organism":
        raise TellnormError(f"{_spec_text(cfg.model)} needs tasks: pass --task FILE.jsonl[=EXTRACTOR] or "
                            "--task lm-eval:NAME (the organism's study runs on the organism's own task)")
    out = check_output_dir(cfg.out)
    inputs = stage_inputs(cfg)
    hashes = stage_hashes(cfg, inputs)
    ctx = Context(cfg, out)
    if cfg.task_mode:
        from tellnorm.apps.reproduce_model import check_run

        check_run(ctx)  # tasks, modes and SAEs: bad input fails before any generation
    runs: dict[str, StageRun] = {}
    with ExitStack() as browser:
        for stage in stages_for(cfg):
            start = time.perf_counter()
            record = _read_record(out, stage.name)
            stale = (stage.name in forced or any(runs[u].status == "ran" for u in stage.upstream)
                     or not _still_valid(record, hashes[stage.name], out))
            if stale:
                print(f"[{stage.name}] running", flush=True)
                if not any(run.status == "ran" for run in runs.values()):  # one browser for every PNG, if any
                    browser.enter_context(png_session())
                record = _run_stage(stage, ctx, hashes[stage.name])
            else:
                ctx.report.sections += record["report"]
                ctx.state.update(record["state"])
            runs[stage.name] = StageRun(hashes[stage.name], "ran" if stale else "cached", time.perf_counter() - start)
            print(f"[{stage.name}] {runs[stage.name].seconds:.1f} s{'' if stale else ' cached'}", flush=True)
    ctx.report.add("The paper's claims, judged", claims_section(out))
    write_claims(out)
    ctx.report.write(out / "REPORT.md")
    _write_json(manifest(cfg, inputs, hashes, out), out / "manifest.json")
    _write_times(runs, out / TIMES_FILE)
    print(f"wrote {out / 'REPORT.md'}, report.html, manifest.json, {TIMES_FILE}")
    return ReproduceResult(ctx.report, runs)


def claims_section(out: Path) -> str:
    """Each paper claim with the numbers it was judged on and the verdict (rules in :mod:`tellnorm.studies.claims`),
    rebuilt from the tables on every run, cached stages included."""
    from tellnorm.studies.claims import claims_markdown, judge_all

    return ("Each verdict follows a rule written next to the claim in `tellnorm/studies/claims.py`, applied to the "
            "tables "
            "above; section numbers are the paper's.\n\n" + claims_markdown(judge_all(out)))


def write_claims(out: Path) -> Path:
    """``claims.csv``: each claim's verdict and what was measured (the contract table ``tellnorm report`` merges)."""
    import pandas as pd

    from tellnorm.io import write_csv
    from tellnorm.studies.claims import judge_all

    verdicts = judge_all(out)
    frame = pd.DataFrame([{"claim": v.claim, "verdict": v.verdict, "measured": v.measured, "reason": v.reason}
                          for v in verdicts])
    return write_csv(frame, out / "claims.csv")


def _still_valid(record: dict | None, stage_hash: str, out: Path) -> bool:
    return (record is not None and record.get("hash") == stage_hash
            and all((out / name).is_file() for name in record.get("outputs", [])))


def _run_stage(stage: Stage, ctx: Context, stage_hash: str) -> dict:
    """Run ``stage`` and save its record: its outputs are the files it created or replaced under OUT."""
    ctx.out.mkdir(parents=True, exist_ok=True)
    before = _snapshot(ctx.out)
    n_sections, n_state = len(ctx.report.sections), set(ctx.state)
    stage.run(ctx)
    after = _snapshot(ctx.out)
    record = {"stage": stage.name, "hash": stage_hash,
              "outputs": sorted(name for name, stat in after.items() if before.get(name) != stat),
              "report": ctx.report.sections[n_sections:],
              "state": {key: value for key, value in ctx.state.items() if key not in n_state}}
    _write_json(record, ctx.out / STAGE_DIR / f"{stage.name}.json")
    return record


def _snapshot(out: Path) -> dict:
    # files are written by rename (tellnorm.io.atomic_path), so a rewritten file has a new inode even if unchanged
    snapshot = {}
    for path in out.rglob("*"):
        if path.is_file():
            stat = path.stat()
            snapshot[path.relative_to(out).as_posix()] = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    return snapshot


def _read_record(out: Path, name: str) -> dict | None:
    try:
        return json.loads((out / STAGE_DIR / f"{name}.json").read_text())
    except (OSError, ValueError):  # missing or damaged: the stage just runs
        return None


def _write_json(obj, path: Path) -> None:
    from tellnorm.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _write_times(runs: dict, path: Path) -> None:
    from tellnorm.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text("stage,status,seconds\n"
                       + "".join(f"{name},{r.status},{r.seconds:.1f}\n" for name, r in runs.items()))


def forced_stages(names: Collection[str]) -> set[str]:
    """The stage names ``--force`` gave (``all``: every stage); an unknown name is one TellnormError line."""
    unknown = [name for name in names if name not in STAGE_NAMES and name != "all"]
    if unknown:
        raise TellnormError(f"unknown stage {unknown[0]!r} for --force: choose from {', '.join(STAGE_NAMES)} or all")
    return set(STAGE_NAMES) if "all" in names else set(names)


# --- cache keys ----------------------------------------------------------------------------------------------------

def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    return str(obj)


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()


def files_hash(folder: str | Path) -> str:
    """Hash of every file's relative path and contents under ``folder`` (byte caches excluded)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        file_digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                file_digest.update(chunk)
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + file_digest.digest())
    return digest.hexdigest()


@lru_cache(maxsize=1)
def code_hash() -> str:
    """tellnorm's own source: any change to it may change a number, so every stage reruns. Hashed once per process:
    the code a process runs is the code it imported, whatever is edited on disk meanwhile."""
    return files_hash(Path(__file__).resolve().parents[1])


def library_versions() -> dict[str, str | None]:
    """Versions of Python, tellnorm and the libraries that compute the numbers (None: not installed)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from tellnorm import __version__

    found = {"python": platform.python_version(), "tellnorm": __version__}
    for package in ("torch", "transformers", "transformer_lens", "sae_lens"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def model_fingerprint(spec: ModelSpec) -> dict[str, str | None]:
    """The model's files (a folder, the organism, or a hub name's cached snapshot), or an in-memory model's weights."""
    from tellnorm.organism.paths import DEFAULT_ORGANISM_DIR

    if isinstance(spec, (str, Path)):
        path = DEFAULT_ORGANISM_DIR if str(spec) == "organism" else Path(spec).expanduser()
        if not path.is_dir():
            path = _hub_snapshot(str(spec))
        # the spec itself too: it becomes the model's name, which figures and dashboards show
        return {"spec": str(spec), "files": files_hash(path) if path is not None else None}
    import torch

    module = spec.hf_model if hasattr(spec, "hf_model") else spec[0]
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # any shape and dtype: its bytes
        digest.update(name.encode() + raw.numpy().tobytes())
    return {"spec": _spec_text(spec), "weights": digest.hexdigest()}


def _hub_snapshot(name: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not a hub name or not cached: load_model says so in its own words when the model loads
        return None


def sae_fingerprint(spec: SaeSpecLike) -> dict[str, Any]:
    """The SAE folder's files, or the registry release and ids (a bad spec is one TellnormError line, now)."""
    from tellnorm.saes.loading import parse_sae_spec

    parsed = parse_sae_spec(spec)
    if parsed.path is None:
        return {"release": parsed.release, "sae_ids": list(parsed.sae_ids), "layers": parsed.layers}
    return {"format": parsed.format, "files": files_hash(parsed.path), "layers": parsed.layers,
            "options": parsed.options}


def _spec_text(spec: ModelSpec | SaeSpecLike) -> str:
    if isinstance(spec, (str, Path, dict)):
        return str(spec)
    return f"in-memory {getattr(spec, 'name', type(spec).__name__)}"


def stage_inputs(cfg: ReproduceConfig) -> dict[str, Any]:
    """What every stage's key shares: code, library versions, model files, SAE files."""
    found = {"code": code_hash(), "versions": library_versions(), "model": model_fingerprint(cfg.model),
             "saes": sae_fingerprint(cfg.saes)}
    if cfg.task_mode:
        found["tasks"] = [task_fingerprint(spec) for spec in cfg.tasks]
        if cfg.contrast_model is not None:
            found["contrast_model"] = model_fingerprint(cfg.contrast_model)
    return found


def task_fingerprint(spec: str) -> dict[str, str]:
    """A task file's contents (a missing file is left to the task loader's one-line error), or an lm-eval name."""
    source = spec.partition("=")[0]
    path = Path(source)
    return {"spec": spec, "sha256": hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""}


def stage_hashes(cfg: ReproduceConfig, inputs: dict[str, Any] | None = None) -> dict[str, str]:
    """{stage: hash of its inputs, config fields and upstream stages' hashes}, in stage order."""
    inputs = inputs or stage_inputs(cfg)
    hashes: dict[str, str] = {}
    for stage in stages_for(cfg):
        hashes[stage.name] = _sha256({
            "stage": stage.name, "code": inputs["code"], "versions": inputs["versions"], "model": inputs["model"],
            "tasks": inputs.get("tasks"), "contrast_model": inputs.get("contrast_model"),
            "saes": inputs["saes"] if stage.saes else None,
            "config": {name: getattr(cfg, name) for name in stage.config},
            "upstream": {name: hashes[name] for name in stage.upstream}})
    return hashes


# --- manifest ------------------------------------------------------------------------------------------------------

# Module-level constants and default configs the paper fixes, read from where they are defined.
PAPER_CONSTANTS = ("tellnorm.features:REASON_SCORE_ALPHA", "tellnorm.features:WINDOW_LEFT",
                   "tellnorm.features:WINDOW_RIGHT", "tellnorm.features:DEFAULT_TOP_K",
                   "tellnorm.features:RELATIVE_EPS",
                   "tellnorm.thresholds:ThresholdConfig", "tellnorm.techniques.alrr:BLOWUP_RATIO",
                   "tellnorm.techniques.alrr:GROWTH_EPS", "tellnorm.techniques.alrr:MAX_EXTRA_ITERS",
                   "tellnorm.techniques.erss:ERSSConfig", "tellnorm.techniques.lrs:LRSConfig",
                   "tellnorm.studies.evaluation:SENSITIVITY_K", "tellnorm.studies.evaluation:SENSITIVITY_LOOPS",
                   "tellnorm.studies.correlation:PAPER_SPEARMAN_X100")


def paper_constants() -> dict[str, Any]:
    """``{"module:NAME": value}`` of :data:`PAPER_CONSTANTS`; a config class gives its defaults as a dict."""
    from importlib import import_module

    found = {}
    for ref in PAPER_CONSTANTS:
        module, name = ref.split(":")
        value = getattr(import_module(module), name)
        found[ref] = asdict(value()) if isinstance(value, type) else value  # a config class: its defaults
    return found


def stage_settings(cfg: ReproduceConfig) -> dict[str, Any]:
    """The library configs the stages run with (their seeds and constants go into the manifest)."""
    from inspect import signature

    from tellnorm.studies.correlation import correlation_study
    from tellnorm.studies.features import feature_study

    return {"accuracy": accuracy_config(cfg), "interventions": intervention_config(cfg),
            "evaluation": evaluation_config(cfg),
            "features": {"seed": signature(feature_study).parameters["seed"].default, "top_k": cfg.top_k},
            "correlation": {"seed": signature(correlation_study).parameters["seed"].default, "top_k": cfg.top_k}}


def _seeds(settings: dict[str, Any]) -> dict[str, Any]:
    def walk(prefix: str, value: Any) -> Iterator[tuple[str, Any]]:
        if isinstance(value, dict):
            for key, item in value.items():
                yield from walk(f"{prefix}.{key}", item)
        elif "seed" in prefix.rsplit(".", 1)[-1]:
            yield prefix, value

    plain = json.loads(json.dumps(settings, default=_json_default))
    return dict(item for name, value in plain.items() for item in walk(name, value))


def git_state(out: Path) -> dict[str, str | bool | None]:
    """HEAD of the repository tellnorm runs from, and whether anything but the output folder differs from it."""
    from tellnorm.organism.paths import REPO_ROOT

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=60)

    try:
        head = git("rev-parse", "--show-toplevel", "HEAD")
        lines = head.stdout.split()
        if head.returncode or len(lines) != 2 or Path(lines[0]).resolve() != REPO_ROOT:
            return {"revision": None, "dirty": None}  # an installed copy, not a checkout
        # the previous run's figures are not the code: leave the output folder out of "dirty"
        out = out.resolve()
        exclude = [f":(exclude){out.relative_to(REPO_ROOT).as_posix()}"] if out.is_relative_to(REPO_ROOT) else []
        status = git("status", "--porcelain", "--", ".", *exclude)
    except (OSError, subprocess.TimeoutExpired):
        return {"revision": None, "dirty": None}
    return {"revision": lines[1], "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def manifest(cfg: ReproduceConfig, inputs: dict[str, Any], hashes: dict[str, str], out: Path) -> dict[str, Any]:
    """Everything that determines the outputs, and nothing machine- or time-dependent. It names the git revision
    the run came from, so it cannot be part of that revision: ``figures/manifest.json`` is git-ignored."""
    settings = stage_settings(cfg)
    config = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    config.update(model=_spec_text(cfg.model), saes=_spec_text(cfg.saes))
    return {"tellnorm": inputs["versions"]["tellnorm"], "versions": inputs["versions"], "git": git_state(out),
            "config": config, "seeds": _seeds(settings), "paper_constants": paper_constants(),
            "stage_settings": settings, "inputs": {"code": inputs["code"], "model": inputs["model"],
                                                   "saes": inputs["saes"]},
            "stages": {stage.name: {"hash": hashes[stage.name], "upstream": list(stage.upstream)}
                       for stage in stages_for(cfg)}}


# --- stages --------------------------------------------------------------------------------------------------------

def _code(text: str) -> str:
    return "```\n" + text + "\n```"


def accuracy_config(cfg: ReproduceConfig) -> EvalConfig:
    """The accuracy stage's config: ``cfg.per_difficulty`` organism test problems per level and mode."""
    from tellnorm.organism.evaluate import EvalConfig

    return EvalConfig(per_difficulty=cfg.per_difficulty)


def stage_accuracy(ctx: Context) -> None:
    """Organism accuracy per difficulty and mode (greedy, held-out test set): table, figure, report section."""
    from tellnorm.figures import write_figure
    from tellnorm.io import write_csv
    from tellnorm.organism.evaluate import accuracy_figure, evaluate, format_summary

    per_problem, summary = evaluate(ctx.model, accuracy_config(ctx.cfg))
    write_csv(summary, ctx.out / "organism_accuracy.csv")
    write_csv(organism_accuracy_table(per_problem, summary, ctx.model.name, seed=accuracy_config(ctx.cfg).seed),
              ctx.out / "accuracy.csv")
    write_figure(accuracy_figure(summary), ctx.out / "organism_accuracy")
    print(format_summary(summary))
    ctx.report.add("Organism accuracy (greedy, held-out test set, bootstrap 95% CI, seed 0)",
                   _code(format_summary(summary)) + "\n\n![accuracy](organism_accuracy.png)")


def organism_accuracy_table(per_problem: pd.DataFrame, summary: pd.DataFrame, model_name: str, *,
                            seed: int = 0) -> pd.DataFrame:
    """The organism's accuracy in the contract columns every run writes to ``accuracy.csv`` (model, task, mode,
    group, n, accuracy, ci_low, ci_high): the whole test set per mode (bootstrap 95% CI over problems), then each
    difficulty as a group."""
    import pandas as pd

    from tellnorm.stats import bootstrap_ci

    rows = []
    for mode, frame in per_problem.groupby("mode", sort=False):
        correct = frame["correct"].to_numpy(dtype=float)
        lo, hi = bootstrap_ci(correct, seed=seed)
        rows.append({"mode": mode, "group": "all", "n": len(correct), "accuracy": correct.mean(), "ci_low": lo,
                     "ci_high": hi})
    groups = summary.rename(columns={"difficulty": "group"})[["mode", "group", "n", "accuracy", "ci_low", "ci_high"]]
    table = pd.concat([pd.DataFrame(rows), groups.astype({"group": str})], ignore_index=True)
    return table.assign(model=model_name, task="organism")[["model", "task", "mode", "group", "n", "accuracy",
                                                            "ci_low", "ci_high"]]


def stage_norm_profile(ctx: Context) -> None:
    """Hidden-state L2 norm per layer, thinking vs non-thinking, all tokens and token-matched: tables, figures."""
    from tellnorm.studies.corpus import organism_prompt_rows
    from tellnorm.studies.profile import format_matched, profile_study

    _, profile, matched = profile_study(ctx.model, organism_prompt_rows(ctx.cfg.profile_per_difficulty), ctx.out)
    table = profile.pivot(index="layer", columns="mode", values="mean_norm").astype(float)  # float32 prints noise
    table["thinking / non-thinking"] = table["thinking"] / table["non-thinking"]
    n = int(profile["n_requests"].min())
    body = (f"Mean ‖h‖₂ of `blocks.L.hook_resid_post` per layer; CIs resample responses (n = {n} per mode).\n\n"
            + _code(table.round(3).to_string())
            + "\n\n![norm trend](norm_trend.png)\n\n![heatmap](norm_heatmap.png)")
    if matched is not None:
        body += ("\n\nLike with like: the same problems in both modes, paired; \"all tokens\" = each response's mean "
                 "norm, `answer_word` / `answer_value` = the norm at the closing `answer : X` both modes write. "
                 "Difference = thinking − non-thinking with a bootstrap 95% CI over problems.\n\n"
                 + _code(format_matched(matched)) + "\n\n![matched](norm_trend_matched.png)")
    ctx.report.add("Hidden-state L2 norm by layer (generated tokens, position 0 excluded)", body)


def stage_peaks(ctx: Context) -> None:
    """Whether norm peaks mark the organism's step computations (ground-truth labels): table, composition, figure."""
    import pandas as pd

    from tellnorm.figures import write_figure
    from tellnorm.io import write_csv
    from tellnorm.studies.groundtruth import peak_composition, peak_figure, peak_table

    frame = pd.read_parquet(ctx.out / "norms_per_token.parquet")  # the norm-profile stage's per-token table
    table = peak_table(frame)
    composition = peak_composition(frame)
    write_csv(table, ctx.out / "norm_peaks_vs_steps.csv")
    write_csv(composition, ctx.out / "norm_peak_composition.csv")
    write_figure(peak_figure(table), ctx.out / "norm_peaks_vs_steps")
    cols = ["target", "layer", "n_targets", "base_rate", "precision", "recall", "auroc_norm",
            "auroc_norm_minus_position", "auroc_same_token", "auroc_position_only"]
    ctx.report.add("Are norm peaks the step computations? (organism ground truth, thinking mode)",
                   "Peak = norm above its response's Q3 + 1.5·IQR at that layer.\n\n"
                   + _code(table[cols].round(3).to_string(index=False)) + "\n\n![peaks](norm_peaks_vs_steps.png)\n\n"
                   + "Where the peaks are (share of each layer's peaks by label, most frequent tokens):\n\n"
                   + _code(composition.round(3).to_string(index=False)))


def stage_features(ctx: Context) -> None:
    """SAE quality, the reasoning-feature contrast with its controls and the trend figure; saves the contrast corpus
    for the later stages and the dashboard's feature choice."""
    import pandas as pd

    from tellnorm.figures import write_figure
    from tellnorm.io import atomic_path, write_csv
    from tellnorm.saes.quality import sae_quality
    from tellnorm.studies.corpus import contrast_corpus
    from tellnorm.studies.features import feature_scores, feature_study, trend_figure

    if ctx.cfg.task_mode:
        from tellnorm.apps.reproduce_model import response_corpus_for

        corpus = response_corpus_for(ctx)
    else:
        corpus = contrast_corpus(ctx.model, ctx.cfg.features_per_difficulty)
    with atomic_path(ctx.out / CORPUS_FILE) as tmp:  # bounds, correlation and dashboards read it, also when cached
        tmp.write_text(json.dumps(asdict(corpus)))
    ctx._corpus = corpus
    quality = sae_quality(ctx.model, ctx.saes, corpus.sequences, n_prompt=corpus.n_prompt)
    write_csv(quality, ctx.out / "sae_quality.csv")
    result = feature_study(ctx.model, ctx.saes, corpus, ctx.out, top_k=ctx.cfg.top_k)
    profile = pd.read_csv(ctx.out / "norm_profile.csv")  # the norm-profile stage's table
    write_figure(trend_figure(profile, result["trend"], ctx.cfg.top_k, result.get("matched_trend")),
                 ctx.out / "feature_trend")
    scores = feature_scores(result)
    ctx.keep("dashboard", {"features": result["top_reason"],
                           "scores": [[layer, f, scores.get((layer, f), {})]
                                      for layer, feats in result["top_reason"].items() for f in feats]})
    trend = result["trend"].assign(ratio=lambda t: t["thinking"] / t["non-thinking"])
    where = ("the stored responses to the tasks, both modes" if ctx.cfg.task_mode
             else "held-out responses (validation problems, both modes)")
    matched_at = ("the tokens of the stated answer, found by the task's extractor, in both modes" if ctx.cfg.task_mode
                  else "the closing `answer : X` of both modes")
    body = [f"SAE quality on {where}:",
            _code(quality.drop(columns=["d_sae"]).round(4).to_string(index=False)),
            f"Mean top-{ctx.cfg.top_k} reasoning-feature activation per layer (features ranked by the contrast):",
            _code(trend.round(4).to_string(index=False)), "![feature trend](feature_trend.png)"]
    if "matched_trend" in result:
        body += [f"Like with like: the contrast on token-matched positions only ({matched_at}); "
                 "`thinking`/`non-thinking` = mean top-K activation of features re-ranked there "
                 "(bootstrap 95% CIs over problems, top-K set held fixed), "
                 "`all_token_features_*` = the all-token top-K features measured there, `top_k_jaccard` = overlap of "
                 "the two top-K sets:",
                 _code(result["matched_trend"].round(4).to_string(index=False))]
    if result["injection"] is not None:
        body += ["Token-injection control (top-5 ReasonScore features of each late layer):",
                 _code(result["injection"].round(4).to_string(index=False))]
    else:
        body += [f"ReasonScore and its token-injection control: not measured ({result['reason_score_note']}); the "
                 "dashboards show the top-5 contrast features of each late layer instead."]
    if "overlap" in result:
        share = result["overlap"].pivot_table(index=["layer", "feature"], columns="label",
                                              values="share_of_activation")
        body += ["Where the top-5 contrast features of each late layer put their activation (share by label):",
                 _code(share.round(3).to_string())]
    ctx.report.add("SAEs and reasoning features", "\n\n".join(body))


def stage_bounds(ctx: Context) -> None:
    """The theorem checked on the contrast corpus: the bound, its assumptions per layer, the two-sided relation."""
    from tellnorm.studies.bounds import bounds_study

    # the two-sided relation pairs states at a marker both modes write: the organism's `answer : X`; a task's
    # responses have no such shared marker, so that part is reported as not measured
    markers = {"markers": ()} if ctx.cfg.task_mode else {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="no marker")
        result = bounds_study(ctx.model, ctx.saes, ctx.corpus, ctx.out, top_k=ctx.cfg.top_k, **markers)
    bounds = result["bounds"][["layer", "n_checked", "violations", "median_tightness", "p99_tightness",
                               "max_tightness", "sum_violations", "sum_max_tightness", "norm_line_max_tightness"]]
    verdicts = result["assumptions"][["layer", "a1_mean_cos", "a1_verdict", "a2_rel_error", "a2_fvu", "a2_verdict",
                                      "a3_mean_abs_cos", "a3_verdict", "a4_reasoning_active_in_non_thinking",
                                      "a4_jaccard", "a4_verdict"]]
    pair_columns = ["layer", "n_pairs", "frac_delta_nonpositive", "c1", "c2", "in_band", "in_band_ideal",
                    "median_r_active", "spearman_s_delta_x100"]
    pairs = (result["pairs"][pair_columns].round(3).to_string(index=False) if result["pairs"].n_pairs.sum() > 0
             else "not measured: the responses have no marker both modes write (the organism's `answer : X`)")
    ctx.report.add("The theorem, checked: the norm bounds feature activation", "\n\n".join([
        "Exact, assumption-free bound `a_i(x) ≤ ‖w_i‖·‖s·x − b_dec‖ + max(b_i, 0)` on every (token, feature) of the "
        "contrast corpus (generated tokens, both modes); `sum_*` = the layer's summed top-K reasoning-feature "
        "activation against the summed bound; `norm_line_*` = that sum against the bound written as a function of "
        "‖x‖ alone:", _code(bounds.round(4).to_string(index=False)), "![bound](bounds_norm_vs_reasoning.png)",
        "The theorem's assumptions, per layer (A1 decoder near-orthonormality on co-active features, A2 faithful "
        "reconstruction, A3 base ⟂ reasoning part, A4 reasoning features silent in non-thinking tokens):",
        _code(verdicts.round(3).to_string(index=False)),
        "The two-sided relation `c₁·√Δ ≤ Σ_{i∈R} Δa_i ≤ c₂·√|R_active|·√Δ` on paired states (same problem, both "
        "modes, at the shared closing `answer : X`); c₁, c₂ fitted as the 5% / 95% quantiles, `in_band_ideal` = "
        "the fraction inside the band with c₁ = c₂ = 1:", _code(pairs),
        "![pairs](bounds_pairs.png)"]))


def stage_correlation(ctx: Context) -> None:
    """Spearman correlation across layers of the norm profile and the reasoning-feature profile, with its CI."""
    from tellnorm.studies.correlation import correlation_study

    result = correlation_study(ctx.model, ctx.saes, ctx.corpus, ctx.out, top_k=ctx.cfg.top_k)
    ctx.report.add("Correlation: norm profile vs reasoning-feature profile across layers", "\n\n".join([
        f"Spearman ×100 across the {ctx.model.n_layers} layers (a coarse rank statistic with so few layers: the "
        "per-layer values it is computed from follow), bootstrap 95% CI over problems; the paper's values beside:",
        _code(result["table"].to_string(index=False, float_format="{:.1f}".format)),
        _code(result["layers"].round(4).to_string(index=False)), "![alignment](correlation_alignment.png)"]))


def intervention_config(cfg: ReproduceConfig) -> InterventionConfig:
    """The interventions stage's config (``quick``: one factor and seed per control, two steering scales)."""
    from tellnorm.studies.suppression import InterventionConfig

    # quick: one factor and seed per control, two steering scales (generation time is the number of batches)
    quick = dict(calibration_per_difficulty=2, factors=(0.1,), amplify=(), steering_scales=(-1.0, 1.0),
                 random_seeds=(0,), feature_seeds=(0,)) if cfg.quick else {}
    return InterventionConfig(per_difficulty=cfg.intervention_per_difficulty, saes=cfg.saes, **quick)


def stage_interventions(ctx: Context) -> None:
    """Suppressing high-norm states vs random matched controls, steering and feature ablation: tables, figures."""
    from tellnorm.studies.suppression import format_suppression, run_intervene

    cfg = intervention_config(ctx.cfg)
    result = run_intervene(ctx.model, cfg, ctx.out, progress=True)
    hits = result["hits"][result["hits"]["edit"] == "clean"]
    body = ["After each layer of a set, on generated tokens, thinking mode: scale high-norm states (‖h‖ > τ, τ = "
            "Q3 + 1.5·IQR calibrated per layer on clean validation responses) by c, or clamp them to τ/4, against "
            f"scaling a random matched fraction of tokens ({len(cfg.random_seeds)} seeds, pooled). "
            f"n = {result['meta']['n_problems']} test problems; Δ = accuracy − clean with a paired bootstrap 95% CI; "
            "Δlogp = change in the teacher-forced log-probability of the gold answer (ans) and of every gold "
            "response token (trace).", _code(format_suppression(result["suppression"])),
            "![suppression](suppression.png)",
            "What the high-norm rule hits (clean run, share of each layer's hits by ground-truth label):",
            _code(hits.round(3).to_string(index=False))]
    if result["steering"] is not None or result["features"] is not None:
        body.append("Steering along the mean thinking − non-thinking direction, and zeroing the top reasoning features "
                    "vs random features of matched activation mass: `steering.csv`, `feature_ablation.csv`.\n\n"
                    "![steering and features](steering_features.png)")
    ctx.report.add("Interventions: does suppressing high-norm states hurt reasoning?", "\n\n".join(body))


def evaluation_config(cfg: ReproduceConfig) -> EvaluateConfig:
    """The evaluation stage's config (``quick``: no recursion controls or sensitivity, the smallest N sweep)."""
    from tellnorm.studies.evaluation import EvaluateConfig

    # quick: every method but the recursion controls (3 more decodes of the whole set), the smallest N sweep
    quick = dict(calibration_per_difficulty=2, n_samples=4, sample_sizes=(2, 4), sensitivity=False,
                 controls=False) if cfg.quick else {}
    return EvaluateConfig(per_difficulty=cfg.evaluation_per_difficulty, **quick)


def stage_evaluation(ctx: Context) -> None:
    """ALRR, ERSS and LRS against compute-matched baselines: the evaluation tables, figures and report section."""
    from tellnorm.studies.evaluation import run_evaluate

    cfg = evaluation_config(ctx.cfg)
    result = run_evaluate(ctx.model, cfg, ctx.out, progress=True)
    ctx.report.add("Test-time techniques: ALRR, ERSS, LRS against compute-matched baselines",
                   result["markdown"].split("\n", 2)[2] + "\n![evaluation](evaluation.png)\n\n"
                   "![by difficulty](evaluation_by_difficulty.png)\n\n![LRS ablations](evaluation_lrs.png)"
                   + ("\n\n![sensitivity](evaluation_sensitivity.png)" if cfg.sensitivity else ""))


def stage_dashboards(ctx: Context) -> None:
    """One offline HTML page of dashboards for the features stage's top ReasonScore features."""
    from tellnorm.apps.dashboards import dashboard_study

    kept = ctx.state["dashboard"]  # the features stage's choice (JSON: layers are strings)
    features = {int(layer): feats for layer, feats in kept["features"].items()}
    scores = {(layer, f): score for layer, f, score in kept["scores"]}
    path = dashboard_study(ctx.model, ctx.saes, ctx.corpus, features, scores, ctx.out / "dashboard.html")
    ctx.report.add("Feature dashboards", f"Offline page: [{path.name}]({path.name}) (top-5 ReasonScore features of "
                   "each late layer).")


def stage_explorer(ctx: Context) -> None:
    """The offline feature-explorer site under ``OUT/explorer/`` (every feature of every layer, the norm view)."""
    from tellnorm.apps.explorer import build_explorer

    index = build_explorer(ctx.model, ctx.saes, ctx.out / "explorer",
                           n_per_difficulty=ctx.cfg.explorer_per_difficulty)
    ctx.report.add("Feature explorer", f"Offline site (not in git: {sum(1 for _ in index.parent.rglob('*'))} files): "
                   f"[explorer/index.html](explorer/index.html) — every feature of every layer, a page per feature, "
                   f"and the norm view with where ALRR, ERSS and high-norm suppression acted "
                   f"({ctx.cfg.explorer_per_difficulty} validation problems per difficulty, both modes).")


PROFILE, FEATURES = "norm_profile", "features"
STAGES = (
    Stage("accuracy", stage_accuracy, ("per_difficulty",)),
    Stage(PROFILE, stage_norm_profile, ("profile_per_difficulty",)),
    Stage("peaks", stage_peaks, upstream=(PROFILE,)),
    Stage(FEATURES, stage_features, ("features_per_difficulty", "top_k"), upstream=(PROFILE,), saes=True),
    Stage("bounds", stage_bounds, ("top_k",), upstream=(FEATURES,), saes=True),
    Stage("correlation", stage_correlation, ("top_k",), upstream=(FEATURES,), saes=True),
    Stage("interventions", stage_interventions, ("intervention_per_difficulty", "quick"), saes=True),
    Stage("evaluation", stage_evaluation, ("evaluation_per_difficulty", "quick")),
    Stage("dashboards", stage_dashboards, upstream=(FEATURES,), saes=True),
    Stage("explorer", stage_explorer, ("explorer_per_difficulty",), saes=True),
)


def _task_stage(name: str) -> Callable[[Context], None]:
    """A stage function of :mod:`tellnorm.apps.reproduce_model`, imported when the stage runs."""
    def run(ctx: Context) -> None:
        from tellnorm.apps import reproduce_model

        getattr(reproduce_model, name)(ctx)

    run.__name__ = name
    return run


TASK = ("tasks", "extractor", "problems", "backend", "contrast_model", "device", "dtype")  # what every response reads
RESPONSES = "accuracy"
TASK_STAGES = (
    Stage(RESPONSES, _task_stage("stage_task_accuracy"), TASK + ("max_new_tokens", "sampling")),
    Stage(PROFILE, _task_stage("stage_task_profile"), upstream=(RESPONSES,)),
    Stage("peaks", _task_stage("skip_peaks")),
    Stage(FEATURES, stage_features, ("top_k",), upstream=(RESPONSES, PROFILE), saes=True),
    Stage("bounds", stage_bounds, ("top_k",), upstream=(FEATURES,), saes=True),
    Stage("correlation", stage_correlation, ("top_k",), upstream=(FEATURES,), saes=True),
    Stage("interventions", _task_stage("stage_task_interventions"), TASK + ("suppression_max_new_tokens", "quick"),
          saes=True),
    Stage("evaluation", _task_stage("stage_task_evaluation"),
          TASK + ("evaluation_max_new_tokens", "n_samples", "quick")),
    Stage("dashboards", stage_dashboards, upstream=(FEATURES,), saes=True),
    Stage("explorer", _task_stage("stage_task_explorer"), ("explorer_per_difficulty", "evaluation_max_new_tokens"),
          upstream=(FEATURES,), saes=True),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)
assert tuple(stage.name for stage in TASK_STAGES) == STAGE_NAMES  # --force and the cache records name either


ORGANISM_ONLY = {"peaks": "it needs per-token step labels, which only the organism's task has"}


def stages_for(cfg: ReproduceConfig) -> tuple[Stage, ...]:
    """The organism's stages, or the task stages of a run with ``--task``; with ``cfg.only``, those stages and the
    ones they read. A stage the model cannot run, or an unknown name, is one TellnormError line."""
    stages = TASK_STAGES if cfg.task_mode else STAGES
    if not cfg.only:
        return stages
    forced_stages(cfg.only)  # unknown names
    for name in cfg.only:
        if cfg.task_mode and name in ORGANISM_ONLY:
            raise TellnormError(f"stage {name} cannot run on {_spec_text(cfg.model)}: {ORGANISM_ONLY[name]}")
    by_name = {stage.name: stage for stage in stages}
    wanted, todo = set(), list(cfg.only)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo.extend(by_name[name].upstream)
    return tuple(stage for stage in stages if stage.name in wanted)
