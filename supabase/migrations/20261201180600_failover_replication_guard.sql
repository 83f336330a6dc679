-- A planned migration or failover and the group's own replication jobs (issue 14).
--
-- From the insert of such a run the group is 'recovering' and no new job is accepted
-- (replication_jobs_group_state). A job already pending or running at that moment would race
-- with the run's steps on the same replica:
--   * planned_migration: refused while a job is pending or running, naming it: the migration
--     replicates by itself, twice, and a job receiving into the replica meanwhile would make
--     the final GUID check compare against a moving target. Wait for it, or cancel it.
--   * failover: the primary site is gone or cannot be trusted, so its jobs are not waited
--     for: they are asked to stop (cancel_requested, as a person would), in the same
--     transaction. A receive that still finishes afterwards lands on a replica the failover
--     has made writable and is refused by ZFS (no job receives with -F): nothing is lost.
-- Fires before recovery_runs_rules (triggers fire by name); a refusal by the rules rolls the
-- cancel back with the insert.

create function zerfaux.recovery_runs_replication_guard() returns trigger
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_job public.replication_jobs;
begin
    if new.kind not in ('planned_migration', 'failover') then
        return new;
    end if;
    select * into v_job from public.replication_jobs j
     where j.protection_group_id = new.protection_group_id and j.status in ('pending', 'running')
     order by j.created_at
     limit 1;
    if not found then
        return new;
    end if;
    if new.kind = 'planned_migration' then
        raise exception 'recovery_runs_replication_in_flight: protection group % has replication job % (%): a planned '
                        'migration replicates by itself and does not start while another replication runs',
                        new.protection_group_id, v_job.id, v_job.status
            using errcode = 'object_not_in_prerequisite_state',
                  hint = format('wait for it to end, or cancel it: update replication_jobs set cancel_requested = '
                                'true where id = %L; then insert the planned migration again', v_job.id);
    end if;
    update public.replication_jobs set cancel_requested = true
     where protection_group_id = new.protection_group_id and status in ('pending', 'running')
       and not cancel_requested;
    return new;
end $$;

revoke execute on function zerfaux.recovery_runs_replication_guard() from public, anon, authenticated;

create trigger recovery_runs_replication_guard before insert on public.recovery_runs
    for each row execute function zerfaux.recovery_runs_replication_guard();
