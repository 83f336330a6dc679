-- A cancel of a running run reaches its operation also while that operation waits in the
-- queue: after a failed attempt (its retry not yet due) or after its listener died (released,
-- or its lease to expire). 20261201160000 marked only an operation that was running at that
-- moment, so a cancel landing between two attempts was lost and the test stayed up. The next
-- attempt is claimed with cancel_requested and runs the cleanup steps (handlers/recovery).

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
        elsif old.status = 'running' then
            update zerfaux.operations set cancel_requested = true
             where kind = 'recovery.run' and subject_id = new.id and status in ('queued', 'running');
            perform pg_notify('zerfaux_cancel', new.id::text);
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
                                  else 'it has ended; nothing is left to stop' end;
        end if;
    end if;
    return new;
end $$;
