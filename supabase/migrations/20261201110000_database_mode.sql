-- One mode per database (issue 11 §5). Stub backends mark jobs completed, write made-up morefs
-- over the inventory and set dr_shell_vm_created: harmless on a demo database, the worst failure
-- on a production one (green while nothing is protected). So the database records whether it is
-- a 'stub' or a 'real' database when the first listener starts, and a listener of the other mode
-- refuses to start (listener/mode.py); `zerfaux mode real|stub` changes it on purpose.

-- Zerfaux's own settings, one row per name. Only 'mode' so far.
create table zerfaux.settings (
    name text primary key,
    value text not null,
    set_by text not null,
    updated_at timestamptz not null default now(),
    constraint settings_mode_value check (name <> 'mode' or value in ('stub', 'real'))
);

alter table zerfaux.settings enable row level security;
-- No policy: only service_role (which bypasses RLS) and the owner read or write it.
revoke all on zerfaux.settings from public, anon, authenticated;
grant all on zerfaux.settings to service_role;

-- The database's mode: the one recorded, or p_mode when none is (recorded now). One statement,
-- so two listeners starting at once agree: the second waits for the first's row and gets it.
create function zerfaux.claim_mode(p_mode text)
returns text language plpgsql security definer set search_path = zerfaux, pg_temp as $$
declare
    v_mode text;
begin
    if p_mode is null or p_mode not in ('stub', 'real') then
        raise exception 'mode must be ''stub'' or ''real'', got %', coalesce(quote_literal(p_mode), 'null')
              using errcode = '22023';
    end if;
    insert into zerfaux.settings as s (name, value, set_by)
    values ('mode', p_mode, 'the first listener')
    on conflict (name) do update set value = s.value  -- a no-op that returns the recorded row
    returning s.value into v_mode;
    return v_mode;
end $$;

-- Set the mode on purpose (`zerfaux mode real|stub`); returns the mode it replaced (null: none).
create function zerfaux.set_mode(p_mode text)
returns text language plpgsql security definer set search_path = zerfaux, pg_temp as $$
declare
    v_old text;
begin
    if p_mode is null or p_mode not in ('stub', 'real') then
        raise exception 'mode must be ''stub'' or ''real'', got %', coalesce(quote_literal(p_mode), 'null')
              using errcode = '22023';
    end if;
    select value into v_old from zerfaux.settings where name = 'mode' for update;
    insert into zerfaux.settings as s (name, value, set_by)
    values ('mode', p_mode, 'zerfaux mode')
    on conflict (name) do update
       set value = excluded.value, set_by = excluded.set_by, updated_at = now();
    return v_old;
end $$;

-- The recorded mode, null before any listener started.
create function zerfaux.database_mode()
returns text language sql stable security definer set search_path = zerfaux, pg_temp as $$
    select value from zerfaux.settings where name = 'mode'
$$;

revoke execute on function zerfaux.claim_mode(text), zerfaux.set_mode(text), zerfaux.database_mode()
    from public, anon, authenticated;
grant execute on function zerfaux.claim_mode(text), zerfaux.set_mode(text), zerfaux.database_mode()
    to service_role;

-- Every succeeded operation's result says which backends produced it. The handlers put "mode"
-- in what they return (handlers/__init__.py); zerfaux.complete stores a summary instead of the
-- result for some kinds (vcenter.sync keeps counts, not the inventory), and there the
-- database's mode fills it in: a listener of another mode cannot have run it.
create function zerfaux.operations_result_mode()
returns trigger language plpgsql security definer set search_path = zerfaux, pg_temp as $$
begin
    new.result := coalesce(new.result, '{}'::jsonb)
                  || jsonb_build_object('mode', coalesce(zerfaux.database_mode(), 'unknown'));
    return new;
end $$;

revoke execute on function zerfaux.operations_result_mode() from public, anon, authenticated;

create trigger operations_result_mode
    before update of status on zerfaux.operations
    for each row
    when (new.status = 'succeeded' and old.status is distinct from 'succeeded'
          and jsonb_typeof(coalesce(new.result, '{}'::jsonb)) = 'object'
          and not coalesce(new.result, '{}'::jsonb) ? 'mode')
    execute function zerfaux.operations_result_mode();
