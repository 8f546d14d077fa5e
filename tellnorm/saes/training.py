"""Train one SAE per layer with sae_lens, on the model's own hidden states (PAPER.md §2).

The corpus is the model's own responses, thinking and non-thinking, to prompts (default: fresh organism problems
from the training distribution, never the test set). sae_lens's ``MultiSAETrainingRunner`` trains every layer's
SAE from one shared forward pass per batch; padding and ``<|im_start|>`` (position 0, massive activations) are
excluded from the activations it trains on.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tellnorm.errors import TellnormError

if TYPE_CHECKING:
    from sae_lens import SAE

    from tellnorm.backends.base import ModelAPI
    from tellnorm.backends.hf import LoadedModel

ARCHITECTURES = ("standard", "topk", "jumprelu")


@dataclass
class SAETrainConfig:
    """How to train the per-layer SAEs (PAPER.md §2): architecture, width, epochs, lr, sparsity, corpus size."""

    architecture: str = "standard"  # PAPER §2: ReLU SAE with an L1 penalty
    expansion: int = 4  # PAPER §2: width 4 × d_model
    epochs: float = 6  # PAPER §2: 6 epochs over the corpus
    lr: float = 1e-3  # PAPER §2
    l1_coefficient: float = 1e-3  # PAPER §2 (robustness variant: 5e-3)
    topk_k: int = 16  # TopK variant only [tellnorm choice: ≈ d_model / 8]
    jumprelu_sparsity_coefficient: float = 1e-3  # JumpReLU variant only [tellnorm choice]
    corpus_problems: int = 600  # prompts per mode in the training corpus
    max_new_tokens: int = 240  # a 10-step organism trace fits (longest gold response ≈ 200 tokens)
    batch_size_tokens: int = 1024
    seed: int = 0
    layers: tuple[int, ...] | None = None  # default: every layer

    @classmethod
    def organism(cls, **overrides: Any) -> SAETrainConfig:
        """The shipped organism SAEs: the paper's recipe with the L1 coefficient calibrated for sparsity.

        In sae_lens's loss (squared error summed over d_in, on activations scaled to mean norm √d_in) the paper's
        L1 = 1e-3 leaves the organism's SAEs dense (L0 ≈ 310–380 of 512 features); see the README."""
        return cls(**{"l1_coefficient": ORGANISM_L1, **overrides})

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise TellnormError(f"unknown SAE architecture {self.architecture!r}: choose one of "
                                f"{', '.join(ARCHITECTURES)}")
        if self.expansion < 1 or self.epochs <= 0 or self.lr <= 0:
            raise TellnormError("SAE training needs expansion ≥ 1, epochs > 0 and lr > 0")


ORGANISM_L1 = 2.0  # [tellnorm calibration on the organism: L0 ≈ 15–24, FVU ≈ 0.02–0.03; see README]
def build_corpus(model: ModelAPI, prompts: list[list[int]], *, max_new_tokens: int, seed: int, batch_size: int = 50,
                 progress: bool = True) -> list[list[int]]:
    """The model's own responses (paper sampling settings, seeded): full token sequences."""
    from tellnorm.generation import SamplingConfig, generate

    gens = generate(model, prompts, SamplingConfig.paper(max_new_tokens=max_new_tokens, seed=seed),
                    batch_size=batch_size, progress=progress, desc="SAE corpus")
    return [g.ids for g in gens]


def excluded_token_ids(model: ModelAPI) -> list[int]:
    """Tokens never used as SAE training data: padding and the chat-turn opener at position 0."""
    tok = model.tokenizer
    ids = {tok.pad_token_id}
    start = tok.convert_tokens_to_ids("<|im_start|>")
    if isinstance(start, int) and start != tok.unk_token_id:
        ids.add(start)
    if tok.bos_token_id is not None and model.info.get("prepend_bos"):
        ids.add(tok.bos_token_id)
    return sorted(i for i in ids if i is not None)


def _sae_config(cfg: SAETrainConfig, d_in: int):
    from sae_lens import JumpReLUTrainingSAEConfig, StandardTrainingSAEConfig, TopKTrainingSAEConfig

    common = {"d_in": d_in, "d_sae": d_in * cfg.expansion, "normalize_activations": "expected_average_only_in"}
    if cfg.architecture == "standard":
        return StandardTrainingSAEConfig(l1_coefficient=cfg.l1_coefficient, **common)
    if cfg.architecture == "topk":
        return TopKTrainingSAEConfig(k=cfg.topk_k, **common)
    return JumpReLUTrainingSAEConfig(l0_coefficient=cfg.jumprelu_sparsity_coefficient, **common)


def train_saes(model: LoadedModel, sequences: list[list[int]], cfg: SAETrainConfig,
               out_dir: str | Path | None = None) -> dict[int, SAE]:
    """Train one SAE per layer on ``sequences``; returns {layer: sae_lens.SAE} and saves them if ``out_dir``."""
    import torch
    from datasets import Dataset
    from sae_lens import SAE, LoggingConfig
    from sae_lens.multi_sae_training_runner import MultiSAETrainingRunner, MultiSAETrainingRunnerConfig

    layers = list(cfg.layers) if cfg.layers is not None else list(range(model.n_layers))
    for layer in layers:
        model.hook_name(layer)  # validates the range
    if not sequences:
        raise TellnormError("the SAE training corpus is empty")
    context = max(len(s) for s in sequences)
    pad = model.tokenizer.pad_token_id
    rows = [list(s) + [pad] * (context - len(s)) for s in sequences]
    excluded = excluded_token_ids(model)
    n_tokens = sum(sum(t not in excluded for t in s) for s in sequences)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    names = {f"layer_{layer}": model.hook_name(layer) for layer in layers}
    runner_cfg = MultiSAETrainingRunnerConfig(
        saes={name: _sae_config(cfg, model.d_model) for name in names},
        hook_names=names,
        model_name=model.name,
        model_class_name="TransformerBridge",
        dataset_path="",
        streaming=False,
        context_size=context,
        # sae_lens needs n_batches_in_buffer * context ≥ train_batch_size_tokens
        n_batches_in_buffer=max(4, -(-2 * cfg.batch_size_tokens // context)),
        training_tokens=int(cfg.epochs * n_tokens),
        store_batch_size_prompts=16,
        train_batch_size_tokens=cfg.batch_size_tokens,
        lr=cfg.lr,
        lr_warm_up_steps=0,
        device=str(model.device),
        seed=cfg.seed,
        prepend_bos=False,
        exclude_special_tokens=excluded,
        disable_concat_sequences=True,
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=None,
        output_path=None,
        n_batches_for_norm_estimate=20,
        n_eval_batches=2,
    )
    trained = MultiSAETrainingRunner(runner_cfg, override_dataset=Dataset.from_dict({"input_ids": rows}),
                                     override_model=model.bridge).run()
    saes = {}
    for layer in layers:
        training_sae = trained[f"layer_{layer}"]
        training_sae.cfg.metadata.model_name = model.name
        if out_dir is not None:
            folder = Path(out_dir) / f"layer_{layer}"
            training_sae.save_inference_model(folder)
            saes[layer] = SAE.load_from_disk(folder, device=str(model.device))
        else:
            saes[layer] = training_sae
    if out_dir is not None:
        meta = {"train_config": asdict(cfg), "n_sequences": len(sequences), "n_training_tokens_per_epoch": n_tokens,
                "model": model.name, "layers": layers}
        (Path(out_dir) / "suite.json").write_text(json.dumps(meta, indent=2))
    return saes
