"""soniq_tvm.schedules: integer kernel families and their schedules per target."""
