"""`python -m rollout_lab [overrides]`: run the RL loop once (or a Hydra multirun with -m / +sweep)."""
from __future__ import annotations

import sys
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from rollout_lab.config import ConfigError, RunConfig, register
from rollout_lab.config_keys import check_keys
from rollout_lab.presets import apply_pressure_by_model

register()


def print_summary(result, pressure=None, block_pool_head=None) -> None:
    """The closing lines a person reads: status, size, worst difference, where it all went."""
    console = Console()
    colour = "green" if result.status == "ok" and result.outcome in ("clean", "") else "red"
    outcome = f", outcome: {result.outcome}" if result.outcome else ""
    console.print(f"[bold {colour}]status: {result.status}{outcome}[/] after {result.steps_completed} steps, {result.seconds:.0f} s")
    console.print(
        f"tokens: {result.num_tokens}  max |sampler-trainer|: {result.abs_diff_max:.3g}  "
        f"mean: {result.abs_diff_mean:.3g}  spike fraction (> {result.spike_threshold:g}): {result.spike_fraction:.4f}  "
        f"bitwise equal: {result.bitwise_equal_fraction:.1%}"
    )
    preemptions = "not reported" if result.preemptions is None else f"{result.preemptions:.0f}"
    console.print(
        f"reward mean: {result.reward_mean:.3f}  preemptions: {preemptions}  "
        f"weight sync max diff: {result.weight_sync_max_diff}  policy change: {result.policy_change}"
    )
    env = result.environment
    if env.get("model_runner"):  # absent when no engine started
        backends = " | ".join(", ".join(group) for group in env.get("attention_backends") or [])
        console.print(f"engine: {env.get('engine')}, model runner {env.get('model_runner_label') or '?'} "
                      f"({env['model_runner']}), attention {backends or '?'}")
    if result.shift is not None:
        console.print(f"[{'red' if result.shift.shifted else 'default'}]{result.shift.sentence()}[/]")
    note = vacuous_sync_note(result)
    if note:
        console.print(f"[yellow]{note}[/]")
    if pressure is not None:
        if block_pool_head is not None:  # this preset's regime is high block ids, not preemption
            console.print(f"pressure {pressure}: blocks handed out from {block_pool_head:.0%} of the pool up "
                          "(block_pool_head; the records' kv_block and state_slot say which were used)")
        elif result.preemptions is None:
            console.print(f"[yellow]pressure {pressure}: this vLLM reports no preemption count; whether the rare regime "
                          "was reached is unknown[/]")
        elif result.preemptions > 0:
            console.print(f"pressure {pressure}: vLLM counted {result.preemptions:.0f} preemptions")
        else:
            console.print(f"[yellow]pressure {pressure}: vLLM counted no preemption; the rare regime was not reached[/]")
    if result.crash:
        console.print(f"[red]crash[/]: {result.crash.key}: {result.crash.message}")
    console.print(f"run dir: {result.run_dir}")


def vacuous_sync_note(result) -> Optional[str]:
    """One line when no weight-sync check saw the policy move (summary's weight_sync_exercised false): why, and the fix."""
    if result.weight_sync_exercised is not False:
        return None
    if result.zero_advantage_steps >= result.steps_completed:
        why = ("every reward was equal within each prompt's group, so every GRPO advantage was 0; a model that "
               "cannot do the task moves under workload.reward=even_tokens")
    else:
        why = "the updates were too small to show (a larger trainer.learning_rate or more loop.steps moves it further)"
    return (f"weight sync check compared unchanged weights (policy change {result.policy_change:.2g}, "
            f"within the sync tolerance): {why}")


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(dict_cfg: DictConfig):
    from rollout_lab.models import ModelError

    try:
        check_keys(dict_cfg, RunConfig)
        from rollout_lab.loop import run

        dict_cfg = apply_pressure_by_model(dict_cfg, list(HydraConfig.get().overrides.task))
        cfg: RunConfig = OmegaConf.to_object(dict_cfg)
        cfg.run_dir = HydraConfig.get().runtime.output_dir
        result = run(cfg)
    except (ConfigError, ModelError) as exc:
        print(f"rollout_lab: {exc}", file=sys.stderr)
        sys.exit(2)
    print_summary(result, cfg.pressure, cfg.block_pool_head)
    return result.status


if __name__ == "__main__":
    main()
