-- Kind vcenter.sync: read a vCenter's inventory and write it into vcenter_vms and
-- vcenter_datastores. Subject: a public.vcenters row. Asked by setting sync_requested_at; a
-- request while a sync runs is not dropped: the running sync is marked rerun_requested and a new
-- one is queued when it ends (zerfaux.enqueue, p_rerun), so the newest request is always served
-- by a sync that started after it. Handler: handlers/vcenter_sync.py.

create function zerfaux.input_vcenter_sync(p_subject uuid)
returns jsonb language sql stable security definer set search_path = zerfaux, public, pg_temp as $$
    select jsonb_build_object('vcenter', to_jsonb(v)) from public.vcenters v where v.id = p_subject
$$;

-- The result is the whole inventory; the operation keeps only the counts.
create function zerfaux.complete_vcenter_sync(p_subject uuid, p_result jsonb)
returns jsonb language sql security definer set search_path = zerfaux, public, pg_temp as $$
    select zerfaux.apply_inventory(p_subject, p_result)
$$;

create function zerfaux.failure_vcenter_sync(p_subject uuid, p_message text, p_final boolean)
returns void language sql security definer set search_path = zerfaux, public, pg_temp as $$
    update public.vcenters set last_sync_error = p_message where id = p_subject
$$;

create or replace function zerfaux.on_vcenter_change() returns trigger
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
begin
    if new.sync_requested_at is not null
       and (tg_op = 'INSERT' or new.sync_requested_at is distinct from old.sync_requested_at) then
        perform zerfaux.enqueue('vcenter.sync', new.id, null, true);
    end if;
    return null;
end $$;

insert into zerfaux.kinds (kind, subject_table, input_fn, complete_fn, failure_fn)
values ('vcenter.sync', 'public.vcenters', 'zerfaux.input_vcenter_sync',
        'zerfaux.complete_vcenter_sync', 'zerfaux.failure_vcenter_sync');

-- Not from authenticated: it holds only the explicit grants of the policies' helpers
-- (20261201100000_operators.sql), which must survive; PUBLIC's default is what goes.
revoke execute on all functions in schema zerfaux from public, anon;
grant execute on all functions in schema zerfaux to service_role;
