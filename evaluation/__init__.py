"""Accuracy against the exact ODE solution of the built-in model (:mod:`evaluation.accuracy`) and
the quickstart (:mod:`evaluation.quickstart`)."""
