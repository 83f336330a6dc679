-- A test-only stand-in for Supabase Realtime's objects in the database, as the hosted project
-- has them: the table realtime.messages (columns of Realtime's own migrations), RLS on, and
-- realtime.send(payload, event, topic, private) inserting one broadcast row and turning every
-- error into a warning (it never aborts its caller). realtime.topic() reads the channel being
-- authorized. The API roles may read and insert, as on Supabase; RLS decides the rest.
create schema if not exists realtime;

create table if not exists realtime.messages (
    topic text not null,
    extension text not null,
    payload jsonb,
    event text,
    private boolean default false,
    updated_at timestamp without time zone not null default now(),
    inserted_at timestamp without time zone not null default now(),
    id uuid not null default gen_random_uuid(),
    primary key (id, inserted_at)
);
alter table realtime.messages enable row level security;
grant usage on schema realtime to anon, authenticated, service_role;
grant select, insert on realtime.messages to anon, authenticated, service_role;

create or replace function realtime.topic() returns text language sql stable as $$
    select nullif(current_setting('realtime.topic', true), '')
$$;

create or replace function realtime.send(payload jsonb, event text, topic text, private boolean default true)
returns void language plpgsql as $$
begin
    insert into realtime.messages (payload, event, topic, private, extension)
    values (payload, event, topic, private, 'broadcast');
exception when others then
    raise warning 'ErrorSendingBroadcastMessage: %', sqlerrm;
end $$;
