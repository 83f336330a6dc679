-- Retention grids checked by the database, and recovery points written by each replication
-- (docs/rpo.md, "Recovery points" and "Retention grids").
--
-- 1. zerfaux.retention_grid_error(text): why a text is not a grid in zrepl's form, or null. The
--    same grammar and the same messages as handlers/backends/zfs/grid.py (the tests hold the two
--    to the same list of strings). A trigger refuses a group whose retention_grid or
--    source_retention_grid does not parse, naming the column and showing a valid example.
-- 2. zerfaux.complete_replication_run, as in 20261201130200_kind_replication_run.sql, and besides:
--    the result's recovery_points (the target's listing of our snapshots, GUID-matched against the
--    source) are upserted into public.recovery_points on (protection_group_id, guid); the group's
--    points not listed are marked gone from both sides (removed_at).

create function zerfaux.retention_grid_error(p_grid text)
returns text language plpgsql immutable set search_path = zerfaux, public, pg_temp as $$
declare
    v_ws constant text := ' ' || chr(9);
    v_form constant text := '<count>x<length><unit>, optionally followed by (keep=all) or (keep=<n>); '
                            'units s, m, h, d, w';
    v_re constant text := '^([0-9]+)[ \t]*x[ \t]*([0-9]+)[ \t]*([a-z]+)[ \t]*'
                          '(\([ \t]*keep[ \t]*=[ \t]*([a-z0-9]+)[ \t]*\))?$';
    v_part text;
    v_n bigint;
    v_m text[];
    v_seconds numeric;
    v_last numeric;
    v_span numeric := 0::numeric;
    v_all_keep_all boolean := true;
begin
    if p_grid is null then
        return null;
    end if;
    if btrim(p_grid, v_ws) = '' then
        return 'is empty: give at least one interval, ' || v_form;
    end if;
    for v_part, v_n in
        select btrim(p, v_ws), n from unnest(string_to_array(p_grid, '|')) with ordinality as u(p, n)
    loop
        if v_part = '' then
            return format('interval %s is empty (two | in a row, or one at an end)', v_n);
        end if;
        v_m := regexp_match(v_part, replace(v_re, '\t', chr(9)));
        if v_m is null then
            return format('interval %s "%s" is not of the form %s', v_n, v_part, v_form);
        end if;
        if v_m[3] not in ('s', 'm', 'h', 'd', 'w') then
            return format('interval %s "%s" has unit "%s": use s, m, h, d or w', v_n, v_part, v_m[3]);
        end if;
        if greatest(length(v_m[1]), length(v_m[2]), coalesce(length(v_m[5]), 0)) > 9 then
            return format('interval %s "%s": numbers may have at most 9 digits', v_n, v_part);
        end if;
        if v_m[1]::numeric < 1 or v_m[2]::numeric < 1 then
            return format('interval %s "%s": count and length must be at least 1', v_n, v_part);
        end if;
        if v_m[4] is not null and v_m[5] <> 'all' and (v_m[5] !~ '^[0-9]+$' or v_m[5]::numeric < 1) then
            return format('interval %s "%s": keep must be all or a whole number of at least 1', v_n, v_part);
        end if;
        v_seconds := v_m[2]::numeric * case v_m[3] when 's' then 1 when 'm' then 60 when 'h' then 3600
                                                   when 'd' then 86400 else 604800 end;
        if v_last is not null and v_seconds < v_last and not v_all_keep_all then
            return format('interval %s "%s" is shorter than interval %s: lengths may not decrease '
                          '(except after intervals that all keep=all)', v_n, v_part, v_n - 1);
        end if;
        v_last := v_seconds;
        v_all_keep_all := v_all_keep_all and v_m[5] is not distinct from 'all';
        v_span := v_span + v_m[1]::numeric * v_seconds;
        if v_span > 3153600000 then  -- 100 years of 365 days, in seconds
            return format('interval %s "%s" makes the grid span more than 100 years', v_n, v_part);
        end if;
    end loop;
    return null;
end $$;

comment on function zerfaux.retention_grid_error(text) is
    'why the text is not a retention grid (zrepl form, e.g. 1x1h(keep=all) | 24x1h | 14x1d | 8x1w), or null';

-- A trigger rather than a check constraint: a constraint can only say its own name, and the
-- person who typed the grid needs to read which column is wrong, why, and what would do.
create function public.protection_groups_check_retention_grids() returns trigger
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_example constant text := '1x1h(keep=all) | 24x1h | 14x1d | 8x1w';
    v_error text;
begin
    v_error := zerfaux.retention_grid_error(new.retention_grid);
    if v_error is not null then
        raise exception 'protection_groups.retention_grid: % (a valid grid: %; null keeps retention_snapshots)',
                        v_error, v_example
            using errcode = 'check_violation', column = 'retention_grid';
    end if;
    v_error := zerfaux.retention_grid_error(new.source_retention_grid);
    if v_error is not null then
        raise exception 'protection_groups.source_retention_grid: % (a valid grid: %; null keeps retention_snapshots)',
                        v_error, v_example
            using errcode = 'check_violation', column = 'source_retention_grid';
    end if;
    return new;
end $$;

revoke execute on function public.protection_groups_check_retention_grids() from public, anon, authenticated;

create trigger protection_groups_check_retention_grids
    before insert or update of retention_grid, source_retention_grid on public.protection_groups
    for each row execute function public.protection_groups_check_retention_grids();

create or replace function zerfaux.complete_replication_run(p_subject uuid, p_result jsonb)
returns jsonb language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_group uuid;
    v_source text;
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
    -- The job's own snapshot was replicated now, by this job; a point seen for the first time
    -- otherwise takes its time from the job that made it, when that job is known.
    insert into public.recovery_points as rp
           (protection_group_id, snapshot_name, guid, created_at, replicated_at, replication_job_id,
            on_source, on_target, bytes, removed_at)
    select v_group, e ->> 'snapshot_name', e ->> 'guid', (e ->> 'created_at')::timestamptz,
           case when mine then now() else made.completed_at end,
           case when mine then p_subject else made.id end,
           coalesce((e ->> 'on_source')::boolean, false), coalesce((e ->> 'on_target')::boolean, false),
           (e ->> 'bytes')::bigint,
           case when not coalesce((e ->> 'on_source')::boolean, false)
                 and not coalesce((e ->> 'on_target')::boolean, false) then now() end
      from jsonb_array_elements(p_result -> 'recovery_points') e
      cross join lateral (select e ->> 'snapshot_name' = p_result ->> 'snapshot_name' as mine) m
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

revoke execute on function zerfaux.retention_grid_error(text), zerfaux.complete_replication_run(uuid, jsonb)
    from public, anon, authenticated;
grant execute on function zerfaux.retention_grid_error(text), zerfaux.complete_replication_run(uuid, jsonb)
    to service_role;
