"""`litlab` command line: run | resume | sweep | models | runs | compare | sync | ui.

Thin on purpose: parse, then call litlab.runner / litlab.tracking. Heavy imports (torch,
lightning, mlflow) happen inside the commands, so `litlab --help` answers at once. A mistake the
user made (bad YAML, unknown key or name, missing file or run) is one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_USER_ERROR = 2
EXIT_SIGNALLED = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal's number, as a shell reports it

EPILOG = """examples:
  litlab run experiments/mlp/mlp_digits.yaml
  litlab run experiments/mlp/mlp_digits.yaml model.hidden=[256,128] optim.lr=0.01
  litlab run experiments/mlp/mlp_digits.yaml trainer.strategy=ddp trainer.devices=2 trainer.accelerator=cpu
  litlab resume RUN_ID trainer.max_epochs=40
  litlab runs --limit 10
  litlab runs --model mlp --where "test/acc>0.9" --sort test/acc
  litlab compare RUN_ID RUN_ID --plot val/acc
  litlab ui
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="litlab", description="Tracked deep-learning experiments on PyTorch Lightning, MLflow and Optuna.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"litlab {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def trust_opts(sp):
        sp.add_argument("--allow-import", action="store_true",
                        help="let the config name your own classes as model.name: package.module:Class (imports "
                             "that code; only for configs you trust)")
        sp.add_argument("--allow-external-checkpoints", action="store_true",
                        help="let the run load checkpoints from outside mlruns/ (e.g. model.pretrained=PATH)")

    def tracking_opt(sp):
        sp.add_argument("--tracking-uri", metavar="URI",
                        help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)")

    r = sub.add_parser("run", help="train, validate and test an experiment, tracked in MLflow",
                       description="Train, validate, then test on the best checkpoint; track params, metrics, "
                                   "checkpoints and plots in one MLflow run.")
    r.add_argument("experiment", metavar="EXPERIMENT.yaml", help="experiment file, e.g. experiments/mlp/mlp_digits.yaml")
    r.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="dotted overrides, e.g. optim.lr=0.01 model.hidden=[256,128]")
    tracking_opt(r)
    trust_opts(r)
    r.add_argument("-q", "--quiet", action="store_true", help="print only the run id and the test metrics")
    r.add_argument("--dry-run", action="store_true", help="validate and print the resolved config; do not train")

    s = sub.add_parser("resume", help="continue a run from its last checkpoint, in the same MLflow run",
                       description="Continue RUN_ID from its last checkpoint in the SAME MLflow run (same run id, "
                                   "metric steps continue). Works after a crash or kill. Overrides may change "
                                   "training length (trainer.max_epochs=...), not the model.")
    s.add_argument("run_id", metavar="RUN_ID")
    s.add_argument("overrides", nargs="*", default=[], metavar="key=value")
    tracking_opt(s)
    trust_opts(s)
    s.add_argument("-q", "--quiet", action="store_true")

    m = sub.add_parser("models", help="list every registered model with its course chapter",
                       description="Every registered model with its course chapter and a one-line description.")
    m.add_argument("--chapter", help="only models whose chapter contains this text")

    ls = sub.add_parser("runs", help="table of tracked runs, newest first, with filters",
                        description="A table of runs (id, name, model, status, start, duration, key metrics), newest\n"
                                    "first; filter by model, status and metric thresholds, sort by a metric.",
                        epilog="example: litlab runs --model mlp --status FINISHED --where 'test/acc>0.9' --sort test/acc",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ls.add_argument("--experiment", metavar="NAME", help="only this MLflow experiment")
    ls.add_argument("--limit", type=int, default=20, metavar="N", help="at most N runs (default 20)")
    ls.add_argument("--model", metavar="NAME", help="only runs of this registered model (see `litlab models`)")
    ls.add_argument("--status", metavar="STATUS", help="only FINISHED, FAILED, RUNNING or KILLED runs")
    ls.add_argument("--where", action="append", metavar="'METRIC OP NUMBER'",
                    help="only runs whose metric passes, e.g. 'test/acc>0.9' (OP: > >= < <= ==); repeatable")
    ls.add_argument("--sort", metavar="METRIC", help="order by this metric, highest first")
    ls.add_argument("--asc", action="store_true", help="with --sort: lowest first")
    tracking_opt(ls)

    cp = sub.add_parser("compare", help="runs side by side: the params that differ, key metrics, overlay plots",
                        description="Compare runs: the params that differ between them and their key metrics\n"
                                    "(each run's monitored metric, test/*) side by side, the best of each row marked.\n"
                                    "--plot METRIC draws that metric over steps for every run on one plot.",
                        epilog="examples:\n  litlab compare 3f2a9c01 77b1e4d2\n"
                               "  litlab compare --experiment mlp_digits --limit 5\n"
                               "  litlab compare 3f2a9c01 77b1e4d2 --plot val/acc --out val_acc.png",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    cp.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="run ids (or unique prefixes of 6+ characters)")
    cp.add_argument("--experiment", metavar="NAME", help="the newest runs of this experiment instead of RUN_IDs")
    cp.add_argument("--limit", type=int, default=10, metavar="N", help="with --experiment: at most N runs (default 10)")
    cp.add_argument("--metric", action="append", metavar="METRIC", help="also show this metric; repeatable")
    cp.add_argument("--plot", metavar="METRIC", help="write a plot of METRIC over steps for these runs")
    cp.add_argument("--out", metavar="FILE.png", help="where --plot writes (default compare_<metric>.png)")
    tracking_opt(cp)

    w = sub.add_parser("sweep", help="run (or resume) an Optuna study over an experiment, tracked in MLflow",
                       description="Run an Optuna study: one trial = one `litlab run` with sampled overrides, one MLflow "
                                   "child run under the study's parent run. Rerunning the same command resumes the "
                                   "study up to n_trials in total.")
    w.add_argument("sweep", metavar="SWEEP.yaml", help="sweep file, e.g. sweeps/mlp_digits.yaml")
    w.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="dotted overrides of the sweep file (n_trials=5, sampler.seed=1)")
    w.add_argument("--n-trials", type=int, metavar="N", help="trials in total (default: the sweep file's n_trials)")
    w.add_argument("--workers", type=int, default=1, metavar="K", help="trials at once on this machine, one process each")
    w.add_argument("--storage", metavar="URL", help="Optuna storage: sqlite:///FILE (default sqlite:///mlruns/optuna.db), "
                                                   "journal:FILE, or an RDB URL shared by several machines")
    w.add_argument("--study", metavar="NAME", help="study name (default: the sweep file's name)")
    w.add_argument("--gpus-per-trial", type=int, metavar="G", help="give each trial G GPUs (CUDA_VISIBLE_DEVICES)")
    w.add_argument("--show", action="store_true", help="print the study's state and best trials; run nothing")
    tracking_opt(w)
    trust_opts(w)
    w.add_argument("-q", "--quiet", action="store_true")

    y = sub.add_parser("sync", help="send what a run could not send while the tracking server was down",
                       description="Send the metric points, files and final status a run kept in its local spool "
                                   "(mlruns/spool) because the tracking server was unreachable. Without RUN_ID: "
                                   "every spooled run.")
    y.add_argument("run_ids", nargs="*", metavar="RUN_ID")
    y.add_argument("--spool-dir", metavar="DIR", help="spool directory (default: $LITLAB_SPOOL_DIR or mlruns/spool)")
    tracking_opt(y)

    u = sub.add_parser("ui", help="open the MLflow UI on 127.0.0.1 over the same store",
                       description="Serve the MLflow UI on 127.0.0.1 over litlab's tracking store.")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1; 0.0.0.0 in Docker)")
    tracking_opt(u)
    return p


def _version() -> str:
    from litlab import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come before or after options (`run x.yaml --tracking-uri U a.b=1`): keep the
    # key=value tokens argparse could not place.
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    from litlab.errors import TrainingDiverged, UserError

    # trust settings travel as environment variables, so DDP ranks and sweep trials inherit them
    if getattr(args, "allow_import", False):
        os.environ["LITLAB_ALLOW_IMPORT"] = "1"
    if getattr(args, "allow_external_checkpoints", False):
        os.environ["LITLAB_ALLOW_EXTERNAL_CHECKPOINTS"] = "1"
    try:
        return COMMANDS[args.command](args) or 0
    except UserError as e:
        print(f"litlab {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingDiverged as e:
        print(f"litlab {args.command}: training diverged: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemExit) as e:
        signalled = _signal_that_stopped(e)
        if signalled is None:
            raise  # an exit status somebody chose (argparse's, a command's)
        print(f"litlab {args.command}: {_stopped_line(signalled, e)}", file=sys.stderr)
        return EXIT_SIGNALLED[signalled]
    except ModuleNotFoundError as e:
        package = _missing_dependency(e)
        if package is None:
            raise  # not one of litlab's dependencies: a bug, shown whole
        hint = " (or run untracked: tracking.mlflow=false)" if package == "mlflow" else ""
        print(f"litlab {args.command}: error: this needs the Python package {package!r}, which is not installed: "
              f"pip install {package}{hint}", file=sys.stderr)
        return EXIT_USER_ERROR


def _signal_that_stopped(e: BaseException) -> str | None:
    """SIGINT for Ctrl+C (a KeyboardInterrupt, or the exit(1) Lightning makes of one), SIGTERM for
    Lightning's SIGTERMException (an exit with no status: 0, as if the run had ended well)."""
    if isinstance(e, KeyboardInterrupt) or (isinstance(e, SystemExit) and isinstance(e.__context__, KeyboardInterrupt)):
        return "SIGINT"
    if isinstance(e, SystemExit) and type(e).__name__ == "SIGTERMException":
        return "SIGTERM"
    return None


def _stopped_line(signalled: str, e: BaseException) -> str:
    """What stopped, and what became of the run (litlab.runner marks the exception with it)."""
    line = "interrupted (Ctrl+C)" if signalled == "SIGINT" else "stopped by SIGTERM"
    run_id = getattr(e, "litlab_run_id", None)
    if run_id:
        line += f"; run {run_id} is KILLED: " + (f"continue it with `litlab resume {run_id}`"
                                                if getattr(e, "litlab_resumable", False)
                                                else "it ended before its first checkpoint, nothing to resume")
    return line


def run_as_program() -> None:
    """The `litlab` command and `python -m litlab`: main(), then exit without the interpreter's
    final search for garbage cycles. That search walks every object torch, Lightning, MLflow and
    Optuna made: 4 s on this project's 2-core machine after `litlab run` printed its last line (0.4 s
    frozen). gc.freeze() leaves those objects to the OS; atexit handlers still run, and files and
    standard streams are flushed as usual. (Not in main(): a test or notebook calling it keeps
    collecting.)"""
    code = main()
    import gc

    gc.freeze()
    sys.exit(code)


# litlab's third-party dependencies (pyproject.toml) by top-level module: a missing one is named in
# one line with its pip name, instead of a traceback
DEPENDENCIES = {"mlflow": "mlflow", "optuna": "optuna", "datasets": "datasets", "wandb": "wandb",
                "gymnasium": "gymnasium", "pygame": "pygame", "torch_geometric": "torch-geometric",
                "sklearn": "scikit-learn", "torchmetrics": "torchmetrics", "lightning": "lightning", "yaml": "pyyaml",
                "rich": "rich", "matplotlib": "matplotlib", "networkx": "networkx", "psutil": "psutil",
                "PIL": "pillow", "plotly": "plotly", "cmaes": "cmaes", "psycopg2": "psycopg2-binary",
                "pycocotools": "pycocotools"}


def _missing_dependency(error: ModuleNotFoundError) -> str | None:
    """The pip name of the litlab dependency whose import failed, or None."""
    module = (error.name or "").split(".")[0]
    return DEPENDENCIES.get(module)


def _quiet_libraries() -> None:
    import logging
    import warnings

    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    for name in ("lightning.fabric.utilities.seed", "mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage())  # an advert, not information
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # a resumed run's own checkpoint directory holds its checkpoints: that is how it resumes
    warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")


def cmd_run(args) -> int:
    _quiet_libraries()
    from litlab import early_checks

    early_checks.check_experiment(args.experiment, args.overrides)  # a typo: one line at once
    from litlab import runner

    if args.dry_run:
        cfg = runner.load_config(args.experiment, args.overrides)
        print(cfg.to_yaml(), end="")
        return 0
    result = runner.run(args.experiment, args.overrides, tracking_uri=args.tracking_uri, verbose=not args.quiet,
                        quiet=args.quiet)
    _report(result, args.quiet)
    return 0


def cmd_resume(args) -> int:
    _quiet_libraries()
    from litlab import early_checks

    early_checks.check_resume(args.run_id, args.overrides, args.tracking_uri)
    from litlab import runner

    result = runner.resume(args.run_id, args.overrides, tracking_uri=args.tracking_uri, verbose=not args.quiet)
    _report(result, args.quiet)
    return 0


def _report(result, quiet: bool) -> None:
    from litlab.runner import _rank

    if _rank() != 0:
        return
    metrics = "  ".join(f"{k}={v:.4f}" for k, v in sorted(result.metrics.items()))
    if quiet:
        print(f"{result.run_id} {metrics}")
        return
    print(f"\nrun {result.run_id} {result.status}")
    for k, v in sorted(result.metrics.items()):
        print(f"  {k:<20} {v:.4f}")
    if result.best_score is not None:
        print(f"  best {result.config.callbacks.checkpoint.monitor} = {result.best_score:.4f}  ({result.best_checkpoint})")
    if result.experiment_id:
        uri_opt = "" if result.tracking_uri.endswith("mlruns/mlflow.db") else f" --tracking-uri {result.tracking_uri}"
        print(f"\nlook at it:  litlab ui{uri_opt}   then open "
              f"http://127.0.0.1:5000/#/experiments/{result.experiment_id}/runs/{result.run_id}")
        from shlex import quote

        exp = quote(result.config.tracking.experiment or result.config.name)
        ck = result.config.callbacks.checkpoint
        print(f"list runs:   litlab runs{uri_opt} --experiment {exp} --sort {ck.monitor}{' --asc' if ck.mode == 'min' else ''}")
        print(f"compare:     litlab compare{uri_opt} --experiment {exp} --plot {ck.monitor}")
        print(f"train more:  litlab resume {result.run_id}{uri_opt} trainer.max_epochs={result.config.trainer.max_epochs * 2}")


def cmd_models(args) -> int:
    from litlab.model_index import registered_models  # read from the source: no chapter is imported

    rows = registered_models(chapter=args.chapter)
    if args.chapter:
        rows = [e for e in rows if args.chapter.lower() in e.chapter.lower()]
    width = max((len(e.name) for e in rows), default=4)
    cwidth = max((len(e.chapter) for e in rows), default=7)
    print(f"{'MODEL':<{width}}  {'CHAPTER':<{cwidth}}  DESCRIPTION")
    for e in rows:
        print(f"{e.name:<{width}}  {e.chapter:<{cwidth}}  {e.description}")
    return 0


def cmd_runs(args) -> int:
    from litlab.runs_table import print_runs

    print_runs(args.tracking_uri, args.experiment, args.limit, model=args.model, status=args.status,
               where=args.where, sort=args.sort, asc=args.asc)
    return 0


def cmd_compare(args) -> int:
    from litlab.compare import compare

    compare(args.run_ids, args.experiment, args.tracking_uri, metrics=args.metric, plot=args.plot, out=args.out,
            limit=args.limit)
    return 0


def cmd_ui(args) -> int:
    from litlab.ui_server import serve

    serve(args.host, args.port, args.tracking_uri)  # returns only by raising: the process becomes MLflow's
    return 0


def cmd_sweep(args) -> int:
    _quiet_libraries()
    from litlab.sweep import TRIAL_ENV

    if os.environ.get(TRIAL_ENV) and _rank_from_env() != 0:
        from litlab.sweep import trial

        return trial.follow_ddp_trial()  # a DDP rank > 0 that Lightning launched for a trial
    from litlab.sweep import driver

    if args.show:
        driver.show(args.sweep, args.overrides, storage=args.storage, study_name=args.study, n_trials=args.n_trials)
        return 0
    driver.sweep(args.sweep, args.overrides, n_trials=args.n_trials, workers=args.workers, storage=args.storage,
                 study_name=args.study, tracking_uri=args.tracking_uri, gpus_per_trial=args.gpus_per_trial,
                 quiet=args.quiet)
    return 0


def cmd_sync(args) -> int:
    from litlab import spool
    from litlab.tracking_store import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    run_ids = args.run_ids or spool.spooled_runs(args.spool_dir)
    if not run_ids:
        print("litlab sync: nothing to send", file=sys.stderr)
        return 0
    known = set(spool.spooled_runs(args.spool_dir))
    failed = 0
    for run_id in run_ids:
        if run_id not in known:
            from litlab.errors import UserError

            raise UserError(f"no spooled data for run {run_id} in {args.spool_dir or spool.default_spool_dir()}")
        try:
            sent = spool.sync(uri, run_id, args.spool_dir)
        except Exception as e:  # the server is still down: keep the spool, say so, try the next run
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            print(f"litlab sync: {run_id}: not sent ({first}); the spool is kept", file=sys.stderr)
            failed += 1
            continue
        print(f"{run_id}: sent {sent['points']} metric points, {sent['artifacts']} files"
              + (f", status {sent['status']}" if sent["status"] else ""))
    return 1 if failed else 0


def _rank_from_env() -> int:
    """Non-zero in a process Lightning launched for another rank (it sets LOCAL_RANK / NODE_RANK)."""
    return int(os.environ.get("LOCAL_RANK") or 0) + int(os.environ.get("NODE_RANK") or 0)


COMMANDS = {"run": cmd_run, "resume": cmd_resume, "sweep": cmd_sweep, "models": cmd_models, "runs": cmd_runs,
            "compare": cmd_compare, "ui": cmd_ui, "sync": cmd_sync}

if __name__ == "__main__":
    run_as_program()
