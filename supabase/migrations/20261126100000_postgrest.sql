-- What the PostgREST store (listener/store_postgrest.py) needs beyond the engine functions: a
-- listener that holds only the project URL and the service-role key reaches the database through
-- RPC alone, so everything the Postgres store reads with a plain query gets a function here.
-- The engine functions themselves are called as they are (named arguments: p_worker, p_ids, ...).
-- Like them, these are for service_role (and the database owner) only.

-- A secret from Supabase Vault by name; null where there is no Vault (bare Postgres) or no such
-- secret. Dynamic SQL, because the vault schema does not exist everywhere these files apply.
create function zerfaux.vault_secret(p_name text)
returns text language plpgsql stable security definer set search_path = zerfaux, pg_temp as $$
declare
    v_secret text;
begin
    if not exists (select 1 from pg_views where schemaname = 'vault' and viewname = 'decrypted_secrets') then
        return null;
    end if;
    execute 'select decrypted_secret from vault.decrypted_secrets where name = $1 limit 1'
       into v_secret using p_name;
    return v_secret;
end $$;

-- A cheap round trip for readiness: proves PostgREST, the exposed schema, the key and the
-- database all answer.
create function zerfaux.ping()
returns boolean language sql stable security definer set search_path = zerfaux, pg_temp as $$
    select true
$$;

revoke execute on function zerfaux.vault_secret(text), zerfaux.ping() from public, anon, authenticated;
grant execute on function zerfaux.vault_secret(text), zerfaux.ping() to service_role;
