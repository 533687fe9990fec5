"""The experiment harness: data sets, the papers' networks, training protocols, reproductions,
tables and plots, and the ``bayesprune`` command line.

It depends on the core (:mod:`bayesprune`) and on the ``experiments`` extra (torchvision,
scikit-learn, scipy, matplotlib, tqdm); the core never imports it.
"""
