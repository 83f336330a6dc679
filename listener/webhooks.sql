-- Database webhooks Zerfaux installs for the user (listener/webhooks.py): the triggers the
-- Supabase dashboard creates (Integrations > Database Webhooks), one per event that means work.
-- Placeholders in braces are filled with quoted literals (psycopg.sql), never pasted text.

-- name: has_http_request
select to_regprocedure('supabase_functions.http_request()') is not null as present;

-- name: installed
select t.tgname as name, c.relnamespace::regnamespace::text || '.' || c.relname as on_table
  from pg_trigger t join pg_class c on c.oid = t.tgrelid
 where t.tgname in ('zerfaux_operations_webhook', 'zerfaux_operations_requeued_webhook', 'zerfaux_cancel_webhook')
 order by t.tgname;

-- name: drop
drop trigger if exists zerfaux_operations_webhook on zerfaux.operations;
drop trigger if exists zerfaux_operations_requeued_webhook on zerfaux.operations;
drop trigger if exists zerfaux_cancel_webhook on public.replication_jobs;

-- name: create
create trigger zerfaux_operations_webhook
    after insert on zerfaux.operations
    for each row execute function supabase_functions.http_request({url}, 'POST', {headers}, '{{}}', {timeout_ms});
create trigger zerfaux_operations_requeued_webhook
    after update of status on zerfaux.operations
    for each row when (new.status = 'queued' and old.status is distinct from 'queued')
    execute function supabase_functions.http_request({url}, 'POST', {headers}, '{{}}', {timeout_ms});
create trigger zerfaux_cancel_webhook
    after update of cancel_requested on public.replication_jobs
    for each row when (new.cancel_requested and not old.cancel_requested)
    execute function supabase_functions.http_request({url}, 'POST', {headers}, '{{}}', {timeout_ms});
