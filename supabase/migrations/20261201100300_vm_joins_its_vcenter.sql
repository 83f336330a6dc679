-- A VM joins only a protection group whose source vCenter it belongs to: the group's dataset,
-- datastore and DR placement are those of that vCenter, and a VM of another one would be moved
-- or registered where it does not live. Checked for every role, the owner included.

create function zerfaux.protected_vms_check_vcenter() returns trigger
language plpgsql set search_path = zerfaux, public, pg_temp as $$
declare
    v_group_name text;
    v_group_vcenter uuid;
    v_group_vcenter_name text;
    v_vm_name text;
    v_vm_vcenter uuid;
    v_vm_vcenter_name text;
begin
    if new.vm_id is null then
        return new;
    end if;
    -- Runs as the caller: what the caller cannot read is not named (its policy refuses it later).
    select g.name, g.source_vcenter_id into v_group_name, v_group_vcenter
      from public.protection_groups g where g.id = new.protection_group_id;
    if not found then
        return new;
    end if;
    select v.name, v.vcenter_id into v_vm_name, v_vm_vcenter from public.vcenter_vms v where v.id = new.vm_id;
    if v_group_vcenter is not null and v_vm_vcenter is not distinct from v_group_vcenter then
        return new;
    end if;
    if v_group_vcenter is null then
        raise exception 'VM % (%) cannot join protection group %: the group has no source vCenter',
                coalesce(v_vm_name, '?'), new.vm_id, v_group_name
            using errcode = 'check_violation',
                  hint = 'set the group''s source_vcenter_id to the VM''s vCenter first';
    end if;
    select name into v_vm_vcenter_name from public.vcenters where id = v_vm_vcenter;
    select name into v_group_vcenter_name from public.vcenters where id = v_group_vcenter;
    raise exception 'VM % (%) of vCenter % cannot join protection group %, whose source vCenter is %',
            coalesce(v_vm_name, '?'), new.vm_id, coalesce(v_vm_vcenter_name, '(another vCenter)'),
            v_group_name, coalesce(v_group_vcenter_name, v_group_vcenter::text)
        using errcode = 'check_violation',
              hint = 'protect the VM in a group whose source_vcenter_id is its vCenter';
end $$;

create trigger protected_vms_check_vcenter
    before insert or update of vm_id, protection_group_id on public.protected_vms
    for each row execute function zerfaux.protected_vms_check_vcenter();

-- The same rule from the other side: a group keeps the source vCenter of the VMs it protects.
create function zerfaux.protection_groups_check_vcenter() returns trigger
language plpgsql set search_path = zerfaux, public, pg_temp as $$
declare
    v_vm text;
    v_vcenter text;
begin
    if new.source_vcenter_id is distinct from old.source_vcenter_id then
        select v.name, vc.name into v_vm, v_vcenter
          from public.protected_vms p
          join public.vcenter_vms v on v.id = p.vm_id
          left join public.vcenters vc on vc.id = v.vcenter_id
         where p.protection_group_id = new.id
           and v.vcenter_id is distinct from new.source_vcenter_id
         limit 1;
        if found then
            raise exception 'protection group % keeps source vCenter %: it protects VM % of that vCenter',
                    new.name, v_vcenter, v_vm
                using errcode = 'check_violation',
                      hint = 'remove its protected VMs of that vCenter first (delete from protected_vms)';
        end if;
    end if;
    return new;
end $$;

create trigger protection_groups_check_vcenter before update of source_vcenter_id on public.protection_groups
    for each row execute function zerfaux.protection_groups_check_vcenter();

revoke execute on function zerfaux.protected_vms_check_vcenter(), zerfaux.protection_groups_check_vcenter()
    from public, anon, authenticated;
