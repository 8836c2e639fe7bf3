#!/usr/bin/env bash
# The runs behind docs/post-training.md's table of GRPO / CISPO / PPO on the `max` task, for one base:
#     bash docs/post-training-runs.sh                                          # the embedded corpus
#     CORPUS=../shared/data/pretrain_zh.jsonl bash docs/post-training-runs.sh  # a base on another corpus
#     SEEDS="1 2 3" METHODS="grpo cispo ppo" bash docs/post-training-runs.sh   # the defaults
# The base: a tokenizer and 20 pretraining steps on the corpus; then SFT on the task's demonstrations for
# 120 steps, every 10th step kept and scored (greedy, held out). RL starts from the last SFT checkpoint
# that still gets fewer than 40% of the held-out prompts right (START=N to choose another): the model
# writes the answer format, is on its way to the rule, and leaves room to improve.
# Each RL run prints one line: held-out greedy exact match at step 0 and the mean of the last two
# evaluations (80 held-out prompts). Everything is seeded: a rerun on the same machine repeats it.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${WORK:-runs/post-training}${CORPUS:+-$(basename "$CORPUS" .jsonl)}
SEEDS=${SEEDS:-"1 2 3"}
METHODS=${METHODS:-"grpo cispo ppo"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # tiny models: one thread each is fastest, and two runs can share
IN=()
if [ -n "${CORPUS:-}" ]; then IN=(--input "$CORPUS"); fi

if [ ! -e "$W/sft/ckpt_000120" ]; then
    python prepare.py tokenizer "${IN[@]}" --out "$W/tok" --quiet
    python prepare.py pretrain "${IN[@]}" --tokenizer "$W/tok" --out "$W/pretrain" --quiet
    python prepare.py rl-task --out "$W/task" --kinds max --lang zh --n-train 800 --n-val 80
    python prepare.py sft --input "$W/task/sft.jsonl" --tokenizer "$W/tok" --out "$W/task-sft" --val-fraction 0.05 --quiet
    python train.py --mode=pretrain --data="$W/pretrain" --out="$W/base" --max-iters=20 --force
    python train.py --mode=sft --init-from="$W/base" --data="$W/task-sft" --out="$W/sft" --seq-len=128 --batch-size=16 \
        --max-iters=120 --save-interval=10 --keep-checkpoints=12 --force
fi
# held-out greedy exact match of every kept SFT checkpoint; the start is the last one under 0.4
SCORE='
import json, sys
from pathlib import Path
import rl
from checkpoint import load_checkpoint
from tokenizer import Tokenizer
work = Path(sys.argv[1])
records = [json.loads(line) for line in open(work / "task" / "val.jsonl")]
scores = {}
for ckpt in sorted((work / "sft").glob("ckpt_*")):
    model, _, path = load_checkpoint(ckpt)
    tok = Tokenizer(path / "tokenizer")
    ro = rl.rollout(model, tok, [tok.encode_chat(rl.rollout_messages(r)) for r in records], 8, temperature=0.0)
    scores[int(ckpt.name[5:])] = sum(rl.reward_exact(None, t, r) for t, r in zip(ro.texts, records)) / len(records)
print("SFT alone, held-out exact by step: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()), file=sys.stderr)
print(max([k for k, v in scores.items() if v < 0.4] or [min(scores)]))
'
START=${START:-$(python -c "$SCORE" "$W")}
echo "RL starts from SFT step $START"
RL=(--init-from="$W/sft/ckpt_$(printf %06d "$START")" --data="$W/task" --batch-size=8 --num-generations=8
    --max-new-tokens=8 --max-iters=60 --eval-interval=10 --eval-iters=10 --lr=2e-4 --ppo-epochs=2 --ppo-minibatches=2
    --force)
for method in $METHODS; do
    for seed in $SEEDS; do
        case $method in
            grpo) flags=(--mode=grpo) ;;
            cispo) flags=(--mode=grpo --loss-type=cispo) ;;
            ppo) flags=(--mode=ppo) ;;
            *) echo "unknown method $method (grpo, cispo, ppo)"; exit 2 ;;
        esac
        out="$W/$method-$seed"
        SECONDS=0
        python train.py "${flags[@]}" "${RL[@]}" --seed="$seed" --out="$out" > "$out.log" 2>&1
        python -c '
import json, sys
path, method, seed, seconds = sys.argv[1:]
val = [r["val_reward"] for r in map(json.loads, open(path)) if "val_reward" in r]
end, every = sum(val[-2:]) / 2, " ".join(format(v, ".3f") for v in val)
print(f"{method:5s} seed {seed}: exact {val[0]:.3f} -> {end:.3f} (gain {end - val[0]:+.3f}; every evaluation {every}) "
      f"in {int(seconds) // 60}m{int(seconds) % 60:02d}s", flush=True)
' "$out/log.jsonl" "$method" "$seed" "$SECONDS"
    done
done
