#!/usr/bin/env bash
# A whole cohort from one driver: wsi-grunet starts its Dask workers as SLURM jobs (dask-jobqueue),
# scales them between slurm.jobs_min and slurm.jobs_max, and cancels them when it ends.
#
#   workflows/jobqueue/submit_cohort.sh /data/cohort /data/results [more wsi-grunet run options]
#
# The driver runs the model (give it a GPU by running this script inside an sbatch/srun allocation,
# or set model.backend: workers and slurm.gpus_per_job to run the model in GPU worker jobs).
# scancel of the driver, Ctrl-C or a failure: the worker jobs are cancelled too.
set -euo pipefail
slides=${1:?usage: submit_cohort.sh SLIDES OUT [wsi-grunet run options]}
out=${2:?usage: submit_cohort.sh SLIDES OUT [wsi-grunet run options]}
shift 2
here=$(cd "$(dirname "$0")" && pwd)
config=${WSI_GRUNET_CONFIG:-$here/slurm-example.yaml}
exec "${WSI_GRUNET:-wsi-grunet}" run "$slides" --out "$out" --cluster slurm --config "$config" "$@"
