-- Zerfaux control plane: the rows people and programs edit to ask for work (DESIGN §3).
-- Column names here are a contract; add columns in new migrations, never rename.


create table public.vcenters (
    id                uuid primary key default gen_random_uuid(),
    name              text not null unique,
    host              text not null,
    port              integer not null default 443 check (port between 1 and 65535),
    username          text not null default '',
    password_secret   text,               -- the NAME of a secret (DESIGN §7), never the password
    verify_tls        boolean not null default true,
    site              text not null default 'primary',
    sync_requested_at timestamptz,        -- set it to ask for an inventory sync
    last_synced_at    timestamptz,
    last_sync_error   text,
    created_at        timestamptz not null default now(),
    constraint vcenters_site_check check (site in ('primary', 'dr'))
);

create table public.vcenter_vms (
    id            uuid primary key default gen_random_uuid(),
    vcenter_id    uuid not null references public.vcenters (id) on delete cascade,
    moref         text not null,
    name          text not null,
    instance_uuid text,
    cluster       text,
    esx_host      text,
    power_state   text,
    datastore     text,                   -- where the VM's configuration lives
    datastores    jsonb not null default '[]',
    guest_os      text,
    guest_id      text,
    firmware      text,
    num_cpu       integer,
    memory_mb     integer,
    disks         jsonb not null default '[]',  -- [{file, capacity, datastore, controller, bus, unit}]
    networks      jsonb not null default '[]',
    synced_at     timestamptz,
    removed_at    timestamptz,            -- set when a sync no longer sees the VM
    constraint vcenter_vms_vcenter_moref_key unique (vcenter_id, moref)
);

create table public.vcenter_datastores (
    id             uuid primary key default gen_random_uuid(),
    vcenter_id     uuid not null references public.vcenters (id) on delete cascade,
    moref          text not null,
    name           text not null,
    type           text,
    capacity_bytes bigint,
    free_bytes     bigint,
    used_percent   numeric(5, 2),
    synced_at      timestamptz,
    removed_at     timestamptz,
    constraint vcenter_datastores_vcenter_moref_key unique (vcenter_id, moref)
);

create table public.replication_targets (
    id             uuid primary key default gen_random_uuid(),
    name           text not null unique,
    ssh_host       text not null,
    ssh_port       integer not null default 22 check (ssh_port between 1 and 65535),
    ssh_user       text not null default 'root',
    ssh_key_secret text,                  -- secret NAME; its value is an OpenSSH private key
    ssh_host_key   text,                  -- known_hosts line; required to connect
    target_root    text not null,         -- dataset under which replicas live
    dr_datastore   text,                  -- datastore at the DR vCenter backed by target_root
    transport      text not null default 'ssh',
    max_concurrent integer not null default 1 check (max_concurrent >= 1),
    created_at     timestamptz not null default now(),
    constraint replication_targets_transport_check check (transport in ('ssh', 'paramiko', 'syncoid'))
);

create table public.protection_groups (
    id                    uuid primary key default gen_random_uuid(),
    name                  text not null unique,
    source_vcenter_id     uuid references public.vcenters (id) on delete restrict,
    dr_vcenter_id         uuid references public.vcenters (id) on delete restrict,
    replication_target_id uuid references public.replication_targets (id) on delete restrict,
    source_dataset        text,           -- ZFS dataset holding the protected VMs' files
    protection_datastore  text,           -- datastore at the source vCenter backed by source_dataset
    rpo_minutes           integer check (rpo_minutes is null or rpo_minutes > 0),
    retention_snapshots   integer not null default 10 check (retention_snapshots >= 1),
    source_ssh_host       text,           -- null: the dataset is on the listener's machine
    source_ssh_port       integer not null default 22 check (source_ssh_port between 1 and 65535),
    source_ssh_user       text,
    source_ssh_key_secret text,
    source_ssh_host_key   text,
    dr_cluster            text,           -- DR placement; null picks the first cluster
    dr_resource_pool      text,
    dr_folder             text,
    dr_network            text,
    dr_vm_suffix          text not null default '-dr',
    created_at            timestamptz not null default now()
);

create table public.protected_vms (
    id                    uuid primary key default gen_random_uuid(),
    protection_group_id   uuid not null references public.protection_groups (id) on delete cascade,
    vm_id                 uuid references public.vcenter_vms (id) on delete set null,
    needs_storage_vmotion boolean not null default false,
    needs_dr_shell        boolean not null default false,
    dr_shell_vm_created   boolean not null default false,
    dr_shell_vm_id        text,
    last_error            text,
    created_at            timestamptz not null default now(),
    updated_at            timestamptz not null default now(),
    constraint protected_vms_group_vm_key unique (protection_group_id, vm_id)
);

create table public.replication_jobs (
    id                  uuid primary key default gen_random_uuid(),
    protection_group_id uuid not null references public.protection_groups (id) on delete cascade,
    source_dataset      text,             -- filled from the group when left null
    target_dataset      text,             -- filled from the target when left null
    snapshot_name       text,
    base_snapshot       text,
    status              text not null default 'pending',
    cancel_requested    boolean not null default false,
    bytes_transferred   bigint not null default 0,
    bytes_estimated     bigint,
    attempts            integer not null default 0,
    error               text,
    notes               text,             -- what this ZFS could not do (no resume, no holds, ...)
    created_at          timestamptz not null default now(),
    started_at          timestamptz,
    completed_at        timestamptz,
    constraint replication_jobs_status_check
        check (status in ('pending', 'running', 'completed', 'failed', 'cancelled'))
);

create index replication_jobs_group_created on public.replication_jobs (protection_group_id, created_at desc);
create index vcenter_vms_vcenter on public.vcenter_vms (vcenter_id) where removed_at is null;
create index protected_vms_vm on public.protected_vms (vm_id);

-- A job left without datasets takes them from its group and target, so a frontend may insert
-- only protection_group_id.
create function public.replication_jobs_fill_datasets() returns trigger
language plpgsql security definer set search_path = public, pg_temp as $$
declare
    g public.protection_groups;
    t public.replication_targets;
begin
    select * into g from public.protection_groups where id = new.protection_group_id;
    if new.source_dataset is null then
        new.source_dataset := g.source_dataset;
    end if;
    if new.target_dataset is null and g.replication_target_id is not null then
        select * into t from public.replication_targets where id = g.replication_target_id;
        if new.source_dataset is not null then
            new.target_dataset := t.target_root || '/' || regexp_replace(new.source_dataset, '^.*/', '');
        end if;
    end if;
    new.status := 'pending';
    new.bytes_transferred := 0;
    new.attempts := 0;
    return new;
end $$;

create trigger replication_jobs_fill_datasets before insert on public.replication_jobs
    for each row execute function public.replication_jobs_fill_datasets();
