#!/usr/bin/env bash
# Every point of the verdict table's sweeps (docs/privacy-verdict.md), one after another, the
# most telling first: digits FedSGD at 200 iterations (FedAvg, HyperFL server, white-box, then
# the controls), the basin test, digits B = 1 at 2,000, the official protocol, photos, digits
# B = 4 at 2,000, then 24,000. A finished point is skipped, so a rerun resumes.
#   nice -n 10 bash jobs/privacy/verdict.sh > runs/privacy-verdict.log 2>&1 &
set -u
cd "$(dirname "$0")/../.."
point() { python -m hpcfl.sweep "jobs/privacy/verdict_$1.yaml" --index "$2" || echo "FAILED $1 $2"; }
# verdict_digits: point p at 200 iterations is index 2p, at 2,000 index 2p + 1
for i in 0 4 6 2 8 10 14 16 12 18; do point digits $i; done
for i in 0 1 2 3 4 5 6 7 8 9; do point basin $i; done
for i in 0 1 2 3; do point basin_far $i; done
for i in 1 5 7 3 9; do point digits $i; done
for i in 0 2 3 1 4; do point official $i; done
for i in 0 2 3 5 7 8 1 4 6 9; do point photos $i; done
for i in 11 15 17 13 19; do point digits $i; done
for i in 10 11 12 13 14; do point basin $i; done
for i in 4 5; do point basin_far $i; done
for i in 0 1 2; do point 24k $i; done
