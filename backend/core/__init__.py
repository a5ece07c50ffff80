"""The bottom layer: the run-folder and artifact contracts, the one guard, and
their mechanisms (process records, atomic writes). Everything else calls these;
they import nothing above them."""
