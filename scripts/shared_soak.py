"""Many hosts writing one PostgreSQL database: check that no message is lost or duplicated.

    .venv/bin/python scripts/shared_soak.py [--hosts 2] [--procs 4] [--convs 8] [--turns 100]
                                            [--restart-db] [--url postgresql://…] [--json]

Starts a PostgreSQL server of its own (pgserver, in a temporary directory; or uses --url)
and `--hosts` x `--procs` writer processes, each with its own data dir (CHATKV_HOME). Every
process plays `--turns` turns on each of `--convs` shared conversations, interleaved: a
turn appends the user's message, then saves the reply under the turn's id (Store.finish_turn,
as a turn does). A turn whose save fails is saved again under the same id, as the journal
replays it at the next start, until it is saved: then it must be there exactly once.

`--restart-db` stops the server for a few seconds in the middle of the run. Every failure a
writer sees must be described in one line (chatkv.store.db.describe_db_error), and nothing
saved before may be lost.

Checks at the end, per conversation: positions 0..n-1 without a gap; every user message and
every reply exactly once; each process's messages in the order it wrote them (other
writers' interleave). Exit status 0 when every check held.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_WRITER = """
import sys, time
from chatkv.api import TurnStats
from chatkv.errors import ChatKVError
from chatkv.store import Store
from chatkv.store.db import describe_db_error
from sqlalchemy import exc

url, tag, convs, turns = sys.argv[1], sys.argv[2], [int(c) for c in sys.argv[3].split(",")], int(sys.argv[4])
errors = 0
bad_lines = 0

def retry(fn):
    global errors, bad_lines
    while True:
        try:
            return fn()
        except (exc.DBAPIError, ChatKVError) as e:
            errors += 1
            line = describe_db_error(e, url) if isinstance(e, exc.DBAPIError) else str(e)
            if "\\n" in line or not line:
                bad_lines += 1
            time.sleep(0.2)

store = retry(lambda: Store(url))
print("open", flush=True)
for t in range(turns):
    for c in convs:
        # The question is saved once: a retry after a failed commit looks for it first.
        q, tried = f"{tag} q{t}", []
        def ask():
            # after a failure the commit may have happened all the same: look before adding again
            if tried and any(m.content == q for m in store.messages(c)):
                return
            tried.append(1)
            store.add_message(c, "user", q)
        retry(ask)
        retry(lambda: store.finish_turn(c, f"{tag} a{t}", TurnStats(), turn_id=f"{tag}-{c}-{t}"))
print(errors, bad_lines, flush=True)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=2)
    ap.add_argument("--procs", type=int, default=4, help="writer processes per host")
    ap.add_argument("--convs", type=int, default=8)
    ap.add_argument("--turns", type=int, default=100)
    ap.add_argument("--restart-db", action="store_true", help="stop the server mid-run for a few seconds")
    ap.add_argument("--url", help="an existing PostgreSQL database (default: a private pgserver)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from chatkv.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="chatkv-soak-"))
    server = None
    if args.url:
        url = args.url
    else:
        import pgserver

        server = pgserver.get_server(tmp / "pg", cleanup_mode="stop")
        url = server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
    t0 = time.perf_counter()
    with Store(url) as store:
        convs = [store.create_conversation(title=f"soak {i}").id for i in range(args.convs)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = {}
    for h in range(args.hosts):
        for p in range(args.procs):
            tag = f"h{h}p{p}"
            procs[tag] = subprocess.Popen(
                [sys.executable, "-c", _WRITER, url, tag, ",".join(map(str, convs)), str(args.turns)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**env, "CHATKV_HOME": str(tmp / f"host{h}")},
            )
    for p in procs.values():
        p.stdout.readline()  # "open": every writer is writing
    restarted = False
    if args.restart_db and server is not None:
        time.sleep(3)
        from pgserver import pg_ctl  # the server's own pg_ctl

        pg_ctl(["-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)
        time.sleep(3)
        server.ensure_postgres_running()
        restarted = True
    errors = bad_lines = failed = 0
    for tag, p in procs.items():
        out, err = p.communicate()
        if p.returncode != 0:
            failed += 1
            print(f"{tag} exited {p.returncode}: {err.strip().splitlines()[-1:]}", file=sys.stderr)
            continue
        e, b = map(int, out.split())
        errors, bad_lines = errors + e, bad_lines + b
    wall = time.perf_counter() - t0
    problems: list[str] = []
    with Store(url) as store:
        for c in convs:
            msgs = store.messages(c)
            if [m.position for m in msgs] != list(range(len(msgs))):
                problems.append(f"conversation {c}: positions have gaps")
            counts = Counter(m.content for m in msgs)
            for tag in procs:
                for t in range(args.turns):
                    for text in (f"{tag} q{t}", f"{tag} a{t}"):
                        if counts[text] != 1:
                            problems.append(f"conversation {c}: {text!r} saved {counts[text]} times")
                mine = [m.content for m in msgs if m.content.startswith(tag + " ")]
                expect = [x for t in range(args.turns) for x in (f"{tag} q{t}", f"{tag} a{t}")]
                if mine != expect:
                    problems.append(f"conversation {c}: {tag}'s messages out of order")
    if server is not None:
        server.cleanup()
    report = {
        "writers": len(procs),
        "conversations": args.convs,
        "turns_per_writer_and_conversation": args.turns,
        "messages_expected": len(procs) * args.convs * args.turns * 2,
        "failed_writers": failed,
        "errors_retried": errors,
        "errors_not_one_line": bad_lines,
        "db_restarted": restarted,
        "problems": problems[:20],
        "wall_s": round(wall, 1),
    }
    print(json.dumps(report) if args.json else "\n".join(f"{k}: {v}" for k, v in report.items()))
    return 0 if not problems and not failed and not bad_lines else 1


if __name__ == "__main__":
    sys.exit(main())
