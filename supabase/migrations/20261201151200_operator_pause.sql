-- An operator pauses and resumes the schedule of its own groups (docs/rpo.md, "Scheduling");
-- every other column of a group stays a global admin's. The policy opens the row to the
-- operator; the guard (a policy cannot see which columns change) keeps it to `paused`.

create policy operator_pause on public.protection_groups for update to authenticated
    using (id in (select zerfaux.group_ids('operator')))
    with check (id in (select zerfaux.group_ids('operator')));

create function zerfaux.protection_groups_guard_update() returns trigger
language plpgsql set search_path = zerfaux, public, pg_temp as $$
begin
    if row_security_active('public.protection_groups')
       and to_jsonb(new) - 'paused' is distinct from to_jsonb(old) - 'paused'
       and not zerfaux.has_role('admin') then
        raise exception 'only a global admin changes protection group % (%) beyond paused', old.name, old.id
            using errcode = 'insufficient_privilege',
                  hint = 'an operator pauses or resumes its group''s schedule by setting paused alone; see docs/authorization.md';
    end if;
    return new;
end $$;

-- Named to run after the other BEFORE UPDATE triggers (alphabetical), so it sees what they
-- filled in too.
create trigger protection_groups_guard_update before update on public.protection_groups
    for each row execute function zerfaux.protection_groups_guard_update();

revoke execute on function zerfaux.protection_groups_guard_update() from public, anon, authenticated;
