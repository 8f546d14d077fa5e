"""``import tellnorm as tn``: the workflow namespace is lazy, complete and lists what it offers."""

import subprocess
import sys

import tellnorm as tn


def test_every_listed_name_resolves_to_its_defining_module():
    for name in dir(tn):
        if name == "__version__":
            continue
        value = getattr(tn, name)
        module = tn._ALIASES.get(name, (tn._EXPORTS.get(name),))[0]
        assert module is not None, name
        owner = getattr(value, "__module__", None)
        if owner is not None and callable(value):  # functions and classes: defined where the table says
            assert owner == module or owner.startswith(module + "."), (name, owner, module)


def test_the_paper_workflow_is_there():
    for name in ("load_model", "generate", "trace_generation", "layer_profile", "make_threshold", "load_saes",
                 "reasoning_features", "check_tokens", "Scale", "SAEFeatureEdit", "AboveThreshold", "ALRR", "ERSS",
                 "lrs_statistics", "build_edits", "majority_vote", "contrast_corpus", "TellnormError"):
        assert name in dir(tn), name


def test_import_is_lazy():
    code = ("import sys, tellnorm as tn; heavy = {'torch', 'transformer_lens', 'sae_lens', 'pandas'}; "
            "print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_unknown_names_fail_like_a_module():
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tn.nope
