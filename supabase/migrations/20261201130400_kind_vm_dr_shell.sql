-- Kind vm.dr_shell: create the protected VM's shell at the DR site, its disks on the replica.
-- Subject: a public.protected_vms row; asked by setting needs_dr_shell. It waits for a Storage
-- vMotion of the same VM that is still queued or running (waits_for): the shell attaches the
-- disks where that move puts them. Failures land in protected_vms.last_error
-- (zerfaux.failure_protected_vm, 20261201130300). Handler: handlers/dr_shell.py.

create function zerfaux.input_vm_dr_shell(p_subject uuid)
returns jsonb language sql stable security definer set search_path = zerfaux, public, pg_temp as $$
    select zerfaux.protected_vm_rows(p_subject)
$$;

create function zerfaux.complete_vm_dr_shell(p_subject uuid, p_result jsonb)
returns jsonb language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
begin
    update public.protected_vms
       set needs_dr_shell = false, dr_shell_vm_created = true,
           dr_shell_vm_id = p_result ->> 'dr_shell_vm_id', last_error = null, updated_at = now()
     where id = p_subject;
    return p_result;
end $$;

create function zerfaux.on_protected_vm_dr_shell() returns trigger
language plpgsql security definer set search_path = zerfaux, public, pg_temp as $$
begin
    if new.needs_dr_shell and (tg_op = 'INSERT' or not old.needs_dr_shell) then
        perform zerfaux.enqueue('vm.dr_shell', new.id);
    end if;
    return null;
end $$;

create trigger protected_vms_enqueue_dr_shell
    after insert or update of needs_dr_shell on public.protected_vms
    for each row execute function zerfaux.on_protected_vm_dr_shell();

insert into zerfaux.kinds (kind, subject_table, input_fn, complete_fn, failure_fn, waits_for)
values ('vm.dr_shell', 'public.protected_vms', 'zerfaux.input_vm_dr_shell',
        'zerfaux.complete_vm_dr_shell', 'zerfaux.failure_protected_vm', '{vm.storage_vmotion}');

-- Not from authenticated: it holds only the explicit grants of the policies' helpers
-- (20261201100000_operators.sql), which must survive; PUBLIC's default is what goes.
revoke execute on all functions in schema zerfaux from public, anon;
grant execute on all functions in schema zerfaux to service_role;
