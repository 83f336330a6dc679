-- A database prepared the way Supabase prepares a project, before Zerfaux is installed, run by
-- the cluster's superuser (Supabase's supabase_admin) in the new database. The owner role
-- (Supabase's `postgres`, here :"owner") is not a superuser; it has CREATEROLE and BYPASSRLS.

create schema if not exists extensions;
grant usage on schema extensions to anon, authenticated, service_role, :"owner";

-- Supabase Auth's schema: owned by another role, where a project's migrations create nothing.
create schema auth;
create table auth.users (
    id    uuid primary key,
    email text
);
create function auth.uid() returns uuid language sql stable as $$
    select coalesce(nullif(current_setting('request.jwt.claim.sub', true), ''),
                    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub'))::uuid
$$;
create function auth.role() returns text language sql stable as $$
    select coalesce(nullif(current_setting('request.jwt.claim.role', true), ''),
                    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role'))
$$;
create function auth.jwt() returns jsonb language sql stable as $$
    select coalesce(nullif(current_setting('request.jwt.claim', true), ''),
                    nullif(current_setting('request.jwt.claims', true), ''))::jsonb
$$;
grant usage on schema auth to anon, authenticated, service_role, :"owner";
grant select, references on auth.users to :"owner";
grant execute on function auth.uid(), auth.role(), auth.jwt() to anon, authenticated, service_role, :"owner";

-- Realtime's publication, empty, owned by the project's owner.
create publication supabase_realtime;
alter publication supabase_realtime owner to :"owner";

grant usage, create on schema public to :"owner";
