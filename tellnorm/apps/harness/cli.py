"""``python -m tellnorm.apps.harness ARGS``: lm-eval's command line (``lm_eval ARGS``) with ``--model tellnorm``
registered.

Every argument is lm-eval's own. Additions: tellnorm's per-response records are written beside lm-eval's results
(``tellnorm_requests_<date>.jsonl`` next to ``results_<date>.json`` under ``--output_path``) unless the model arg
``stats=FILE`` names a file; and bad input ends in one line on stderr with exit status 2 (an unknown technique or
other model arg, a task whose dataset is not in the offline cache, an unknown task) instead of a traceback.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tellnorm.apps.harness.model import TellnormLM

PROG = "tellnorm harness"


def _output_path(argv: list[str]) -> Path | None:
    for i, arg in enumerate(argv):
        for flag in ("--output_path", "-o"):
            if arg == flag and i + 1 < len(argv):
                return Path(argv[i + 1])
            if arg.startswith(flag + "="):
                return Path(arg.split("=", 1)[1])
    return None


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def offline_dataset_message(err: BaseException) -> str | None:
    """One line for a task whose dataset could not be loaded (offline, not cached): which dataset, where from."""
    task = None
    tb = err.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "download" and frame.f_code.co_filename.endswith(os.path.join("api", "task.py")):
            task = frame.f_locals.get("self")
        tb = tb.tb_next
    if task is None or getattr(getattr(task, "config", None), "custom_dataset", None) is not None:
        return None
    path = getattr(task, "DATASET_PATH", None) or getattr(task.config, "dataset_path", None)
    name = getattr(task, "DATASET_NAME", None) or getattr(task.config, "dataset_name", None)
    if not path:
        return None
    call = f"datasets.load_dataset('{path}'" + (f", '{name}'" if name else "") + ")"
    cache = os.environ.get("HF_HOME", "~/.cache/huggingface")
    return (f"task {task.config.task} needs the dataset {path}" + (f" (config {name})" if name else "")
            + f", which is not in this machine's Hugging Face cache and cannot be downloaded here "
            f"({type(err).__name__}): on a machine with network run python -c \"import datasets; {call}\", then copy "
            f"its ~/.cache/huggingface/datasets and ~/.cache/huggingface/hub folders into {cache} here")


def _results_file(output: Path, since: float) -> Path | None:
    if output.suffix == ".json":
        candidates = list(output.parent.glob(f"{output.stem}_*.json"))
    else:
        candidates = list(output.rglob("results_*.json")) if output.is_dir() else []
    candidates = [p for p in candidates if p.stat().st_mtime >= since - 1]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def write_beside_results(models: Sequence[TellnormLM], output: Path | None, since: float) -> list[Path]:
    """Each model's records next to the results file lm-eval wrote in this run (models with ``stats=`` wrote
    their own file already)."""
    written = []
    results = None if output is None else _results_file(output, since)
    for i, lm in enumerate(models):
        if lm.stats_path is not None or results is None:
            continue
        stem = results.stem.replace("results_", "tellnorm_requests_", 1) if results.stem.startswith("results_") \
            else f"{results.stem}_tellnorm_requests"
        suffix = f"_{i}" if len(models) > 1 else ""
        written.append(lm.write_records(results.with_name(f"{stem}{suffix}.jsonl")))
    return written


def main(argv: list[str] | None = None) -> int:
    """Run lm-eval's CLI on ``argv`` (default ``sys.argv[1:]``) with ``--model tellnorm``; returns the exit status
    (2 with one line on stderr for bad input)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as the tellnorm command: no machine it runs on downloads
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tellnorm.apps.harness import register
    from tellnorm.errors import TellnormError

    if not register():
        print(f"{PROG}: error: lm-eval is not installed: pip install 'lm-eval>=0.4.13,<0.5' math-verify",
              file=sys.stderr)
        return 2
    from tellnorm.apps.harness import model as harness_model

    argv = list(sys.argv[1:] if argv is None else argv)
    before = len(harness_model.LIVE)
    started = time.time()
    saved_argv = sys.argv
    sys.argv = ["lm-eval", *argv]  # lm-eval's parser reads sys.argv
    try:
        from lm_eval.__main__ import cli_evaluate

        cli_evaluate()
    except SystemExit as exc:  # --help, or lm-eval's argparse errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except Exception as err:
        tellnorm_error = next((e for e in _chain(err) if isinstance(e, TellnormError)), None)
        line = str(tellnorm_error) if tellnorm_error is not None else offline_dataset_message(err)
        if line is None and isinstance(err, ValueError) and str(err).startswith("Tasks not found"):
            line = f"{err} (list them with: lm_eval ls tasks; tellnorm's own: --include_path " \
                   f"{Path(__file__).resolve().parents[2] / 'data' / 'lm_eval'})"
        if line is None:
            raise
        print(f"{PROG}: error: {line}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved_argv
    for path in write_beside_results(harness_model.LIVE[before:], _output_path(argv), started):
        print(f"{PROG}: per-response norm statistics -> {path}")
    del harness_model.LIVE[before:]  # the models of this run can go
    return 0
