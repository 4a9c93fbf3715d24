"""Cost of the tenant-scoping session event on typical ORM reads.

Measures the same queries with the scope applied (the normal path) and marked
``unscoped()`` (no event work, no extra WHERE), in one run, and prints the ratio.

    .venv/bin/python bench/tenancy.py            # embedded services, or
    DATABASE_URL=... REDIS_URL=... .venv/bin/python bench/tenancy.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# ``python bench/tenancy.py`` puts bench/ first on sys.path, where bench/email.py would shadow
# the standard library's email package: look modules up from the project root instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import statistics  # noqa: E402
import time  # noqa: E402

from sqlalchemy import func, select  # noqa: E402

from whistle_web import create_app  # noqa: E402
from whistle_web.extensions import db  # noqa: E402
from whistle_web.models import Recipient  # noqa: E402
from whistle_web.organizations.services import create_organization  # noqa: E402
from whistle_web.tenancy import organization_scope, unscoped  # noqa: E402

ROWS = 5_000
ROUNDS = 5
QUERIES = 2_000


def queries(org_id: int, ids: list[int], *, scoped: bool):  # type: ignore[no-untyped-def]
    mark = (lambda s: s) if scoped else unscoped
    for i in range(QUERIES):
        rid = ids[i % len(ids)]
        db.session.scalar(mark(select(Recipient).where(Recipient.id == rid)))
        if i % 10 == 0:
            db.session.scalar(
                mark(select(func.count()).select_from(Recipient).where(Recipient.locale == "en"))
            )
        db.session.expunge_all()


def main() -> None:
    app = create_app()
    with app.app_context():
        org = create_organization(f"bench-{time.time_ns()}")
        with organization_scope(org.id):
            db.session.execute(
                Recipient.__table__.insert(),
                [
                    {"organization_id": org.id, "external_id": f"b{i}", "locale": "en"}
                    for i in range(ROWS)
                ],
            )
            ids = list(db.session.scalars(select(Recipient.id)))
            timings: dict[bool, list[float]] = {True: [], False: []}
            queries(org.id, ids, scoped=True)  # warm up caches and the pool
            for _ in range(ROUNDS):
                for scoped in (False, True):
                    start = time.perf_counter()
                    queries(org.id, ids, scoped=scoped)
                    timings[scoped].append(time.perf_counter() - start)
        db.session.rollback()
    per_query = {k: statistics.median(v) / QUERIES * 1e6 for k, v in timings.items()}
    print(f"queries per round: {QUERIES} by id + {QUERIES // 10} counts, {ROUNDS} rounds")
    print(f"unscoped baseline: {per_query[False]:8.1f} µs per query")
    print(f"tenant-scoped:     {per_query[True]:8.1f} µs per query")
    print(f"ratio scoped/baseline: {per_query[True] / per_query[False]:.2f}x")


if __name__ == "__main__":
    main()
