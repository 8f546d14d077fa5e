"""Train the organism: a tiny Qwen3-architecture HF model on the chain task, both thinking modes.

The model is ``transformers.Qwen3ForCausalLM`` (pre-RMSNorm, GQA, q/k-norm, RoPE); nothing here is a
hand-written transformer. Training is deterministic under ``seed`` for a given torch version and thread count.
"""

from __future__ import annotations

import json
import math
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tellnorm.io import check_output_dir
from tellnorm.organism import task
from tellnorm.organism.paths import DEFAULT_ORGANISM_DIR

if TYPE_CHECKING:
    from transformers import Qwen3Config, Qwen3ForCausalLM


@dataclass
class OrganismModelConfig:
    """Shape of the organism [organism design choice: ≥ 8 layers so that 'late layers' mean something]."""

    n_layers: int = 8
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention, as in every Qwen3 model
    head_dim: int = 32
    d_mlp: int = 384
    max_positions: int = 320  # the longest problem (10 steps) with its trace stays below ~300 tokens

    def hf_config(self, vocab_size: int, pad_token_id: int, eos_token_id: int) -> Qwen3Config:
        """The HF ``Qwen3Config`` of this shape (tied embeddings, no BOS)."""
        from transformers import Qwen3Config

        return Qwen3Config(
            vocab_size=vocab_size,
            hidden_size=self.d_model,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            intermediate_size=self.d_mlp,
            max_position_embeddings=self.max_positions,
            tie_word_embeddings=True,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            bos_token_id=None,
        )


@dataclass
class OrganismTrainConfig:
    """How the organism is trained: phase 1 (both modes) then phase 2 (direct answers); checked on construction."""

    seed: int = 0
    steps: int = 3600  # ≈ 20 min on 2 CPU cores [measured, see README]
    batch_size: int = 32  # more, smaller steps reach the in-context-retrieval transition sooner
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decay to 10% of lr
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    thinking_fraction: float = 0.6  # the chain is the harder skill; direct answers get 40% of the examples
    # Difficulty of thinking examples: the two longest chains are rare, so the model masters 1–8 steps and only
    # partly learns 9–10, leaving room at the top for test-time techniques [organism design choice, v2: with
    # uniform weights thinking reached 0.98 at 10 steps, and 0.05 at 11 steps it never saw].
    thinking_difficulty_weights: tuple[float, ...] = (1, 1, 1, 1, 1, 1, 1, 1, 0.35, 0.08)
    # Difficulty of non-thinking examples: mostly the short chains a single pass can sum; longer ones keep the
    # format learned for every length [organism design choice, v2].
    non_thinking_difficulty_weights: tuple[float, ...] = (0.3, 0.3, 0.1, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05)
    # Phase 2, direct answers [organism design choice, v2]: from the fp16-rounded phase-1 weights and a fresh
    # optimiser, a short phase whose batches are 70% non-thinking 1–3-step problems. Phase 1 alone left the
    # two-step direct answer at the majority-guess level (0.13 vs 0.11, n = 100) and thinking at 10 steps at 0.86.
    phase2_steps: int = 400  # 0 skips the phase
    phase2_lr: float = 5e-4  # peak; linear warm-up, then cosine decay to 0
    phase2_warmup_steps: int = 20
    phase2_thinking_fraction: float = 0.3  # drawn per batch: a batch is all thinking or all non-thinking
    phase2_non_thinking_difficulty_weights: tuple[float, ...] = (0.25, 0.5, 0.25, 0, 0, 0, 0, 0, 0, 0)
    threads: int = 2
    model: OrganismModelConfig = field(default_factory=OrganismModelConfig)

    def __post_init__(self):
        from tellnorm.errors import TellnormError

        checks = [
            (isinstance(self.steps, int) and self.steps >= 1, f"steps must be a positive integer, got {self.steps!r}"),
            (isinstance(self.batch_size, int) and self.batch_size >= 1,
             f"batch_size must be a positive integer, got {self.batch_size!r}"),
            (math.isfinite(self.lr) and self.lr > 0, f"learning rate must be a positive number, got {self.lr!r}"),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio!r}"),
            (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
             f"warmup_steps must be ≥ 0, got {self.warmup_steps!r}"),
            (0 <= self.thinking_fraction <= 1, f"thinking_fraction must lie in [0, 1], got {self.thinking_fraction!r}"),
            *[(len(weights) == task.MAX_DIFFICULTY - task.MIN_DIFFICULTY + 1 and min(weights) >= 0
               and sum(weights) > 0,
               f"{name} needs {task.MAX_DIFFICULTY - task.MIN_DIFFICULTY + 1} non-negative weights, one per difficulty")
              for name, weights in (("thinking_difficulty_weights", self.thinking_difficulty_weights),
                                    ("non_thinking_difficulty_weights", self.non_thinking_difficulty_weights),
                                    ("phase2_non_thinking_difficulty_weights",
                                     self.phase2_non_thinking_difficulty_weights))],
            (isinstance(self.phase2_steps, int) and self.phase2_steps >= 0,
             f"phase2_steps must be an integer ≥ 0, got {self.phase2_steps!r}"),
            (math.isfinite(self.phase2_lr) and self.phase2_lr > 0,
             f"phase-2 learning rate must be a positive number, got {self.phase2_lr!r}"),
            (isinstance(self.phase2_warmup_steps, int) and self.phase2_warmup_steps >= 1,
             f"phase2_warmup_steps must be ≥ 1, got {self.phase2_warmup_steps!r}"),
            (0 <= self.phase2_thinking_fraction <= 1,
             f"phase2_thinking_fraction must lie in [0, 1], got {self.phase2_thinking_fraction!r}"),
            (isinstance(self.threads, int) and self.threads >= 1, f"threads must be ≥ 1, got {self.threads!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise TellnormError(f"organism training: {message}")


def encode_example(tokenizer: Any, problem: task.Problem, thinking: bool) -> tuple[list[int], int]:
    """Token ids of a full chat (prompt + assistant turn) and the number of prompt tokens (not trained on)."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": problem.prompt_text()}],
        tokenize=False, add_generation_prompt=True, enable_thinking=thinking,
    )
    completion = task.response_text(problem, thinking) + "<|im_end|>"
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return prompt_ids + completion_ids, len(prompt_ids)


def _batch(tokenizer, problems, modes, pad_id):
    import torch

    encoded = [encode_example(tokenizer, p, m) for p, m in zip(problems, modes)]
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        mask[row, : len(ids)] = 1
    return input_ids, mask, labels


def _draw_example(stream_by_difficulty, cfg: OrganismTrainConfig, rng: random.Random):
    """One (problem, thinking) pair: the mode first, then the difficulty from that mode's distribution."""
    levels = list(range(task.MIN_DIFFICULTY, task.MAX_DIFFICULTY + 1))
    thinking = rng.random() < cfg.thinking_fraction
    weights = cfg.thinking_difficulty_weights if thinking else cfg.non_thinking_difficulty_weights
    difficulty = rng.choices(levels, weights=weights)[0]
    return next(stream_by_difficulty[difficulty]), thinking


def _length_bucketed_batches(stream_by_difficulty, cfg: OrganismTrainConfig, rng: random.Random,
                             n_batches: int = 8) -> list:
    """Draw ``n_batches`` batches at once and group them by mode and difficulty so padding is small (a
    non-thinking answer is a third of a thinking trace's length)."""
    pool = [_draw_example(stream_by_difficulty, cfg, rng) for _ in range(cfg.batch_size * n_batches)]
    pool.sort(key=lambda example: (example[1], example[0].difficulty))
    batches = [pool[i : i + cfg.batch_size] for i in range(0, len(pool), cfg.batch_size)]
    rng.shuffle(batches)
    return batches


LOG_EVERY = 100  # steps between per-label loss reports


def _loss_by_label(tokenizer, input_ids, labels, logits) -> dict[str, float]:
    """Mean next-token loss per ground-truth label: shows which skills (format, copying, arithmetic) are learned."""
    import torch

    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
    sums: dict[str, list[float]] = {}
    for row in range(input_ids.shape[0]):
        trained = (labels[row] != -100).nonzero().flatten()
        if len(trained) == 0:
            continue
        n_prompt, end = int(trained[0]), int(trained[-1]) + 1
        tokens = tokenizer.convert_ids_to_tokens(input_ids[row, :end].tolist())
        for pos, label in enumerate(task.label_tokens(tokens, n_prompt)[n_prompt:], n_prompt):
            sums.setdefault(label, []).append(float(losses[row, pos - 1]))
    return {label: sum(v) / len(v) for label, v in sorted(sums.items())}


def _lr_at(step: int, cfg: OrganismTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _phase2_lr_at(step: int, cfg: OrganismTrainConfig) -> float:
    warmup = min(1.0, (step + 1) / cfg.phase2_warmup_steps)
    return cfg.phase2_lr * warmup * 0.5 * (1 + math.cos(math.pi * step / cfg.phase2_steps))


PHASE2_SEED_OFFSET = 9000  # phase 2 draws its problems from streams of its own


def direct_answer_phase(model: Qwen3ForCausalLM, tokenizer: Any, cfg: OrganismTrainConfig, held_out: set[str], *,
                        progress: bool = True) -> list[float]:
    """Phase 2: ``cfg.phase2_steps`` steps, each batch all non-thinking (1–3 steps by default) or, with
    probability ``phase2_thinking_fraction``, all thinking (phase 1's difficulty mix), from a fresh AdamW.
    Returns the loss of every step; trains ``model`` in place."""
    import torch
    from tqdm.auto import tqdm

    levels = list(range(task.MIN_DIFFICULTY, task.MAX_DIFFICULTY + 1))
    streams = {d: task.training_problems(cfg.seed * 100 + PHASE2_SEED_OFFSET + d, held_out, difficulties=(d,))
               for d in levels}
    rng = random.Random(cfg.seed + 77)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.phase2_lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    model.train()
    losses = []
    for step in tqdm(range(cfg.phase2_steps), desc="training organism, phase 2", disable=not progress):
        thinking = rng.random() < cfg.phase2_thinking_fraction
        weights = cfg.thinking_difficulty_weights if thinking else cfg.phase2_non_thinking_difficulty_weights
        problems = [next(streams[d]) for d in rng.choices(levels, weights=weights, k=cfg.batch_size)]
        input_ids, mask, labels = _batch(tokenizer, problems, [thinking] * cfg.batch_size, tokenizer.pad_token_id)
        for group in opt.param_groups:
            group["lr"] = _phase2_lr_at(step, cfg)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
    return losses


def train_organism(cfg: OrganismTrainConfig | None = None, out_dir: str | Path = DEFAULT_ORGANISM_DIR,
                   progress: bool = True) -> dict:
    """Train the organism and write it (fp16 weights, tokenizer, chat template, metadata) to ``out_dir``."""
    import torch

    cfg = cfg or OrganismTrainConfig()
    check_output_dir(out_dir)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _train(cfg, Path(out_dir), progress)
    finally:  # leave the process as we found it
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(cfg: OrganismTrainConfig, out_dir: Path, progress: bool) -> dict:
    import torch
    import transformers
    from tqdm.auto import tqdm
    from transformers import Qwen3ForCausalLM

    from tellnorm.organism.tokenizer import build_tokenizer

    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer()
    hf_cfg = cfg.model.hf_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    model = Qwen3ForCausalLM(hf_cfg)
    model.train()

    held_out = task.test_split().keys() | task.validation_split().keys()
    stream_by_difficulty = {d: task.training_problems(cfg.seed * 100 + d, held_out, difficulties=(d,))
                            for d in range(task.MIN_DIFFICULTY, task.MAX_DIFFICULTY + 1)}
    mode_rng = random.Random(cfg.seed + 1)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))

    losses, label_log = [], []
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="training organism", disable=not progress)
    batches: list = []
    for step in bar:
        if not batches:
            batches = _length_bucketed_batches(stream_by_difficulty, cfg, mode_rng)
        problems, modes = zip(*batches.pop())
        input_ids, mask, labels = _batch(tokenizer, problems, modes, tokenizer.pad_token_id)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        out = model(input_ids=input_ids, attention_mask=mask, labels=labels)
        loss = out.loss
        if step % LOG_EVERY == 0:
            by_label = _loss_by_label(tokenizer, input_ids, labels, out.logits.detach())
            label_log.append({"training_step": step, **by_label})
            if progress:
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in by_label.items()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0:
                bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
    model.half().float()  # phase 2 starts from the weights as phase 1 would have saved them
    phase2_losses = direct_answer_phase(model, tokenizer, cfg, held_out, progress=progress)
    seconds = time.perf_counter() - start

    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.half().save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    meta = {
        "train_config": asdict(cfg),
        "train_seconds": round(seconds, 1),
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "loss_every_50_steps": losses[::50],
        "phase2_loss_every_50_steps": phase2_losses[::50],
        "loss_by_token_label": label_log,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "held_out_problems": len(held_out),
    }
    (out_dir / "organism.json").write_text(json.dumps(meta, indent=2))
    return meta
