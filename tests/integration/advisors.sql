-- Supabase's database advisors (security and performance lints), as catalog queries over the
-- schemas Zerfaux owns a part of. Each returns the offending objects; none must return a row.
-- Objects that belong to an extension are the extension's business, not ours.

-- name: function_search_path_mutable
-- 0011: a function without its own search_path resolves names through the caller's.
select p.oid::regprocedure::text as offender
  from pg_proc p
 where p.pronamespace in ('public'::regnamespace, 'zerfaux'::regnamespace)
   and not exists (select 1 from pg_depend d where d.objid = p.oid and d.deptype = 'e')
   and not exists (select 1 from unnest(p.proconfig) c where c like 'search_path=%')
 order by 1;

-- name: rls_disabled_in_api
-- 0013: a table the API can reach without Row Level Security: every table of public (exposed by
-- PostgREST by default), and a table of zerfaux any API role holds a privilege on.
select c.oid::regclass::text as offender
  from pg_class c
 where c.relkind in ('r', 'p') and not c.relrowsecurity
   and not exists (select 1 from pg_depend d where d.objid = c.oid and d.deptype = 'e')
   and (c.relnamespace = 'public'::regnamespace
        or (c.relnamespace = 'zerfaux'::regnamespace
            and exists (select 1 from unnest(array['anon', 'authenticated']) r
                         where has_table_privilege(r, c.oid, 'select, insert, update, delete, truncate, references, trigger')
                            or has_any_column_privilege(r, c.oid, 'select, insert, update, references'))))
 order by 1;

-- name: security_definer_view
-- 0010: a view in the API that runs with its owner's rights passes by the policies below it.
select c.oid::regclass::text as offender
  from pg_class c
 where c.relkind in ('v', 'm') and c.relnamespace in ('public'::regnamespace, 'zerfaux'::regnamespace)
   and not coalesce('security_invoker=true' = any(c.reloptions) or 'security_invoker=on' = any(c.reloptions), false)
   and exists (select 1 from unnest(array['anon', 'authenticated']) r
                where has_table_privilege(r, c.oid, 'select') or has_any_column_privilege(r, c.oid, 'select'))
 order by 1;

-- name: permissive_write_policy
-- 0024: a policy for a write that lets every signed-in user (or everyone) through.
select schemaname || '.' || tablename || ' ' || policyname as offender
  from pg_policies
 where schemaname in ('public', 'zerfaux')
   and cmd in ('INSERT', 'UPDATE', 'DELETE', 'ALL')
   and roles && array['authenticated', 'public', 'anon']::name[]
   and (regexp_replace(coalesce(qual, ''), '[\s()]', '', 'g') in ('true', '1=1')
        or regexp_replace(coalesce(with_check, ''), '[\s()]', '', 'g') in ('true', '1=1'))
 order by 1;

-- name: security_definer_executable
-- 0028 / 0029: SECURITY DEFINER functions anon or authenticated may call, with who may.
select p.oid::regprocedure::text as function, n.nspname || '.' || p.proname as name, r.role
  from pg_proc p
  join pg_namespace n on n.oid = p.pronamespace
 cross join unnest(array['anon', 'authenticated']) as r(role)
 where n.nspname in ('public', 'zerfaux') and p.prosecdef
   and not exists (select 1 from pg_depend d where d.objid = p.oid and d.deptype = 'e')
   and has_function_privilege(r.role, p.oid, 'execute')
 order by 1, 3;

-- name: unindexed_foreign_keys
-- 0001: a foreign key whose columns lead no index: every delete or key update of the referenced
-- row scans the referencing table.
select c.conrelid::regclass::text || ' ' || c.conname as offender
  from pg_constraint c
 where c.contype = 'f' and c.connamespace in ('public'::regnamespace, 'zerfaux'::regnamespace)
   and not exists (
       select 1 from pg_index i
        where i.indrelid = c.conrelid
          and (i.indkey::int2[])[0:cardinality(c.conkey) - 1] @> c.conkey
          and (i.indkey::int2[])[0:cardinality(c.conkey) - 1] <@ c.conkey)
 order by 1;
