-- Key cells of the role matrix on the engine (tests/integration/test_rls.py holds the whole
-- matrix): the engine's functions are service_role's alone; a signed-in user, even a global
-- admin, reaches the queue only through the request columns and their triggers.
begin;
select plan(14);

insert into zerfaux.operators (user_id, role) values ('7e000000-0000-4000-9000-000000000001', 'admin');

select is(has_function_privilege('service_role', 'zerfaux.claim(text, integer, double precision, uuid[], double precision)', 'execute'),
          true, 'service_role claims');
select is(has_function_privilege('service_role', 'zerfaux.complete_one(uuid, text, jsonb)', 'execute'),
          true, 'service_role completes');
select is(has_function_privilege('authenticated', 'zerfaux.claim(text, integer, double precision, uuid[], double precision)', 'execute'),
          false, 'authenticated claims nothing');
select is(has_function_privilege('authenticated', 'zerfaux.enqueue(text, uuid, text, boolean)', 'execute'),
          false, 'authenticated enqueues nothing directly');
select is(has_function_privilege('authenticated', 'zerfaux.vault_secret(text)', 'execute'),
          false, 'authenticated reads no Vault secret');
select is(has_function_privilege('anon', 'zerfaux.heartbeat(text, uuid[], double precision)', 'execute'),
          false, 'anon sends no heartbeat');
select is(has_function_privilege('authenticated', 'zerfaux.has_role(text, uuid)', 'execute'),
          true, 'authenticated runs the policies'' helpers');
select is(has_function_privilege('authenticated', 'zerfaux.on_replication_job_insert()', 'execute'),
          false, 'no API role runs a trigger function by hand');

set local role authenticated;
select set_config('request.jwt.claims', '{"role": "authenticated", "sub": "7e000000-0000-4000-9000-000000000001"}', true);
select throws_ok($$select * from zerfaux.claim('tap-intruder', 1, 60)$$, '42501', null,
                 'a global admin calling claim is refused');
select throws_ok($$select zerfaux.complete_one(gen_random_uuid(), 'tap-intruder', '{}')$$, '42501', null,
                 'and so is complete_one');
select throws_ok($$insert into zerfaux.operations (kind, subject_id) values ('replication.run', gen_random_uuid())$$,
                 '42501', null, 'a global admin inserts no operation');
select throws_ok($$update zerfaux.operations set status = 'succeeded'$$, '42501', null,
                 'nor writes an operation''s status');
reset role;

set local role anon;
select set_config('request.jwt.claims', '{"role": "anon"}', true);
select throws_ok($$select count(*) from zerfaux.operations$$, '42501', null, 'anon reads no operation');
reset role;

set local role service_role;
select lives_ok($$select * from zerfaux.claim('tap-service', 0, 60)$$, 'service_role calls claim');
reset role;

select * from finish();
rollback;
