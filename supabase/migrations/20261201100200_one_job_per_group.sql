-- At most one pending or running replication job per protection group. A job sends the group's
-- dataset as it is when the job starts, so a second one queued behind it adds nothing but a
-- restore point, and inserting them in a loop would let count retention prune the history.

-- Jobs queued before this rule: keep the running one (or else the oldest pending one) of each
-- group and cancel the others, through the cancel trigger, so their operations end too.
with ranked as (
    select id, status, row_number() over (
               partition by protection_group_id
               order by (status = 'running') desc, created_at, id) as n
      from public.replication_jobs
     where status in ('pending', 'running')
)
update public.replication_jobs j
   set cancel_requested = true
  from ranked r
 where r.id = j.id and r.n > 1 and r.status = 'pending' and not j.cancel_requested;

update public.replication_jobs
   set error = 'cancelled when the rule "one pending or running replication job per group" was introduced'
 where status = 'cancelled' and error = 'cancelled before it started'
   and completed_at >= transaction_timestamp();

do $$
declare
    v_group text;
begin
    select g.name into v_group from public.replication_jobs j
      join public.protection_groups g on g.id = j.protection_group_id
     where j.status = 'running' group by g.name having count(*) > 1 limit 1;
    if found then
        raise exception 'protection group % has more than one running replication job', v_group
            using hint = 'wait until they finish (or cancel all but one), then apply the migrations again';
    end if;
end $$;

-- The guarantee, also against two inserts racing past the trigger below.
create unique index replication_jobs_one_active_per_group on public.replication_jobs (protection_group_id)
    where status in ('pending', 'running');

-- The message a person reads instead of the index's. It runs as the caller, so it names only
-- what the caller may read: someone who cannot see the group finds no job here and is then
-- refused by the insert policy (checked after BEFORE triggers).
create function zerfaux.replication_jobs_one_active() returns trigger
language plpgsql set search_path = zerfaux, public, pg_temp as $$
declare
    v_job uuid;
    v_status text;
    v_group text;
begin
    select j.id, j.status into v_job, v_status from public.replication_jobs j
     where j.protection_group_id = new.protection_group_id and j.status in ('pending', 'running')
     limit 1;
    if v_job is not null then
        select g.name into v_group from public.protection_groups g where g.id = new.protection_group_id;
        raise exception 'protection group % (%) already has a % replication job (%): one at a time per group',
                coalesce(v_group, '?'), new.protection_group_id, v_status, v_job
            using errcode = 'unique_violation',
                  constraint = 'replication_jobs_one_active_per_group',
                  hint = 'wait until that job ends, or cancel it (set its cancel_requested to true) and insert again';
    end if;
    return new;
end $$;

create trigger replication_jobs_one_active before insert on public.replication_jobs
    for each row execute function zerfaux.replication_jobs_one_active();

revoke execute on function zerfaux.replication_jobs_one_active() from public, anon, authenticated;
