"""diffattr: training-data attribution for diffusion models (Diffusion-TracIn/ReTrac, K-FAC IF).

Score sign convention, for every method: a score > 0 means the training sample is a
proponent — removing it is predicted to increase the query's loss.
"""

__version__ = "0.1.0"
