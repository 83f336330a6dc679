-- Kind recovery.run for every kind of run (issue 14; docs/recovery.md, "Failover runs: the
-- rows"): the functions of 20261201160100_kind_recovery_run.sql, replaced. A test and a cleanup
-- end as before; a planned_migration, failover, commit, rollback and reprotect move the group's
-- state (and a reprotect its direction) when they end.

-- What the handler is given: as before, and for a commit, rollback or reprotect the run it acts
-- on (acts_on_run) and that run's steps (acts_on_steps: their detail says what it made); null and
-- [] for the other kinds.
create or replace function zerfaux.input_recovery_run(p_subject uuid)
returns jsonb language plpgsql stable security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_run public.recovery_runs;
    v_group public.protection_groups;
    v_target public.replication_targets;
    v_test public.recovery_runs;
    v_acts public.recovery_runs;
begin
    select * into v_run from public.recovery_runs where id = p_subject;
    if not found then return null; end if;
    select * into v_group from public.protection_groups where id = v_run.protection_group_id;
    select * into v_target from public.replication_targets where id = v_group.replication_target_id;
    if v_run.test_run_id is not null then
        select * into v_test from public.recovery_runs where id = v_run.test_run_id;
    end if;
    if v_run.acts_on_run_id is not null then
        select * into v_acts from public.recovery_runs where id = v_run.acts_on_run_id;
    end if;
    return jsonb_build_object(
        'run', to_jsonb(v_run),
        'group', to_jsonb(v_group),
        'target', case when v_target.id is null then null
                       else to_jsonb(v_target)
                            || jsonb_build_object('nfs_host_effective', coalesce(v_target.nfs_host, v_target.ssh_host)) end,
        'dr_vcenter', (select to_jsonb(v) from public.vcenters v where v.id = v_group.dr_vcenter_id),
        'source_vcenter', (select to_jsonb(v) from public.vcenters v where v.id = v_group.source_vcenter_id),
        'recovery_point', (select to_jsonb(p) from public.recovery_points p where p.id = v_run.recovery_point_id),
        'replica_dataset', case when v_target.id is null or v_group.replica_name is null then null
                                else v_target.target_root || '/' || v_group.replica_name end,
        'vms', coalesce((
            select jsonb_agg(jsonb_build_object(
                       'protected_vm', to_jsonb(p),
                       'vm', case when v.id is null then null else to_jsonb(v) end)
                   order by p.boot_priority, v.name, p.id)
              from public.protected_vms p
              left join public.vcenter_vms v on v.id = p.vm_id
             where p.protection_group_id = v_run.protection_group_id), '[]'::jsonb),
        'network_mappings', coalesce((
            select jsonb_agg(to_jsonb(m) order by m.source_network)
              from public.network_mappings m where m.protection_group_id = v_run.protection_group_id),
            '[]'::jsonb),
        'steps', coalesce((
            select jsonb_agg(to_jsonb(s) order by s.seq)
              from public.recovery_run_steps s where s.run_id = v_run.id), '[]'::jsonb),
        'test_run', case when v_test.id is null then null else to_jsonb(v_test) end,
        'test_steps', coalesce((
            select jsonb_agg(to_jsonb(s) order by s.seq)
              from public.recovery_run_steps s where s.run_id = v_test.id), '[]'::jsonb),
        'acts_on_run', case when v_acts.id is null then null else to_jsonb(v_acts) end,
        'acts_on_steps', coalesce((
            select jsonb_agg(to_jsonb(s) order by s.seq)
              from public.recovery_run_steps s where s.run_id = v_acts.id), '[]'::jsonb));
end $$;

-- An attempt starts: the run is running from its first start. Data loss is fixed then for a test
-- and a failover (what a failover at this moment loses, from the point's creation on the source)
-- and for a cleanup as before; a planned_migration loses nothing; a commit, rollback or
-- reprotect brings nothing up and has none.
create or replace function zerfaux.claimed_recovery_run(p_subject uuid, p_attempt integer)
returns void language sql security definer set search_path = zerfaux, public, pg_temp as $$
    update public.recovery_runs r
       set status = 'running', started_at = coalesce(r.started_at, now()),
           data_loss_seconds = case
               when r.kind = 'planned_migration' then 0
               when r.kind in ('commit', 'rollback', 'reprotect') then null
               else coalesce(r.data_loss_seconds, (
                   select round(extract(epoch from coalesce(r.started_at, now()) - p.created_at)::numeric, 3)
                     from public.recovery_points p where p.id = r.recovery_point_id)) end
     where r.id = p_subject and r.status in ('pending', 'running')
$$;

-- A planned_migration or failover that failed or was cancelled before anything at site B
-- changed: every step from pre_failover_snapshot on (or, with no such step in the plan, from the
-- first step that is not one of the source side's) is still pending or was skipped.
create or replace function zerfaux.recovery_run_left_site_b_untouched(p_run uuid)
returns boolean language sql stable security definer set search_path = zerfaux, public, pg_temp as $$
    with first_b as (
        select coalesce(
                   min(s.seq) filter (where s.name = 'pre_failover_snapshot'),
                   min(s.seq) filter (where s.name not in ('validate', 'replicate', 'shutdown_source',
                                                           'replicate_final', 'fence_source'))) as seq
          from public.recovery_run_steps s where s.run_id = p_run
    )
    select not exists (
        select 1 from public.recovery_run_steps s, first_b f
         where s.run_id = p_run and f.seq is not null and s.seq >= f.seq
           and s.status not in ('pending', 'skipped'))
$$;

-- Success, by kind (docs/recovery.md, "Failover runs: the rows", Endings):
--   test       active, RTO from the step times, data loss from the start (as before);
--   cleanup    completed, its test completed and the test's point tested (as before);
--   planned_migration  completed, data loss 0, RTO as a test's, report.final_point recorded as
--              a recovery point (recovery_point_id), the group failed_over;
--   failover   awaiting_commit (completed_at null), RTO, data loss from the start, the group
--              awaiting_commit;
--   commit     completed, its failover completed, the group failed_over;
--   rollback   completed, the run it undid completed (a failed one stays failed) with
--              rolled_back_by in its report, the group protected (direction unchanged);
--   reprotect  completed, the group protected, its direction flipped.
-- Every change of the group's state sets state_changed_at.
create or replace function zerfaux.complete_recovery_run(p_subject uuid, p_result jsonb)
returns jsonb language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_run public.recovery_runs;
    v_test public.recovery_runs;
    v_report jsonb := case when jsonb_typeof(p_result -> 'report') = 'object' then p_result -> 'report' end;
    v_final jsonb;
    v_point uuid;
    v_rto numeric;
begin
    select * into v_run from public.recovery_runs where id = p_subject for update;
    if not found then
        return p_result;
    end if;
    select round(extract(epoch from coalesce(
               max(s.finished_at) filter (where s.name = 'wait_ready'),
               max(s.finished_at) filter (where s.name = 'power_on')) - v_run.started_at)::numeric, 3)
      into v_rto
      from public.recovery_run_steps s where s.run_id = v_run.id;

    if v_run.kind = 'cleanup' then
        select * into v_test from public.recovery_runs where id = v_run.test_run_id for update;
        update public.recovery_runs
           set status = 'completed', completed_at = now(), error = null, report = v_report
         where id = p_subject;
        if v_test.status = 'active' then
            update public.recovery_runs set status = 'completed', completed_at = now() where id = v_test.id;
            update public.recovery_points set tested_at = now() where id = v_test.recovery_point_id;
        end if;
    elsif v_run.kind = 'test' then
        update public.recovery_runs r
           set status = 'active', completed_at = null, error = null, report = v_report,
               data_loss_seconds = coalesce((
                   select round(extract(epoch from r.started_at - p.created_at)::numeric, 3)
                     from public.recovery_points p where p.id = r.recovery_point_id), r.data_loss_seconds),
               rto_seconds = v_rto
         where r.id = p_subject;
    elsif v_run.kind = 'planned_migration' then
        -- The final snapshot, made with the VMs off and found by GUID on both sites.
        v_final := v_report -> 'final_point';
        if jsonb_typeof(v_final) = 'object' and v_final ? 'guid' and v_final ? 'snapshot_name' then
            insert into public.recovery_points as rp
                   (protection_group_id, snapshot_name, guid, created_at, replicated_at, on_source, on_target)
            values (v_run.protection_group_id, v_final ->> 'snapshot_name', v_final ->> 'guid',
                    coalesce((v_final ->> 'created_at')::timestamptz, now()), now(), true, true)
            on conflict (protection_group_id, guid) do update
               set snapshot_name = excluded.snapshot_name, on_source = true, on_target = true,
                   replicated_at = coalesce(rp.replicated_at, excluded.replicated_at), removed_at = null
            returning rp.id into v_point;
        end if;
        update public.recovery_runs r
           set status = 'completed', completed_at = now(), error = null, report = v_report,
               recovery_point_id = coalesce(v_point, r.recovery_point_id),
               data_loss_seconds = 0, rto_seconds = v_rto
         where r.id = p_subject;
        update public.protection_groups
           set state = 'failed_over', state_changed_at = now()
         where id = v_run.protection_group_id;
    elsif v_run.kind = 'failover' then
        update public.recovery_runs r
           set status = 'awaiting_commit', completed_at = null, error = null, report = v_report,
               data_loss_seconds = coalesce((
                   select round(extract(epoch from r.started_at - p.created_at)::numeric, 3)
                     from public.recovery_points p where p.id = r.recovery_point_id), r.data_loss_seconds),
               rto_seconds = v_rto
         where r.id = p_subject;
        update public.protection_groups
           set state = 'awaiting_commit', state_changed_at = now()
         where id = v_run.protection_group_id;
    elsif v_run.kind = 'commit' then
        update public.recovery_runs
           set status = 'completed', completed_at = now(), error = null, report = v_report
         where id = p_subject;
        update public.recovery_runs
           set status = 'completed', completed_at = now(),
               report = coalesce(report, '{}'::jsonb) || jsonb_build_object('committed_by', p_subject)
         where id = v_run.acts_on_run_id and status = 'awaiting_commit';
        update public.protection_groups
           set state = 'failed_over', state_changed_at = now()
         where id = v_run.protection_group_id;
    elsif v_run.kind = 'rollback' then
        update public.recovery_runs
           set status = 'completed', completed_at = now(), error = null, report = v_report
         where id = p_subject;
        update public.recovery_runs
           set status = case when status = 'awaiting_commit' then 'completed' else status end,
               completed_at = coalesce(completed_at, now()),
               report = coalesce(report, '{}'::jsonb) || jsonb_build_object('rolled_back_by', p_subject)
         where id = v_run.acts_on_run_id;
        update public.protection_groups
           set state = 'protected', state_changed_at = now()
         where id = v_run.protection_group_id;
    elsif v_run.kind = 'reprotect' then
        update public.recovery_runs
           set status = 'completed', completed_at = now(), error = null, report = v_report
         where id = p_subject;
        update public.protection_groups
           set state = 'protected', state_changed_at = now(),
               direction = case when direction = 'forward' then 'reverse' else 'forward' end
         where id = v_run.protection_group_id;
    end if;
    return p_result;
end $$;

-- A retry keeps the run running (its steps say where it is) with the last error; the end fails
-- it. A planned_migration or failover that failed before anything at site B changed gives the
-- group back the state it had (protected); one that got further leaves it recovering, for a
-- rollback to undo. A failed commit, rollback or reprotect leaves the group as it was.
create or replace function zerfaux.failure_recovery_run(p_subject uuid, p_message text, p_final boolean)
returns void language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_run public.recovery_runs;
begin
    update public.recovery_runs r
       set status = case when p_final then 'failed' else r.status end,
           error = p_message,
           completed_at = case when p_final then now() else r.completed_at end
     where r.id = p_subject
    returning * into v_run;
    if p_final and v_run.kind in ('planned_migration', 'failover')
       and zerfaux.recovery_run_left_site_b_untouched(v_run.id) then
        update public.protection_groups
           set state = coalesce(v_run.group_state_before, 'protected'), state_changed_at = now()
         where id = v_run.protection_group_id and state = 'recovering';
    end if;
end $$;

-- Ended on request (a cancelled test has run its cleanup steps first). A planned_migration or
-- failover can be cancelled only while pending (on_recovery_run_cancel); one that ends here all
-- the same (its operation was claimed with cancel_requested) gives the group its state back
-- when nothing at site B changed.
create or replace function zerfaux.cancelled_recovery_run(p_subject uuid, p_message text)
returns void language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_run public.recovery_runs;
begin
    update public.recovery_runs
       set status = 'cancelled', completed_at = now(), error = p_message
     where id = p_subject
    returning * into v_run;
    if v_run.kind in ('planned_migration', 'failover') and zerfaux.recovery_run_left_site_b_untouched(v_run.id) then
        update public.protection_groups
           set state = coalesce(v_run.group_state_before, 'protected'), state_changed_at = now()
         where id = v_run.protection_group_id and state = 'recovering';
    end if;
end $$;

-- A group cannot be deleted while a run is under way or holds something (as before), nor while
-- its state says a recovery moved its VMs (recovering, awaiting_commit, failed_over): the row is
-- what says which site runs them.
create or replace function zerfaux.protection_groups_guard_delete() returns trigger
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_run public.recovery_runs;
begin
    select * into v_run from public.recovery_runs r
     where r.protection_group_id = old.id
       and r.status in ('pending', 'running', 'active', 'awaiting_commit')
     order by r.created_at
     limit 1;
    if found then
        raise exception 'protection_groups_delete_during_recovery: protection group % has recovery run % (%, %)',
                        old.name, v_run.id, v_run.kind, v_run.status
              using errcode = '55000',
                    hint = case when v_run.kind = 'test' and v_run.status = 'active'
                                then format('clean it up first: insert into recovery_runs (protection_group_id, kind, test_run_id) '
                                            'values (%L, ''cleanup'', %L)', old.id, v_run.id)
                                when v_run.kind = 'failover' and v_run.status = 'awaiting_commit'
                                then 'commit or roll back the failover first (insert a commit or rollback run)'
                                when v_run.kind in ('test', 'cleanup') or v_run.status = 'pending'
                                then 'wait for it to end, or cancel it (update recovery_runs set cancel_requested = true)'
                                else 'wait for it to end' end;
    end if;
    if old.state in ('recovering', 'awaiting_commit', 'failed_over') then
        raise exception 'protection_groups_delete_during_recovery: protection group % is % (direction %): deleting it '
                        'would lose which site runs its VMs', old.name, old.state, old.direction
              using errcode = '55000',
                    hint = case old.state
                               when 'failed_over' then 'its VMs run at site B: reprotect it (insert a reprotect run) and '
                                                        'fail back first, or keep the row'
                               when 'awaiting_commit' then 'commit or roll back the failover first'
                               else 'a failed planned_migration or failover is undone by a rollback run' end;
    end if;
    return old;
end $$;

revoke execute on function zerfaux.input_recovery_run(uuid), zerfaux.claimed_recovery_run(uuid, integer),
    zerfaux.complete_recovery_run(uuid, jsonb), zerfaux.failure_recovery_run(uuid, text, boolean),
    zerfaux.cancelled_recovery_run(uuid, text), zerfaux.recovery_run_left_site_b_untouched(uuid),
    zerfaux.protection_groups_guard_delete()
    from public, anon, authenticated;
grant execute on function zerfaux.input_recovery_run(uuid), zerfaux.claimed_recovery_run(uuid, integer),
    zerfaux.complete_recovery_run(uuid, jsonb), zerfaux.failure_recovery_run(uuid, text, boolean),
    zerfaux.cancelled_recovery_run(uuid, text), zerfaux.recovery_run_left_site_b_untouched(uuid)
    to service_role;
