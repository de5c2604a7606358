"""The minimizer: a failed run dir in; repro/<name>/repro.py, REPORT.md and reduction.jsonl out.

    run dir -> predicate.load_run -> FailingRun (the failing step as a direct-engine Case, and
            the failure to keep) -> reduce.minimize (candidates shrunk by ddmin.py, each run
            by trials.TrialRunner) -> emit.write (repro.py = standalone.py + the minimal case)

Run it as `python -m rollout_lab.minimize <run_dir>` (__main__.py).
"""
