"""SAEs keyed by layer: load them from local folders (sae_lens or native release layouts) or sae_lens's registry."""

from tellnorm.saes.formats import FORMATS, SaeSource, find_saes, layer_of_hook
from tellnorm.saes.loading import SAEModelMismatchWarning, SaeSpec, load_saes, parse_sae_spec, validate_sae

__all__ = [
    "FORMATS",
    "SAEModelMismatchWarning",
    "SaeSource",
    "SaeSpec",
    "find_saes",
    "layer_of_hook",
    "load_saes",
    "parse_sae_spec",
    "validate_sae",
]
