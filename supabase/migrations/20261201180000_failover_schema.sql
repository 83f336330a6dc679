-- Failover runs (issue 14; docs/recovery.md, "Failover runs: the rows"): the columns that say
-- where a protection group stands (state, direction), how a failover awaiting commit ends by
-- itself (commit_policy, commit_timeout_minutes), how long a source VM is given to shut down
-- (shutdown_timeout_seconds), and what a run acts on (acts_on_run_id, group_state_before).
-- The rules are in 20261201180100_failover_rules.sql, the kind's functions in
-- 20261201180200_failover_kind.sql, the schedule and the commit policy in
-- 20261201180300_commit_policy_and_schedule.sql.

-- ---------------------------------------------------------------------------------------------
-- protection_groups.state: 'normal' (20261201150000_rpo_schema.sql) is now called 'protected'.

update public.protection_groups set state = 'protected' where state = 'normal';

alter table public.protection_groups
    alter column state set default 'protected',
    add constraint protection_groups_state_check
        check (state in ('protected', 'recovering', 'awaiting_commit', 'failed_over')),
    add column state_changed_at timestamptz,
    add column direction text not null default 'forward'
        constraint protection_groups_direction_check check (direction in ('forward', 'reverse')),
    add column commit_policy text not null default 'manual'
        constraint protection_groups_commit_policy_check check (commit_policy in ('manual', 'commit', 'rollback')),
    add column commit_timeout_minutes integer
        constraint protection_groups_commit_timeout_minutes_between_1_and_10080
        check (commit_timeout_minutes between 1 and 10080);

comment on column public.protection_groups.state is
    'protected (replicated on schedule) | recovering (a planned_migration or failover under way, or failed '
    'half-way: a rollback undoes it) | awaiting_commit (a failover is up at site B: commit or rollback) | '
    'failed_over (the VMs run at site B: reprotect next); written by the engine only; docs/recovery.md';
comment on column public.protection_groups.state_changed_at is
    'when state last changed (null: never since issue 14); the commit policy counts from it; the engine''s';
comment on column public.protection_groups.direction is
    'forward: primary -> DR (source_dataset is live, the replica receives); reverse: DR -> primary, after a '
    'reprotect (the replica is live, source_dataset receives); flipped by a reprotect run only';
comment on column public.protection_groups.commit_policy is
    'manual (a person inserts commit or rollback) | commit | rollback: inserted by the schedule once a failover '
    'has awaited commit for commit_timeout_minutes';
comment on column public.protection_groups.commit_timeout_minutes is
    'commit_timeout_minutes must be between 1 and 10080 (a week); null = 60: how long a failover awaits commit '
    'before commit_policy applies';

-- Configuration, like rpo_minutes: a global admin sets it (the policies on protection_groups).
-- state, state_changed_at and direction are read, never written, by a person.
grant select (state_changed_at, direction, commit_policy, commit_timeout_minutes)
    on public.protection_groups to authenticated;
grant insert (commit_policy, commit_timeout_minutes), update (commit_policy, commit_timeout_minutes)
    on public.protection_groups to authenticated;

-- ---------------------------------------------------------------------------------------------
-- protected_vms.shutdown_timeout_seconds: set like the boot order (20261201159100_boot_order.sql).

alter table public.protected_vms
    add column shutdown_timeout_seconds integer not null default 300
        constraint protected_vms_shutdown_timeout_seconds_between_0_and_86400
        check (shutdown_timeout_seconds between 0 and 86400);

comment on column public.protected_vms.shutdown_timeout_seconds is
    'shutdown_timeout_seconds must be between 0 and 86400: how long a planned migration waits for the guest '
    'to shut down before it powers the VM off (options.force_power_off false: before it stops the run)';

grant insert (shutdown_timeout_seconds), update (shutdown_timeout_seconds) on public.protected_vms to authenticated;

-- ---------------------------------------------------------------------------------------------
-- recovery_runs: what a commit, rollback or reprotect acts on, and where the group stood.

alter table public.recovery_runs
    add column acts_on_run_id uuid references public.recovery_runs (id) on delete set null,
    add column group_state_before text
        constraint recovery_runs_group_state_before_check
        check (group_state_before in ('protected', 'recovering', 'awaiting_commit', 'failed_over'));

create index recovery_runs_acts_on_run_id_idx on public.recovery_runs (acts_on_run_id);

-- One run per group at a time (the rules' recovery_runs_one_run_per_group, also against two
-- inserts racing past the trigger): of every kind but cleanup, one pending or running, and none
-- while a test is active. A failover awaiting commit is not in it: its commit or rollback is the
-- next run.
create unique index recovery_runs_one_run_per_group on public.recovery_runs (protection_group_id)
    where (kind <> 'cleanup' and status in ('pending', 'running')) or (kind = 'test' and status = 'active');

comment on column public.recovery_runs.acts_on_run_id is
    'commit, rollback, reprotect: the planned_migration or failover run they act on (set by the rules at insert)';
comment on column public.recovery_runs.group_state_before is
    'the group''s state when the run was inserted (set by the rules); a planned_migration or failover that '
    'ended before it changed anything at site B gives it back';

comment on table public.recovery_runs is
    'a recovery of a protection group: test, cleanup (of a test), planned_migration, failover, commit, rollback, '
    'reprotect; insert one to start it (operation recovery.run); docs/recovery.md';
comment on column public.recovery_runs.kind is
    'test | cleanup | planned_migration | failover | commit | rollback | reprotect (docs/recovery.md); the last '
    'five need the admin role';
comment on column public.recovery_runs.recovery_point_id is
    'the point brought up; a test or failover left null takes the newest point on the site it comes up at; a '
    'cleanup copies its test''s, a commit or rollback its failover''s; a planned_migration''s is its final '
    'snapshot, recorded when it completes';
comment on column public.recovery_runs.status is
    'pending -> running -> active (a test is up) | awaiting_commit (a failover is up) | completed | failed | '
    'cancelled; set by the engine';
comment on column public.recovery_runs.cancel_requested is
    'set to true to stop a pending run, or a running test or cleanup (a running test then removes what it made)';
comment on column public.recovery_runs.options is
    'per-run options, a JSON object: force_power_off, skip_source, fence_timeout_seconds, '
    'discard_source_changes, auto (docs/recovery.md, "Failover runs: the rows")';
comment on column public.recovery_runs.completed_at is
    'when the run ended (null while a test is active or a failover awaits commit)';
comment on column public.recovery_runs.rto_seconds is
    'test, planned_migration, failover: seconds from started_at to the last VM ready (or given up waiting for)';
comment on column public.recovery_runs.data_loss_seconds is
    'test, failover: seconds between the recovery point''s creation on the source and the run''s start; '
    'planned_migration: 0';
comment on column public.recovery_runs.requested_by is
    'auth.uid() of the person who inserted the run; null for the engine''s (a commit policy''s)';
