-- A test-only stand-in for Supabase's supabase_functions.http_request (Database Webhooks): the
-- same trigger function, arguments (url, method, headers, params, timeout_ms) and body
-- {type, table, schema, record, old_record} (FACTS.md), but the request is recorded in
-- supabase_functions.sent instead of handed to pg_net; a test sends it on.
create schema if not exists supabase_functions;

create table if not exists supabase_functions.sent (
    id bigserial primary key,
    url text not null,
    method text not null,
    headers jsonb not null,
    params jsonb not null,
    timeout_ms integer not null,
    body jsonb not null
);

create or replace function supabase_functions.http_request() returns trigger language plpgsql as $$
begin
    insert into supabase_functions.sent (url, method, headers, params, timeout_ms, body)
    values (tg_argv[0], tg_argv[1], tg_argv[2]::jsonb, tg_argv[3]::jsonb, tg_argv[4]::integer,
            jsonb_build_object('type', tg_op, 'table', tg_table_name, 'schema', tg_table_schema,
                               'record', case when tg_op = 'DELETE' then null else to_jsonb(new) end,
                               'old_record', case when tg_op = 'INSERT' then null else to_jsonb(old) end));
    return new;
end $$;
