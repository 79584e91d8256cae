#!/usr/bin/env bash
# DVC-versioned data -> registered model lineage, end to end on a local S3 API server (moto):
# version a dataset with `tlops data version` (dvc add + git commit + dvc push to S3), run the
# pipeline from a fresh clone whose DVC cache is empty, and print the registered version's
# data lineage tags. Usage: bash examples/dvc-lineage.sh   (needs `make install` first)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
V="$REPO/.venv/bin"
W="$(mktemp -d /tmp/tlops-lineage.XXXXXX)"
cd "$W"
export PATH=$V:$PATH AWS_ACCESS_KEY_ID=demo-key AWS_SECRET_ACCESS_KEY=demo-secret-value AWS_DEFAULT_REGION=us-east-1
moto_server -H 127.0.0.1 -p ${MOTO_PORT:-5077} >"$W/moto.log" 2>&1 & MOTO=$!
trap "kill $MOTO" EXIT
echo "working in $W"
sleep 3
python -c "import boto3; boto3.client('s3', endpoint_url='http://127.0.0.1:${MOTO_PORT:-5077}').create_bucket(Bucket='demo-data')"
mkdir data-repo && cd data-repo
git init -q -b main && git config user.email a@b && git config user.name demo
dvc init -q && dvc remote add -q -d storage s3://demo-data/dvc && dvc remote modify storage endpointurl http://127.0.0.1:${MOTO_PORT:-5077}
git add -A && git commit -qm "dvc init"
python - <<'PY'
import numpy as np
from sklearn.datasets import load_digits
from PIL import Image
from pathlib import Path
d = load_digits()
for c in (0, 1, 2):
    p = Path("data/digits") / str(c); p.mkdir(parents=True)
    for i, img in enumerate(d.images[d.target == c][:40]):
        Image.fromarray((img * 255 / 16).astype(np.uint8)).save(p / f"{i:03d}.png")
PY
echo '$ tlops data version data/digits -m "digits v1"'
tlops data version data/digits -m "digits v1" 2>/dev/null | tee "$W/version.txt"
REV=$(grep -o 'at git rev [0-9a-f]*' "$W/version.txt" | cut -d' ' -f4)
rm -rf .dvc/cache && cd .. && git clone -q data-repo clone
cat > cfg.yaml <<YAML
name: lineage-demo
workdir: $W/work
data: {dvc: {repo: $W/clone, rev: $REV, path: data/digits}, split: {val: 0.2, test: 0.3}}
source: {model: "timm:resnet10t", pretrained: false, in_chans: 1, image_size: 16}
train: {strategies: [linear-probe]}
evaluate: {scratch_baseline: false}
register: {model_name: lineage-demo}
YAML
echo '$ tlops run --config cfg.yaml'
tlops run --config cfg.yaml 2>&1 | grep -E "ingest|registered" | sed 's/^[0-9:]* INFO *//' | head -8
echo '$ (registered version tags)'
W="$W" python - <<'PY'
import mlflow
mlflow.set_tracking_uri("sqlite:///" + __import__("os").environ["W"] + "/work/mlflow.db")
c = mlflow.MlflowClient()
mv = c.get_model_version_by_alias("lineage-demo", "challenger")
print(f"lineage-demo v{mv.version} (@challenger):")
for k in sorted(mv.tags):
    if k.startswith("tlops.data") or k in ("tlops.git_commit",):
        print(f"  {k} = {mv.tags[k]}")
PY
grep -rl demo-secret-value "$W/work" && echo "SECRET FOUND" || echo "no credential value in any file under the workdir"
