#!/bin/sh
# Fill the data volume (/data): the default base model, the default datasets and an SFT
# ensemble at /data/ensemble. Runs in the softspec image (compose service `populate`, the
# Kubernetes Job in k8s/populate-job.yaml):
#
#   docker compose -f deploy/compose.yaml run --rm populate                  # K=4, one epoch
#   docker compose -f deploy/compose.yaml run --rm populate --members 2 --max-steps 20
#
# Arguments are appended to `softspec train sft` and win over the defaults below. Re-running
# replaces /data/ensemble; restart vllm, then the gateway, afterwards.
set -eu
MODEL=/data/models/smollm2-135m-instruct
softspec model export-default --out "$MODEL"
softspec data build
exec softspec train sft --base "$MODEL" --data /data/data/sft_topics_train.jsonl \
    --members 4 --alpha 1.0 --out /data/ensemble --overwrite "$@"
