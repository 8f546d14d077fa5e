"""Batched generation: left padding, KV cache vs a no-cache reference, per-request sampling, hook cleanup."""

import pytest
import torch
from helpers import active_hook_count, organism_prompts, tiny_organism_like

from tellnorm.errors import TellnormError
from tellnorm.generation import (
    SamplingConfig,
    StepInfo,
    generate,
    mark_seen,
    pick_tokens,
    process_logits,
    seen_tokens,
)


@pytest.fixture(scope="module")
def model():
    return tiny_organism_like(n_layers=3)


def _no_cache_greedy(model, prompt, n_new):
    """Reference: re-run the whole sequence through plain HF every step, no cache, no padding."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n_new):
            logits = model.hf_model(torch.tensor([ids]), use_cache=False).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def test_greedy_with_kv_cache_and_left_padding_matches_no_cache_reference(model):
    prompts = organism_prompts(model, 8)
    assert len({len(p) for p in prompts}) > 4  # genuinely different lengths -> real left padding
    gens = generate(model, prompts, SamplingConfig(max_new_tokens=12), batch_size=8)
    for prompt, gen in zip(prompts, gens):
        if gen.finish_reason == "length":
            assert gen.generated_ids == _no_cache_greedy(model, prompt, 12)
        else:  # stopped early at EOS: the reference must agree up to and including that token
            assert gen.generated_ids == _no_cache_greedy(model, prompt, len(gen.generated_ids))


def test_sampled_requests_do_not_depend_on_batch_or_slot(model):
    prompts = organism_prompts(model, 8, seed=1)
    cfg = SamplingConfig.paper(max_new_tokens=10, seed=7)
    together = generate(model, prompts, cfg, request_ids=[f"r{i}" for i in range(8)], batch_size=8)
    alone = [generate(model, [p], cfg, request_ids=[f"r{i}"])[0] for i, p in enumerate(prompts)]
    reversed_batch = generate(model, prompts[::-1], cfg, request_ids=[f"r{i}" for i in range(8)][::-1], batch_size=3)
    assert [g.generated_ids for g in together] == [g.generated_ids for g in alone]
    assert [g.generated_ids for g in together] == [g.generated_ids for g in reversed_batch[::-1]]


def test_seeds_make_sampling_bit_reproducible_and_differ_across_seeds(model):
    prompts = organism_prompts(model, 4, seed=2)
    a = generate(model, prompts, SamplingConfig(temperature=1.5, max_new_tokens=15, seed=1))
    b = generate(model, prompts, SamplingConfig(temperature=1.5, max_new_tokens=15, seed=1))
    c = generate(model, prompts, SamplingConfig(temperature=1.5, max_new_tokens=15, seed=2))
    assert [g.generated_ids for g in a] == [g.generated_ids for g in b]
    assert [g.generated_ids for g in a] != [g.generated_ids for g in c]


SAMPLING_CASES = [SamplingConfig.paper(), SamplingConfig(temperature=0.9, top_k=5),
                  SamplingConfig(temperature=1.2, top_p=0.5, repetition_penalty=1.3),
                  SamplingConfig(repetition_penalty=1.1)]
HISTORIES = [[3, 7, 7, 20, 41], [0, 49], [], [12] * 6 + [5, 30]]


@pytest.mark.parametrize("cfg", SAMPLING_CASES)
def test_logit_processing_matches_hf_processors(cfg):
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(len(HISTORIES), 50) * 3
    ours = process_logits(logits, seen_tokens(HISTORIES, 50), cfg)
    for row, history in enumerate(HISTORIES):  # HF's processors, one row at a time (histories differ in length)
        ref = logits[row:row + 1].clone()
        ids = torch.tensor([history], dtype=torch.long).reshape(1, -1)
        ref = RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty)(ids, ref)
        if not cfg.greedy:
            ref = TemperatureLogitsWarper(cfg.temperature)(ids, ref)
        if cfg.top_k:
            ref = TopKLogitsWarper(cfg.top_k)(ids, ref)
        if cfg.top_p < 1:
            ref = TopPLogitsWarper(cfg.top_p)(ids, ref)
        assert torch.equal(torch.isinf(ours[row]), torch.isinf(ref[0]))
        finite = ~torch.isinf(ours[row])
        assert torch.allclose(ours[row][finite], ref[0][finite], atol=1e-6)


@pytest.mark.parametrize("cfg", SAMPLING_CASES)
def test_a_row_picks_the_same_token_alone_or_in_a_batch(cfg):
    # vocabulary of the organism's size, logits with near-ties: each row's pick (and the draw its own generator makes)
    # must not depend on the rows beside it
    torch.manual_seed(1)
    batch, vocab = 64, 63
    logits = (torch.randn(batch, vocab) * 2).round(decimals=1)
    histories = [torch.randint(0, vocab, (int(n),)).tolist() for n in torch.randint(0, 12, (batch,))]
    seen = seen_tokens(histories, vocab)

    def generators():
        return [None if cfg.greedy else torch.Generator().manual_seed(row) for row in range(batch)]

    together = pick_tokens(logits, seen, cfg, generators())
    alone = [pick_tokens(logits[row:row + 1], seen[row:row + 1], cfg, [g])[0] for row, g in enumerate(generators())]
    assert together == alone
    if cfg.greedy:
        assert together == process_logits(logits, seen, cfg).argmax(-1).tolist()
    else:  # every draw is among the tokens top-k / top-p kept
        kept = ~torch.isinf(process_logits(logits, seen, cfg))
        assert all(kept[row, token] for row, token in enumerate(together))


def test_seen_tokens_are_kept_up_to_date_step_by_step():
    histories = [[1, 2], [], [4]]
    seen = seen_tokens(histories, 6)
    mark_seen(seen, [5, 0, 4])
    expected = seen_tokens([[1, 2, 5], [0], [4, 4]], 6)
    assert torch.equal(seen, expected)
    assert seen.sum().item() == 5


class _Exploding:
    """An observer whose hook fails on the third forward pass."""

    def __init__(self):
        self.calls = 0

    def hooks(self, model):
        def hook(x, hook):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("boom")
            return x
        return [(model.hook_name(1), hook)]

    def on_step(self, info: StepInfo):
        pass


def test_hooks_are_removed_when_generation_raises(model):
    assert active_hook_count(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        generate(model, organism_prompts(model, 2), SamplingConfig(max_new_tokens=10), observers=[_Exploding()])
    assert active_hook_count(model) == 0


def test_generation_stops_at_the_end_of_the_context(model):
    prompt = [5] * (model.max_positions - 3)
    gen = generate(model, [prompt], SamplingConfig(max_new_tokens=10))[0]
    assert len(prompt) + len(gen.generated_ids) <= model.max_positions
    assert gen.finish_reason == "length" or len(gen.generated_ids) < 3


def test_bad_generation_input_is_one_clear_error(model):
    with pytest.raises(TellnormError, match="empty prompt"):
        generate(model, [[]])
    with pytest.raises(TellnormError, match="no room in the context"):
        generate(model, [[5] * model.max_positions], SamplingConfig(max_new_tokens=10))
    with pytest.raises(TellnormError, match="unique"):
        generate(model, [[5], [6]], request_ids=["a", "a"])
    with pytest.raises(TellnormError):
        SamplingConfig(top_p=0)
