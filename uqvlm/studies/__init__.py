"""Building blocks of the paper's further studies (section 4.3 and the reproduction report).

One module per study, pure functions on tensors or plain data; the only I/O is the plotting functions,
which write one PNG atomically. Tasks and configs wire them up:

- :mod:`~uqvlm.studies.overhead`: FLOPs (matmul, counted) and elementwise work of MAP vs the BayesVLM
  predictive, encoder FLOPs, wall-time helper.
- :mod:`~uqvlm.studies.corruption`: the published additive Gaussian pixel noise, a dataset view that
  applies it, true-class similarity statistics per noise level, figures.
- :mod:`~uqvlm.studies.probcosine_accuracy`: ProbCosine vs Monte Carlo over posterior widths, figure.
- :mod:`~uqvlm.studies.uncertainty_error`: error rate per equal-mass uncertainty bin, figure.
- :mod:`~uqvlm.studies.report`: verdicts per paper claim from run records, the one-page markdown.
"""
