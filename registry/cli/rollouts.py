"""`flowfleet registry rollouts ...`: staged rollouts from the command line.

The rollout lives in the database, so these commands work beside a running registry:
``create`` stores it and that registry's rollout job moves its devices at its next
tick; ``abort`` puts the moved devices back on their previous models at once (the
desired states wait in the commands outbox until the registry publishes them).
Exit codes: 0 done, 2 refused input (unknown model, version or group, an empty target
set, bad plan numbers: the message names the field), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from flowfleet.cliutil import EXIT_USAGE, CliError

from .common import _actor, _open, _print_json, settings

FAILURE_KINDS = ("failed", "rolled_back", "timed_out", "drifted")


def add_rollout_actions(actions, shared_options: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``rollouts create|list|show|pause|resume|abort`` to the registry's actions."""
    ro = actions.add_parser("rollouts", help="staged rollouts (canary, waves, abort)")
    sub = ro.add_subparsers(dest="rollouts_action", metavar="ACTION", required=True)

    create = sub.add_parser(
        "create",
        help="start a rollout of a model version or alias to a camera",
        description="Targets: --device, --group, --tag (devices with every tag) or --all. "
        "Plan flags override --plan-json, which overrides the config's [rollouts] defaults.",
    )
    create.add_argument("model")
    create.add_argument("version", help="a version number or an alias")
    create.add_argument("--camera", required=True)
    create.add_argument("--device", action="append", default=[], metavar="ID")
    create.add_argument("--group", action="append", default=[], metavar="NAME")
    create.add_argument("--tag", action="append", default=[], metavar="TAG")
    create.add_argument("--all", action="store_true", help="every device record")
    create.add_argument("--plan-json", metavar="JSON", help="the whole plan as a JSON object")
    canary = create.add_mutually_exclusive_group()
    canary.add_argument("--canary", action="append", metavar="ID", help="a named canary device")
    canary.add_argument("--canary-count", type=int, metavar="N")
    canary.add_argument("--canary-percent", type=float, metavar="P")
    create.add_argument("--waves", type=int)
    create.add_argument("--rate", type=float, dest="rate_per_minute", help="devices per minute")
    create.add_argument("--rate-growth", type=float, help="rate factor per succeeded wave")
    create.add_argument("--soak", type=float, dest="soak_s", metavar="SECONDS")
    create.add_argument(
        "--shadow",
        type=float,
        dest="shadow_s",
        metavar="SECONDS",
        help="canaries run the new model in shadow this long first (needs shadow-capable agents)",
    )
    create.add_argument(
        "--soak-shadow",
        action="store_true",
        default=None,
        help="moved canaries run their previous model in shadow through the soak "
        "(the count-agreement gate's data)",
    )
    create.add_argument("--timeout", type=float, dest="timeout_s", metavar="SECONDS")
    create.add_argument("--beat-timeout", type=float, dest="beat_timeout_s", metavar="SECONDS")
    create.add_argument("--abort-min", type=int, metavar="N", help="finished devices first")
    create.add_argument(
        "--abort-percent",
        action="append",
        default=[],
        metavar="KIND=P",
        help=f"abort at this failure percentage; KIND is one of {', '.join(FAILURE_KINDS)}",
    )
    create.add_argument("--seed", type=int, help="seed of the canary pick and wave order")
    create.add_argument("--reason", default="")
    create.add_argument("--json", action="store_true", help="print the rollout as JSON")
    create.set_defaults(func=cmd_create)

    listing = sub.add_parser("list", help="rollouts, newest first")
    listing.add_argument("--state", help="running, paused, succeeded, aborting or aborted")
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=cmd_list)

    show = sub.add_parser("show", help="one rollout: waves, each device's state and reason")
    show.add_argument("id", type=int)
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=cmd_show)

    parsers = [create, listing, show]
    for name, text in (
        ("pause", "stop moving devices (those in flight are still judged)"),
        ("resume", "resume a paused rollout"),
        ("abort", "abort and put every moved device back on its previous model"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("id", type=int)
        p.add_argument("--reason", default="")
        p.add_argument("--json", action="store_true", help="print the rollout as JSON")
        p.set_defaults(func=cmd_change, change=name)
        parsers.append(p)
    for parser in parsers:
        shared_options(parser)


def _in_db(args: argparse.Namespace, func):
    """``func(db, registry)`` in the registry database; any refusal (4xx) exits 2
    naming the field, anything else 1."""
    from ..errors import RegistryError

    db, reg = _open(args)
    with db.connection_context():
        try:
            return func(db, reg)
        except RegistryError as exc:
            field = f"{exc.field}: " if exc.field else ""
            message = exc.message if exc.message.startswith(field) else f"{field}{exc.message}"
            raise CliError(message, EXIT_USAGE if 400 <= exc.status < 500 else 1) from None


def _plan(args: argparse.Namespace) -> dict:
    plan: dict = dict(settings(args).rollouts.plan_defaults())
    if args.plan_json:
        try:
            given = json.loads(args.plan_json)
        except ValueError as exc:
            raise CliError(f"--plan-json: not JSON ({exc})", EXIT_USAGE) from None
        if not isinstance(given, dict):
            raise CliError("--plan-json: must be a JSON object", EXIT_USAGE)
        plan.update(given)
    for key in ("waves", "rate_per_minute", "rate_growth", "soak_s", "timeout_s", "shadow_s"):
        if getattr(args, key) is not None:
            plan[key] = getattr(args, key)
    if args.beat_timeout_s is not None:
        plan["beat_timeout_s"] = args.beat_timeout_s
    if args.soak_shadow:
        plan["soak_shadow"] = True
    if args.seed is not None:
        plan["seed"] = args.seed
    if args.canary:
        plan["canary"] = {"devices": args.canary}
    elif args.canary_count is not None:
        plan["canary"] = {"count": args.canary_count}
    elif args.canary_percent is not None:
        plan["canary"] = {"percent": args.canary_percent}
    abort = dict(plan.get("abort") or {})
    if args.abort_min is not None:
        abort["min_finished"] = args.abort_min
    for item in args.abort_percent:
        kind, _, value = item.partition("=")
        if kind not in FAILURE_KINDS:
            raise CliError(
                f"--abort-percent: {kind!r} is not one of {', '.join(FAILURE_KINDS)}", EXIT_USAGE
            )
        try:
            abort[f"{kind}_percent"] = float(value)
        except ValueError:
            raise CliError(f"--abort-percent: {item!r} is not KIND=PERCENT", EXIT_USAGE) from None
    if abort:
        plan["abort"] = abort
    return plan


def _targets(args: argparse.Namespace) -> dict:
    targets: dict = {}
    for key, values in (("devices", args.device), ("groups", args.group), ("tags", args.tag)):
        if values:
            targets[key] = values
    if args.all:
        targets["all"] = True
    return targets


def cmd_create(args: argparse.Namespace) -> int:
    from ..fleet import rollouts

    plan, targets = _plan(args), _targets(args)
    ref = int(args.version) if args.version.isdigit() else args.version
    result = _in_db(
        args,
        lambda db, reg: rollouts.create_rollout(
            reg,
            model=args.model,
            ref=ref,
            camera=args.camera,
            targets=targets,
            plan=plan,
            actor=_actor(),
            reason=args.reason,
        ),
    )
    if args.json:
        _print_json(result)
    else:
        canary = [d["device"] for d in result["waves"][0]["devices"]]
        total = sum(result["devices"].values())
        print(
            f"rollout {result['id']}: {result['model']} v{result['version']} to camera "
            f"{result['camera']} on {total} device(s) in {result['waves'][-1]['wave']} wave(s) "
            f"after a canary of {len(canary)} ({', '.join(canary) or 'none'}); seed "
            f"{result['seed']}"
        )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from ..fleet import rollouts

    rows = _in_db(args, lambda db, reg: rollouts.list_rollouts(args.state, args.limit))
    if args.json:
        _print_json(rows)
    elif not rows:
        print("no rollouts")
    else:
        for r in rows:
            counts = " ".join(f"{k}={v}" for k, v in sorted(r["devices"].items()))
            print(
                f"{r['id']}\t{r['state']}\t{r['model']} v{r['version']}\t{r['camera']}\t"
                f"wave {r['wave']}/{r['waves']}\t{counts}"
            )
    return 0


def _print_rollout(r: dict) -> None:
    print(
        f"rollout {r['id']}: {r['model']} v{r['version']} ({r['ref']}) camera {r['camera']}: "
        f"{r['state']}, wave {r['wave']} of {r['waves'][-1]['wave']}"
    )
    if r["reason"]:
        print(f"reason: {r['reason']}")
    for w in r["waves"]:
        label = "canary" if w["canary"] else f"wave {w['wave']}"
        print(f"{label} ({w['state']}):")
        for d in w["devices"]:
            print(f"  {d['device']}\t{d['state']}\t{d['reason']}")


def cmd_show(args: argparse.Namespace) -> int:
    from ..fleet import rollouts

    r = _in_db(args, lambda db, reg: rollouts.get_rollout(args.id))
    if args.json:
        _print_json(r)
    else:
        _print_rollout(r)
    return 0


def cmd_change(args: argparse.Namespace) -> int:
    from ..fleet import rollouts
    from ..fleet.rollout_steps import RolloutStepper

    def change(db, reg):
        if args.change == "pause":
            return rollouts.pause_rollout(db, args.id, actor=_actor(), reason=args.reason)
        if args.change == "resume":
            return rollouts.resume_rollout(db, args.id, actor=_actor(), reason=args.reason)
        return rollouts.abort_rollout(
            db, args.id, actor=_actor(), reason=args.reason, stepper=RolloutStepper(reg)
        )

    r = _in_db(args, change)
    if args.json:
        _print_json(r)
    else:
        print(f"rollout {r['id']}: {r['state']}")
    return 0
