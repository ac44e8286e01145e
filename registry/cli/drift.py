"""`flowfleet registry drift verdicts|judge`: the drift judge's verdicts, and one pass
of the judge by hand (it also runs every ``[drift] interval_s`` in the registry).

Both work on the database directly (no running registry needed). ``judge`` rolls a
confirmed model drift back like the registry's own job: the new desired state waits
in the commands outbox until a running registry publishes it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import datetime, timezone

from flowfleet.cliutil import EXIT_USAGE, CliError

from .common import _config, _print_json, run_in_db, settings


def add_drift_actions(actions, shared_options: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``drift verdicts|judge`` to the registry's action parsers."""
    from ..fleet.drift_stats import VERDICTS

    dr = actions.add_parser("drift", help="the drift judge: its verdicts, a pass by hand")
    sub = dr.add_subparsers(dest="drift_action", metavar="ACTION", required=True)
    ls = sub.add_parser("verdicts", help="judged windows, newest first")
    ls.add_argument("--device", help="only this device")
    ls.add_argument("--camera", help="only this camera")
    ls.add_argument("--verdict", choices=VERDICTS, help="only this verdict")
    ls.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=cmd_verdicts)
    judge = sub.add_parser("judge", help="judge what arrived since the last pass, now")
    judge.add_argument("--json", action="store_true", help="print JSON")
    judge.set_defaults(func=cmd_judge)
    for parser in (ls, judge):
        shared_options(parser)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def cmd_verdicts(args: argparse.Namespace) -> int:
    from ..fleet import drift

    if args.limit < 1:
        raise CliError("--limit must be at least 1", EXIT_USAGE)
    rows = run_in_db(
        args,
        lambda db: drift.verdicts(args.device, args.camera, limit=args.limit, verdict=args.verdict),
    )
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print("no verdicts")
    for r in rows:
        broke = f"  [{', '.join(r['breaches'])}]" if r["breaches"] else ""
        print(
            f"#{r['id']:<6} {_when(r['start'])}  {r['device']}/{r['camera']}  "
            f"{r['baseline_model']} -> {r['model']}  {r['verdict']}{broke}"
        )
    return 0


def cmd_judge(args: argparse.Namespace) -> int:
    from ..catalog.modelreg import ModelRegistry
    from ..fleet.drift import DriftJudge

    s = settings(args)

    def run(db):
        models = ModelRegistry.from_config(db, _config(args))
        judge = DriftJudge(db, models, s.drift.stats_settings(), s.drift.judge_options())
        return judge.run_once()

    done = run_in_db(args, run)
    if args.json:
        _print_json(done)
    else:
        print(", ".join(f"{k}: {v}" for k, v in sorted(done.items())) or "nothing new to judge")
    return 0
