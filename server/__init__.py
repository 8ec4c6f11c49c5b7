"""The parameter-server role: windows, update rules, phase schedule, control plane."""
