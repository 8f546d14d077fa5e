"""The worker extension (``LLM(worker_extension_cls=...)``): methods vLLM adds to its worker, reached through
``llm.collective_rpc``.

In-process, a :class:`~.session.Session` object passes to the worker as is, and the observers it carries are the
caller's own objects. Across processes (vLLM's multi-process engine, tensor parallelism) the caller sends an
observer spec (:mod:`.remote`); each worker builds its own session from it, and :meth:`tellnorm_detach` sends the
observers' state back. Across processes these methods never raise: an error comes back as a value, so it reaches
the caller as itself and the engine stays usable."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tellnorm.backends.vllm.session import Session


class TellnormWorker:
    """Mixed into vLLM's worker: attaches and detaches a tellnorm session on its model runner."""

    tellnorm_session: Session | None = None  # the session built here from a spec (across processes)

    def tellnorm_attach(self, session: Session | bytes) -> bytes | None:
        """Attach ``session``'s observers to this worker's model runner; given a spec (bytes), build the session
        here first and return None, or the error pickled (:func:`~.remote.error_reply`)."""
        if not isinstance(session, bytes):
            session.attach(self.model_runner)
            return None
        from tellnorm.backends.vllm.remote import error_reply, session_from_spec

        try:
            built = session_from_spec(session)
            built.attach(self.model_runner)
        except BaseException as err:  # sent back whole: the worker must go on serving
            return error_reply(err)
        self.tellnorm_session = built
        return None

    def tellnorm_detach(self, session: Session | None = None) -> bytes | None:
        """Detach ``session`` (its hooks are removed); given None, detach the session built here and return what
        the caller gets back (:func:`~.remote.session_reply`), or None when there is none."""
        if session is not None:
            session.detach()
            return None
        from tellnorm.backends.vllm.remote import session_reply

        built, self.tellnorm_session = self.tellnorm_session, None
        if built is None:
            return None
        built.detach()
        return session_reply(built)

    def tellnorm_poll(self, finished: list) -> bytes | None:
        """The caller's poll every few engine steps: the session built here lets go of the ``finished`` requests
        (the vLLM request ids the caller added) and answers whether it stood down after an error, with their
        records from the leader (:func:`~.remote.poll_reply`); None when there is no such session."""
        if self.tellnorm_session is None:
            return None
        from tellnorm.backends.vllm.remote import poll_reply

        return poll_reply(self.tellnorm_session, finished)

    def tellnorm_rank(self) -> Any:
        """This worker's ``(tensor parallel rank, size)`` as the session sees them (for tests and diagnostics)."""
        from tellnorm.backends.vllm.session import tensor_parallel_place

        rank, world, _ = tensor_parallel_place()
        return rank, world
