"""Zero-shot classification and retrieval, in the training loop or standalone (``python -m evaluate``).

- ``evaluate.registry.build_evaluators(config, mesh)`` -> evaluators with ``run(model) -> dict[str, float]``
- ``evaluate.zeroshot`` / ``evaluate.retrieval``: the two evaluator types; ``evaluate.metrics``: pure NumPy
- ``evaluate.scoring.ScoringModel``: the adapter a model implements (CLIP, Llip)

See ``docs/evaluation.md``.
"""
