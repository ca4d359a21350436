#!/usr/bin/env bash
# Rebuild the bundled model from nothing: the corpus from Debian's fortunes, then prepare,
# train, evaluate and convert with this package's own commands. About 30-40 minutes on 2 cores.
#
#   bash weights/fortunes/make.sh            # into weights/fortunes/ (WORK=build/fortunes)
#   OUT=/tmp/check WORK=/tmp/work bash weights/fortunes/make.sh
#
# Needs Debian's fortunes packages at the version the card names (apt-get as root) and
# numpy-gpt2 installed with its plot extra (the loss curve).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-$HERE}"
WORK="${WORK:-build/fortunes}"
VERSION="1:1.99.1-7.3"
SHA256="1401c09858105c57a20cd3d6b8813700ff6fc75f8c991e03598c59b352cffcb9"

if [ "$(dpkg-query -W -f='${Version}' fortunes 2>/dev/null)" != "$VERSION" ] ||
   [ "$(dpkg-query -W -f='${Version}' fortunes-min 2>/dev/null)" != "$VERSION" ]; then
    apt-get update -q && apt-get install -y -q "fortunes=$VERSION" "fortunes-min=$VERSION"
fi

mkdir -p "$WORK"
python3 "$HERE/corpus.py" /usr/share/games/fortunes > "$WORK/corpus.txt"
echo "$SHA256  $WORK/corpus.txt" | sha256sum --check --quiet

numpy-gpt2 prepare "$WORK/corpus.txt" --out "$WORK/data" --val-fraction 0.05
cat > "$WORK/config.json" <<'JSON'
{"n_embd": 128, "n_layer": 6, "n_head": 4, "n_positions": 256, "vocab_size": 50257}
JSON
# --resume continues an interrupted run exactly; a finished one is left as it is.
if [ -f "$WORK/run/training_state.json" ]; then RESUME=(--resume); else RESUME=(--config "$WORK/config.json"); fi
numpy-gpt2 train --data "$WORK/data" --out "$WORK/run" "${RESUME[@]}" --steps 800 --batch-size 16 \
    --seq-len 256 --lr 2e-3 --min-lr 1e-4 --warmup 50 --eval-every 100 --seed 1337

python3 "$HERE/evaluate.py" "$WORK/run" "$WORK/data" | tee "$WORK/evaluation.json"
numpy-gpt2 convert "$WORK/run" "$WORK/float16" --dtype float16 --force
mkdir -p "$OUT"
cp "$WORK/float16/config.json" "$WORK/float16/model.safetensors" "$WORK/run/vocab.json" \
   "$WORK/run/merges.txt" "$WORK/run/loss.png" "$WORK/run/log.jsonl" "$OUT/"
