#!/bin/sh
# The compose `search` service: ray.init(address=HOST:PORT) needs a Ray node (raylet) on the
# driver's own machine, so the container joins the cluster first, with no CPUs or GPUs so that
# no trial is placed here, runs the search with --address auto and leaves the cluster at the end.
# Usage: search-node.sh HEAD_ADDRESS STORAGE [search/run.py arguments]
set -eu
head=$1 storage=$2
shift 2
ray start --address="$head" --num-cpus=0 --num-gpus=0 --disable-usage-stats >/dev/null
trap 'ray stop >/dev/null 2>&1' EXIT
python search/run.py --address auto --storage "$storage" "$@"
