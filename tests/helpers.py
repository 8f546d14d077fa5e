"""Test helpers: tiny random models that share the organism's tokenizer and chat template."""

from __future__ import annotations

import math

from tellnorm.generation import LayerHooks


def tiny_organism_like(n_layers: int = 3, d_model: int = 64, seed: int = 0):
    """A random-init Qwen3 with the organism's tokenizer, wrapped by tellnorm's backend."""
    import torch
    from transformers import Qwen3ForCausalLM

    from tellnorm.backends import load_model
    from tellnorm.organism.tokenizer import build_tokenizer
    from tellnorm.organism.train import OrganismModelConfig

    tok = build_tokenizer()
    shape = OrganismModelConfig(n_layers=n_layers, d_model=d_model, n_heads=4, n_kv_heads=2, head_dim=16, d_mlp=128)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(shape.hf_config(len(tok), tok.pad_token_id, tok.eos_token_id))
    return load_model((model, tok))


def organism_prompts(model, n: int, thinking: bool = True, seed: int = 0) -> list[list[int]]:
    """``n`` chat prompts of different lengths (difficulties 1..8)."""
    import random

    from tellnorm.organism import task

    rng = random.Random(seed)
    problems = [task.make_problem(rng, 1 + i % task.MAX_DIFFICULTY) for i in range(n)]
    return [model.encode(model.chat_prompt(p.prompt_text(), thinking=thinking)) for p in problems]


def active_hook_count(model) -> int:
    """Forward hooks currently registered anywhere in the bridge (TransformerLens hook points)."""
    unique = {id(hp): hp for hp in model.bridge.hook_dict.values()}  # aliases share one HookPoint
    return sum(len(hp.fwd_hooks) for hp in unique.values())


def hf_layer_norms_float64(model, batch):
    """Reference independent of TransformerLens: forward hooks on HF's own decoder layers, ‖h‖ in float64.

    ``batch``: equal-length token-id lists. Returns a tensor ``[n_layers, batch, seq]``."""
    import torch

    outputs = {}
    handles = [layer.register_forward_hook(lambda mod, inp, out, i=i: outputs.__setitem__(
        i, (out[0] if isinstance(out, tuple) else out).detach()))
        for i, layer in enumerate(model.hf_model.model.layers)]
    try:
        with torch.no_grad():
            model.hf_model(torch.tensor(batch), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([outputs[i].double().norm(dim=-1) for i in range(len(outputs))])


def cache_snapshot(cache) -> list:
    """Copies of every initialised layer's keys and values, and of a state layer's convolution/recurrent states."""
    snapshot = []
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None:
            snapshot.append((layer.keys.clone(), layer.values.clone()))
        for states in (getattr(layer, "conv_states", {}), getattr(layer, "recurrent_states", {})):
            snapshot += [(t.clone(), t.clone()) for t in states.values() if t is not None]
    return snapshot


class ExtraPassProbe(LayerHooks):
    """An observer for ``generate``: at ``layers``' resid_post in the passes ``steps``, runs ALRR's
    ``extra_block_pass`` for the first, middle and last real token of every row, on a perturbed input y and on the
    token's own layer input (captured at resid_pre), with cache snapshots around each call.

    ``calls``: (layer, request_id, position, y, out, normal_out, post); ``cache_checks``: (before, after)."""

    def __init__(self, model, layers, steps, seed: int = 0):
        import torch

        super().__init__(model, layers)
        self.extra_pass_layers = list(layers)  # the HF backend keeps a state layer's inputs for these
        self.steps = set(steps)
        self.gen = torch.Generator().manual_seed(seed)
        self.calls: list = []
        self.cache_checks: list = []
        self._pre: dict = {}

    def hooks(self, model=None):
        def pre(layer):
            def hook(x, hook):
                self._pre[layer] = x.detach().clone()
                return x
            return hook

        return [(self.model.hook_name(L, "resid_pre"), pre(L)) for L in self.layers] + super().hooks(model)

    def hook_for(self, layer):
        import torch

        from tellnorm.techniques.alrr import extra_block_pass

        def hook(x, hook):
            info = self.info
            if info.step not in self.steps:
                return x
            picked = []
            for r in range(x.shape[0]):
                cols = info.valid[r].nonzero().flatten().tolist()
                picked += [(r, c) for c in sorted({cols[0], cols[len(cols) // 2], cols[-1]})]
            rows, cols = torch.tensor([r for r, _ in picked]), torch.tensor([c for _, c in picked])
            post = x[rows, cols]
            noise = torch.randn(post.shape, generator=self.gen, dtype=torch.float64).to(post.dtype)
            y = 1.3 * post + 0.3 * noise * post.norm(dim=-1, keepdim=True) / math.sqrt(post.shape[-1])
            before = cache_snapshot(info.cache)
            out = extra_block_pass(self.model, layer, y, rows, cols, info)
            normal = extra_block_pass(self.model, layer, self._pre[layer][rows, cols], rows, cols, info)
            self.cache_checks.append((before, cache_snapshot(info.cache)))
            for i, (r, c) in enumerate(picked):
                self.calls.append((layer, info.request_ids[r], int(info.positions[r, c]), y[i].clone(),
                                   out[i].clone(), normal[i].clone(), post[i].clone()))
            return x

        return hook


def sae_reference(model, sae, layer: int, sequences, features=None):
    """Per sequence, alone: ``run_with_cache`` at the layer's hook, ``sae.encode`` (only ``features`` if given) and
    ‖h‖₂, in float64 — what dashboards and the explorer are checked against."""
    import torch

    hook = model.hook_name(layer)
    acts, norms = [], []
    with torch.no_grad():
        for seq in sequences:
            _, cache = model.bridge.run_with_cache(torch.tensor([seq]), names_filter=lambda n: n == hook)
            h = cache[hook][0]
            encoded = sae.encode(h)
            acts.append((encoded if features is None else encoded[:, features]).double().numpy())
            norms.append(h.double().norm(dim=-1).numpy())
    return acts, norms


class StaleCounter:
    """An observer that counts the tokens a step shows again (``fresh`` False): vLLM recomputing a preempted
    request's prefix. Module-level here, so vLLM's worker processes can unpickle it."""

    edits_stream = False

    def __init__(self):
        self.stale = 0

    def hooks(self, model):
        return []

    def on_step(self, info):
        self.stale += int((info.valid & ~info.fresh).sum())


class FinishLog:
    """An observer that counts the steps its copy sees and, when the worker takes a finished request's records
    (:class:`tellnorm.generation.FinishedRequests`), stamps how many steps after the request's last one that was.
    Module-level here, so vLLM's worker processes can unpickle it."""

    edits_stream = False

    def __init__(self):
        self.step = 0
        self.last: dict = {}  # request id -> the last step that showed it
        self.parts: list = []  # what came back: ("finished" | "end", {request id: steps since its last step})

    def hooks(self, model):
        return []

    def on_step(self, info):
        self.step += 1
        for rid in info.request_ids:
            self.last[rid] = self.step

    def take_records(self, request_ids):
        chosen = list(self.last) if request_ids is None else [rid for rid in request_ids if rid in self.last]
        return ("end" if request_ids is None else "finished", {rid: self.step - self.last.pop(rid) for rid in chosen})

    def add_records(self, part):
        self.parts.append(part)
