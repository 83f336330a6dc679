"""The Zerfaux listener: notices work in the control plane and runs it."""
