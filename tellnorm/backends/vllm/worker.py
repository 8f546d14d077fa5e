"""The worker extension (``LLM(worker_extension_cls=...)``): methods vLLM adds to its worker, reached through
``llm.collective_rpc``. tellnorm runs the engine in-process, so a session object passes to the worker as is and
the observers it carries are the user's own objects."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tellnorm.backends.vllm.session import Session


class TellnormWorker:
    """Mixed into vLLM's worker: attaches and detaches a tellnorm session on its model runner."""

    def tellnorm_attach(self, session: Session) -> None:
        """Attach ``session``'s observers to this worker's model runner."""
        session.attach(self.model_runner)

    def tellnorm_detach(self, session: Session) -> None:
        """Detach ``session`` (its hooks are removed)."""
        session.detach()
