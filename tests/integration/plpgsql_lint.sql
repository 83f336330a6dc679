-- Every PL/pgSQL function of public and zerfaux through plpgsql_check with every warning on
-- (what `supabase db lint` runs); a trigger function is checked once per table it is attached
-- to, with that table as its relation. Run in a database where plpgsql_check lives in schema lint.

-- name: findings
with targets as (
    select p.oid, coalesce(t.tgrelid, 0) as relid, p.prorettype = 'trigger'::regtype as is_trigger
      from pg_proc p
      join pg_language l on l.oid = p.prolang and l.lanname = 'plpgsql'
      left join pg_trigger t on t.tgfoid = p.oid and not t.tgisinternal
     where p.pronamespace in ('public'::regnamespace, 'zerfaux'::regnamespace)
       and not exists (select 1 from pg_depend d where d.objid = p.oid and d.deptype = 'e')
)
select t.oid::regprocedure::text as function, nullif(t.relid, 0)::regclass::text as relation,
       r.lineno, r.level, r.sqlstate, r.message, r.detail
  from targets t
  cross join lateral lint.plpgsql_check_function_tb(
      t.oid, t.relid::regclass, fatal_errors => false, all_warnings => true) r
 where not (t.is_trigger and t.relid = 0)
 order by 1, 2, 3;

-- name: checked
select count(*) as n
  from pg_proc p join pg_language l on l.oid = p.prolang and l.lanname = 'plpgsql'
 where p.pronamespace in ('public'::regnamespace, 'zerfaux'::regnamespace);

-- name: unattached_triggers
select p.oid::regprocedure::text as function
  from pg_proc p join pg_language l on l.oid = p.prolang and l.lanname = 'plpgsql'
 where p.pronamespace in ('public'::regnamespace, 'zerfaux'::regnamespace)
   and p.prorettype = 'trigger'::regtype
   and not exists (select 1 from pg_trigger t where t.tgfoid = p.oid and not t.tgisinternal)
 order by 1;
