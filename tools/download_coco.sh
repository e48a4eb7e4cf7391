#!/usr/bin/env bash
# Download COCO 2017 (train/val images and instance annotations, about 20 GB) into the layout
# ssd-train reads: DIR/annotations/instances_{train,val}2017.json, DIR/train2017/, DIR/val2017/.
# Usage: tools/download_coco.sh DIR
set -euo pipefail
dir=${1:?usage: tools/download_coco.sh DIR}
mkdir -p "$dir"
cd "$dir"
base=http://images.cocodataset.org
for archive in zips/train2017.zip zips/val2017.zip annotations/annotations_trainval2017.zip; do
    file=$(basename "$archive")
    [ -f "$file.done" ] && continue                  # finished earlier: rerunning resumes, not restarts
    curl -fL --retry 5 -C - -o "$file" "$base/$archive"
    unzip -q -o "$file"
    touch "$file.done"
    rm -f "$file"
done
ls annotations/instances_train2017.json annotations/instances_val2017.json >/dev/null
echo "COCO 2017 is in $dir (train2017/, val2017/, annotations/)"
