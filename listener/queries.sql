-- Named queries of the Postgres store (listener/store_pg.py), loaded once at import.
-- Every state change is a SQL function of the migrations; these only call them.

-- name: claim
select id, kind, subject_id, attempts, max_attempts, cancel_requested, waited_seconds, payload
  from zerfaux.claim(%(worker)s, %(limit)s, %(lease)s, %(held)s::uuid[], %(window)s);

-- name: heartbeat
select id, cancel_requested from zerfaux.heartbeat(%(worker)s, %(ids)s::uuid[], %(lease)s);

-- name: progress
select zerfaux.progress(%(id)s, %(worker)s, %(progress)s) as state;

-- name: current_input
select zerfaux.current_input(%(id)s, %(worker)s) as payload;

-- name: complete_many
select id, done, error from zerfaux.complete_many(%(worker)s, %(items)s);

-- name: fail
select zerfaux.fail(%(id)s, %(worker)s, %(error)s, %(permanent)s, %(retry)s, %(window)s) as outcome;

-- name: finish_cancelled
select zerfaux.finish_cancelled(%(id)s, %(worker)s, %(message)s) as done;

-- name: release
select zerfaux.release(%(worker)s, %(ids)s::uuid[]) as released;

-- name: prune
select zerfaux.prune(%(days)s) as pruned;

-- name: queue_state
select queued, runnable, running, expired, next_run_after from zerfaux.queue_state();

-- name: schedule_due
select inserted, next_due_at from zerfaux.schedule_due();

-- name: record_rpo_transitions
select zerfaux.record_rpo_transitions() as recorded;

-- name: has_vault
select exists (select 1 from pg_views where schemaname = 'vault' and viewname = 'decrypted_secrets') as present;

-- name: vault_secret
select decrypted_secret from vault.decrypted_secrets where name = %(name)s limit 1;

-- name: status_report
select zerfaux.status_report(%(recent)s, %(seconds)s) as report;

-- name: claim_mode
select zerfaux.claim_mode(%(mode)s) as mode;

-- name: set_mode
select zerfaux.set_mode(%(mode)s) as previous;

-- name: database_mode
select zerfaux.database_mode() as mode;

-- name: broadcast_ready
select zerfaux.broadcast_ready() as ready;

-- name: protection_overview
select protection_group_id, name, rpo_minutes, last_recovery_point_at, current_rpo_seconds, rpo_status,
       next_replication_at, last_job_status, last_error, paused
  from zerfaux.protection_overview();

-- name: rpo_report
select protection_group_id, name, rpo_minutes, window_seconds, observed_seconds, within_seconds,
       within_share, worst_rpo_seconds, violations, longest_violation_seconds, paused_seconds,
       unknown_seconds
  from zerfaux.rpo_report(%(since)s, %(until)s);

-- name: run_report
select zerfaux.run_report(%(run)s) as report;
