-- A VM joins only a protection group whose source vCenter it belongs to, whoever asks; the
-- message names the VM, both vCenters and the group.
begin;
select plan(6);

insert into public.vcenters (id, name, host) values
    ('7c000000-0000-4000-a000-000000000001', 'vc-tap-src', 'h1'),
    ('7c000000-0000-4000-a000-000000000002', 'vc-tap-else', 'h2');
insert into public.protection_groups (id, name, source_vcenter_id) values
    ('7c000000-0000-4000-c000-000000000001', 'join-tap', '7c000000-0000-4000-a000-000000000001'),
    ('7c000000-0000-4000-c000-000000000002', 'join-tap-else', '7c000000-0000-4000-a000-000000000002'),
    ('7c000000-0000-4000-c000-000000000003', 'join-tap-none', null);
insert into public.vcenter_vms (id, vcenter_id, moref, name) values
    ('7c000000-0000-4000-d000-000000000001', '7c000000-0000-4000-a000-000000000001', 'vm-1', 'here-01'),
    ('7c000000-0000-4000-d000-000000000002', '7c000000-0000-4000-a000-000000000002', 'vm-2', 'there-01');

select lives_ok(
    $$insert into public.protected_vms (protection_group_id, vm_id)
      values ('7c000000-0000-4000-c000-000000000001', '7c000000-0000-4000-d000-000000000001')$$,
    'a VM joins a group of its own vCenter');

select throws_ok(
    $$insert into public.protected_vms (protection_group_id, vm_id)
      values ('7c000000-0000-4000-c000-000000000001', '7c000000-0000-4000-d000-000000000002')$$,
    '23514',
    'VM there-01 (7c000000-0000-4000-d000-000000000002) of vCenter vc-tap-else cannot join protection group join-tap, whose source vCenter is vc-tap-src',
    'a VM of another vCenter is refused, naming both');

select throws_like(
    $$update public.protected_vms set protection_group_id = '7c000000-0000-4000-c000-000000000002'
       where vm_id = '7c000000-0000-4000-d000-000000000001'$$,
    '%cannot join protection group join-tap-else, whose source vCenter is vc-tap-else%',
    'moving a protected VM to a group of another vCenter is refused');

select throws_like(
    $$insert into public.protected_vms (protection_group_id, vm_id)
      values ('7c000000-0000-4000-c000-000000000003', '7c000000-0000-4000-d000-000000000001')$$,
    '%the group has no source vCenter%',
    'a group without a source vCenter takes no VM');

select throws_like(
    $$update public.protection_groups set source_vcenter_id = '7c000000-0000-4000-a000-000000000002'
       where id = '7c000000-0000-4000-c000-000000000001'$$,
    '%keeps source vCenter vc-tap-src: it protects VM here-01%',
    'a group keeps the source vCenter of the VMs it protects');

select lives_ok(
    $$insert into public.protected_vms (protection_group_id) values ('7c000000-0000-4000-c000-000000000002')$$,
    'a row without a VM is not checked');

select * from finish();
rollback;
