"""Kill `chatkv ask` at random points and check that nothing the user saw is lost.

    .venv/bin/python scripts/fault_campaign.py --kills 100 [--model smollm2] [--seed 1] [--json]

Each round continues one of a few conversations with `chatkv ask -C ID` in a child process
and SIGKILLs it after a random delay (before it loads, while it prefills, while it streams,
while it saves or spills), or lets it finish. Afterwards (and after every round) the data
dir must open, and:

- every reply a finished `ask` printed is saved, once;
- every piece of text a killed `ask` had printed is saved: its conversation holds an
  assistant reply that starts with it (replayed from the journal by the next start);
- no reply is saved twice: no conversation has two replies in a row (the database also
  keeps each reply's turn id unique).

Runs in a private temporary CHATKV_HOME unless --home is given. Exit status 0 when every
check held; the summary says what was checked.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTIONS = [
    "Tell me a story about the sea.",
    "What is the capital of France?",
    "Summarise the GNU GPL in three bullet points.",
    "How does the Apache license differ?",
    "Count to ten.",
]


def run_round(
    env: dict[str, str],
    conv: int,
    question: str,
    kill_after: float | None,
    max_tokens: int,
    kill_at_bytes: int | None = None,
):
    """One `ask`, killed `kill_after` seconds in or once it has printed `kill_at_bytes`;
    returns (exit code, what it printed, stderr, seconds to its first output)."""
    cmd = [sys.executable, "-m", "chatkv", "ask", "-C", str(conv), "-t", "0", "-n", str(max_tokens), question]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.set_blocking(proc.stdout.fileno(), False)
    shown = b""
    start = time.monotonic()
    first = None
    while proc.poll() is None:
        chunk = proc.stdout.read()
        if chunk:
            shown += chunk
            first = first or time.monotonic() - start
        late = kill_after is not None and time.monotonic() - start >= kill_after
        if late or (kill_at_bytes is not None and len(shown) >= kill_at_bytes):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.005)
    rest = proc.stdout.read()
    if rest:
        shown += rest
    err = proc.stderr.read().decode(errors="replace")
    return proc.returncode, shown.decode("utf-8", errors="ignore"), err, first


def check(home: Path, expected: list[dict]) -> list[str]:
    """What is wrong with the data dir against what the rounds printed."""
    from chatkv import journal
    from chatkv.store import Store

    problems: list[str] = []
    try:
        store = Store(home / "chatkv.db")
    except Exception as e:  # the store must always open
        return [f"the database does not open: {e}"]
    journal.replay(store)  # what the next start does
    with store:
        for e in expected:
            msgs = store.messages(e["conversation"])
            replies = [m.content for m in msgs if m.role == "assistant"]
            printed = e["shown"][:-1] if e["shown"].endswith("\n") else e["shown"]  # ask ends with "\n"
            if e["code"] == 0 and printed.strip() and printed not in replies:
                problems.append(f"round {e['round']}: a finished reply is not saved")
            if e["code"] == -signal.SIGKILL and printed:
                if not any(r.startswith(printed) for r in replies):
                    problems.append(f"round {e['round']}: text shown before the kill is not saved")
        for conv in {e["conversation"] for e in expected}:
            msgs = store.messages(conv)
            roles = [m.role for m in msgs]
            for a, b in zip(roles, roles[1:], strict=False):
                if a == b == "assistant":
                    problems.append(f"conversation {conv}: two replies in a row (duplicated?)")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=100, help="rounds that end in SIGKILL")
    ap.add_argument("--finished", type=int, default=None, help="rounds left to finish (default: kills // 4)")
    ap.add_argument("--model", default=None, help="--model for the children (default: the config's)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--max-delay", type=float, default=None, help="latest kill, seconds (default: measured)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--home", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    home = args.home or Path(tempfile.mkdtemp(prefix="chatkv-faults-"))
    os.environ["CHATKV_HOME"] = str(home)  # this process's own replay and checks, too
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error")
    if args.model:
        env["CHATKV_MODEL_NAME"] = args.model

    from chatkv.store import Store

    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    with Store(home / "chatkv.db") as store:
        convs = [store.create_conversation(title=f"fault campaign {i}").id for i in range(3)]

    # One finished round measures how long a whole `ask` takes: kills land anywhere in it.
    expected: list[dict] = []
    code, shown, err, _ = run_round(env, convs[0], QUESTIONS[0], None, args.max_new_tokens)
    if code != 0:
        print(f"a plain ask failed (exit {code}): {err.strip()}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    code, shown, err, first = run_round(env, convs[0], QUESTIONS[1], None, args.max_new_tokens)
    span = args.max_delay or time.monotonic() - t0
    first = min(first or span / 2, span)
    expected.append({"round": 0, "conversation": convs[0], "code": code, "shown": shown})
    finished = args.kills // 4 if args.finished is None else args.finished
    plan = [True] * args.kills + [False] * finished
    rng.shuffle(plan)
    problems: list[str] = []
    for i, kill in enumerate(plan, 1):
        conv, question = rng.choice(convs), rng.choice(QUESTIONS)
        # A third of the kills land once some of the reply is on screen, a third while it
        # streams or is saved and spilled, a third anywhere (loading, prefill, ...).
        delay, at_bytes = None, None
        if kill:
            how = rng.randrange(3)
            if how == 0:
                at_bytes = rng.randint(1, 40)
            else:
                delay = rng.uniform(first, span) if how == 1 else rng.uniform(0, span)
        code, shown, err, _ = run_round(env, conv, question, delay, args.max_new_tokens, at_bytes)
        if code not in (0, -signal.SIGKILL):
            problems.append(f"round {i}: exit {code}: {err.strip()[-300:]}")
        expected.append({"round": i, "conversation": conv, "code": code, "shown": shown})
    problems += check(home, expected)
    killed = sum(e["code"] == -signal.SIGKILL for e in expected)
    mid_reply = sum(e["code"] == -signal.SIGKILL and bool(e["shown"]) for e in expected)
    summary = {
        "rounds": len(expected),
        "killed": killed,
        "killed_mid_reply": mid_reply,
        "finished": sum(e["code"] == 0 for e in expected),
        "problems": problems,
        "home": str(home),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"{summary['rounds']} rounds: {killed} killed ({mid_reply} while the reply streamed), "
            f"{summary['finished']} finished; {len(problems)} problems"
        )
        for p in problems:
            print("  " + p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
