"""Observers across processes: what the caller sends to vLLM's workers, what comes back, and the caller's handle.

In vLLM's multi-process engine and under tensor parallelism the model runs in worker processes, so the caller's
observers cannot be hooked in as they are. They travel as a spec: the observers pickled with every reference to the
caller's model replaced by a name (pickle's ``persistent_id``), so no engine, tokenizer-backed ``LLM`` or process
handle goes along — only each observer's configuration, thresholds and (empty or earlier) records. The worker
rebuilds them around :func:`engine_side_model`, a copy of the model's description without the engine. When the run
ends the worker sends the observers' state back the same way and :func:`merge_back` puts it into the caller's own
objects, so user code reads its tracer or edit exactly as after an in-process run.

Everything crosses vLLM's RPC as ``bytes`` (msgpack-native), so vLLM's insecure pickle fallback is never needed.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from tellnorm.errors import TellnormError

if TYPE_CHECKING:
    from tellnorm.backends.vllm.session import Session

MODEL_REFERENCE = "tellnorm-model"  # the name that stands for the caller's model inside a spec


class _Pickler(pickle.Pickler):
    def __init__(self, buffer: io.BytesIO, model: Any):
        super().__init__(buffer, protocol=pickle.HIGHEST_PROTOCOL)
        self.model = model

    def persistent_id(self, obj: Any) -> str | None:
        return MODEL_REFERENCE if obj is self.model else None


class _Unpickler(pickle.Unpickler):
    def __init__(self, buffer: io.BytesIO, model: Any):
        super().__init__(buffer)
        self.model = model

    def persistent_load(self, pid: Any) -> Any:
        if pid != MODEL_REFERENCE:
            raise pickle.UnpicklingError(f"unknown reference {pid!r} in a tellnorm observer spec")
        return self.model


def dumps(payload: Any, model: Any) -> bytes:
    """``payload`` pickled with ``model`` replaced by a reference (:data:`MODEL_REFERENCE`)."""
    buffer = io.BytesIO()
    _Pickler(buffer, model).dump(payload)
    return buffer.getvalue()


def loads(data: bytes, model: Any) -> Any:
    """The payload of :func:`dumps`, with the reference resolved to ``model`` (this side's model)."""
    return _Unpickler(io.BytesIO(data), model).load()


def engine_side_model(model: Any) -> Any:
    """What observers see of ``model`` inside a worker: its description (shape, names, dtype, hook points), without
    the engine, tokenizer or labeler."""
    return replace(model, llm=None, tokenizer=None, token_labeler=None, info=dict(model.info))


def observer_spec(model: Any, observers: Sequence[Any], **session_args: Any) -> bytes:
    """The bytes a worker builds its session from: ``observers`` with ``model`` by reference, the model's
    engine-side description, and the session's other arguments. An observer that cannot be pickled is named in
    one TellnormError line."""
    side = engine_side_model(model)
    try:
        return pickle.dumps((side, dumps({"observers": list(observers), **session_args}, model)))
    except Exception:  # pickle raises TypeError, AttributeError, PicklingError... depending on the object
        for observer in observers:  # name the one that cannot go
            try:
                dumps(observer, model)
            except Exception as err:
                raise TellnormError(f"observer {getattr(observer, 'name', type(observer).__name__)!r} cannot be "
                                    f"sent to vLLM's worker processes ({type(err).__name__}: {err}): keep hook "
                                    "functions, open files and engines out of its attributes, or use "
                                    "engine='in-process'") from None
        raise


def open_spec(spec: bytes) -> tuple[Any, dict]:
    """Worker side of :func:`observer_spec`: ``(engine-side model, {"observers": [...], session arguments})``, the
    observers' model references resolved to that model."""
    side, rest = pickle.loads(spec)
    return side, loads(rest, side)


def merge_back(observers: Sequence[Any], returned: Sequence[Any]) -> None:
    """Put the state of the worker's copies ``returned`` into the caller's ``observers`` (same order and types)."""
    if len(returned) != len(observers):
        raise TellnormError(f"vLLM's worker returned {len(returned)} observers for {len(observers)}")
    for mine, theirs in zip(observers, returned):
        if type(mine) is not type(theirs):
            raise TellnormError(f"vLLM's worker returned a {type(theirs).__name__} for a {type(mine).__name__}")
        vars(mine).update(vars(theirs))


def session_from_spec(spec: bytes) -> Session:
    """A worker's :class:`~.session.Session` built from :func:`observer_spec`'s bytes."""
    from tellnorm.backends.vllm.session import Session

    side, args = open_spec(spec)
    token_stats = {} if args.pop("token_stats") else None
    return Session(side, args.pop("observers"), token_stats=token_stats, **args)


def error_reply(err: BaseException) -> bytes:
    """A worker's error as bytes for the caller (:func:`portable_error`)."""
    return pickle.dumps({"error": portable_error(err)})


def session_reply(session: Session) -> bytes:
    """What a worker's detached ``session`` sends back: its error, and on the leader (rank 0, the one that ran the
    observers) the observers and token statistics, with the engine-side model by reference."""
    reply: dict[str, Any] = {"error": None if session.error is None else portable_error(session.error)}
    if session.rank == 0:
        reply["observers"], reply["token_stats"] = session.observers, session.token_stats
    try:
        return dumps(reply, session.model)
    except Exception as err:
        return error_reply(TellnormError(f"an observer's records cannot be sent back from vLLM's worker "
                                         f"({type(err).__name__}: {err}): keep hook functions and open files out of "
                                         "its attributes, or use engine='in-process'"))


def portable_error(err: BaseException) -> BaseException:
    """``err`` if it survives pickling, else a TellnormError with its type and first line (a worker's exception
    must reach the caller as one clear error, whatever it holds)."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        first = (str(err).splitlines() or [""])[0][:300]
        return TellnormError(f"{type(err).__name__} in vLLM's worker: {first}")


POLL_EVERY = 16  # engine steps between two asks whether a worker's session stood down (an RPC each)


class RemoteSession:
    """The caller's handle on sessions in vLLM's worker processes (:meth:`VLLMModel.observe
    <tellnorm.backends.vllm.VLLMModel.observe>` across processes): sends the observer spec on :meth:`attach`,
    merges the leader's records into the caller's observers and ``token_stats`` on :meth:`detach`, and sets
    :attr:`error` to the first worker error."""

    def __init__(self, model: Any, observers: Sequence[Any], request_ids: Sequence | None = None,
                 n_prompt: Mapping[Any, int] | None = None, token_stats: dict | None = None):
        self.model, self.observers, self.token_stats = model, list(observers), token_stats
        self.spec = observer_spec(model, self.observers, request_ids=None if request_ids is None else list(request_ids),
                                  n_prompt=dict(n_prompt or {}), token_stats=token_stats is not None)
        self.error: BaseException | None = None
        self.stopped = False
        self.polls = 0

    def attach(self) -> None:
        """Build and attach a session in every worker; if one fails, detach all and raise its error."""
        replies = self.model.llm.collective_rpc("tellnorm_attach", args=(self.spec,))
        errors = [pickle.loads(reply)["error"] for reply in replies if reply is not None]
        if errors:
            self.model.llm.collective_rpc("tellnorm_detach")
            raise errors[0]

    def failed(self) -> bool:
        """Whether a worker's session stood down after an error: asked every :data:`POLL_EVERY` calls (once per
        engine step), so a failing run ends within that many steps; its error arrives on :meth:`detach`."""
        self.polls += 1
        if not self.stopped and self.polls % POLL_EVERY == 0:
            self.stopped = any(self.model.llm.collective_rpc("tellnorm_failed"))
        return self.stopped

    def detach(self) -> None:
        """Detach every worker's session; merge the leader's records into the caller's objects."""
        replies = [loads(reply, self.model) for reply in self.model.llm.collective_rpc("tellnorm_detach")
                   if reply is not None]
        errors = [reply["error"] for reply in replies if reply["error"] is not None]
        self.error = errors[0] if errors else None
        leader = next((reply for reply in replies if "observers" in reply), None)
        if leader is None:
            self.error = self.error or TellnormError("no vLLM worker sent the observers' records back")
            return
        merge_back(self.observers, leader["observers"])
        if self.token_stats is not None:
            self.token_stats.update(leader["token_stats"] or {})
