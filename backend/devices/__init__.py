"""The devices of this machine and who holds them: ``inventory`` (what there
is, and the one seam tests may replace), ``leases`` (a lock per device that
dies with its process), ``queue`` (runs waiting for their devices, kept in the
work directory)."""
