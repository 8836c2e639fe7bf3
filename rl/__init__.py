"""Reinforcement learning pieces for minimind: GRPO / CISPO / PPO losses, rewards, a tool sandbox, a
generator of verifiable tasks, and rollouts on the model's own batched decoder. Pure functions and small
classes; the training loop lives elsewhere (train.py --mode=grpo|ppo, the objective in losses.py).

    import rl
    ro = rl.rollout(model, tok, prompt_ids, 256, generator=g, tools=rl.TOOLS, max_turns=3)  # episodes
    adv = rl.group_advantages(rewards, G)                       # (P*G,)
    logp = rl.completion_logprobs(model, prompt, completion, mask, pad)  # (B, T) fp32
    loss, metrics = rl.grpo_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, beta=0.1)
    specs = rl.parse_reward_specs("exact:1.0 think:0.2 repetition:1.0")
    rewards, parts = rl.compute_rewards(specs, prompts, completions, records, group_size=G)

Files, one per job, each importing only those listed before it (answers and tools at the bottom):
answers.py (think blocks, final answers, numbers), tools.py (the sandbox: calculator, unit_convert,
lookup, tool calls found, checked and run, the system prompt offering them), rewards.py (reward
functions, specs, RewardModel), tasks.py (the task generator, demonstrations, write_task),
policy.py (advantages, log-probs, GRPO / CISPO losses, GAE, value loss, KL; torch only), rollout.py
(episodes, multi-turn with tools). Each module's docstring gives its conventions. Import a submodule
for one job (`from rl.tasks import make_task`); this file only re-exports.
"""
from rl.answers import THINK_END, answers_match, extract_answer, last_number, normalize, split_think
from rl.policy import (POLICY_LOSSES, approx_kl, cispo_loss, completion_logprobs, completion_mask, differing_groups,
                       gae, gather_logprobs, group_advantages, grpo_loss, kl_early_stop, kl_k3, last_token_rewards,
                       masked_mean, reduce_tokens, token_entropy, value_loss, whiten)
from rl.rewards import (REWARDS, RewardModel, compute_rewards, parse_reward_specs, repetition_penalty,
                        reward_exact, reward_length, reward_repetition, reward_think, reward_tool_calls)
from rl.rollout import Rollout, join_rollouts, rollout, rollout_messages, select_tools, tool_turn_ids
from rl.tasks import TASKS, TOOL_TASKS, demonstration, is_val_key, make_task, prompt_messages, tool_solution, write_task
from rl.tools import (CAPITALS, ELEMENTS, MAX_EXPONENT, MAX_EXPR_LEN, MAX_MAGNITUDE, MAX_TOOL_OUTPUT, TOOL_CALL_END,
                      TOOL_CALL_START, TOOLS, SandboxTool, ToolError, calculator, check_tool_call, find_tool_calls,
                      format_number, lookup, record_tools, run_tool_call, schemas_of, tool_response_message,
                      tools_system_prompt, unit_convert, validate_arguments)

__all__ = [
    # answers
    "THINK_END", "answers_match", "extract_answer", "last_number", "normalize", "split_think",
    # policy
    "POLICY_LOSSES", "approx_kl", "cispo_loss", "completion_logprobs", "completion_mask", "differing_groups", "gae",
    "gather_logprobs", "group_advantages", "grpo_loss", "kl_early_stop", "kl_k3", "last_token_rewards", "masked_mean",
    "reduce_tokens", "token_entropy", "value_loss", "whiten",
    # rewards
    "REWARDS", "RewardModel", "compute_rewards", "parse_reward_specs", "repetition_penalty", "reward_exact",
    "reward_length", "reward_repetition", "reward_think", "reward_tool_calls",
    # rollout
    "Rollout", "join_rollouts", "rollout", "rollout_messages", "select_tools", "tool_turn_ids",
    # tasks
    "TASKS", "TOOL_TASKS", "demonstration", "is_val_key", "make_task", "prompt_messages", "tool_solution", "write_task",
    # tools
    "CAPITALS", "ELEMENTS", "MAX_EXPONENT", "MAX_EXPR_LEN", "MAX_MAGNITUDE", "MAX_TOOL_OUTPUT", "TOOL_CALL_END",
    "TOOL_CALL_START", "TOOLS", "SandboxTool", "ToolError", "calculator", "check_tool_call", "find_tool_calls",
    "format_number", "lookup", "record_tools", "run_tool_call", "schemas_of", "tool_response_message",
    "tools_system_prompt", "unit_convert", "validate_arguments",
]
