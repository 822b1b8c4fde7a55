"""Benchmarks (imports as ``vitdeploy.benchmarks``): timing harness, suites, reports, plots, comparisons.

``vitdeploy bench`` and ``vitdeploy deploy`` drive it; :class:`~vitdeploy.benchmarks.harness.Harness`
runs a :class:`~vitdeploy.benchmarks.harness.BenchPlan` and returns a results document whose
schema is ``schema.json``; ``report``, ``plots`` and ``compare`` render such documents.
"""
