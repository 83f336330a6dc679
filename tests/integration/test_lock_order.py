"""One lock order (subject row, then operation row) for a person's cancel and the engine's
writes: cancels while progress is being written from another connection never deadlock."""

from __future__ import annotations

import threading

import psycopg

from tests.integration.test_claim_fairness import many_groups_on_one_target
from tests.support.pg import Database

# Widens the race: a writer that sets zerfaux.test_slow sleeps at the start of each UPDATE of a
# job, before that statement locks any job row, i.e. while it holds whatever it locked before.
# With the old order (operation, then job) a cancel then always lands in the gap.
SLOW = """
create function public.test_slow() returns trigger language plpgsql as $$
begin
    if current_setting('zerfaux.test_slow', true) = 'on' then
        perform pg_sleep(0.02);
    end if;
    return null;
end $$;
create trigger test_slow before update on public.replication_jobs
    for each statement execute function public.test_slow();
"""


def slow(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    conn.execute("set zerfaux.test_slow = 'on'")


def test_50_cancels_during_progress_writes_never_deadlock(world: Database) -> None:
    many_groups_on_one_target(world, 50, max_concurrent=50)
    claimed = world.sql("select id, subject_id from zerfaux.claim('w', 50, 300)")
    assert len(claimed) == 50
    world.sql(SLOW)
    errors: list[BaseException] = []
    stop = threading.Event()

    def progress_writer() -> None:
        # Progress of every running job, over and over, each call its own transaction.
        with psycopg.connect(world.url, autocommit=True) as conn:
            slow(conn)
            n = 0
            while not stop.is_set():
                n += 1
                for op in claimed:
                    try:
                        conn.execute("select zerfaux.progress(%s, 'w', %s::jsonb)",
                                     (op["id"], f'{{"bytes_transferred": {n}}}'))
                    except psycopg.Error as exc:
                        errors.append(exc)
                        return

    def heartbeater() -> None:
        with psycopg.connect(world.url, autocommit=True) as conn:
            while not stop.is_set():
                try:
                    conn.execute("select * from zerfaux.heartbeat('w', %s::uuid[], 300)",
                                 ([op["id"] for op in claimed],))
                except psycopg.Error as exc:
                    errors.append(exc)
                    return

    def canceller() -> None:
        with psycopg.connect(world.url, autocommit=True) as conn:
            for op in claimed:
                try:
                    # As a frontend does it: one UPDATE of the job row.
                    conn.execute("update replication_jobs set cancel_requested = true where id = %s",
                                 (op["subject_id"],))
                except psycopg.Error as exc:
                    errors.append(exc)

    threads = [threading.Thread(target=progress_writer), threading.Thread(target=progress_writer),
               threading.Thread(target=heartbeater)]
    for t in threads:
        t.start()
    cancel = threading.Thread(target=canceller)
    cancel.start()
    cancel.join(timeout=120)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not cancel.is_alive()
    assert errors == []
    # Every cancel landed where the worker hears it.
    assert world.value("select count(*) from zerfaux.operations where cancel_requested") == 50
    assert world.value("select count(*) from replication_jobs where cancel_requested") == 50
