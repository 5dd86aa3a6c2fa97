#!/usr/bin/env bash
# jaxtune on a Cloud TPU pod slice: create the slice, install, train on every host at once, fetch the model.
# Usage: bash examples/tpu_pod.sh NAME ZONE ACCELERATOR BUCKET     e.g.  bash examples/tpu_pod.sh jt us-central2-b v4-32 my-bucket
# Needs the gcloud CLI, a project with TPU quota, and a Cloud Storage bucket for checkpoints (every host must see
# the same checkpoint directory; the bucket is mounted with gcsfuse at /mnt/runs on each host).
set -euo pipefail
NAME=${1:?name}; ZONE=${2:?zone}; ACCEL=${3:?accelerator type, e.g. v4-32 or v5litepod-32}; BUCKET=${4:?bucket}
VERSION=${TPU_VERSION:-tpu-ubuntu2204-base}
RUN=${RUN:-gpt2-xl-helpdesk}
on_all() { gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "$1"; }

gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" --accelerator-type "$ACCEL" --version "$VERSION"

# the same code on every host
tar czf /tmp/jaxtune.tgz --exclude .git --exclude runs -C "$(dirname "$0")/.." .
gcloud compute tpus tpu-vm scp /tmp/jaxtune.tgz "$NAME":~/ --zone "$ZONE" --worker=all
on_all 'mkdir -p ~/jaxtune && tar xzf ~/jaxtune.tgz -C ~/jaxtune &&
        pip install -U "jax[tpu]" && pip install -r ~/jaxtune/requirements.txt &&
        sudo mkdir -p /mnt/runs && sudo chown $USER /mnt/runs &&
        (command -v gcsfuse || (sudo apt-get update && sudo apt-get install -y gcsfuse)) &&
        gcsfuse --implicit-dirs --rename-dir-limit 100000 '"$BUCKET"' /mnt/runs'  # runs and checkpoints are renamed into place

# every host runs the same command; jax.distributed.initialize() finds the others (distributed: "on" in the config)
on_all "cd ~/jaxtune && python -m jaxtune train --config configs/tpu-pod.yaml --output /mnt/runs/$RUN"

# process 0 wrote the Hugging Face directory; resume a pre-empted run with  --resume /mnt/runs/$RUN  on all hosts
gsutil -m cp -r "gs://$BUCKET/$RUN" .
echo "model in ./$RUN  (delete the slice: gcloud compute tpus tpu-vm delete $NAME --zone $ZONE)"
