#!/usr/bin/env bash
# Every point of the verdict table's sweeps (docs/privacy-verdict.md), one after another, the
# cheapest first: digits at 200 iterations, the official protocol, the basin test, photos,
# digits at 2,000, then 24,000. A finished point is skipped, so a rerun resumes.
#   nice -n 10 bash jobs/privacy/verdict.sh > runs/privacy-verdict.log 2>&1 &
set -u
cd "$(dirname "$0")/../.."
point() { python -m hpcfl.sweep "jobs/privacy/verdict_$1.yaml" --index "$2" || echo "FAILED $1 $2"; }
for i in 0 2 4 6 8 10 12 14 16 18; do point digits $i; done
for i in 0 1 2 3 4; do point official $i; done
for i in $(seq 0 14); do point basin $i; done
for i in $(seq 0 9); do point photos $i; done
for i in 1 3 5 7 9 11 13 15 17 19; do point digits $i; done
for i in 0 1 2; do point 24k $i; done
