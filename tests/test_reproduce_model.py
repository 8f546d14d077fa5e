"""``tellnorm reproduce --model M --saes S --task T`` on tiny random stand-ins of real architectures.

References are independent of the code under test: HF's own ``generate`` for the responses (greedy), HF's
``output_hidden_states`` for the norms, a regular expression for the answers, the HF backend for the vLLM backend.
Nothing measured on a random stand-in means anything about a model: these tests check the path, not findings.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tellnorm.apps.reproduce import ReproduceConfig, reproduce
from tellnorm.errors import TellnormError
from tellnorm.organism.standins import QWEN_SCOPE_3_5_REPO, llama_scope_r1_files, qwen_scope_files, tiny_model

ORGANISM_TASK = Path(__file__).resolve().parents[1] / "tellnorm" / "data" / "lm_eval" / "organism_test.jsonl"
PLAIN_TEMPLATE = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                  "'<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
                  "{%- endif %}")


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    root = tmp_path_factory.mktemp("standins")
    qwen = tiny_model(root / "qwen3", "qwen3", n_layers=4)
    saes = qwen_scope_files(root / "qwen_saes", 128, range(4))
    rows = [json.loads(line) for line in ORGANISM_TASK.read_text().splitlines()[:12]]
    task = root / "twelve.jsonl"
    task.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"], "id": f"p{i}",
                                        "group": f"level {r['difficulty']}"}) + "\n" for i, r in enumerate(rows)))
    return {"root": root, "qwen": qwen, "saes": f"qwen-scope:{saes}", "task": task}


def _config(s, out, **fields):
    base = dict(model=str(s["qwen"]), saes=s["saes"], tasks=(str(s["task"]),), out=str(out), quick=True,
                sampling="greedy")
    base.update(fields)
    return ReproduceConfig(**base)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _plain_template_copy(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    (target / "chat_template.jinja").write_text(PLAIN_TEMPLATE)
    return target


def test_bad_input_fails_in_one_line_before_any_generation(standins, tmp_path):
    s = standins
    no_answers = tmp_path / "no_answers.jsonl"
    no_answers.write_text('{"prompt": "a = 1 ; what is a ?"}\n')
    wide = qwen_scope_files(tmp_path / "wide", 64, range(2))
    no_switch = _plain_template_copy(s["qwen"], tmp_path / "no_switch")
    cases = [
        (dict(tasks=(str(no_answers),)), 'has no "answer"'),
        (dict(tasks=(f"{s['task']}=nope",)), "unknown answer extractor"),
        (dict(saes=f"qwen-scope:{wide}"), "size 64 but .* has d_model 128"),
        (dict(model=str(no_switch)), "contrast"),
        (dict(tasks=("lm-eval:no_such_task_here",)), "no task 'no_such_task_here'"),
        (dict(only=("peaks",)), "only the organism"),
        (dict(tasks=(), model=str(s["qwen"])), "needs tasks"),
    ]
    for fields, message in cases:
        out = tmp_path / "out"
        with pytest.raises(TellnormError, match=message) as err:
            reproduce(_config(s, out, **fields))
        assert "\n" not in str(err.value), str(err.value)
        assert _files(out) == [], (fields, _files(out))  # nothing generated, nothing half-written


def _hf_greedy(model_dir: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=model.config.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


def assert_measured_like_hf(model_dir: Path, out: Path, task: Path, max_new_tokens: int) -> None:
    """Responses, accuracy and the norm profile of a run in ``out`` against HF's own greedy ``generate``, a regular
    expression over the decoded responses and HF decoder layers' outputs (teacher-forced) on the same sequences."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    responses = pd.read_parquet(out / "responses.parquet")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for row in responses[responses["mode"] == "thinking"].head(2).itertuples():  # HF's own greedy decoding
        expected = _hf_greedy(model_dir, [int(t) for t in row.prompt_ids], max_new_tokens)
        assert [int(t) for t in row.generated_ids] == expected[:len(row.generated_ids)]
    # accuracy: the last number of each decoded response (a regex, not tellnorm's extractor) against the gold
    gold = {json.loads(line)["id"]: json.loads(line)["answer"] for line in task.read_text().splitlines()}
    for mode, frame in responses.groupby("mode"):
        correct = []
        for row in frame.itertuples():
            numbers = re.findall(r"-?\d+", tokenizer.decode([int(t) for t in row.generated_ids],
                                                            skip_special_tokens=True))
            correct.append(bool(numbers) and int(numbers[-1]) == int(gold[row.id]))
        table = pd.read_csv(out / "accuracy.csv")
        measured = table[(table["mode"] == mode) & (table.group == "all")].accuracy.item()
        assert measured == pytest.approx(np.mean(correct), abs=1e-9)
    # the norm profile: HF decoder layers' outputs on the same sequences (teacher-forced, every generated token)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    outputs = {}
    for index, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda _m, _i, out, index=index: outputs.__setitem__(
            index, out[0] if isinstance(out, tuple) else out))
    profile = pd.read_csv(out / "norm_profile.csv")
    both = set.intersection(*(set(responses[responses["mode"] == m].id) for m in ("thinking", "non-thinking")))
    for mode in ("thinking", "non-thinking"):
        per_response = []
        for row in responses[(responses["mode"] == mode) & responses.id.isin(both)].itertuples():
            ids = [int(t) for t in row.prompt_ids] + [int(t) for t in row.generated_ids]
            with torch.no_grad():
                model(torch.tensor([ids]))
            k = len(row.prompt_ids)
            per_response.append([outputs[i][0, k:].double().norm(dim=-1).mean().item()
                                 for i in range(len(model.model.layers))])
        expected = np.mean(per_response, axis=0)
        measured = profile[profile["mode"] == mode].sort_values("layer").mean_norm.to_numpy()
        np.testing.assert_allclose(measured, expected, rtol=1e-3)


@pytest.fixture(scope="module")
def hf_run(standins, tmp_path_factory):
    """The quick greedy run of every stage on the HF backend (shared: the vLLM test compares against it)."""
    out = tmp_path_factory.mktemp("hf_run") / "run"
    return out, reproduce(_config(standins, out))


@pytest.mark.slow
def test_qwen3_standin_runs_every_stage_with_the_contract_files(standins, hf_run):

    s = standins
    out, result = hf_run
    assert set(result.stages) >= {"accuracy", "norm_profile", "features", "bounds", "correlation", "interventions",
                                  "evaluation", "explorer"}
    for name in ("REPORT.md", "claims.csv", "accuracy.csv", "norm_profile.csv", "suppression.csv", "evaluation.csv"):
        assert (out / name).is_file(), name
    report = (out / "REPORT.md").read_text()
    skipped = json.loads((out / "skipped_stages.json").read_text())
    assert "Skipped: peaks" in report and "step labels" in skipped["peaks"]

    assert_measured_like_hf(s["qwen"], out, s["task"], _config(s, out).max_new_tokens)
    # a cached rerun loads nothing and runs nothing
    assert {r.status for r in reproduce(_config(s, out)).stages.values()} == {"cached"}


@pytest.mark.slow
def test_qwen3_5_hybrid_standin_with_qwen_scope_3_5_saes_runs_every_stage(standins, tmp_path):
    """Qwen3.5's hybrid (Gated DeltaNet layers with every fourth layer full attention): 8 layers, so ALRR's default
    layer (6) is a linear-attention layer; SAEs in Qwen-Scope's layout under the Qwen3.5 release's name."""
    model = tiny_model(tmp_path / "qwen3_5", "qwen3_5", n_layers=8)
    saes = qwen_scope_files(tmp_path / "saes", 128, range(8), repo=QWEN_SCOPE_3_5_REPO)
    out = tmp_path / "run"
    config = _config(standins, out, model=str(model), saes=f"qwen-scope:{saes}")
    result = reproduce(config)
    assert set(result.stages) >= {"accuracy", "norm_profile", "features", "bounds", "correlation", "interventions",
                                  "evaluation", "explorer"}
    assert "Skipped: peaks" in (out / "REPORT.md").read_text()
    assert_measured_like_hf(model, out, standins["task"], config.max_new_tokens)
    evaluation = pd.read_csv(out / "evaluation" / standins["task"].stem / "evaluation_responses.csv")
    assert {"greedy", "alrr", "erss"} <= set(evaluation.run)


@pytest.mark.slow
def test_vllm_backend_measures_what_the_hf_backend_does(standins, hf_run, tmp_path):
    pytest.importorskip("vllm")
    s = standins
    runs = {"hf": hf_run[0], "vllm": tmp_path / "vllm"}
    reproduce(_config(s, runs["vllm"], backend="vllm", only=("norm_profile", "evaluation")))
    hf, vl = (pd.read_parquet(runs[b] / "responses.parquet") for b in ("hf", "vllm"))
    assert [list(x) for x in hf.generated_ids] == [list(x) for x in vl.generated_ids]
    assert list(hf.answer) == list(vl.answer)
    a, b = (pd.read_csv(runs[x] / "norm_profile.csv") for x in ("hf", "vllm"))
    np.testing.assert_allclose(a.mean_norm, b.mean_norm, rtol=1e-4)
    task = s["task"].stem
    firing = [pd.read_csv(runs[x] / "evaluation" / task / "evaluation_responses.csv") for x in ("hf", "vllm")]
    greedy = [f[f.run.isin(["greedy", "alrr", "erss", "alrr+erss"])].reset_index(drop=True) for f in firing]
    pd.testing.assert_frame_equal(greedy[0], greedy[1])


@pytest.mark.slow
def test_r1_distill_llama_with_llama_scope_r1_saes(tmp_path):
    model = tiny_model(tmp_path / "DeepSeek-R1-Distill-Llama-8B", "llama", n_layers=4)
    (model / "chat_template.jinja").write_text(PLAIN_TEMPLATE)  # no enable_thinking: the name picks the switch
    saes = llama_scope_r1_files(tmp_path / "lsr1", 128, range(4))
    rows = [json.loads(line) for line in ORGANISM_TASK.read_text().splitlines()[:4]]
    task = tmp_path / "four.jsonl"
    task.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in rows))
    out = tmp_path / "run"
    reproduce(ReproduceConfig(model=str(model), saes=f"llama-scope-r1:{saes}", tasks=(str(task),), out=str(out),
                              quick=True, sampling="greedy", only=("features",)))
    responses = pd.read_parquet(out / "responses.parquet")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = {m: tokenizer.decode([int(t) for t in responses[responses["mode"] == m].prompt_ids.iloc[0]])
               for m in ("thinking", "non-thinking")}
    # R1-Distill always thinks: its non-thinking prompt is the thinking one with an empty think block pre-filled
    assert prompts["non-thinking"].startswith(prompts["thinking"].rstrip()) and "</think>" in prompts["non-thinking"]
    assert "</think>" not in prompts["thinking"]
    assert len(pd.read_csv(out / "feature_trend.csv")) == 4


@pytest.mark.slow
def test_a_model_without_a_switch_pairs_with_a_contrast_model(standins, tmp_path):
    s = standins
    thinking = tiny_model(tmp_path / "Qwen3-4B-Thinking-2507", "qwen3", n_layers=4)
    instruct = tiny_model(tmp_path / "Qwen3-4B-Instruct-2507", "qwen3", n_layers=4, seed=1)
    for folder in (thinking, instruct):
        (folder / "chat_template.jinja").write_text(PLAIN_TEMPLATE)
    out = tmp_path / "run"
    reproduce(_config(s, out, model=str(thinking), contrast_model=str(instruct), only=("norm_profile",)))
    responses = pd.read_parquet(out / "responses.parquet")
    from transformers import AutoModelForCausalLM  # the non-thinking responses are the instruct model's own

    row = responses[responses["mode"] == "non-thinking"].iloc[0]
    expected = _hf_greedy(instruct, [int(t) for t in row.prompt_ids], len(row.generated_ids))
    assert [int(t) for t in row.generated_ids] == expected
    assert AutoModelForCausalLM  # imported for the reference above
    assert "contrast model" in (out / "REPORT.md").read_text()


@pytest.mark.slow
def test_an_lm_eval_task_from_a_local_file(standins, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    s = standins
    rows = [json.loads(line) for line in ORGANISM_TASK.read_text().splitlines()[:4]]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": r["prompt"], "target": r["answer"]}) + "\n" for r in rows))
    (tmp_path / "organism_local.yaml").write_text(
        "task: organism_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: []\nfilter_list:\n  - name: last\n    filter:\n      - function: regex\n"
        "        regex_pattern: '(\\d+)'\n        group_select: -1\n      - function: take_first\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    monkeypatch.setenv("TELLNORM_LM_EVAL_INCLUDE", str(tmp_path))
    out = tmp_path / "run"
    reproduce(_config(s, out, tasks=("lm-eval:organism_local",), only=("accuracy",)))
    table = pd.read_csv(out / "accuracy.csv")
    assert set(table.task) == {"organism_local"} and table.n.max() == 4
