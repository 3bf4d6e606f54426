#!/usr/bin/env bash
# The same images under the same weights (docs/privacy-verdict.md, "Same images"): round 1,
# FedSGD B = 1 on the first 8 of 20 digits clients, HyperFL without its head epoch
# (algorithm.head_epochs=0), so that every method's one local step draws the same image from the
# batch-order stream and starts from the same head. Rows: FedAvg on its own init; FedAvg on
# HyperFL's generated extractor and head (the weight-scale control); HyperFL's hypernetwork
# upload of that same extractor, white-box and server. 1,000 IG iterations.
#   nice -n 10 bash jobs/privacy/verdict_same.sh > runs/privacy-same.log 2>&1 &
set -u
cd "$(dirname "$0")/../.."
C="attack.clients=8 attack.iterations=1000 algorithm.head_epochs=0 output.dir=runs/privacy-same"
python -m hpcfl.attack algorithm.name=fedavg $C output.name=fedavg
python -m hpcfl.attack algorithm.name=fedavg algorithm.fedavg_init=hyperfl $C output.name=control
python -m hpcfl.attack algorithm.name=hyperfl attack.threat=white-box $C output.name=hyperfl-wb
python -m hpcfl.attack algorithm.name=hyperfl $C output.name=hyperfl-server
