"""Ground-truth retraining: many models trained on chosen subsets of the training set.

- `jobs`: what to train (`RetrainJob`: family, tag, ids, seed index; `lds_jobs` for the LDS
  subsets and their membership masks);
- `store`: where finished models go (`ModelStore`: one folder per model, settings-checked,
  resumable);
- `worker`: `train_job`, the one job function, stage 1's `train` on a job's ids;
- `executors`: `retrain`, running the pending jobs locally (worker processes) or as a SLURM
  array through submitit.
"""

from diffattr.retraining.executors import SlurmOptions, retrain
from diffattr.retraining.jobs import RetrainJob, lds_jobs, retrain_seed, subset_mask
from diffattr.retraining.store import ModelStore, StoreMismatchError, store_settings
from diffattr.retraining.worker import RetrainJobError, train_job

__all__ = [
    "ModelStore",
    "RetrainJob",
    "RetrainJobError",
    "SlurmOptions",
    "StoreMismatchError",
    "lds_jobs",
    "retrain",
    "retrain_seed",
    "store_settings",
    "subset_mask",
    "train_job",
]
