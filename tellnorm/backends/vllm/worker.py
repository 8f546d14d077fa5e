"""The worker extension (``LLM(worker_extension_cls=...)``): methods vLLM adds to its worker, reached through
``llm.collective_rpc``. tellnorm runs the engine in-process, so a session object passes to the worker as is and
the observers it carries are the user's own objects."""

from __future__ import annotations


class TellnormWorker:
    def tellnorm_attach(self, session) -> None:
        session.attach(self.model_runner)

    def tellnorm_detach(self, session) -> None:
        session.detach()
