#!/bin/bash
# Strong and weak scaling on one node: jobs/scaling/sweep.yaml submitted once per rank count
# (an array job each, the ranks sharing the node's GPUs), results in runs/scaling/ranks<R>/.
#
#     bash slurm/scaling.sh 1 2 4 8          (default: 1 2 4)
#     python -m analysis.summarize runs/scaling/* --plot runs/scaling
#
# sbatch options (SITE lines: account, partition, GPUs) as in slurm/sweep.sbatch.
set -euo pipefail
sweep=jobs/scaling/sweep.yaml
points=$(python -m hpcfl.sweep "$sweep" --list | tail -n 1 | cut -d' ' -f1)
ranks=("$@")
[ $# -gt 0 ] || ranks=(1 2 4)
for r in "${ranks[@]}"; do
    sbatch --job-name="hpcfl-scaling-$r" --ntasks-per-node="$r" --array=0-$((points - 1)) \
        slurm/sweep.sbatch "$sweep" "output.dir=runs/scaling/ranks$r"
done
