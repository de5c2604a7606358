"""Sweep analysis: run dirs -> failure signatures -> structure-versus-magnitude verdicts -> SweepReport.

    signature.py  RunSignature per run dir (crash, spike rate, |diff| quantiles, where spikes fall)
    verdict.py    the statistics: FeatureTest per feature, VariableVerdict per swept variable
    report.py     SweepReport: SWEEP_REPORT.md, sweep_report.json, PNG plots, W&B
    hydra_callback.py  runs report.analyze_sweep at the end of every multirun

Nothing is imported here, so the Hydra callback costs a single run no scipy or matplotlib.
"""
