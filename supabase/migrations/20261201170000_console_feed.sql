-- The console's live feed (docs/console.md, "Live"): a wake-up on channel 'zerfaux_console'
-- whenever something a console page shows changes by itself: a replication's progress or
-- status, a new recovery point, a group paused or rescheduled, a recovery run or one of its
-- steps. The payload is the group's id, a hint and never row data: the feed reads the rows
-- again, as the listener, and shows each person only the groups that person may read.
--
-- One NOTIFY per changed row; Postgres folds identical payloads of one transaction into one.
-- Progress is written about once a second per running job, so 100 running replications are
-- about 100 notifications a second, far below what LISTEN/NOTIFY carries.

create function zerfaux.console_hint() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    v_group text := to_jsonb(new) ->> tg_argv[0];
begin
    if v_group is not null then
        perform pg_notify('zerfaux_console', v_group);
    end if;
    return null;
end $$;

revoke execute on function zerfaux.console_hint() from public, anon, authenticated;

create trigger replication_jobs_console_hint
    after insert or update of status, bytes_transferred, bytes_estimated, error on public.replication_jobs
    for each row execute function zerfaux.console_hint('protection_group_id');
create trigger recovery_points_console_hint
    after insert or update of on_target, tested_at, removed_at on public.recovery_points
    for each row execute function zerfaux.console_hint('protection_group_id');
create trigger protection_groups_console_hint
    after update of paused, next_replication_at, state on public.protection_groups
    for each row execute function zerfaux.console_hint('id');

-- Recovery runs (issue 13, migrations 20261201160000 on) and their steps; a step carries no group
-- id, so its hint names the group of its run.
create function zerfaux.console_step_hint() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    v_group uuid;
begin
    select r.protection_group_id into v_group from public.recovery_runs r where r.id = new.run_id;
    if v_group is not null then
        perform pg_notify('zerfaux_console', v_group::text);
    end if;
    return null;
end $$;

revoke execute on function zerfaux.console_step_hint() from public, anon, authenticated;

create trigger recovery_runs_console_hint after insert or update on public.recovery_runs
    for each row execute function zerfaux.console_hint('protection_group_id');
create trigger recovery_run_steps_console_hint after insert or update on public.recovery_run_steps
    for each row execute function zerfaux.console_step_hint();
