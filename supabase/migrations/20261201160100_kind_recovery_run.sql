-- Kind recovery.run: carry out a recovery run (20261201160000_recovery_runs.sql) at the DR site.
-- Subject: a public.recovery_runs row (status pending -> running -> active | completed | failed |
-- cancelled). The handler (handlers/recovery/) writes its plan and each step through the
-- operation's progress ({"plan": [...]} and {"steps": [...]}, below); its result ends the run.
-- No concurrency key: the rules allow one test per group, and a cleanup works on its test's
-- objects only. Cancel: set cancel_requested on the run. The shapes are in docs/recovery.md,
-- "Recovery runs: the rows".

-- What the handler is given. A cleanup also gets its test run and the test's steps (their
-- detail says what the test made); for a test those two are null and [].
create function zerfaux.input_recovery_run(p_subject uuid)
returns jsonb language plpgsql stable security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_run public.recovery_runs;
    v_group public.protection_groups;
    v_target public.replication_targets;
    v_test public.recovery_runs;
begin
    select * into v_run from public.recovery_runs where id = p_subject;
    if not found then return null; end if;
    select * into v_group from public.protection_groups where id = v_run.protection_group_id;
    select * into v_target from public.replication_targets where id = v_group.replication_target_id;
    if v_run.test_run_id is not null then
        select * into v_test from public.recovery_runs where id = v_run.test_run_id;
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
              from public.recovery_run_steps s where s.run_id = v_test.id), '[]'::jsonb));
end $$;

-- An attempt starts: the run is running from its first start. Data loss is fixed then: what a
-- failover at this moment would lose, from the point's creation on the source.
create function zerfaux.claimed_recovery_run(p_subject uuid, p_attempt integer)
returns void language sql security definer set search_path = zerfaux, public, pg_temp as $$
    update public.recovery_runs r
       set status = 'running', started_at = coalesce(r.started_at, now()),
           data_loss_seconds = coalesce(r.data_loss_seconds, (
               select round(extract(epoch from coalesce(r.started_at, now()) - p.created_at)::numeric, 3)
                 from public.recovery_points p where p.id = r.recovery_point_id))
     where r.id = p_subject and r.status in ('pending', 'running')
$$;

-- Live progress: {"plan": [{seq, name, protected_vm_id}, ...]} writes the whole plan as pending
-- steps (again: nothing changes); {"steps": [{seq, status, detail, error}, ...]} updates steps.
-- A step going running in a new attempt of the operation gets a new started_at, the previous
-- start kept in detail.previous_attempts (detail.attempt and detail.worker say which attempt
-- started it: a worker that took over after a kill or a release starts anew); an end
-- (done, failed, skipped, warning) sets finished_at; detail is merged. The same report twice (a
-- call retried after its answer was lost) changes no time. Any other key is the handler's own
-- progress, kept on the operation only.
create function zerfaux.progress_recovery_run(p_subject uuid, p_progress jsonb)
returns void language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_step jsonb;
    v_seq integer;
    v_status text;
    v_old public.recovery_run_steps;
    v_attempt integer;
    v_worker text;
    v_fresh boolean;
    v_repeat boolean;
begin
    if jsonb_typeof(p_progress -> 'plan') = 'array' then
        insert into public.recovery_run_steps (run_id, seq, name, protected_vm_id, detail)
        select p_subject, (e ->> 'seq')::integer, e ->> 'name', (e ->> 'protected_vm_id')::uuid,
               case when jsonb_typeof(e -> 'detail') = 'object' then e -> 'detail' else '{}'::jsonb end
          from jsonb_array_elements(p_progress -> 'plan') as e
        on conflict (run_id, seq) do nothing;
    end if;
    if jsonb_typeof(p_progress -> 'steps') is distinct from 'array' then
        return;
    end if;
    select o.attempts, o.worker_id into v_attempt, v_worker from zerfaux.operations o
     where o.kind = 'recovery.run' and o.subject_id = p_subject and o.status = 'running';
    for v_step in select e from jsonb_array_elements(p_progress -> 'steps') as e loop
        v_seq := (v_step ->> 'seq')::integer;
        v_status := v_step ->> 'status';
        select * into v_old from public.recovery_run_steps s
         where s.run_id = p_subject and s.seq = v_seq for update;
        if not found then
            raise exception 'recovery run %: step % is not in its plan: send {"plan": [...]} with it first',
                            p_subject, v_seq
                using errcode = 'invalid_parameter_value';
        end if;
        v_fresh := v_status = 'running'
                   and not (v_old.status = 'running'
                            and (v_old.detail ->> 'attempt') is not distinct from v_attempt::text
                            and (v_old.detail ->> 'worker') is not distinct from v_worker);
        v_repeat := v_status is not distinct from v_old.status and not v_fresh;
        update public.recovery_run_steps s
           set status = coalesce(v_status, s.status),
               started_at = case when v_fresh then now() else s.started_at end,
               finished_at = case when v_repeat then s.finished_at
                                  when v_status in ('done', 'failed', 'skipped', 'warning') then now()
                                  when v_status in ('running', 'pending') then null
                                  else s.finished_at end,
               error = case when v_step ? 'error' then v_step ->> 'error'
                            when v_status in ('running', 'done') then null
                            else s.error end,
               detail = s.detail
                        || case when v_fresh and s.started_at is not null
                                then jsonb_build_object('previous_attempts',
                                         coalesce(s.detail -> 'previous_attempts', '[]'::jsonb)
                                         || jsonb_build_array(jsonb_build_object(
                                                'attempt', s.detail -> 'attempt', 'worker', s.detail -> 'worker',
                                                'started_at', s.started_at, 'finished_at', s.finished_at,
                                                'status', s.status, 'error', s.error)))
                                else '{}'::jsonb end
                        || case when v_fresh then jsonb_build_object('attempt', v_attempt, 'worker', v_worker)
                                else '{}'::jsonb end
                        || case when jsonb_typeof(v_step -> 'detail') = 'object' then v_step -> 'detail'
                                else '{}'::jsonb end
         where s.id = v_old.id;
    end loop;
end $$;

-- Success. A test is up: 'active', with its RTO (from the start to the last VM ready or given
-- up on; without wait_ready steps, to the last power-on) and its data loss again from the start. A cleanup ends itself and its test,
-- and marks the test's recovery point tested (only when the test got as far as active: a
-- failed test's leftovers removed test nothing, and that test stays failed).
create function zerfaux.complete_recovery_run(p_subject uuid, p_result jsonb)
returns jsonb language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_run public.recovery_runs;
    v_test public.recovery_runs;
    v_report jsonb := case when jsonb_typeof(p_result -> 'report') = 'object' then p_result -> 'report' end;
begin
    select * into v_run from public.recovery_runs where id = p_subject;
    if not found then
        return p_result;
    end if;
    if v_run.kind = 'cleanup' then
        select * into v_test from public.recovery_runs where id = v_run.test_run_id for update;
        update public.recovery_runs
           set status = 'completed', completed_at = now(), error = null, report = v_report
         where id = p_subject;
        if v_test.status = 'active' then
            update public.recovery_runs set status = 'completed', completed_at = now() where id = v_test.id;
            update public.recovery_points set tested_at = now() where id = v_test.recovery_point_id;
        end if;
    else
        update public.recovery_runs r
           set status = 'active', completed_at = null, error = null, report = v_report,
               data_loss_seconds = coalesce((
                   select round(extract(epoch from r.started_at - p.created_at)::numeric, 3)
                     from public.recovery_points p where p.id = r.recovery_point_id), r.data_loss_seconds),
               rto_seconds = (
                   select round(extract(epoch from coalesce(
                              max(s.finished_at) filter (where s.name = 'wait_ready'),
                              max(s.finished_at) filter (where s.name = 'power_on')) - r.started_at)::numeric, 3)
                     from public.recovery_run_steps s where s.run_id = r.id)
         where r.id = p_subject;
    end if;
    return p_result;
end $$;

-- A retry keeps the run running (its steps say where it is) with the last error; the end fails it.
create function zerfaux.failure_recovery_run(p_subject uuid, p_message text, p_final boolean)
returns void language sql security definer set search_path = zerfaux, public, pg_temp as $$
    update public.recovery_runs r
       set status = case when p_final then 'failed' else r.status end,
           error = p_message,
           completed_at = case when p_final then now() else r.completed_at end
     where r.id = p_subject
$$;

-- Ended on request (a cancelled test has run its cleanup steps first).
create function zerfaux.cancelled_recovery_run(p_subject uuid, p_message text)
returns void language sql security definer set search_path = zerfaux, public, pg_temp as $$
    update public.recovery_runs
       set status = 'cancelled', completed_at = now(), error = p_message
     where id = p_subject
$$;

-- A new run is queued. No released function: a run given back stays running for the next
-- worker, which resumes at its first unfinished step.
create function zerfaux.on_recovery_run_insert() returns trigger
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
begin
    perform zerfaux.enqueue('recovery.run', new.id);
    return null;
end $$;

create trigger recovery_runs_enqueue after insert on public.recovery_runs
    for each row execute function zerfaux.on_recovery_run_insert();

insert into zerfaux.kinds (kind, subject_table, input_fn, claimed_fn, progress_fn, complete_fn,
                           failure_fn, cancelled_fn)
values ('recovery.run', 'public.recovery_runs', 'zerfaux.input_recovery_run',
        'zerfaux.claimed_recovery_run', 'zerfaux.progress_recovery_run',
        'zerfaux.complete_recovery_run', 'zerfaux.failure_recovery_run',
        'zerfaux.cancelled_recovery_run');

-- A recovery run's operation is readable by whoever reads the run (the policy on
-- zerfaux.operations asks this helper).
create or replace function zerfaux.operation_subjects(p_role text) returns table (kind text, subject_id uuid)
language sql stable security definer set search_path = zerfaux, public, pg_temp as $$
    select 'vcenter.sync', v from zerfaux.vcenter_ids(p_role) v
    union all
    select 'replication.run', j.id from public.replication_jobs j
     where j.protection_group_id in (select zerfaux.group_ids(p_role))
    union all
    select k.kind, p.id from public.protected_vms p
     cross join (values ('vm.storage_vmotion'), ('vm.dr_shell')) k (kind)
     where p.protection_group_id in (select zerfaux.group_ids(p_role))
    union all
    select 'recovery.run', r.id from public.recovery_runs r
     where r.protection_group_id in (select zerfaux.group_ids(p_role))
$$;

revoke execute on function zerfaux.input_recovery_run(uuid), zerfaux.claimed_recovery_run(uuid, integer),
    zerfaux.progress_recovery_run(uuid, jsonb), zerfaux.complete_recovery_run(uuid, jsonb),
    zerfaux.failure_recovery_run(uuid, text, boolean), zerfaux.cancelled_recovery_run(uuid, text),
    zerfaux.on_recovery_run_insert() from public, anon, authenticated;
grant execute on function zerfaux.input_recovery_run(uuid), zerfaux.claimed_recovery_run(uuid, integer),
    zerfaux.progress_recovery_run(uuid, jsonb), zerfaux.complete_recovery_run(uuid, jsonb),
    zerfaux.failure_recovery_run(uuid, text, boolean), zerfaux.cancelled_recovery_run(uuid, text)
    to service_role;
