-- replication_targets.placeholder_datastore: where DR shells keep their configuration files.
--
-- A DR shell's .vmx (and its nvram, logs) used to be written into dr_datastore. When that
-- datastore is the replica dataset itself, those writes change the replica, and the next
-- incremental `zfs receive` refuses the target (`written` > 0 since the last snapshot). From
-- now on the shell's own files go to the placeholder datastore, a DR datastore that no replica
-- backs; only the disks still point at dr_datastore, attached as they are (never created,
-- never written by Zerfaux).
--
-- Existing rows are left null on purpose. Zerfaux cannot tell from the database whether a
-- dr_datastore is the replica itself or a clone of one, so copying dr_datastore into the new
-- column could keep writing into a replica. With null, a DR shell that already exists is still
-- found by its mark and adopted where it is (never destroyed; the job's result names the
-- datastore holding its .vmx), and a shell that would have to be created fails permanently,
-- naming this column and what to set it to (docs/recovery.md, "Migrating an existing install").

alter table public.replication_targets
    add column placeholder_datastore text,
    add constraint replication_targets_placeholder_datastore_name check (
        char_length(placeholder_datastore) between 1 and 80 and placeholder_datastore !~ '[][\n\r]'),
    add constraint replication_targets_placeholder_is_not_the_dr_datastore check (
        placeholder_datastore <> dr_datastore);

comment on column public.replication_targets.placeholder_datastore is
    'a datastore at the DR vCenter, backed by no replica, for the configuration files of DR shell VMs; '
    'never the dr_datastore. Null: existing shells are adopted, new ones are refused';

-- Configuration, written by admins like the target's other columns (the policies of
-- 20261201100100_policies.sql keep the writes to global admins).
grant select (placeholder_datastore),
      insert (placeholder_datastore),
      update (placeholder_datastore)
    on public.replication_targets to authenticated;
