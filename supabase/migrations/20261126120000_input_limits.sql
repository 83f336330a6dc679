-- Bounds on what a row may hold, so an oversized or malformed value is refused by the database
-- with the constraint's name instead of reaching a shell, a SOAP call or a log line.
-- ZFS names are at most 255 characters; vSphere object names at most 80; hosts at most 253.

alter table public.vcenters
    add constraint vcenters_name_length check (char_length(name) between 1 and 255),
    add constraint vcenters_host_length check (char_length(host) between 1 and 253),
    add constraint vcenters_username_length check (char_length(username) <= 255),
    add constraint vcenters_password_secret_length check (char_length(password_secret) <= 128);

alter table public.replication_targets
    add constraint replication_targets_name_length check (char_length(name) between 1 and 255),
    add constraint replication_targets_ssh_host_length check (char_length(ssh_host) between 1 and 253),
    add constraint replication_targets_ssh_user_length check (char_length(ssh_user) between 1 and 64),
    add constraint replication_targets_ssh_key_secret_length check (char_length(ssh_key_secret) <= 128),
    add constraint replication_targets_ssh_host_key_length check (char_length(ssh_host_key) <= 16384),
    add constraint replication_targets_target_root_length check (char_length(target_root) between 1 and 200),
    add constraint replication_targets_dr_datastore_name check (
        char_length(dr_datastore) <= 80 and dr_datastore !~ '[][\n\r]');

alter table public.protection_groups
    add constraint protection_groups_name_length check (char_length(name) between 1 and 255),
    add constraint protection_groups_source_dataset_length check (char_length(source_dataset) between 1 and 255),
    add constraint protection_groups_protection_datastore_name check (
        char_length(protection_datastore) <= 80 and protection_datastore !~ '[][\n\r]'),
    add constraint protection_groups_source_ssh_host_length check (char_length(source_ssh_host) <= 253),
    add constraint protection_groups_dr_vm_suffix_length check (char_length(dr_vm_suffix) <= 32);

alter table public.replication_jobs
    add constraint replication_jobs_source_dataset_length check (char_length(source_dataset) <= 255),
    add constraint replication_jobs_target_dataset_length check (char_length(target_dataset) <= 255);
