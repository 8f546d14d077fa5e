"""Where the shipped organism lives."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ORGANISM_DIR = REPO_ROOT / "data" / "organism"
DEFAULT_SAE_DIR = REPO_ROOT / "data" / "organism_saes"
