"""vCenter backends on pyVmomi: inventory, Storage vMotion, DR shells."""
