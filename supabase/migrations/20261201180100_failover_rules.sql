-- The rules of every kind of recovery run (issue 14; docs/recovery.md, "Failover runs: the
-- rows"), replacing those of 20261201160000_recovery_runs.sql: planned_migration, failover,
-- commit, rollback and reprotect are no longer refused as unavailable
-- (recovery_runs_kind_available is gone), and each is checked against the group's state.
-- Who may insert which kind is unchanged (recovery_runs_allowed_insert: admins for these).
--
-- At insert the rules also fill acts_on_run_id (commit, rollback, reprotect) and
-- group_state_before (every kind), and a planned_migration or failover turns the group's state
-- to 'recovering' in the same transaction: nothing else (a test, a scheduled replication) starts
-- on the group from then on.

create or replace function zerfaux.recovery_runs_rules() returns trigger
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_group public.protection_groups;
    v_point public.recovery_points;
    v_test public.recovery_runs;
    v_other public.recovery_runs;
    v_acts public.recovery_runs;
    v_unmapped text;
    v_key text;
    v_value jsonb;
    v_allowed text[];
    v_recovering boolean;
begin
    -- What the engine writes is the engine's: a run starts pending, whoever inserts it.
    new.status := 'pending';
    new.cancel_requested := false;
    new.started_at := null;
    new.completed_at := null;
    new.rto_seconds := null;
    new.data_loss_seconds := null;
    new.error := null;
    new.report := null;
    new.created_at := now();
    new.acts_on_run_id := null;
    new.group_state_before := null;

    -- Locked: two runs of one group asked for at once queue up here, and the state read below
    -- is the one the run starts from.
    select * into v_group from public.protection_groups g where g.id = new.protection_group_id
       for no key update;
    if not found then
        return new;  -- the foreign key refuses it, naming the column
    end if;
    new.group_state_before := v_group.state;
    v_recovering := new.kind in ('planned_migration', 'failover', 'commit', 'rollback', 'reprotect');

    if new.test_run_id is not null and new.kind <> 'cleanup' then
        raise exception 'recovery_runs_test_run_only_for_cleanup: a % run takes no test_run_id', new.kind
            using errcode = 'check_violation', column = 'test_run_id',
                  hint = 'leave test_run_id null; a cleanup run names the test it removes';
    end if;

    -- recovery_runs_options: the keys each kind knows, with their JSON types (docs/recovery.md).
    -- A test's and a cleanup's options are the handler's, as before.
    if v_recovering then
        v_allowed := case new.kind
            when 'planned_migration' then array['force_power_off']
            when 'failover' then array['force_power_off', 'skip_source', 'fence_timeout_seconds']
            when 'reprotect' then array['discard_source_changes']
            else array['auto'] end;
        for v_key, v_value in select e.key, e.value from jsonb_each(new.options) e order by e.key loop
            if not v_key = any(v_allowed) then
                raise exception 'recovery_runs_options: a % run knows no option %', new.kind, v_key
                    using errcode = 'check_violation', column = 'options',
                          hint = format('the options of a %s run are: %s (docs/recovery.md)', new.kind,
                                        array_to_string(v_allowed, ', '));
            elsif v_key = 'fence_timeout_seconds' then
                if (case when jsonb_typeof(v_value) = 'number' then v_value::numeric not between 0 and 86400
                         else true end) then
                    raise exception 'recovery_runs_options: option fence_timeout_seconds must be a number of '
                                    'seconds between 0 and 86400, not %', v_value
                        using errcode = 'check_violation', column = 'options',
                              hint = 'for example {"fence_timeout_seconds": 60} (the default)';
                end if;
            elsif jsonb_typeof(v_value) <> 'boolean' then
                raise exception 'recovery_runs_options: option % must be true or false, not %', v_key, v_value
                    using errcode = 'check_violation', column = 'options',
                          hint = format('for example {"%s": true}, without quotes around true', v_key);
            end if;
        end loop;
    end if;

    -- recovery_runs_one_run_per_group: one run of the group at a time. A cleanup may run beside
    -- a test (its own) and a test beside a cleanup (of an earlier one); the five kinds of issue
    -- 14 wait for a cleanup too (a trigger's rule only: the index leaves cleanups out).
    if new.kind <> 'cleanup' then
        select * into v_other from public.recovery_runs r
         where r.protection_group_id = new.protection_group_id
           and ((r.status in ('pending', 'running') and (r.kind <> 'cleanup' or v_recovering))
                or (r.kind = 'test' and r.status = 'active'))
         order by r.created_at desc
         limit 1;
        if found then
            if new.kind = 'test' and v_other.kind = 'test' then
                -- as before: the test's own rule, its own name
                raise exception 'recovery_runs_one_active_test_per_group: protection group % (%) already has a % test run (%)',
                                v_group.name, v_group.id, v_other.status, v_other.id
                    using errcode = 'unique_violation', constraint = 'recovery_runs_one_active_test_per_group',
                          hint = case when v_other.status = 'active'
                                      then format('clean it up first: insert into recovery_runs (protection_group_id, kind, '
                                                  'test_run_id) values (%L, ''cleanup'', %L)', v_group.id, v_other.id)
                                      else 'wait until it is active and clean it up, or cancel it (cancel_requested = true)' end;
            end if;
            raise exception 'recovery_runs_one_run_per_group: protection group % (%) already has a % % run (%): '
                            'one recovery run per group at a time', v_group.name, v_group.id, v_other.status,
                            v_other.kind, v_other.id
                using errcode = 'unique_violation', constraint = 'recovery_runs_one_run_per_group',
                      hint = case when v_other.kind = 'test' and v_other.status = 'active'
                                  then format('clean the test up first: insert into recovery_runs (protection_group_id, '
                                              'kind, test_run_id) values (%L, ''cleanup'', %L)', v_group.id, v_other.id)
                                  when v_other.kind in ('test', 'cleanup') or v_other.status = 'pending'
                                  then 'wait for it to end, or cancel it (update recovery_runs set cancel_requested = '
                                       'true where id = ...), then insert the run again'
                                  else 'wait for it to end (a running ' || v_other.kind || ' run cannot be cancelled); '
                                       'if it fails, a rollback run undoes it' end;
        end if;
        if new.kind = 'test' and v_group.state <> 'protected' then
            raise exception 'recovery_runs_one_run_per_group: protection group % (%) is %, not protected: a test runs '
                            'only while the group is protected', v_group.name, v_group.id, v_group.state
                using errcode = 'object_not_in_prerequisite_state',
                      hint = case v_group.state
                                 when 'awaiting_commit' then 'commit or roll back the failover first (insert a commit or '
                                                              'rollback run)'
                                 when 'failed_over' then 'the group''s VMs run at site B: reprotect it first (insert a '
                                                          'reprotect run)'
                                 else 'a failed planned_migration or failover is undone by a rollback run' end;
        end if;
    end if;

    -- recovery_runs_state: where each kind may start from, and what it acts on.
    if new.kind in ('planned_migration', 'failover') then
        if v_group.state <> 'protected' then
            raise exception 'recovery_runs_state: protection group % (%) is %: a % starts only from state protected',
                            v_group.name, v_group.id, v_group.state, new.kind
                using errcode = 'object_not_in_prerequisite_state',
                      hint = case v_group.state
                                 when 'awaiting_commit' then 'a failover is up and awaits commit: insert a commit run to '
                                                              'keep it or a rollback run to undo it'
                                 when 'failed_over' then 'the group''s VMs already run at site B: insert a reprotect run '
                                                          'first; a failback is then a planned_migration'
                                 else 'its last planned_migration or failover failed half-way: insert a rollback run to '
                                      'undo it' end;
        end if;
    elsif new.kind = 'commit' then
        if v_group.state <> 'awaiting_commit' then
            raise exception 'recovery_runs_state: protection group % (%) is %: a commit needs a failover awaiting '
                            'commit', v_group.name, v_group.id, v_group.state
                using errcode = 'object_not_in_prerequisite_state',
                      hint = case v_group.state
                                 when 'failed_over' then 'the failover is already final: insert a reprotect run next'
                                 when 'recovering' then 'a failed planned_migration or failover is undone by a rollback '
                                                        'run, never committed'
                                 else 'nothing awaits commit: insert a failover run first' end;
        end if;
        select * into v_acts from public.recovery_runs r
         where r.protection_group_id = new.protection_group_id and r.kind = 'failover'
           and r.status = 'awaiting_commit'
         order by r.created_at desc limit 1;
    elsif new.kind = 'rollback' then
        select * into v_acts from public.recovery_runs r
         where r.protection_group_id = new.protection_group_id and r.kind in ('planned_migration', 'failover')
         order by r.created_at desc, r.started_at desc nulls last limit 1;
        if not (v_group.state = 'awaiting_commit'
                or (v_group.state = 'recovering' and v_acts.status is not distinct from 'failed')) then
            raise exception 'recovery_runs_state: protection group % (%) is %: a rollback undoes a failover awaiting '
                            'commit or a failed planned_migration or failover', v_group.name, v_group.id, v_group.state
                using errcode = 'object_not_in_prerequisite_state',
                      hint = case v_group.state
                                 when 'failed_over' then 'a completed migration or committed failover is not rolled '
                                                          'back: insert a reprotect run, then fail back with a '
                                                          'planned_migration'
                                 when 'recovering' then 'its planned_migration or failover has not failed: wait for it '
                                                        'to end'
                                 else 'nothing to roll back: the group is protected' end;
        end if;
        if v_group.state = 'awaiting_commit' then
            select * into v_acts from public.recovery_runs r
             where r.protection_group_id = new.protection_group_id and r.kind = 'failover'
               and r.status = 'awaiting_commit'
             order by r.created_at desc limit 1;
        end if;
    elsif new.kind = 'reprotect' then
        if v_group.state <> 'failed_over' then
            raise exception 'recovery_runs_state: protection group % (%) is %: a reprotect starts only from state '
                            'failed_over', v_group.name, v_group.id, v_group.state
                using errcode = 'object_not_in_prerequisite_state',
                      hint = case v_group.state
                                 when 'awaiting_commit' then 'commit the failover first (insert a commit run), or roll it '
                                                              'back'
                                 when 'recovering' then 'a failed planned_migration or failover is undone by a rollback '
                                                        'run'
                                 else 'the group is protected already (direction ' || v_group.direction || ')' end;
        end if;
        select * into v_acts from public.recovery_runs r
         where r.protection_group_id = new.protection_group_id and r.kind in ('planned_migration', 'failover')
           and r.status = 'completed' and not coalesce(r.report ? 'rolled_back_by', false)
         order by r.created_at desc, r.started_at desc nulls last limit 1;
    end if;
    if v_acts.id is not null then
        new.acts_on_run_id := v_acts.id;
    end if;

    -- recovery_runs_point_on_target: the point a test or a failover brings up is on the site it
    -- comes up at (forward: the replication target; reverse: the source).
    if new.kind in ('test', 'failover') then
        if new.recovery_point_id is null then
            select * into v_point from public.recovery_points p
             where p.protection_group_id = new.protection_group_id and p.removed_at is null
               and case when v_group.direction = 'reverse' then p.on_source else p.on_target end
             order by p.created_at desc, p.id desc
             limit 1;
            if not found then
                raise exception 'recovery_runs_point_on_target: protection group % (%) has no recovery point on its '
                                '%: replicate first', v_group.name, v_group.id,
                                case when v_group.direction = 'reverse' then 'source (direction reverse)'
                                     else 'replication target' end
                    using errcode = 'check_violation', column = 'recovery_point_id',
                          hint = 'replicate first (insert into replication_jobs (protection_group_id) values (...)), '
                                 'then insert the ' || new.kind || ' run again';
            end if;
            new.recovery_point_id := v_point.id;
        else
            select * into v_point from public.recovery_points p where p.id = new.recovery_point_id;
            if found and v_point.protection_group_id <> new.protection_group_id then
                raise exception 'recovery_runs_point_on_target: recovery point % belongs to another protection group, '
                                'not to % (%)', v_point.id, v_group.name, v_group.id
                    using errcode = 'check_violation', column = 'recovery_point_id',
                          hint = 'name a recovery point of this group, or leave recovery_point_id null for the newest';
            elsif found and (v_point.removed_at is not null
                             or not case when v_group.direction = 'reverse' then v_point.on_source
                                         else v_point.on_target end) then
                raise exception 'recovery_runs_point_on_target: recovery point % (snapshot %) is no longer on the '
                                '%', v_point.id, v_point.snapshot_name,
                                case when v_group.direction = 'reverse' then 'source (direction reverse)'
                                     else 'replication target' end
                    using errcode = 'check_violation', column = 'recovery_point_id',
                          hint = case when v_group.direction = 'reverse'
                                      then 'name a point with on_source = true, or leave recovery_point_id null for the newest'
                                      else 'name a point with on_target = true, or leave recovery_point_id null for the newest' end;
            end if;
            -- not found: the foreign key refuses it
        end if;
    elsif new.kind in ('planned_migration', 'reprotect') then
        if new.recovery_point_id is not null then
            raise exception 'recovery_runs_point_on_target: a % run takes no recovery_point_id%', new.kind,
                            case when new.kind = 'planned_migration'
                                 then ': its point is the final snapshot it makes with the VMs off' else '' end
                using errcode = 'check_violation', column = 'recovery_point_id',
                      hint = case when new.kind = 'planned_migration'
                                  then 'leave recovery_point_id null; to bring up an older point, insert a failover run'
                                  else 'leave recovery_point_id null: a reprotect starts from the newest snapshot both '
                                       'sites share' end;
        end if;
    elsif new.kind in ('commit', 'rollback') then
        new.recovery_point_id := v_acts.recovery_point_id;
    end if;

    -- recovery_runs_networks_mapped: every NIC has a network to join at site B.
    if new.kind in ('test', 'planned_migration', 'failover') then
        select string_agg(format('%s (VMs %s)', u.source_network, array_to_string(u.vm_names, ', ')), '; '
                          order by u.source_network)
          into v_unmapped
          from zerfaux.unmapped_networks(new.protection_group_id) u;
        if v_unmapped is not null then
            raise exception 'recovery_runs_networks_mapped: protection group % (%) has NICs on networks with no '
                            'network mapping: %', v_group.name, v_group.id, v_unmapped
                using errcode = 'check_violation',
                      hint = 'insert a network_mappings row (protection_group_id, source_network, recovery_network, '
                             'test_network) for each of these networks, then insert the run again';
        end if;
    end if;

    if new.kind = 'cleanup' then
        if new.test_run_id is null then
            raise exception 'recovery_runs_cleanup_of_an_active_test: a cleanup run needs test_run_id, the test it removes'
                using errcode = 'check_violation', column = 'test_run_id',
                      hint = 'set test_run_id to the id of the group''s active (or failed) test run';
        end if;
        -- Locked: two cleanups of one test, or a cleanup and the test's own end, queue up here.
        select * into v_test from public.recovery_runs r where r.id = new.test_run_id for update;
        if not found then
            return new;  -- the foreign key refuses it
        end if;
        if v_test.kind <> 'test' or v_test.protection_group_id <> new.protection_group_id
           or v_test.status not in ('active', 'failed') then
            raise exception 'recovery_runs_cleanup_of_an_active_test: run % is a % run of % in status %; a cleanup '
                            'removes an active (or failed) test of its own protection group % (%)',
                            v_test.id, v_test.kind,
                            case when v_test.protection_group_id = new.protection_group_id
                                 then 'this group' else 'another group' end,
                            v_test.status, v_group.name, v_group.id
                using errcode = 'check_violation', column = 'test_run_id',
                      hint = case when v_test.kind = 'test' and v_test.status in ('pending', 'running')
                                  then 'wait until the test is active, or cancel it (cancel_requested = true): a '
                                       'cancelled test removes what it made by itself'
                                  else 'name a test run of this group whose status is active or failed' end;
        end if;
        select * into v_other from public.recovery_runs r
         where r.test_run_id = new.test_run_id and r.kind = 'cleanup'
           and r.status in ('pending', 'running', 'completed')
         limit 1;
        if found then
            raise exception 'recovery_runs_one_cleanup_per_test: test run % already has a % cleanup run (%)',
                            v_test.id, v_other.status, v_other.id
                using errcode = 'unique_violation', constraint = 'recovery_runs_one_cleanup_per_test',
                      hint = 'wait for that cleanup; insert another only after it failed or was cancelled';
        end if;
        new.recovery_point_id := v_test.recovery_point_id;
    end if;

    -- Accepted: from now on the group is recovering (no test, no scheduled replication).
    if new.kind in ('planned_migration', 'failover') then
        update public.protection_groups
           set state = 'recovering', state_changed_at = now()
         where id = v_group.id;
    end if;
    return new;
end $$;

-- Cancelling a pending run ends it at once (a planned_migration or failover gives the group its
-- state back); a running test or cleanup is told through its heartbeat, as before. A running
-- planned_migration, failover, commit, rollback or reprotect is refused: stopping one half-way
-- would leave VMs and datasets between the two sites; a failed one is undone by a rollback.
create or replace function zerfaux.on_recovery_run_cancel() returns trigger
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
begin
    if new.cancel_requested and not old.cancel_requested then
        if old.status = 'pending' then
            update zerfaux.operations
               set status = 'cancelled', finished_at = now(), worker_id = null,
                   lease_expires_at = null, last_error = 'cancelled before it started'
             where kind = 'recovery.run' and subject_id = new.id and status = 'queued';
            new.status := 'cancelled';
            new.completed_at := now();
            new.error := 'cancelled before it started';
            if old.kind in ('planned_migration', 'failover') then
                update public.protection_groups
                   set state = coalesce(old.group_state_before, 'protected'), state_changed_at = now()
                 where id = old.protection_group_id and state = 'recovering';
            end if;
        elsif old.status = 'running' and old.kind in ('test', 'cleanup') then
            update zerfaux.operations set cancel_requested = true
             where kind = 'recovery.run' and subject_id = new.id and status in ('queued', 'running');
            perform pg_notify('zerfaux_cancel', new.id::text);
        elsif old.status = 'running' then
            raise exception 'recovery_runs_cancel: recovery run % (kind %) is running: a running % cannot be '
                            'cancelled', old.id, old.kind, old.kind
                using errcode = 'object_not_in_prerequisite_state',
                      hint = 'wait for it to end; a failed planned_migration or failover is undone by a rollback run';
        else
            raise exception 'recovery_runs_cancel: recovery run % (kind %) is %: only a pending or running run can be '
                            'cancelled', old.id, old.kind, old.status
                using errcode = 'object_not_in_prerequisite_state',
                      hint = case when old.kind = 'test' and old.status in ('active', 'failed')
                                  then format('to remove what the test made, insert a cleanup run: insert into '
                                              'recovery_runs (protection_group_id, kind, test_run_id) values '
                                              '(%L, ''cleanup'', %L)', old.protection_group_id, old.id)
                                  when old.kind = 'cleanup' and old.status = 'failed'
                                  then 'insert a cleanup run again for its test run'
                                  when old.kind = 'failover' and old.status = 'awaiting_commit'
                                  then 'the failover is up: insert a commit run to keep it or a rollback run to undo it'
                                  when old.kind in ('planned_migration', 'failover') and old.status = 'failed'
                                  then 'a failed planned_migration or failover is undone by a rollback run'
                                  else 'it has ended; nothing is left to stop' end;
        end if;
    end if;
    return new;
end $$;

revoke execute on function zerfaux.recovery_runs_rules(), zerfaux.on_recovery_run_cancel()
    from public, anon, authenticated;
