"""Optuna sweeps over litlab experiments: `litlab sweep SWEEP.yaml`.

spec.py     the sweep file: schema, validation (exit 2 before any trial), sampler, pruner, space
storage.py  Optuna storage by URL (sqlite, journal file, any RDB), the budget lock, heartbeats
trial.py    one trial in its own process: ask, suggest, runner.run with pruning, tell; DDP followers
driver.py   the study loop: parent MLflow run, K worker slots, resume, the end report
report.py   best-trials table, the command reproducing the best trial, Optuna plots as artifacts
definition.py  what defines a study's trials (config, metric, space), recorded; a rerun that differs is refused
stopping.py    Ctrl+C and SIGTERM: trials stopped and retried later, runs ended KILLED, exit 130 / 143
preload_start.py, freeze.py  first and last of the trial forkserver's preloaded modules
"""

# Set in a DDP trial's environment (JSON: its experiment and overrides): the ranks > 0 Lightning launches
# run `litlab sweep` again and follow the trial. Here, not in trial.py, so checking it imports no Lightning.
TRIAL_ENV = "LITLAB_TRIAL"
