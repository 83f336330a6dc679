-- RPO-driven protection (docs/rpo.md): the columns and tables later migrations of the same issue
-- fill in. A group with rpo_minutes set and not paused is replicated by itself
-- (zerfaux.schedule_due(), called by the sweep); every snapshot the target holds is a recovery
-- point; protection_status shows how far behind each group is.

alter table public.protection_groups
    add column paused boolean not null default false,
    add column replication_interval_minutes numeric
        constraint protection_groups_replication_interval_check
        check (replication_interval_minutes is null or replication_interval_minutes >= 0.1),
    add column next_replication_at timestamptz,
    add column retention_grid text,
    add column source_retention_grid text,
    add column state text not null default 'normal';

comment on column public.protection_groups.paused is
    'true: no scheduled replication (a job asked for by hand still runs)';
comment on column public.protection_groups.replication_interval_minutes is
    'minutes between scheduled replications; null = rpo_minutes / 2; at least 0.1';
comment on column public.protection_groups.next_replication_at is
    'when the schedule next starts a job (written by the engine; null = not scheduled)';
comment on column public.protection_groups.retention_grid is
    'target-side retention, zrepl grid form, e.g. 1x1h(keep=all) | 24x1h | 14x1d; null = retention_snapshots';
comment on column public.protection_groups.source_retention_grid is
    'source-side retention, same form as retention_grid; null = retention_snapshots';
comment on column public.protection_groups.state is
    'normal, or where a recovery left the group (the recovery issues add the other states)';

alter table public.replication_jobs
    add column origin text not null default 'request'
        constraint replication_jobs_origin_check check (origin in ('schedule', 'request'));
comment on column public.replication_jobs.origin is
    'schedule: inserted by zerfaux.schedule_due(); request: by a person or a program';

create table public.recovery_points (
    id                  uuid primary key default gen_random_uuid(),
    protection_group_id uuid not null references public.protection_groups (id) on delete cascade,
    snapshot_name       text not null,
    guid                text not null,          -- ZFS GUIDs exceed bigint
    created_at          timestamptz not null,   -- the snapshot's creation on the source
    replicated_at       timestamptz,
    replication_job_id  uuid references public.replication_jobs (id) on delete set null,
    on_source           boolean not null default true,
    on_target           boolean not null default true,
    bytes               bigint,                 -- the incremental's size
    tested_at           timestamptz,
    removed_at          timestamptz,            -- gone from both sides
    constraint recovery_points_group_guid_key unique (protection_group_id, guid)
);
create index recovery_points_group_created_idx
    on public.recovery_points (protection_group_id, created_at desc);
create index recovery_points_job_idx on public.recovery_points (replication_job_id);

create table public.rpo_events (
    id                  uuid primary key default gen_random_uuid(),
    protection_group_id uuid not null references public.protection_groups (id) on delete cascade,
    at                  timestamptz not null default now(),
    old_status          text,
    new_status          text not null,
    rpo_seconds         numeric,                -- the group's current RPO at that moment
    reason              text not null,          -- e.g. 'last job failed', 'listener down', 'paused'
    constraint rpo_events_status_check
        check (new_status in ('ok', 'at_risk', 'violated', 'unknown'))
);
create index rpo_events_group_at_idx on public.rpo_events (protection_group_id, at);

-- The status of each group, computed when read. security_invoker: a signed-in user sees only the
-- groups RLS lets it read.
create view public.protection_status with (security_invoker = true) as
select g.id as protection_group_id,
       g.name,
       g.rpo_minutes,
       rp.last_at as last_recovery_point_at,
       extract(epoch from now() - rp.last_at) as current_rpo_seconds,
       case
           when g.rpo_minutes is null or rp.last_at is null then 'unknown'
           when now() - rp.last_at >= g.rpo_minutes * interval '1 minute' then 'violated'
           when now() - rp.last_at >= g.rpo_minutes * interval '45 seconds' then 'at_risk'
           else 'ok'
       end as rpo_status,
       g.next_replication_at,
       j.status as last_job_status,
       j.error as last_error,
       g.paused
  from public.protection_groups g
  left join lateral (
      select max(p.created_at) as last_at from public.recovery_points p
       where p.protection_group_id = g.id and p.on_target) rp on true
  left join lateral (
      select r.status, r.error from public.replication_jobs r
       where r.protection_group_id = g.id
       order by r.created_at desc limit 1) j on true;

alter table public.recovery_points enable row level security;
alter table public.rpo_events enable row level security;
revoke all on public.recovery_points, public.rpo_events, public.protection_status
    from public, anon, authenticated, service_role;
grant all on public.recovery_points, public.rpo_events to service_role;
grant select on public.protection_status to service_role;
grant select on public.recovery_points, public.rpo_events, public.protection_status to authenticated;
grant select (paused, replication_interval_minutes, next_replication_at, retention_grid,
              source_retention_grid, state)
    on public.protection_groups to authenticated;
grant insert (paused, replication_interval_minutes, retention_grid, source_retention_grid),
      update (paused, replication_interval_minutes, retention_grid, source_retention_grid)
    on public.protection_groups to authenticated;

create policy viewer_read on public.recovery_points for select to authenticated
    using (protection_group_id in (select zerfaux.group_ids('viewer')));
create policy viewer_read on public.rpo_events for select to authenticated
    using (protection_group_id in (select zerfaux.group_ids('viewer')));
