"""Hunt: search engine configurations and workloads for bugs nobody planted.

    HuntConfig (conf/hunt/) -> space.Space -> search.Planner (coverage-guided, seeded)
      -> Group (one engine config, several workloads) -> supervise.Supervisor -> runner.run_group
         (isolated Ray task: one vllm.LLM, each workload a trial, oracles) -> TrialEvent lines
      -> TrialResult -> Signature -> Finding (store.Store, SQLite) -> triage -> CaseFile (case.json)
      -> minimizer -> MinimizedResult (minimized.json) + repro.py -> report (Markdown, plots, W&B)

`python -m rollout_lab.hunt hunt.budget_s=1800` (see __main__.py for the modules, one idea each).
"""
