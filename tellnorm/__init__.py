"""tellnorm: the ℓ2 norm of hidden states as a signal for reasoning dynamics in language models.

The top-level names load their modules on first use, so ``import tellnorm`` stays instant; the modules follow the
paper's table of contents: ``models`` (backend), ``generation``, ``norms``, ``thresholds``, ``saes``, ``features``,
``groundtruth``, ``dashboards``, ``organism``, ``figures``, ``studies``, ``reproduce``, ``cli``.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "tellnorm.backends.hf",
    "LoadedModel": "tellnorm.backends.hf",
    "generate": "tellnorm.generation",
    "SamplingConfig": "tellnorm.generation",
    "NormTracer": "tellnorm.norms",
    "trace_generation": "tellnorm.norms",
    "trace_forward": "tellnorm.norms",
    "layer_profile": "tellnorm.norms",
    "ThresholdConfig": "tellnorm.thresholds",
    "make_threshold": "tellnorm.thresholds",
    "load_saes": "tellnorm.saes",
    "TellnormError": "tellnorm.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tellnorm' has no attribute {name!r}")
