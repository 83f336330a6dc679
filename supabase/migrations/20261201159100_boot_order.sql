-- Boot order of a protected VM at recovery (docs/recovery.md): read by the recovery runs that
-- come later; nothing uses them yet. Operators set them like the protected VM's two flags.
-- Each check constraint is named after its column and its range, so the error a refused
-- value gets (`violates check constraint "protected_vms_boot_priority_between_1_and_5"`) says both.

alter table public.protected_vms
    add column boot_priority integer not null default 3
        constraint protected_vms_boot_priority_between_1_and_5 check (boot_priority between 1 and 5),
    add column boot_delay_seconds integer not null default 0
        constraint protected_vms_boot_delay_seconds_at_least_0 check (boot_delay_seconds >= 0),
    add column tools_timeout_seconds integer not null default 300
        constraint protected_vms_tools_timeout_seconds_at_least_0 check (tools_timeout_seconds >= 0);

comment on column public.protected_vms.boot_priority is
    'boot_priority must be between 1 and 5: 1 boots first, the VMs of one priority start together';
comment on column public.protected_vms.boot_delay_seconds is
    'boot_delay_seconds must be 0 or more: the wait after this VM is ready before the next priority starts';
comment on column public.protected_vms.tools_timeout_seconds is
    'tools_timeout_seconds must be 0 or more: how long to wait for VMware Tools; 0 = do not wait';

grant insert (boot_priority, boot_delay_seconds, tools_timeout_seconds),
      update (boot_priority, boot_delay_seconds, tools_timeout_seconds)
    on public.protected_vms to authenticated;
