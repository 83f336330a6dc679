-- Who a signed-in user is to Zerfaux (docs/authorization.md). A person without a row in
-- zerfaux.operators sees and does nothing, whatever Supabase's sign-up settings let in.
--   viewer    reads the control plane of its groups (never a *_secret column);
--   operator  also asks for work in its groups: syncs of their vCenters, replications, cancels,
--             protecting and unprotecting VMs, flipping their two flags;
--   admin     also grants roles in its groups; a global admin (protection_group_id null) writes
--             the configuration: vCenters, replication targets, protection groups.
-- A role includes the ones before it. protection_group_id null means every group.

-- auth.uid() is Supabase's own, in schema auth, where a migration may create nothing. A bare
-- Postgres gets the same function, reading the JWT claims PostgREST sets per request, so one set
-- of policies serves both.
do $$
begin
    if to_regprocedure('auth.uid()') is null then
        create schema if not exists auth;
        execute $f$
            create function auth.uid() returns uuid language sql stable as $b$
                select coalesce(
                    nullif(current_setting('request.jwt.claim.sub', true), ''),
                    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
                )::uuid
            $b$ $f$;
        grant usage on schema auth to anon, authenticated, service_role;
    end if;
end $$;

create table zerfaux.operators (
    id                  uuid primary key default gen_random_uuid(),
    user_id             uuid not null,
    role                text not null,
    protection_group_id uuid references public.protection_groups (id) on delete cascade,
    created_at          timestamptz not null default now(),
    constraint operators_role_check check (role in ('viewer', 'operator', 'admin')),
    -- One role per user and scope: a global row and group rows may stand side by side.
    constraint operators_user_group_key unique nulls not distinct (user_id, protection_group_id)
);

create index operators_group on zerfaux.operators (protection_group_id);

-- On Supabase a user removed from auth.users loses its roles with it.
do $$
begin
    if to_regclass('auth.users') is not null then
        alter table zerfaux.operators add constraint operators_user_id_fkey
            foreign key (user_id) references auth.users (id) on delete cascade;
    end if;
end $$;

-- ---------------------------------------------------------------------------------------------
-- Helpers for the policies. SECURITY DEFINER so that they read zerfaux.operators past its own
-- policies (no recursion) and run once per statement where a policy writes `in (select ...)`.
-- They answer only about the caller (auth.uid() inside, never a user argument), so letting
-- `authenticated` execute them, which policies require, tells a user nothing but its own roles.

create function zerfaux.role_rank(p_role text) returns integer
language sql immutable set search_path = zerfaux, pg_temp as $$
    select case p_role when 'viewer' then 1 when 'operator' then 2 when 'admin' then 3 end
$$;

-- The caller holds at least p_role for group p_group (a global row counts for every group);
-- p_group null asks for a global row.
create function zerfaux.has_role(p_role text, p_group uuid default null) returns boolean
language sql stable security definer set search_path = zerfaux, public, pg_temp as $$
    select exists (
        select 1 from zerfaux.operators o
         where o.user_id = auth.uid()
           and zerfaux.role_rank(o.role) >= zerfaux.role_rank(p_role)
           and (o.protection_group_id is null or o.protection_group_id = p_group))
$$;

-- The caller has any row at all (what the workers' heartbeat table asks).
create function zerfaux.is_member() returns boolean
language sql stable security definer set search_path = zerfaux, public, pg_temp as $$
    select exists (select 1 from zerfaux.operators o where o.user_id = auth.uid())
$$;

-- The groups in which the caller holds at least p_role.
create function zerfaux.group_ids(p_role text) returns setof uuid
language sql stable security definer set search_path = zerfaux, public, pg_temp as $$
    select g.id from public.protection_groups g
     where exists (select 1 from zerfaux.operators o
                    where o.user_id = auth.uid()
                      and zerfaux.role_rank(o.role) >= zerfaux.role_rank(p_role)
                      and (o.protection_group_id is null or o.protection_group_id = g.id))
$$;

-- The vCenters the caller's groups use (source or DR); a global role sees every vCenter.
create function zerfaux.vcenter_ids(p_role text) returns setof uuid
language sql stable security definer set search_path = zerfaux, public, pg_temp as $$
    select v.id from public.vcenters v where zerfaux.has_role(p_role)
    union
    select g.source_vcenter_id from public.protection_groups g
     where g.source_vcenter_id is not null and g.id in (select zerfaux.group_ids(p_role))
    union
    select g.dr_vcenter_id from public.protection_groups g
     where g.dr_vcenter_id is not null and g.id in (select zerfaux.group_ids(p_role))
$$;

-- The replication targets the caller's groups send to; a global role sees every target.
create function zerfaux.target_ids(p_role text) returns setof uuid
language sql stable security definer set search_path = zerfaux, public, pg_temp as $$
    select t.id from public.replication_targets t where zerfaux.has_role(p_role)
    union
    select g.replication_target_id from public.protection_groups g
     where g.replication_target_id is not null and g.id in (select zerfaux.group_ids(p_role))
$$;

-- The subjects of operations in the caller's groups: the operation of a subject is readable
-- by whoever reads the subject. A kind this function does not name is readable by global
-- viewers only (policy below); a new kind adds its subjects here.
create function zerfaux.operation_subjects(p_role text) returns table (kind text, subject_id uuid)
language sql stable security definer set search_path = zerfaux, public, pg_temp as $$
    select 'vcenter.sync', v from zerfaux.vcenter_ids(p_role) v
    union all
    select 'replication.run', j.id from public.replication_jobs j
     where j.protection_group_id in (select zerfaux.group_ids(p_role))
    union all
    select k.kind, p.id from public.protected_vms p
     cross join (values ('vm.storage_vmotion'), ('vm.dr_shell')) k (kind)
     where p.protection_group_id in (select zerfaux.group_ids(p_role))
$$;

revoke execute on function zerfaux.role_rank(text), zerfaux.has_role(text, uuid), zerfaux.is_member(),
    zerfaux.group_ids(text), zerfaux.vcenter_ids(text), zerfaux.target_ids(text),
    zerfaux.operation_subjects(text) from public, anon;
grant execute on function zerfaux.role_rank(text), zerfaux.has_role(text, uuid), zerfaux.is_member(),
    zerfaux.group_ids(text), zerfaux.vcenter_ids(text), zerfaux.target_ids(text),
    zerfaux.operation_subjects(text) to authenticated, service_role;
