"""rollout_lab: find, explain and shrink silent logprob bugs between an RL trainer and its engine."""
