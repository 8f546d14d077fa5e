"""The paper's studies, each run on a model: contrast corpus, norm profile, ground truth, features, bounds,
correlation, suppression, evaluation and the judged claims. Studies import the core and the organism, never the apps."""
