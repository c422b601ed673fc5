"""Engine build, run, parity, bench and the `omnimoe` command line."""
