-- The shape of the authorization: the role table, auth.uid() reading the request's claims, no
-- always-true policy (Supabase's advisor lint 0024), and helpers that cannot be steered.
begin;
select plan(12);

select has_table('zerfaux', 'operators', 'zerfaux.operators holds the roles');
select col_not_null('zerfaux', 'operators', 'user_id', 'a role belongs to a user');
select throws_ok($$insert into zerfaux.operators (user_id, role) values (gen_random_uuid(), 'root')$$,
                 '23514', null, 'only viewer, operator and admin are roles');
select lives_ok($$insert into zerfaux.operators (user_id, role) values ('7d000000-0000-4000-9000-000000000001', 'viewer')$$,
                'a global role');
select throws_ok($$insert into zerfaux.operators (user_id, role) values ('7d000000-0000-4000-9000-000000000001', 'admin')$$,
                 '23505', null, 'one global role per user');

select is((select auth.uid()), null, 'no claims, no user');
select set_config('request.jwt.claims', '{"sub": "7d000000-0000-4000-9000-000000000001", "role": "authenticated"}', true);
select is((select auth.uid()), '7d000000-0000-4000-9000-000000000001'::uuid, 'auth.uid() reads the JWT''s sub');
select is(zerfaux.has_role('viewer'), true, 'has_role answers for the caller');
select is(zerfaux.has_role('operator'), false, 'and only up to the caller''s role');

select is_empty(
    $$select tablename || '.' || policyname from pg_policies
       where schemaname in ('public', 'zerfaux')
         and (regexp_replace(coalesce(qual, ''), '[\s()]', '', 'g') in ('true', '1=1')
              or regexp_replace(coalesce(with_check, ''), '[\s()]', '', 'g') in ('true', '1=1'))$$,
    'no policy is always true');

select is_empty(
    $$select p.proname from pg_proc p join pg_namespace n on n.oid = p.pronamespace
       where n.nspname = 'zerfaux' and p.prosecdef
         and not exists (select 1 from unnest(p.proconfig) c where c like 'search_path=%')$$,
    'every SECURITY DEFINER function of zerfaux fixes its search_path');

select is_empty(
    $$select p.proname from pg_proc p join pg_namespace n on n.oid = p.pronamespace
       where n.nspname = 'zerfaux' and p.prosecdef and has_function_privilege('anon', p.oid, 'execute')$$,
    'anon executes no SECURITY DEFINER function');

select * from finish();
rollback;
