"""Observers across processes: what the caller sends to vLLM's workers, what comes back, and the caller's handle.

In vLLM's multi-process engine and under tensor parallelism the model runs in worker processes, so the caller's
observers cannot be hooked in as they are. They travel as a spec: the observers pickled with every reference to the
caller's model replaced by a name (pickle's ``persistent_id``), so no engine, tokenizer-backed ``LLM`` or process
handle goes along — only each observer's configuration, thresholds and (empty or earlier) records. The worker
rebuilds them around :func:`engine_side_model`, a copy of the model's description without the engine.

Records leave the worker as requests finish: every :data:`POLL_EVERY` engine steps the caller names the requests
that finished since the last poll, and the leader (rank 0, the one that runs the observers) releases their
working state and sends their records back (:class:`~tellnorm.generation.FinishedRequests`; an observer without
that protocol keeps its records until the run ends). When the run ends the worker sends the observers' state
back the same way, :func:`merge_back` puts it into the caller's own objects and the parts received on the way are
added back in order, so user code reads its tracer or edit exactly as after an in-process run.

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


def _unsendable(err: BaseException) -> TellnormError:
    return TellnormError(f"an observer's records cannot be sent back from vLLM's worker ({type(err).__name__}: "
                         f"{err}): keep hook functions and open files out of its attributes, or use "
                         "engine='in-process'")


def session_reply(session: Session) -> bytes:
    """What a worker's detached ``session`` sends back: its error, and on the leader (rank 0, the one that ran the
    observers) the observers and everything they still hold, with the engine-side model by reference."""
    reply: dict[str, Any] = {}
    if session.rank == 0:
        session.finish(set(session.added_as.values()))  # the session is over: every request it saw is done
        reply["records"], reply["observers"] = _taken(session, None), session.observers
    reply["error"] = None if session.error is None else portable_error(session.error)
    try:
        return dumps(reply, session.model)
    except Exception as err:
        return error_reply(_unsendable(err))


def poll_reply(session: Session, finished: Sequence[Any]) -> bytes:
    """A worker's answer to the caller's poll: whether its ``session`` stood down and, on the leader, the records of
    the ``finished`` requests (the vLLM request ids the caller added), which it lets go of. An observer that raises
    here, or records that cannot be sent, stop the session as a hook's error would."""
    observed = session.finish(finished)
    records = _taken(session, observed) if session.rank == 0 and observed and not session.failed() else None
    try:
        return dumps({"failed": session.failed(), "records": records}, session.model)
    except Exception as err:
        session.error = session.error or _unsendable(err)
        return pickle.dumps({"failed": True, "records": None})


def _taken(session: Session, observed: Sequence[Any] | None) -> dict | None:
    """``session.take_records(observed)``, or None with the session stopped by the observer's error."""
    try:
        return session.take_records(observed)
    except Exception as err:
        session.error = session.error or err
        return None


def portable_error(err: BaseException) -> BaseException:
    """``err`` if it survives pickling, else a TellnormError with its type and first line (a worker's exception
    must reach the caller as one clear error, whatever it holds)."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        first = (str(err).splitlines() or [""])[0][:300]
        return TellnormError(f"{type(err).__name__} in vLLM's worker: {first}")


POLL_EVERY = 16  # engine steps between two polls of the workers (an RPC each): finished requests, errors


class RemoteSession:
    """The caller's handle on sessions in vLLM's worker processes (:meth:`VLLMModel.observe
    <tellnorm.backends.vllm.VLLMModel.observe>` across processes): sends the observer spec on :meth:`attach`,
    collects finished requests' records while the run goes on (:meth:`finish`, :meth:`failed`), merges everything
    into the caller's observers and ``token_stats`` on :meth:`detach`, and sets :attr:`error` to the first worker
    error."""

    def __init__(self, model: Any, observers: Sequence[Any], request_ids: Sequence | None = None,
                 n_prompt: Mapping[Any, int] | None = None, token_stats: dict | None = None):
        self.model, self.observers, self.token_stats = model, list(observers), token_stats
        self.spec = observer_spec(model, self.observers, request_ids=None if request_ids is None else list(request_ids),
                                  n_prompt=dict(n_prompt or {}), token_stats=token_stats is not None)
        self.error: BaseException | None = None
        self.stopped = False
        self.polls = 0
        self.finished: list = []  # the vLLM request ids of requests finished since the last poll
        self.received: list[list] = []  # per poll that brought records: one part per observer

    def attach(self) -> None:
        """Build and attach a session in every worker; if one fails, detach all and raise its error."""
        replies = self.model.llm.collective_rpc("tellnorm_attach", args=(self.spec,))
        errors = [pickle.loads(reply)["error"] for reply in replies if reply is not None]
        if errors:
            self.model.llm.collective_rpc("tellnorm_detach")
            raise errors[0]

    def finish(self, requests: Sequence[Any]) -> None:
        """Note that ``requests`` (the vLLM request ids the caller added) finished: their records come back with the
        next poll."""
        self.finished.extend(requests)

    def failed(self) -> bool:
        """Whether a worker's session stood down after an error. Polls the workers every :data:`POLL_EVERY` calls
        (once per engine step), handing over the requests finished since the last poll and taking their records,
        so a failing run ends within that many steps; its error arrives on :meth:`detach`."""
        self.polls += 1
        if self.stopped or self.polls % POLL_EVERY:
            return self.stopped
        finished, self.finished = self.finished, []
        for reply in self.model.llm.collective_rpc("tellnorm_poll", args=(finished,)):
            if reply is None:
                continue
            reply = loads(reply, self.model)
            self.stopped = self.stopped or reply["failed"]
            self._receive(reply["records"])
        return self.stopped

    def _receive(self, records: dict | None) -> None:
        if records is None:
            return
        self.received.append(records["parts"])
        if self.token_stats is not None:
            self.token_stats.update(records["token_stats"])

    def detach(self) -> None:
        """Detach every worker's session; merge the leader's observers into the caller's objects, then add back the
        records received during the run, in order."""
        replies = [loads(reply, self.model) for reply in self.model.llm.collective_rpc("tellnorm_detach")
                   if reply is not None]
        errors = [reply["error"] for reply in replies if reply["error"] is not None]
        self.error = errors[0] if errors else None
        leader = next((reply for reply in replies if "observers" in reply), None)
        if leader is None:
            self.error = self.error or TellnormError("no vLLM worker sent the observers' records back")
            return
        merge_back(self.observers, leader["observers"])
        self._receive(leader["records"])
        for parts in self.received:
            for observer, part in zip(self.observers, parts):
                if part is not None:
                    observer.add_records(part)
        self.received = []
