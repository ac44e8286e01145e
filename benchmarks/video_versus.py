"""Ours against the peer pipeline line by line, for `bench_video_accuracy.py`.

The goal "lower than the peer pipeline's on every line" is checked on every line of
every set (the lines we chose, their shifted copies, the further held-out lines),
and each of our lines is shown beside its held-out copies, so a line that was tuned
on can be read against the ones that were not.
"""

from __future__ import annotations

SETS = ("tuned", "held_out", "more_held_out")


def line_by_line(ours: dict, peer: dict) -> dict:
    """Per line of every set, whether ours has fewer errors than the peer, as many, or
    more: ``{set: {"lower": [...], "equal": [...], "higher": [...]}}`` (line names).
    ``ours`` and ``peer`` are result rows with ``per_line`` errors under each set."""
    out = {}
    for key in SETS:
        verdict: dict[str, list[str]] = {"lower": [], "equal": [], "higher": []}
        for line, mine in ours[key]["per_line"].items():
            theirs = peer[key]["per_line"][line]
            side = "lower" if mine < theirs else "equal" if mine == theirs else "higher"
            verdict[side].append(line)
        out[key] = verdict
    return out


def copies(per_line: dict, name: str, key: str) -> list[str]:
    """The lines of set ``key`` that are copies of our line ``name``: the line itself
    (tuned), ``name+3%``-style shifts (held_out), ``name@+15``-style turns."""
    if key == "tuned":
        return [name]
    prefixes = (f"{name}+", f"{name}-") if key == "held_out" else (f"{name}@",)
    return [ln for ln in per_line if ln.startswith(prefixes)]


def print_line_by_line(versus: dict, ours: dict, peer: dict, names: list[str]) -> None:
    """Each of our lines beside its held-out copies (ours / peer errors), then how
    many lines of each set ours counts better than the peer, as well, or worse."""
    print("\nours / peer errors, each line beside its held-out copies:")
    print(f"{'line':<8}{'tuned':>9}{'4 shifted copies':>18}{'2 turned copies':>17}")
    for name in names:
        cells = []
        for key in SETS:
            lines = copies(ours[key]["per_line"], name, key)
            mine = sum(ours[key]["per_line"][ln] for ln in lines)
            theirs = sum(peer[key]["per_line"][ln] for ln in lines)
            cells.append(f"{mine} / {theirs}")
        print(f"{name:<8}{cells[0]:>9}{cells[1]:>18}{cells[2]:>17}")
    print("lines where ours has fewer errors than the peer / as many / more:")
    for key in SETS:
        v = versus[key]
        equal = f" (as many: {', '.join(v['equal'])})" if v["equal"] else ""
        higher = f" (more: {', '.join(v['higher'])})" if v["higher"] else ""
        print(
            f"  {key:<14}{len(v['lower']):>3} / {len(v['equal'])} / {len(v['higher'])}"
            f"{equal}{higher}"
        )
