"""``medrl report``: the run's report (``build``) and its sections (training plots, benchmarks, HealthBench scores,
teacher feedback, caveats). Sits above evaluation and review: it reads both, neither imports it."""
