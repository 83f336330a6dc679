-- Kind vm.storage_vmotion: move a protected VM's files onto its group's protection datastore.
-- Subject: a public.protected_vms row; asked by setting needs_storage_vmotion. On success the
-- flag is cleared and vcenter_vms shows the VM on the new datastore. Handler:
-- handlers/storage_vmotion.py.

create function zerfaux.input_vm_storage_vmotion(p_subject uuid)
returns jsonb language sql stable security definer set search_path = zerfaux, public, pg_temp as $$
    select zerfaux.protected_vm_rows(p_subject)
$$;

create function zerfaux.complete_vm_storage_vmotion(p_subject uuid, p_result jsonb)
returns jsonb language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
declare
    v_ds text := p_result ->> 'datastore';
begin
    update public.protected_vms set needs_storage_vmotion = false, last_error = null, updated_at = now()
     where id = p_subject;
    -- The VM's files now sit on the protection datastore, under the same directories.
    update public.vcenter_vms v
       set datastore = v_ds,
           datastores = jsonb_build_array(v_ds),
           disks = coalesce((select jsonb_agg(d || jsonb_build_object(
                        'datastore', v_ds,
                        'file', regexp_replace(d ->> 'file', '^\[[^]]*\]', '[' || v_ds || ']')))
                      from jsonb_array_elements(v.disks) d), '[]')
      from public.protected_vms p
     where p.id = p_subject and v.id = p.vm_id;
    return p_result;
end $$;

create function zerfaux.failure_protected_vm(p_subject uuid, p_message text, p_final boolean)
returns void language sql security definer set search_path = zerfaux, public, pg_temp as $$
    update public.protected_vms set last_error = p_message, updated_at = now() where id = p_subject
$$;

create function zerfaux.on_protected_vm_storage_vmotion() returns trigger
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
begin
    if new.needs_storage_vmotion and (tg_op = 'INSERT' or not old.needs_storage_vmotion) then
        perform zerfaux.enqueue('vm.storage_vmotion', new.id);
    end if;
    return null;
end $$;

-- The old trigger enqueued both VM kinds; each kind now has its own.
drop trigger protected_vms_enqueue on public.protected_vms;
drop function zerfaux.on_protected_vm_change();

create trigger protected_vms_enqueue_storage_vmotion
    after insert or update of needs_storage_vmotion on public.protected_vms
    for each row execute function zerfaux.on_protected_vm_storage_vmotion();

insert into zerfaux.kinds (kind, subject_table, input_fn, complete_fn, failure_fn)
values ('vm.storage_vmotion', 'public.protected_vms', 'zerfaux.input_vm_storage_vmotion',
        'zerfaux.complete_vm_storage_vmotion', 'zerfaux.failure_protected_vm');

-- Not from authenticated: it holds only the explicit grants of the policies' helpers
-- (20261201100000_operators.sql), which must survive; PUBLIC's default is what goes.
revoke execute on all functions in schema zerfaux from public, anon;
grant execute on all functions in schema zerfaux to service_role;
