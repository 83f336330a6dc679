-- Broadcast from Database as the Realtime wake-up (issue 16, section 2).
--
-- When Supabase Realtime is present, new work (an INSERT into zerfaux.operations, or a row given
-- back to 'queued') and a cancellation request on a replication job each send one broadcast on
-- the private topic 'zerfaux:operations' through realtime.send(payload, event, topic, private):
--   event 'operation'  payload {"id": <operation id>, "kind": <kind>}
--   event 'cancel'     payload {"id": <replication job id>}
-- Never row data: a hint says which row to look at, the claim decides.
--
-- The check is made at call time (to_regprocedure), so a realtime schema that appears after
-- this migration needs no migration of its own, only the policies below
-- (select zerfaux.install_broadcast_policies()). Nothing is sent until those policies exist:
-- a broadcast never goes out on a topic an API user could subscribe to. On bare Postgres the
-- triggers only look up realtime.send and return.
--
-- Who receives: Realtime authorizes a private channel by RLS on realtime.messages. The listener
-- joins with the server key (service_role, which bypasses RLS); the two restrictive policies
-- below keep anon and authenticated off the topic even when the application's own permissive
-- policies on realtime.messages would let them in (restrictive policies are ANDed with them).
-- realtime.send never aborts its caller (it turns errors into warnings); the exception block
-- here is a second guard, so an enqueue cannot fail because of Realtime.

create function zerfaux.broadcast_topic() returns text
language sql immutable set search_path = pg_catalog, pg_temp as $$
    select 'zerfaux:operations'::text
$$;

-- True when a broadcast would go out: realtime.send exists and both policies are in place.
create function zerfaux.broadcast_ready() returns boolean
language sql stable set search_path = pg_catalog, pg_temp as $$
    select to_regprocedure('realtime.send(jsonb,text,text,boolean)') is not null
       and (select count(*) from pg_catalog.pg_policies
             where schemaname = 'realtime' and tablename = 'messages'
               and policyname in ('zerfaux_topic_not_readable_by_api_users',
                                  'zerfaux_topic_not_writable_by_api_users')) = 2
$$;

-- Creates the policies on realtime.messages when the table exists; true when they are in place.
-- Run by the migration, and by an administrator after enabling Realtime on a project that had
-- none when Zerfaux was installed.
create function zerfaux.install_broadcast_policies() returns boolean
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    if to_regclass('realtime.messages') is null then
        return false;
    end if;
    if not exists (select 1 from pg_catalog.pg_policies
                    where schemaname = 'realtime' and tablename = 'messages'
                      and policyname = 'zerfaux_topic_not_readable_by_api_users') then
        execute format('create policy zerfaux_topic_not_readable_by_api_users on realtime.messages '
                       'as restrictive for select to anon, authenticated '
                       'using (topic is distinct from %L)', zerfaux.broadcast_topic());
    end if;
    if not exists (select 1 from pg_catalog.pg_policies
                    where schemaname = 'realtime' and tablename = 'messages'
                      and policyname = 'zerfaux_topic_not_writable_by_api_users') then
        execute format('create policy zerfaux_topic_not_writable_by_api_users on realtime.messages '
                       'as restrictive for insert to anon, authenticated '
                       'with check (topic is distinct from %L)', zerfaux.broadcast_topic());
    end if;
    return true;
exception when insufficient_privilege then
    -- Not the owner of realtime.messages here: no policies, so no broadcast (broadcast_ready).
    raise warning 'zerfaux: cannot create the policies on realtime.messages (%); broadcasts stay off', sqlerrm;
    return false;
end $$;

-- One broadcast, or nothing; never an error for the caller.
-- The call is dynamic because realtime.send may appear after this migration (and a static one
-- would not pass plpgsql_check on a database without it).
create function zerfaux.broadcast(p_event text, p_payload jsonb) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    v_send constant regprocedure := to_regprocedure('realtime.send(jsonb,text,text,boolean)');
begin
    if v_send is null or not zerfaux.broadcast_ready() then
        return;
    end if;
    begin
        execute format('select %s($1, $2, $3, true)', v_send::regproc)
            using p_payload, p_event, zerfaux.broadcast_topic();
    exception when others then
        raise warning 'zerfaux: broadcast of % failed: %', p_event, sqlerrm;
    end;
end $$;

create function zerfaux.operations_broadcast() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    perform zerfaux.broadcast('operation', jsonb_build_object('id', new.id, 'kind', new.kind));
    return null;
end $$;

create function zerfaux.cancel_broadcast() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    perform zerfaux.broadcast('cancel', jsonb_build_object('id', new.id));
    return null;
end $$;

create trigger operations_broadcast_new after insert on zerfaux.operations
    for each row execute function zerfaux.operations_broadcast();
create trigger operations_broadcast_requeued after update of status on zerfaux.operations
    for each row when (new.status = 'queued' and old.status is distinct from 'queued')
    execute function zerfaux.operations_broadcast();
create trigger replication_jobs_broadcast_cancel after update of cancel_requested on public.replication_jobs
    for each row when (new.cancel_requested and not old.cancel_requested)
    execute function zerfaux.cancel_broadcast();

revoke execute on function zerfaux.broadcast_topic() from public, anon, authenticated;
revoke execute on function zerfaux.broadcast_ready() from public, anon, authenticated;
revoke execute on function zerfaux.install_broadcast_policies() from public, anon, authenticated;
revoke execute on function zerfaux.broadcast(text, jsonb) from public, anon, authenticated;
revoke execute on function zerfaux.operations_broadcast() from public, anon, authenticated;
revoke execute on function zerfaux.cancel_broadcast() from public, anon, authenticated;
-- Every engine function is service_role's (test_rls.test_execute): the server key may ask
-- whether broadcasts go out, and create the policies after Realtime was enabled.
grant execute on function zerfaux.broadcast_topic() to service_role;
grant execute on function zerfaux.broadcast_ready() to service_role;
grant execute on function zerfaux.install_broadcast_policies() to service_role;
grant execute on function zerfaux.broadcast(text, jsonb) to service_role;

select zerfaux.install_broadcast_policies();
