"""Cluster execution for the FFN commands: Slurm through submitit, or local subprocesses.

See :mod:`slurm.executor` for the shared command-line flags and the log layout.
"""

from slurm.executor import (CLUSTERS, JobExecutor, JobFailedError, SlurmOptions,
                            add_slurm_arguments, make_executor, parse_sbatch_params,
                            resolve_cluster, slurm_available, submit_array, wait_all)

__all__ = [
    "CLUSTERS", "JobExecutor", "JobFailedError", "SlurmOptions", "add_slurm_arguments",
    "make_executor", "parse_sbatch_params", "resolve_cluster", "slurm_available", "submit_array",
    "wait_all",
]
