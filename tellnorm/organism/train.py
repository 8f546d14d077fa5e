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

from tellnorm.organism import task
from tellnorm.organism.paths import DEFAULT_ORGANISM_DIR


@dataclass
class OrganismModelConfig:
    """Shape of the organism [organism design choice: ≥ 8 layers so that 'late layers' mean something]."""

    n_layers: int = 8
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention, as in every Qwen3 model
    head_dim: int = 32
    d_mlp: int = 384
    max_positions: int = 256  # the longest problem (8 steps) with its trace stays below ~220 tokens

    def hf_config(self, vocab_size: int, pad_token_id: int, eos_token_id: int):
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
    seed: int = 0
    steps: int = 3000  # ≈ 25 min on 2 CPU cores [measured, see README]
    batch_size: int = 32  # more, smaller steps reach the in-context-retrieval transition sooner
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decay to 10% of lr
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    thinking_fraction: float = 0.7  # the chain is the harder skill; direct answers still get 30%
    threads: int = 2
    model: OrganismModelConfig = field(default_factory=OrganismModelConfig)


def encode_example(tokenizer, problem: task.Problem, thinking: bool) -> tuple[list[int], int]:
    """Token ids of a full chat (prompt + assistant turn) and the number of prompt tokens (not trained on)."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": problem.prompt_text()}],
        tokenize=False, add_generation_prompt=True, enable_thinking=thinking,
    )
    completion = (f"<think>\n{task.thinking_trace(problem)}\n</think>\n\n" if thinking else "")
    completion += task.answer_text(problem) + "<|im_end|>"
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


def _length_bucketed_batches(stream, batch_size: int, rng: random.Random, n_batches: int = 8) -> list:
    """Draw ``n_batches`` batches at once and group them by difficulty so padding is small."""
    pool = sorted((next(stream) for _ in range(batch_size * n_batches)), key=lambda p: p.difficulty)
    batches = [pool[i : i + batch_size] for i in range(0, len(pool), batch_size)]
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


def train_organism(cfg: OrganismTrainConfig | None = None, out_dir: str | Path = DEFAULT_ORGANISM_DIR,
                   progress: bool = True) -> dict:
    """Train the organism and write it (fp16 weights, tokenizer, chat template, metadata) to ``out_dir``."""
    import torch

    cfg = cfg or OrganismTrainConfig()
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
    from tqdm.auto import tqdm
    from transformers import Qwen3ForCausalLM

    from tellnorm.organism.tokenizer import build_tokenizer

    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer()
    hf_cfg = cfg.model.hf_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    model = Qwen3ForCausalLM(hf_cfg)
    model.train()

    held_out = task.test_split().keys() | task.validation_split().keys()
    stream = task.training_problems(cfg.seed, held_out)
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
            batches = _length_bucketed_batches(stream, cfg.batch_size, mode_rng)
        problems = batches.pop()
        modes = [mode_rng.random() < cfg.thinking_fraction for _ in problems]
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
        "loss_by_token_label": label_log,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "held_out_problems": len(held_out),
    }
    (out_dir / "organism.json").write_text(json.dumps(meta, indent=2))
    return meta
