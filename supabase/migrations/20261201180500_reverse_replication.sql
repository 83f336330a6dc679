-- Reverse replication (issue 14): after a reprotect (protection_groups.direction = 'reverse') a
-- replication job sends the DR replica back to the primary's source_dataset
-- (handlers/replication.py, request_for). The job row keeps its columns' meaning either way:
-- source_dataset is the primary's dataset, target_dataset the replica on the replication target.
-- The backend's result names its sides by the direction of the stream (on_source: on the host
-- that sent), so in reverse its on_source is the DR host. recovery_points keep their physical
-- meaning: on_source = on the primary site's host, on_target = on the DR host; this swaps them
-- back for a reverse job. Otherwise as in 20261201152000_recovery_points.sql.

create or replace function zerfaux.complete_replication_run(p_subject uuid, p_result jsonb)
returns jsonb language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_group uuid;
    v_source text;
    v_reverse boolean;
begin
    update public.replication_jobs
       set status = 'completed', completed_at = now(), error = null, next_attempt_at = null,
           snapshot_name = p_result ->> 'snapshot_name',
           base_snapshot = p_result ->> 'base_snapshot',
           bytes_transferred = coalesce((p_result ->> 'bytes_transferred')::bigint, 0),
           bytes_estimated = (p_result ->> 'bytes_estimated')::bigint,
           notes = nullif(array_to_string(array(
               select jsonb_array_elements_text(coalesce(p_result -> 'notes', '[]'))), '; '), '')
     where id = p_subject
    returning protection_group_id, source_dataset into v_group, v_source;
    -- A result without a listing (an older backend) leaves the recovery points as they are, and so
    -- does a job that replicated another dataset than the group's (set on the row by service_role):
    -- the group's points are those of its own replica.
    if v_group is null or jsonb_typeof(p_result -> 'recovery_points') is distinct from 'array'
       or v_source is distinct from (select g.source_dataset from public.protection_groups g where g.id = v_group) then
        return p_result;
    end if;
    -- The direction the backend ran in: the result says it (the group may have flipped since the
    -- claim); an older result that does not say is the group's present direction.
    v_reverse := coalesce(p_result ->> 'direction',
                          (select g.direction from public.protection_groups g where g.id = v_group)) = 'reverse';
    -- The job's own snapshot was replicated now, by this job; a point seen for the first time
    -- otherwise takes its time from the job that made it, when that job is known.
    insert into public.recovery_points as rp
           (protection_group_id, snapshot_name, guid, created_at, replicated_at, replication_job_id,
            on_source, on_target, bytes, removed_at)
    select v_group, e ->> 'snapshot_name', e ->> 'guid', (e ->> 'created_at')::timestamptz,
           case when mine then now() else made.completed_at end,
           case when mine then p_subject else made.id end,
           case when v_reverse then sent_to else sent_from end,
           case when v_reverse then sent_from else sent_to end,
           (e ->> 'bytes')::bigint,
           case when not sent_from and not sent_to then now() end
      from jsonb_array_elements(p_result -> 'recovery_points') e
      cross join lateral (select e ->> 'snapshot_name' = p_result ->> 'snapshot_name' as mine,
                                 coalesce((e ->> 'on_source')::boolean, false) as sent_from,
                                 coalesce((e ->> 'on_target')::boolean, false) as sent_to) m
      left join lateral (select j.id, j.completed_at from public.replication_jobs j
                          where j.protection_group_id = v_group and j.snapshot_name = e ->> 'snapshot_name'
                            and j.status = 'completed'
                          order by j.completed_at limit 1) made on true
    on conflict (protection_group_id, guid) do update
       set snapshot_name = excluded.snapshot_name,
           on_source = excluded.on_source,
           on_target = excluded.on_target,
           bytes = coalesce(excluded.bytes, rp.bytes),
           replicated_at = case when excluded.replication_job_id = p_subject then excluded.replicated_at
                                else coalesce(rp.replicated_at, excluded.replicated_at) end,
           replication_job_id = case when excluded.replication_job_id = p_subject then p_subject
                                     else coalesce(rp.replication_job_id, excluded.replication_job_id) end,
           removed_at = case when excluded.on_source or excluded.on_target then null
                             else coalesce(rp.removed_at, now()) end;
    -- Listed on neither side any more (pruned, or destroyed by hand): gone. Unless the listing
    -- says it is partial (the stub without its shared world): then what it left out is unknown.
    update public.recovery_points rp
       set on_source = false, on_target = false, removed_at = now()
     where rp.protection_group_id = v_group and rp.removed_at is null
       and not coalesce((p_result ->> 'recovery_points_partial')::boolean, false)
       and not exists (select 1 from jsonb_array_elements(p_result -> 'recovery_points') e
                        where e ->> 'guid' = rp.guid);
    return p_result;
end $$;

revoke execute on function zerfaux.complete_replication_run(uuid, jsonb) from public, anon, authenticated;
grant execute on function zerfaux.complete_replication_run(uuid, jsonb) to service_role;
