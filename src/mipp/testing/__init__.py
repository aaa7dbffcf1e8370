"""Conformance checks a user can run on their own estimator or method.

- :mod:`~mipp.testing.estimators`: known answers (closed-form Gaussian MI and CMI,
  independence, monotone transforms, a planted layer) any estimator should reproduce;
- :mod:`~mipp.testing.methods`: a method run through the one pipeline on a tiny model must
  give a valid report that replays onto a fresh model, leave no hooks, and leave the input
  model untouched.
"""
