"""Hunt: search engine configurations and workloads for bugs nobody planted.

    HuntConfig (conf/hunt/) -> space.Space -> search.Planner (coverage-guided, seeded)
      -> Group (one engine config, several workloads) -> runner.run_group (isolated Ray task:
         one vllm.LLM, each workload a trial, oracles) -> trial lines (jsonl)
      -> store.Store (SQLite: trials, findings, rejected) -> new finding -> minimizer -> repro.py
      -> report (Markdown, plots, W&B)

`python -m rollout_lab.hunt hunt.budget_s=1800` (see __main__.py).
"""
