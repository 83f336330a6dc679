-- The privileges held on the relations of schema public that are not Zerfaux's, one row per
-- privilege: on the relation (attname null) and on each of its columns. A relation whose ACL was
-- never set holds its owner's default one (acldefault), so "never granted" and "granted back to
-- the owner only" compare equal. Parameter: the names of Zerfaux's own relations in public.

-- name: public_privileges
select quote_ident(n.nspname) || '.' || quote_ident(c.relname) as relation, c.relkind = 'S' as is_sequence,
       null::text as attname, g.rolname as grantor,
       coalesce(e.rolname, 'public') as grantee, a.privilege_type, a.is_grantable
  from pg_class c
  join pg_namespace n on n.oid = c.relnamespace
  cross join lateral aclexplode(coalesce(
      c.relacl, acldefault(case when c.relkind = 'S' then 's' else 'r' end::"char", c.relowner))) a
  join pg_roles g on g.oid = a.grantor
  left join pg_roles e on e.oid = a.grantee
 where n.nspname = 'public' and c.relkind in ('r', 'p', 'v', 'm', 'f', 'S')
   and c.relname <> all (%(ours)s::text[])
union all
select quote_ident(n.nspname) || '.' || quote_ident(c.relname), false, t.attname, g.rolname,
       coalesce(e.rolname, 'public'), a.privilege_type, a.is_grantable
  from pg_class c
  join pg_namespace n on n.oid = c.relnamespace
  join pg_attribute t on t.attrelid = c.oid and t.attnum > 0 and not t.attisdropped and t.attacl is not null
  cross join lateral aclexplode(t.attacl) a
  join pg_roles g on g.oid = a.grantor
  left join pg_roles e on e.oid = a.grantee
 where n.nspname = 'public' and c.relkind in ('r', 'p', 'v', 'm', 'f')
   and c.relname <> all (%(ours)s::text[]);
